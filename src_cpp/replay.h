// replay.h: native replay of an allocation trace (no Python per event), the engine
// behind `python -m mtia_alloc replay` and the trace benchmarks. Mirrors the peer
// harness: the trace is mapped to dense slots before the clock starts, and the timed
// loop does only malloc/free. Relies on allocator.h. (The other native benchmark loops
// are in bench_loops.h.)
#pragma once
#include <cstdint>
#include <vector>

#include "allocator.h"

namespace mtia {

struct ReplayEvent {
  uint64_t size;    // bytes; 0 marks a free
  uint32_t slot;    // dense id of the allocation
  uint32_t stream;  // index into the stream list given to replay()
};

struct ReplayResult {
  uint64_t events = 0, total_ns = 0, cpu_ns = 0;
  int64_t peak_requested = 0, peak_allocated = 0, peak_reserved = 0;
  int64_t num_device_alloc = 0, num_device_free = 0, num_alloc_retries = 0, num_ooms = 0;
  int64_t first_failure = -1;  // index of the first event that raised OOM
  uint64_t skipped = 0;        // frees of slots that are not live (e.g. after an OOM)
  uint64_t leftover_freed = 0; // live at the end, freed untimed
  std::vector<uint32_t> alloc_latency_ns, free_latency_ns;  // only when asked
};

// Replays `events` once on `device`. Allocations that fail with OOM are counted and
// skipped, as the peer harness does. The first `prefix` events (a snapshot's rebuilt
// starting state) run untimed; then peaks and accumulated stats are reset and the clock
// starts: events, times, latencies and counters cover events[prefix:] only, the peaks
// start from the state the prefix built. first_failure indexes `events` (prefix included).
ReplayResult replay_trace(Allocator& a, int device, const std::vector<ReplayEvent>& events, uint32_t slots,
                          const std::vector<StreamId>& streams, bool latency, size_t prefix = 0);

// replay_trace trusts its arguments (it runs without the GIL); these check them first.
// Throws InvalidArgument: `device` out of range, an event whose slot is >= `slots` or
// whose stream index is >= streams.size(), or an unknown stream id.
void check_replay_args(Allocator& a, int device, const std::vector<ReplayEvent>& events, uint32_t slots,
                       const std::vector<StreamId>& streams);
// check_replay_args, then replay_trace (what the binding calls; replay_trace alone is what
// bench/instructions_per_op.sh counts).
ReplayResult replay_checked(Allocator& a, int device, const std::vector<ReplayEvent>& events, uint32_t slots,
                            const std::vector<StreamId>& streams, bool latency, size_t prefix = 0);

}  // namespace mtia
