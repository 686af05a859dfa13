// device_allocator_history.cpp: observability (allocator_core.md §9): the memory-history
// trace (record_trace, set_history, trace) and the segment snapshot.
//
// Relies on: history.h (TraceRing, the clock, the per-thread user metadata id),
// history_stream.h (the ring hands its records to the open stream), segment_info.h (what a snapshot
// returns). record_trace (inline, device_allocator.h) is called from every file of the
// allocator, always behind `if (history_on_)`, so the fast path pays one branch while
// history is off; what its inline fast path does not record comes here.
#include <algorithm>

#include "device_allocator.h"
#include "device_allocator_internal.h"
#include "history_stream.h"

namespace mtia {

// The general path of record_trace (device_allocator.h): a record with a pool, a stack
// that is not interned or metadata, a skipped action, one of a period's exact time
// stamps, or the end of a chunk of streamed records.
void DeviceAllocator::record_trace_general(TraceAction a, uintptr_t addr, size_t size, StreamId stream,
                                           MempoolId pool, const FramesPtr& frames) {
  if (trace_.skips(a)) return;  // skip_actions: not recorded at all
  TraceRecord r{};
  r.addr = addr;
  r.size = size;
  r.stream = stream;
  r.pool = pool;
  if (record_context_ >= RecordContext::kAlloc) r.frames = frames;
  r.metadata = current_metadata_id();
  r.action = a;
  trace_.record(r);
}

void DeviceAllocator::set_history(bool enabled, RecordContext context, size_t max_entries, bool clear,
                                  uint32_t skip_mask) {
  first_clock_anchor();  // the process's first anchor, before any record
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (!enabled) {
    history_on_ = false;
    record_context_ = RecordContext::kNever;
    trace_.stop();
    trace_.configure(0, false);
    update_plain();
    return;
  }
  if (!history_on_ || clear) trace_.start(max_entries);
  else trace_.resize(max_entries);  // PyTorch applies a new size without clearing
  trace_.configure(skip_mask, context >= RecordContext::kAlloc);
  history_on_ = true;
  record_context_ = context;
  update_plain();
}

std::vector<TraceEntry> DeviceAllocator::trace() {
  std::vector<TraceRecord> records;
  {
    lock();
    Lock lock(mu_, std::adopt_lock);
    records = trace_.ordered();
  }
  const ClockAnchor& a = first_clock_anchor();
  const ClockAnchor b = ClockAnchor::now();
  MetadataTable& meta = MetadataTable::get();
  std::vector<TraceEntry> out;
  out.reserve(records.size());
  uint32_t last_meta = 0;
  std::string last_text;
  for (TraceRecord& r : records) {
    if (r.metadata != last_meta) {
      last_meta = r.metadata;
      last_text = meta.lookup(r.metadata);
    }
    out.push_back(TraceEntry{r.action, r.addr, r.size, r.stream, ticks_to_us(r.tick, a, b), r.pool,
                             std::move(r.frames), r.metadata ? last_text : std::string()});
  }
  return out;
}

void DeviceAllocator::attach_history_stream(HistoryStream* s) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (s) trace_.attach_stream(s, device_);
  else trace_.detach_stream();
}

void DeviceAllocator::flush_history_stream() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  trace_.flush_stream();
}

std::vector<SegmentInfo> DeviceAllocator::snapshot(MempoolId pool, bool all_pools) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  std::vector<SegmentInfo> out;
  size_t total_active = 0;
  for (Segment* seg : segments_) {
    PrivatePool* owner = seg->pool->owner;
    MempoolId pid = owner ? owner->id : MempoolId{};
    if (!all_pools && pid != pool) continue;
    // A segment is a run of mapped blocks (one run per normal segment; an expandable
    // segment shows each contiguous mapped range, as PyTorch's snapshot does).
    for (Block* b = seg->first; b;) {
      if (!b->mapped) {
        b = b->next;
        continue;
      }
      SegmentInfo s;
      s.device = device_;
      s.address = b->ptr;
      s.stream = seg->stream;
      s.is_small = seg->pool->is_small;
      s.is_expandable = seg->expandable;
      s.pool = pid;
      s.frames = seg->frames;
      for (; b && b->mapped; b = b->next) {
        const char* state = b->allocated ? "active_allocated"
                            : (b->events_pending() || b->has_stream_uses || b->deferred) ? "active_pending_free"
                                                                                        : "inactive";
        s.total_size += b->size;
        if (b->allocated) s.allocated_size += b->size;
        if (state[0] == 'a') {
          s.active_size += b->size;
          s.requested_size += b->requested_size;
        }
        s.blocks.push_back(BlockInfo{b->ptr, b->size, b->requested_size, state,
                                     state[0] == 'a' ? b->cold().frames : FramesPtr()});
      }
      total_active += s.active_size;
      out.push_back(std::move(s));
    }
  }
  std::sort(out.begin(), out.end(), [](const SegmentInfo& a, const SegmentInfo& b) { return a.address < b.address; });
  if (history_on_) record_trace(TraceAction::kSnapshot, 0, total_active, 0, MempoolId{}, FramesPtr());
  return out;
}

}  // namespace mtia
