// device_allocator_stats.cpp: limits and statistics (allocator_core.md §4.6, §7): the
// memory fraction, the out-of-memory error and its message, reading and resetting the
// stats, the largest free blocks, and the checker that recounts every stat from the
// segments.
//
// Relies on: stats.h (the counters, kept up to date by the hot path in
// device_allocator.cpp), format_size (size_policy.h) and record_trace
// (device_allocator_history.cpp, for the OOM entry).
#include <algorithm>
#include <sstream>
#include <string>

#include "device_allocator.h"
#include "device_allocator_internal.h"
#include "errors.h"
#include "size_policy.h"

namespace mtia {

// ---------------------------------------------------------------- OOM (§4.6)

void DeviceAllocator::raise_oom(Lock& lock, const Request& r) {
  DeviceMemory& mem = emulator_->device(device_).memory();
  const size_t total = mem.capacity(), device_free = total - mem.used();
  stats_.num_ooms += 1;
  if (history_on_) {
    record_trace(TraceAction::kOom, device_free, r.size, r.stream,
                 pool_id_of(r.pool), *r.frames);
  }
  const int64_t A = both_kinds_current(stats_.allocated_bytes);
  const int64_t R = both_kinds_current(stats_.reserved_bytes);
  int64_t P = 0;
  for (auto& [id, p] : pools_)
    for (BlockPool* bp : {&p->small_blocks, &p->large_blocks})
      for (auto& [s, idx] : bp->by_stream) idx->for_each([&](Block* b) { P += int64_t(b->size); });
  std::ostringstream msg;
  msg << "MTIA out of memory. Tried to allocate " << format_size(r.alloc_size) << ". Device " << device_
      << " has a total capacity of " << format_size(total) << " of which " << format_size(device_free)
      << " is free. ";
  if (fraction_limit_) msg << format_size(allowed_memory_maximum_) << " allowed; ";
  msg << "Of the allocated memory " << format_size(uint64_t(A + P)) << " is allocated by PyTorch, ";
  if (P > 0) msg << "with " << format_size(uint64_t(P)) << " allocated in private pools (e.g., MTIA Graphs), ";
  msg << "and " << format_size(uint64_t(std::max<int64_t>(0, R - A - P)))
      << " is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
         "MTIA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
         "Management  (https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-"
         "pytorch-cuda-alloc-conf)";
  OutOfMemory oom(msg.str());
  oom.device = device_;
  oom.alloc_size = r.alloc_size;
  oom.total_or_allowed = fraction_limit_ ? allowed_memory_maximum_ : total;
  oom.device_free = device_free;
  oom.notify_observers = true;
  lock.unlock();
  throw oom;
}

// ---------------------------------------------------------------- limits, stats

void DeviceAllocator::set_memory_fraction(double fraction) {
  if (!(fraction >= 0.0 && fraction <= 1.0))
    throw InvalidArgument("invalid fraction:" + std::to_string(fraction) + ". Please set within [0, 1].");
  lock();
  Lock lock(mu_, std::adopt_lock);
  fraction_limit_ = fraction < 1.0;  // exactly 1.0 removes the limit
  allowed_memory_maximum_ = fraction_limit_ ? size_t(fraction * double(capacity())) : 0;
  update_plain();
}

double DeviceAllocator::memory_fraction() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  return fraction_limit_ ? double(allowed_memory_maximum_) / double(capacity()) : 1.0;
}

DeviceStats DeviceAllocator::stats() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  DeviceStats out = stats_;
  out.derive_active(pending_);
  out.finalize();
  return out;
}

void DeviceAllocator::reset_peak_stats() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  stats_.derive_active(pending_);
  stats_.reset_peak();
}

void DeviceAllocator::reset_accumulated_stats() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  stats_.derive_active(pending_);
  stats_.reset_accumulated();
}

std::pair<size_t, size_t> DeviceAllocator::largest_free_blocks() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  size_t small = 0, large = 0;
  auto scan = [&](BlockPool& bp) {
    size_t& m = bp.is_small ? small : large;
    for (auto& [s, idx] : bp.by_stream)
      if (Block* b = idx->largest()) m = std::max(m, b->size);  // one bin per index (its top one)
  };
  scan(small_blocks_);
  scan(large_blocks_);
  for (auto& [id, p] : pools_) {
    scan(p->small_blocks);
    scan(p->large_blocks);
  }
  return {small, large};
}

