// bench_loops.h: the native benchmark loops behind `python -m mtia_alloc bench` and
// bench/ (the cached malloc+free pair, glibc's, threads, cache size), the clocks they and
// replay.h time with, and the checked entry points the binding forwards to. Relies on
// allocator.h.
#pragma once
#include <chrono>
#include <cstdint>
#include <utility>

#include "allocator.h"

namespace mtia {

uint64_t thread_cpu_ns();  // CPU time of the calling thread
inline uint64_t wall_ns() {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count());
}

// --- the loops; they run without the GIL and trust their arguments ---

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

// --- checked entry points (the binding's): InvalidArgument before anything runs ---

// Throws InvalidArgument("device must be in [0, N), got D") unless 0 <= device < N.
void check_bench_device(const Allocator& a, int device);
// (wall ns, CPU ns) per pair of native_pair_loop / glibc_pair_loop; n > 0.
std::pair<double, double> native_pair_ns(Allocator& a, int device, size_t size, uint64_t n);
std::pair<double, double> glibc_pair_ns(size_t size, uint64_t n);
// Pairs per second of threaded_pair_loop, rounds per second of threaded_compute_loop,
// both summed over the threads; threads > 0, n > 0.
double threaded_pairs_per_second(Allocator& a, int threads, size_t size, uint64_t n);
double threaded_compute_per_second(int threads, uint64_t n);
// cached_blocks_pair_ns on a checked device; pairs > 0.
double cached_blocks_pair_checked(Allocator& a, int device, size_t cached, uint64_t pairs, uint64_t seed);

}  // namespace mtia
