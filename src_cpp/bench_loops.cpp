// bench_loops.cpp: the native benchmark loops of bench_loops.h and their checked entry
// points. Relies on allocator.h (the loops call Allocator::malloc/free, the fast path).
#include "bench_loops.h"

#include <time.h>

#include <algorithm>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "errors.h"

namespace mtia {

uint64_t thread_cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
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


// ---------------------------------------------------------------- checked entry points

void check_bench_device(const Allocator& a, int device) {
  if (device < 0 || device >= a.device_count())
    throw InvalidArgument("device must be in [0, " + std::to_string(a.device_count()) + "), got " +
                          std::to_string(device));
}

namespace {
void check_positive(bool ok, const char* what) {
  if (!ok) throw InvalidArgument(what);
}
}  // namespace

std::pair<double, double> native_pair_ns(Allocator& a, int device, size_t size, uint64_t n) {
  check_bench_device(a, device);
  check_positive(n != 0, "n must be positive");
  const auto [wall, cpu] = native_pair_loop(a, device, size, n);
  return {double(wall) / double(n), double(cpu) / double(n)};
}

std::pair<double, double> glibc_pair_ns(size_t size, uint64_t n) {
  check_positive(n != 0, "n must be positive");
  const auto [wall, cpu] = glibc_pair_loop(size, n);
  return {double(wall) / double(n), double(cpu) / double(n)};
}

double threaded_pairs_per_second(Allocator& a, int threads, size_t size, uint64_t n) {
  check_positive(threads >= 1 && n != 0, "threads and n must be positive");
  const uint64_t wall = threaded_pair_loop(a, threads, size, n);
  return double(uint64_t(threads) * n) / (double(wall) / 1e9);
}

double threaded_compute_per_second(int threads, uint64_t n) {
  check_positive(threads >= 1 && n != 0, "threads and n must be positive");
  const uint64_t wall = threaded_compute_loop(threads, n);
  return double(uint64_t(threads) * n) / (double(wall) / 1e9);
}

double cached_blocks_pair_checked(Allocator& a, int device, size_t cached, uint64_t pairs, uint64_t seed) {
  check_bench_device(a, device);
  check_positive(pairs != 0, "pairs must be positive");
  return cached_blocks_pair_ns(a, device, cached, pairs, seed);
}

}  // namespace mtia
