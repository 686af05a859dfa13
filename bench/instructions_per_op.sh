#!/usr/bin/env bash
# Instructions per warm op, ours and PyTorch's, over a set of traces: a noise-free
# companion to `python -m mtia_alloc bench` (whose CPU-time ratios swing with the host on
# small VMs). Both sides run under valgrind's callgrind, once with 1 pass and once with 3
# passes over the trace: (3 passes - 1 pass) / (2 x events), so set-up and the cold pass
# cancel out. Ours counts only mtia::replay_trace* (the native replay loop and the
# allocator); the peer counts its whole harness process, whose parsing and set-up cancel
# out. Both devices have 20 GiB (under valgrind our emulator cannot reserve the address
# space of bigger ones with expandable segments; the traces peak at 17.3 GiB).
#
# usage: bench/instructions_per_op.sh [--peer DIR] [--conf CONF] [TRACE.csv[.gz] ...]
#   TRACE     default: the traces shipped with mtia_alloc (mtia_alloc/tools/traces)
#   --peer    the peer build (python -m mtia_alloc peer build DIR); default: $MTIA_TORCH_PEER,
#             else the default folder of `peer build`
#   --conf    allocator settings for both sides, e.g. expandable_segments:True
#             (default: the default configuration)
# Needs valgrind. Prints one table row per trace: trace | mtia instr/op | torch instr/op | ratio.
set -euo pipefail
peer=${MTIA_TORCH_PEER:-}
conf=
traces=()
while (($#)); do
  case $1 in
    --peer) peer=$2; shift 2 ;;
    --conf) conf=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "instructions_per_op.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) traces+=("$1"); shift ;;
  esac
done
py=$(python -c "import sys; print(sys.executable)")
if [[ -z $peer ]]; then
  peer=$("$py" -c "from mtia_alloc.tools.peer_build import default_build_dir; print(default_build_dir())")
fi
if [[ ! -x $peer/bin/harness ]]; then
  echo "instructions_per_op.sh: no peer harness at $peer/bin/harness (python -m mtia_alloc peer build DIR, then --peer DIR)" >&2
  exit 2
fi
command -v valgrind >/dev/null || { echo "instructions_per_op.sh: valgrind not found" >&2; exit 2; }
if ((${#traces[@]} == 0)); then
  shipped=$("$py" -c "from mtia_alloc.tools.shipped_traces import SHIPPED_DIR; print(SHIPPED_DIR)")
  traces=("$shipped"/*.csv.gz)
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the instructions a callgrind output file counted
total() { awk '/^totals:/ {print $2; found = 1} END {if (!found) exit 1}' "$1" 2>/dev/null ||
          awk '/^summary:/ {print $2}' "$1"; }

printf '%-32s %14s %15s %7s   (%s)\n' "trace" "mtia instr/op" "torch instr/op" "ratio" "${conf:-default config}"
for trace in "${traces[@]}"; do
  name=$(basename "$trace"); name=${name%.gz}; name=${name%.csv}
  events=$( (zcat -f "$trace") | grep -c '^[af],')
  pids=()
  for passes in 1 3; do  # the four runs side by side: instruction counts do not depend on scheduling
    MTIA_ALLOC_CONF=$conf OPENBLAS_NUM_THREADS=1 valgrind --tool=callgrind --toggle-collect='mtia::replay_trace*' \
      --callgrind-out-file="$tmp/ours.$passes" "$py" -m mtia_alloc replay "$trace" --repeat $passes \
      --memory 20GiB >/dev/null 2>"$tmp/ours.$passes.log" &
    pids+=($!)
    PYTORCH_CUDA_ALLOC_CONF=$conf FAKE_CUDA_MEM_BYTES=20G valgrind --tool=callgrind \
      --callgrind-out-file="$tmp/peer.$passes" "$peer/bin/harness" trace "$trace" --repeat $passes \
      >/dev/null 2>"$tmp/peer.$passes.log" &
    pids+=($!)
  done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  if ((failed)); then
    echo "instructions_per_op.sh: a run failed on $trace (logs: $(tail -n 3 "$tmp"/*.log | tr '\n' ' '))" >&2
    exit 1
  fi
  # one decimal, and the ratio of the unrounded figures: a bar of 10x must hold exactly
  "$py" - "$name" "$events" "$(total "$tmp/ours.1")" "$(total "$tmp/ours.3")" \
    "$(total "$tmp/peer.1")" "$(total "$tmp/peer.3")" <<'PY'
import sys
name, events, o1, o3, p1, p3 = sys.argv[1], *map(int, sys.argv[2:])
ours, theirs = (o3 - o1) / (2 * events), (p3 - p1) / (2 * events)
ratio = f"{theirs / ours:.2f}x" if ours > 0 else "-"
print(f"{name:<32} {ours:14.1f} {theirs:15.1f} {ratio:>7}")
PY
done
