#!/usr/bin/env bash
# Instructions per warm op, ours and PyTorch's, on one trace: a noise-free companion to
# `python -m mtia_alloc bench` (whose CPU-time ratios swing with the host on small VMs).
# Both sides run under valgrind's callgrind: 3 passes minus 1 pass, divided by 2 x events,
# so set-up and the cold pass cancel out. Ours counts only mtia::replay_trace (the native
# replay loop and the allocator); the peer counts its whole harness process, whose parsing
# and setup also cancel out. Needs valgrind and the peer harness
# (shared/peers/torch_caching_allocator/setup.sh BUILD_DIR).
#
# usage: bench/instructions_per_op.sh TRACE.csv[.gz] PEER_BUILD_DIR [MTIA_ALLOC_CONF]
set -euo pipefail
trace=$1; peer=$2; conf=${3:-}
py=$(python -c "import sys; print(sys.executable)")
events=$(( $( (zcat -f "$trace") | wc -l) - 1 ))
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
total() { callgrind_annotate "$1" | awk '/PROGRAM TOTALS/ && !seen {gsub(",", "", $1); print $1; seen = 1}'; }
for passes in 1 3; do
  MTIA_ALLOC_CONF=$conf valgrind --tool=callgrind --toggle-collect='mtia::replay_trace*' \
    --callgrind-out-file="$tmp/ours.$passes" "$py" -m mtia_alloc replay "$trace" --repeat $passes --memory 24GiB \
    >/dev/null 2>&1
  PYTORCH_CUDA_ALLOC_CONF=$conf FAKE_CUDA_MEM_BYTES=$((24 << 30)) valgrind --tool=callgrind \
    --callgrind-out-file="$tmp/peer.$passes" "$peer/bin/harness" trace "$trace" --repeat $passes >/dev/null 2>&1
done
ours=$(( ($(total "$tmp/ours.3") - $(total "$tmp/ours.1")) / (2 * events) ))
theirs=$(( ($(total "$tmp/peer.3") - $(total "$tmp/peer.1")) / (2 * events) ))
echo "$(basename "$trace") ${conf:-default}: mtia $ours instructions/op, torch $theirs, ratio $(python -c "print(round($theirs / $ours, 1))")x"
