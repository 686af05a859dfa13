// replay.cpp: timed trace replay and the native alloc/free loops for benchmarks.
#include "replay.h"

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <random>
#include <thread>
#include <type_traits>

#include "errors.h"

namespace mtia {

uint64_t thread_cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

namespace {
uint64_t wall_ns() {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count());
}
}  // namespace

ReplayResult replay_trace(Allocator& a, int device, const std::vector<ReplayEvent>& events, uint32_t slots,
                          const std::vector<StreamId>& streams, bool latency, size_t prefix) {
  ReplayResult res;
  DeviceAllocator& dev = a.device(device);
  std::vector<uintptr_t> ptrs(slots, 0);
  // Plain pointers, as the peer harness's loop has: the vectors' members would otherwise be
  // reloaded after every call into the allocator.
  const ReplayEvent* const ev = events.data();
  uintptr_t* const live = ptrs.data();
  const StreamId* const stream_of = streams.data();
  // One event: true if it ran (a free of a slot that is not live is skipped).
  auto apply = [&](size_t i) {
    const ReplayEvent& e = ev[i];
    uintptr_t& p = live[e.slot];
    if (e.size) {
      try {
        p = a.malloc(device, e.size, stream_of[e.stream]);
      } catch (const OutOfMemory&) {
        p = 0;
        if (res.first_failure < 0) res.first_failure = int64_t(i);
      }
      return true;
    }
    if (!p) return false;
    if (!dev.free(p, kNoFrames)) a.free(p);  // the device that made it
    p = 0;
    return true;
  };
  prefix = std::min(prefix, events.size());
  for (size_t i = 0; i < prefix; ++i) apply(i);  // untimed: the starting state
  dev.reset_peak_stats();
  dev.reset_accumulated_stats();
  if (latency) {
    res.alloc_latency_ns.reserve(events.size() - prefix);
    res.free_latency_ns.reserve(events.size() - prefix);
  }
  // Two copies of the timed loop, so the common one has no latency bookkeeping at all.
  const size_t n = events.size();
  auto timed = [&](auto with_latency) {
    for (size_t i = prefix; i < n; ++i) {
      if constexpr (decltype(with_latency)::value) {
        const uint64_t l0 = wall_ns();
        if (!apply(i)) {
          ++res.skipped;
          continue;
        }
        (ev[i].size ? res.alloc_latency_ns : res.free_latency_ns).push_back(uint32_t(wall_ns() - l0));
      } else if (!apply(i)) {
        ++res.skipped;
      }
    }
  };
  const uint64_t t0 = wall_ns(), c0 = thread_cpu_ns();
  if (latency) timed(std::true_type{});
  else timed(std::false_type{});
  res.cpu_ns = thread_cpu_ns() - c0;
  res.total_ns = wall_ns() - t0;
  res.events = events.size() - prefix;
  for (uintptr_t p : ptrs)
    if (p) {
      a.free(p);
      ++res.leftover_freed;
    }
  DeviceStats st = dev.stats();
  res.peak_requested = st.requested_bytes[kAggregate].peak;
  res.peak_allocated = st.allocated_bytes[kAggregate].peak;
  res.peak_reserved = st.reserved_bytes[kAggregate].peak;
  res.num_device_alloc = st.num_device_alloc;
  res.num_device_free = st.num_device_free;
  res.num_alloc_retries = st.num_alloc_retries;
  res.num_ooms = st.num_ooms;
  return res;
}

std::pair<uint64_t, uint64_t> native_pair_loop(Allocator& a, int device, size_t size, uint64_t n) {
  a.free(a.malloc(device, size, 0));  // warm: the block is cached from here on
  const uint64_t t0 = wall_ns(), c0 = thread_cpu_ns();
  for (uint64_t i = 0; i < n; ++i) a.free(a.malloc(device, size, 0));
  return {wall_ns() - t0, thread_cpu_ns() - c0};
}

std::pair<uint64_t, uint64_t> glibc_pair_loop(size_t size, uint64_t n) {
  const uint64_t t0 = wall_ns(), c0 = thread_cpu_ns();
  for (uint64_t i = 0; i < n; ++i) {
    void* volatile p = std::malloc(size);
    std::free(p);
  }
  return {wall_ns() - t0, thread_cpu_ns() - c0};
}

namespace {
// Runs body(t) on `threads` threads at once; returns the wall ns of the slowest one.
template <class Body>
uint64_t slowest_thread_ns(int threads, Body body) {
  std::vector<std::thread> pool;
  std::vector<uint64_t> wall(size_t(threads), 0);
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      const uint64_t t0 = wall_ns();
      body(t);
      wall[size_t(t)] = wall_ns() - t0;
    });
  for (auto& th : pool) th.join();
  return *std::max_element(wall.begin(), wall.end());
}
}  // namespace

uint64_t threaded_pair_loop(Allocator& a, int threads, size_t size, uint64_t n) {
  return slowest_thread_ns(threads, [&](int t) { native_pair_loop(a, t % a.device_count(), size, n); });
}

namespace {
__attribute__((noinline)) uint64_t busy_work(uint64_t n) {
  uint64_t a = 1, b = 2, c = 3, d = 4, e = 5, f = 6;
  for (uint64_t i = 0; i < n; ++i) {
    a += i;
    b ^= a;
    c += b >> 1;
    d += i * 3;
    e ^= d;
    f += e + c;
    asm volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d), "+r"(e), "+r"(f));  // keep every chain
  }
  return a + b + c + d + e + f;
}
}  // namespace

uint64_t threaded_compute_loop(int threads, uint64_t n) {
  return slowest_thread_ns(threads, [&](int) { busy_work(n); });
}

double cached_blocks_pair_ns(Allocator& a, int device, size_t cached, uint64_t pairs, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> size_dist(1, 16);  // x 512 B
  std::vector<uintptr_t> live;
  live.reserve(cached * 2 + 1);
  for (size_t i = 0; i < cached * 2; ++i) live.push_back(a.malloc(device, size_dist(rng) * 512, 0));
  for (size_t i = 0; i < live.size(); i += 2) {  // every other block: neighbours stay allocated
    a.free(live[i]);
    live[i] = 0;
  }
  std::vector<size_t> sizes(4096);
  for (auto& s : sizes) s = size_dist(rng) * 512;
  // The pairs run in 10 timed slices; the fastest slice is the figure (a slice that a
  // burst of host noise slowed down says nothing about the allocator).
  constexpr uint64_t kSlices = 10;
  const uint64_t per_slice = std::max<uint64_t>(pairs / kSlices, 1);
  double best = 0;
  for (uint64_t slice = 0, i = 0; slice < kSlices; ++slice) {
    const uint64_t c0 = thread_cpu_ns();
    for (uint64_t end = i + per_slice; i < end; ++i) a.free(a.malloc(device, sizes[i & 4095], 0));
    const double ns = double(thread_cpu_ns() - c0) / double(per_slice);
    best = slice == 0 ? ns : std::min(best, ns);
  }
  for (uintptr_t p : live)
    if (p) a.free(p);
  return best;
}

}  // namespace mtia
