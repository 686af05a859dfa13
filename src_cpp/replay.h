// replay.h: native replay of an allocation trace (no Python per event), the engine
// behind `python -m mtia_alloc replay` and the trace benchmarks. Mirrors the peer
// harness: the trace is mapped to dense slots before the clock starts, and the timed
// loop does only malloc/free.
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

// The cached-hit loop: `n` times malloc(size) + free, on the default stream.
// Returns {wall ns, thread CPU ns} for the whole loop.
std::pair<uint64_t, uint64_t> native_pair_loop(Allocator& a, int device, size_t size, uint64_t n);
// The same loop with glibc malloc/free, the floor for a general-purpose allocator.
std::pair<uint64_t, uint64_t> glibc_pair_loop(size_t size, uint64_t n);

// Throughput scaling: `threads` threads, thread t on device t % devices, each doing `n`
// cached malloc+free pairs of `size`. Returns the wall time of the slowest thread (ns).
uint64_t threaded_pair_loop(Allocator& a, int threads, size_t size, uint64_t n);
// The yardstick for that scaling: the same threads doing `n` rounds each of busy integer
// work (several independent chains, so it keeps a core as full as the allocator does)
// with no shared data. A VM's two vCPUs may sit on one physical core, and then this
// scales below 2x too. Returns the wall time of the slowest thread (ns).
uint64_t threaded_compute_loop(int threads, uint64_t n);

// Lookup cost against cache size: fills the cache with `cached` free blocks (sizes
// 512 B..8 KiB kept apart by live neighbours), then times `pairs` malloc+free pairs of
// random sizes from the same range. Returns CPU ns per pair of the fastest of 10
// slices. Frees everything after.
double cached_blocks_pair_ns(Allocator& a, int device, size_t cached, uint64_t pairs, uint64_t seed);

uint64_t thread_cpu_ns();

}  // namespace mtia