// ---------------------------------------------------------------- invariants of the above

// Every stat's current value matches a recount from the segments, per pool kind k:
//   segment[k]                 == #{non-expandable segments of kind k}
//   reserved_bytes[k]          == Σ seg.size over those + Σ b.size over mapped blocks of expandable ones
//   allocation[k], allocated_bytes[k]         == #, Σ b.size over allocated blocks
//   active[k], active_bytes[k]                == #, Σ b.size over allocated or pending blocks
//   requested_bytes[k]                        == Σ b.requested_size over allocated or pending blocks
//   inactive_split[k], inactive_split_bytes[k] == #, Σ b.size over inactive split non-expandable blocks
// and for every stat s and field f ≠ peak: s[ALL].f == s[SMALL].f + s[LARGE].f;  s[k].peak ≥ s[k].current;
//   total_allocated_memory_ == reserved_bytes[ALL].current
void DeviceAllocator::check_stats(InvariantReport& report) {
  int64_t seg_count[3] = {}, reserved[3] = {}, alloc_count[3] = {}, alloc_bytes[3] = {};
  int64_t active_count[3] = {}, active_bytes[3] = {}, split_count[3] = {}, split_bytes[3] = {}, requested[3] = {};
  for (Segment* seg : segments_) {
    const int k = seg->pool->is_small ? kSmallPool : kLargePool;
    if (!seg->expandable) {  // expandable: only mapped pages count, and not as segments
      seg_count[k] += 1;
      reserved[k] += int64_t(seg->size);
    }
    for (Block* b = seg->first; b; b = b->next) {
      if (!b->mapped) continue;
      if (seg->expandable) reserved[k] += int64_t(b->size);
      const bool pending = !b->allocated && (b->events_pending() || !b->cold().stream_uses.empty() || b->deferred);
      if (b->allocated) {
        alloc_count[k] += 1;
        alloc_bytes[k] += int64_t(b->size);
      }
      if (b->allocated || pending) {
        active_count[k] += 1;
        active_bytes[k] += int64_t(b->size);
        requested[k] += int64_t(b->requested_size);
      } else if (b->is_split() && !b->expandable) {
        split_count[k] += 1;
        split_bytes[k] += int64_t(b->size);
      }
    }
  }
  DeviceStats st = stats_;
  st.derive_active(pending_);
  st.finalize();
  auto check = [&](const char* name, StatArray& s, int64_t* expect) {
    for (int k : {kSmallPool, kLargePool})
      if (s[k].current != expect[k])
        report.fail(std::string(name) + (k == kSmallPool ? ".small_pool" : ".large_pool") + ".current is " +
                    std::to_string(s[k].current) + ", recount gives " + std::to_string(expect[k]));
    for (int f = 0; f < 4; ++f) {
      auto field = [&](const Stat& st) {
        return f == 0 ? st.current : f == 1 ? st.peak : f == 2 ? st.allocated : st.freed;
      };
      if (f != 1 && field(s[kAggregate]) != field(s[kSmallPool]) + field(s[kLargePool]))
        report.fail(std::string(name) + ": all != small_pool + large_pool");
    }
    for (int k : {kAggregate, kSmallPool, kLargePool})
      if (s[k].peak < s[k].current) report.fail(std::string(name) + ": peak below current");
  };
  check("segment", st.segment, seg_count);
  check("reserved_bytes", st.reserved_bytes, reserved);
  check("allocation", st.allocation, alloc_count);
  check("allocated_bytes", st.allocated_bytes, alloc_bytes);
  check("active", st.active, active_count);
  check("active_bytes", st.active_bytes, active_bytes);
  check("inactive_split", st.inactive_split, split_count);
  check("inactive_split_bytes", st.inactive_split_bytes, split_bytes);
  check("requested_bytes", st.requested_bytes, requested);
  if (int64_t(total_allocated_memory_) != st.reserved_bytes[kAggregate].current)
    report.fail("total_allocated_memory != reserved_bytes");
}

}  // namespace mtia
