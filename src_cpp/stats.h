// stats.h: PyTorch's allocator statistics (allocator_core.md §7).
// Invariants (checked by DeviceAllocator::check_stats, device_allocator_stats.cpp):
//   for every StatArray s and field f: s[ALL].f == s[SMALL].f + s[LARGE].f
//   current == current_at_reset + allocated - freed (freed is derived from it)
//   active(_bytes) == allocation(_bytes) + frees waiting for events (derived from it)
// Relies on: nothing.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>

namespace mtia {

struct Stat {
  int64_t current = 0, peak = 0, allocated = 0, freed = 0;
  int64_t current_at_reset = 0;  // current when the accumulated counts were last reset
  void increase(int64_t n) {
    current += n;
    allocated += n;
    if (__builtin_expect(current > peak, 0)) peak = current;  // predicted: a trace's peak is rare news
  }
  // `freed` is not counted on the hot path: fill_freed() derives it from
  // current == current_at_reset + allocated - freed.
  void decrease(int64_t n) { current -= n; }
  void fill_freed() { freed = current_at_reset + allocated - current; }
  void reset_peak() { peak = current; }
  void reset_accumulated() {
    allocated = freed = 0;
    current_at_reset = current;
  }
};

enum StatType { kAggregate = 0, kSmallPool = 1, kLargePool = 2, kNumStatTypes = 3 };
using StatArray = std::array<Stat, kNumStatTypes>;

// current of small + large: the aggregate's current, which the hot path does not keep.
inline int64_t both_kinds_current(const StatArray& s) { return s[kSmallPool].current + s[kLargePool].current; }

// Adds n to one pool kind's stat. On the hot path the aggregate keeps only its peak
// (of small + large current); its current, allocated and freed are the sums of the two
// kinds and are filled in by DeviceStats::finalize() when stats are read.
__attribute__((always_inline)) inline void stat_add(StatArray& s, bool small, int64_t n) {
  s[small ? kSmallPool : kLargePool].increase(n);
  const int64_t all = both_kinds_current(s);
  if (__builtin_expect(all > s[kAggregate].peak, 0)) s[kAggregate].peak = all;
}
__attribute__((always_inline)) inline void stat_sub(StatArray& s, bool small, int64_t n) {
  s[small ? kSmallPool : kLargePool].decrease(n);
}

// Blocks the user freed that still wait for events (record_stream), per pool kind.
// Active memory is allocated memory plus these, so the hot path never counts `active`:
// DeviceStats::derive_active() rebuilds it when stats are read. Only its peak needs care,
// and only while something is pending (see DeviceAllocator::note_active_peaks).
struct PendingFrees {
  int64_t count[kNumStatTypes] = {}, bytes[kNumStatTypes] = {};  // [kAggregate] = both kinds
  void add(bool small, int64_t size, int64_t sign) {
    for (int k : {int(kAggregate), small ? int(kSmallPool) : int(kLargePool)}) {
      count[k] += sign;
      bytes[k] += sign * size;
    }
  }
};

struct DeviceStats {
  StatArray allocation, segment, active, inactive_split;
  StatArray allocated_bytes, reserved_bytes, active_bytes, inactive_split_bytes, requested_bytes;
  int64_t num_alloc_retries = 0, num_ooms = 0, num_sync_all_streams = 0;
  int64_t num_device_alloc = 0, num_device_free = 0;
  Stat oversize_allocations, oversize_segments;
  int64_t max_split_size = -1;

  template <class F>
  void for_each_array(F f) {
    f(allocation); f(segment); f(active); f(inactive_split); f(allocated_bytes);
    f(reserved_bytes); f(active_bytes); f(inactive_split_bytes); f(requested_bytes);
  }
  // Rebuilds active and active_bytes from allocation(_bytes) and the pending frees. Their
  // stored peak and current_at_reset are the only fields kept between calls: active only
  // grows when allocation grows, by the same amount, so its cumulative count equals the
  // allocation's, and its peak is the larger of the stored peak (raised by mallocs made
  // while frees were pending) and the allocation's peak (active == allocation otherwise).
  void derive_active(const PendingFrees& pending) {
    auto derive = [&](StatArray& active, const StatArray& alloc, const int64_t* extra) {
      for (int k : {kSmallPool, kLargePool}) {
        active[k].current = alloc[k].current + extra[k];
        active[k].allocated = alloc[k].allocated;
        active[k].peak = std::max(active[k].peak, alloc[k].peak);
      }
      active[kAggregate].peak = std::max(active[kAggregate].peak, alloc[kAggregate].peak);
    };
    derive(active, allocation, pending.count);
    derive(active_bytes, allocated_bytes, pending.bytes);
  }
  // Fills every `freed` and the aggregate's current/allocated/freed (see stat_add).
  // Call on a copy before reading.
  void finalize() {
    for_each_array([](StatArray& a) {
      a[kSmallPool].fill_freed();
      a[kLargePool].fill_freed();
      a[kAggregate].current = both_kinds_current(a);
      a[kAggregate].allocated = a[kSmallPool].allocated + a[kLargePool].allocated;
      a[kAggregate].freed = a[kSmallPool].freed + a[kLargePool].freed;
    });
    oversize_allocations.fill_freed();
    oversize_segments.fill_freed();
  }
  void reset_peak() {
    for_each_array([](StatArray& a) {
      a[kAggregate].current = both_kinds_current(a);
      for (auto& s : a) s.reset_peak();
    });
    oversize_allocations.reset_peak();
    oversize_segments.reset_peak();
  }
  void reset_accumulated() {
    for_each_array([](StatArray& a) { for (auto& s : a) s.reset_accumulated(); });
    oversize_allocations.reset_accumulated();
    oversize_segments.reset_accumulated();
    num_alloc_retries = num_ooms = num_sync_all_streams = num_device_alloc = num_device_free = 0;
  }
};

}  // namespace mtia
