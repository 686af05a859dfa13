// device_allocator_internal.h: what the device_allocator*.cpp files share and nothing
// else includes: small inline helpers, the caller-stack thread-local, the block
// recycling and merging members and find_pool (inline here, so that the fast path in
// device_allocator.cpp and the expandable-segment, release and pool code all inline
// them), and InvariantReport, which the checkers write to. Relies on device_allocator.h.
#pragma once
#include <sstream>
#include <string>

#include "device_allocator.h"

namespace mtia {

MTIA_INLINE BlockPool* pool_of(const Block* b) { return b->index->pool; }
MTIA_INLINE bool is_small_block(const Block* b) { return b->index->small; }  // == pool_of(b)->is_small

MTIA_INLINE void stat_update(StatArray& s, bool small, int64_t delta) {
  if (delta > 0) stat_add(s, small, delta);
  else if (delta < 0) stat_sub(s, small, -delta);
}

MTIA_INLINE MempoolId pool_id_of(const BlockPool* pool) { return pool->owner ? pool->owner->id : MempoolId{}; }

// The stack of the public call (malloc, free, empty_cache) running on this thread, for
// the trace entries of the frees and segment releases it causes: PyTorch gathers one per
// call (malloc at context "state", free and empty_cache at "all") and records it in place
// of the block's or the segment's own stack. Set only off the fast path (history is on,
// or a malloc missed the cache), as a thread_local costs a call in a shared object.
// ONE variable for the whole core: declared here, defined once in device_allocator.cpp
// (a `static` or anonymous-namespace copy per file would silently split it).
extern thread_local const FramesPtr* t_call_frames;

class CallFramesScope {
 public:
  explicit CallFramesScope(const FramesPtr* frames) : prev_(t_call_frames) { t_call_frames = frames; }
  ~CallFramesScope() { t_call_frames = prev_; }
  CallFramesScope(const CallFramesScope&) = delete;
  CallFramesScope& operator=(const CallFramesScope&) = delete;

 private:
  const FramesPtr* prev_;
};

// The running call's stack if one was noted, else `own` (the block's or segment's).
inline const FramesPtr& call_frames_or(const FramesPtr& own) {
  return t_call_frames && *t_call_frames ? *t_call_frames : own;
}

// Collects check_invariants() failures: "device D: what; what; ...".
class InvariantReport {
 public:
  explicit InvariantReport(DeviceIndex device) : device_(device) {}
  void fail(const std::string& what) {
    if (out_.tellp() == 0) out_ << "device " << device_ << ": ";
    else out_ << "; ";
    out_ << what;
  }
  std::string str() const { return out_.str(); }

 private:
  DeviceIndex device_;
  std::ostringstream out_;
};

// ---------------------------------------------------------------- block recycling

// The GC clock at the time b became free. The clock only runs while garbage collection
// is on; while a pool's clock reads 0, its blocks' bases are 0 already (new_block clears
// recycled ones once the clock has started), so the write, to the block's cold part,
// is skipped. The plain paths (free_plain, a plain malloc's split) skip even the test:
// they run only while no clock has started (plain_, free_watched_).
MTIA_INLINE void DeviceAllocator::set_gc_count_base(Block* b, const BlockPool* pool) {
  if (pool->get_free_blocks_call_count) b->cold().gc_count_base = pool->get_free_blocks_call_count;
}

MTIA_INLINE Block* DeviceAllocator::new_block() {
  if (!spare_blocks_) add_block_chunk();
  Block* b = spare_blocks_;
  spare_blocks_ = b->next;
  b->next = nullptr;
  if (gc_clock_started_) b->cold().gc_count_base = 0;
  return b;
}

// For a block that is clean already but for its links (a free block of a plain segment
// just taken out of the index: not allocated, no events, stream uses or frames, mapped,
// not oversize). check_spare_blocks verifies that every spare block is clean.
MTIA_INLINE void DeviceAllocator::recycle_clean_block(Block* b) {
  b->prev = nullptr;
  b->next = spare_blocks_;
  spare_blocks_ = b;
}

// A spare block must look new: no links, flags cleared, nothing in its cold part.
MTIA_INLINE void DeviceAllocator::recycle_block(Block* b) {
  if (b->has_stream_uses) b->cold().stream_uses.clear();
  if (b->has_frames) b->cold().frames.reset();
  b->has_frames = false;
  b->prev = nullptr;
  b->allocated = b->deferred = b->in_index = b->has_stream_uses = b->expandable = b->oversize = false;
  b->mapped = true;
  b->requested_size = 0;
  b->event_count = 0;
  recycle_clean_block(b);
}

// The private pool `id`, or null. Inline: choose_pool calls it on every malloc during a
// capture.
inline PrivatePool* DeviceAllocator::find_pool(MempoolId id) {
  auto it = pools_.find(id);
  return it == pools_.end() ? nullptr : it->second.get();
}

// ---------------------------------------------------------------- merging (§3.5)

// dst takes over the range of its neighbour src (either side); src is recycled.
template <bool kPlain, bool kExpandable>
MTIA_INLINE void DeviceAllocator::absorb(Block* dst, Block* src) {
  if (dst->prev == src) {
    dst->ptr = src->ptr;
    dst->prev = src->prev;
    if (dst->prev) dst->prev->next = dst;
    else dst->seg->first = dst;
  } else {
    dst->next = src->next;
    if (dst->next) dst->next->prev = dst;
  }
  dst->size += src->size;
  if (kPlain || (src->mapped && !src->expandable)) {  // out of the free index: clean
    if (kExpandable) src->meta &= ~Block::kExpandableBit;  // but for this flag
    recycle_clean_block(src);
  } else {
    recycle_block(src);
  }
}

// Merges free neighbour `src` into `dst`; returns the bytes taken over (0 if not mergeable).
// (An unmapped neighbour is never in the index.)
template <bool kPlain, bool kExpandable>
MTIA_INLINE size_t DeviceAllocator::try_merge(Block* dst, Block* src) {
  if (!src || !src->in_index) return 0;  // indexed == free: not allocated, nothing pending
  dst->index->erase(src);  // neighbours share the segment's index
  size_t subsumed = src->size;
  absorb<kPlain, kExpandable>(dst, src);
  return subsumed;
}

}  // namespace mtia
