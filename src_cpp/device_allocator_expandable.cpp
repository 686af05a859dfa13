// device_allocator_expandable.cpp: expandable segments (allocator_core.md §11). One
// reserved range per (pool, stream), 1.125 x the device capacity; pages (2 MiB small,
// 20 MiB large) are mapped at the lowest address where the request fits, and fully free
// pages are unmapped by empty_cache. Mapped pages count as reserved memory and as
// num_device_alloc; the `segment` stats are not touched. Also the checker of the
// invariants of unmapped ranges.
//
// Relies on: device_allocator_internal.h (new_block, try_merge, absorb, recycling),
// the emulated device's reserve/map/unmap (emulated_device.h), forget_segment
// (device_allocator_release.cpp) and record_trace (device_allocator_history.cpp). Called
// from alloc_block only when expandable segments are on, and from the release code.
#include <algorithm>

#include "device_allocator.h"
#include "device_allocator_internal.h"

namespace mtia {

Block* DeviceAllocator::split_off(Block* b, size_t offset, bool mapped) {
  Block* tail = new_block();
  tail->ptr = b->ptr + offset;
  tail->size = b->size - offset;
  tail->order = b->order;
  tail->index = b->index;
  tail->seg = b->seg;
  tail->expandable = b->expandable;
  tail->mapped = mapped;
  tail->prev = b;
  tail->next = b->next;
  if (tail->next) tail->next->prev = tail;
  b->next = tail;
  b->size = offset;
  return tail;
}

void DeviceAllocator::merge_unmapped(Block* dst, Block* src) {
  if (!src || src->mapped) return;
  pool_of(dst)->unmapped.erase(src);
  absorb(dst, src);
}

Block* DeviceAllocator::find_expandable_block(const Request& r) {
  BlockPool* pool = r.pool;
  auto allocatable = [](const Block* b) {
    return b && b->mapped && !b->allocated && !b->events_pending() && !b->has_stream_uses && !b->deferred;
  };
  auto room = [&](const Block* b) {  // free + unmapped bytes from b on
    size_t bytes = 0;
    for (; b && bytes < r.size && (allocatable(b) || (b && !b->mapped)); b = b->next) bytes += b->size;
    return bytes >= r.size;
  };
  Segment key_seg;  // a probe for the (stream, address) order
  key_seg.stream = r.stream;
  Block key;
  key.seg = &key_seg;
  for (auto it = pool->unmapped.lower_bound(&key); it != pool->unmapped.end() && (*it)->seg->stream == r.stream;
       ++it) {
    Block* c = *it;
    if (allocatable(c->prev)) c = c->prev;  // a free block right before the hole helps
    if (room(c)) return c;
  }
  // A new reservation for this pool and stream.
  DeviceMemory& mem = emulator_->device(device_).memory();
  const size_t page = pool->is_small ? kSmallBuffer : kLargeBuffer;
  const size_t cap = mem.capacity();
  const size_t size = (cap + cap / 8 + page - 1) / page * page;  // PyTorch: numSegments(total + total / 8)
  void* base = mem.reserve_range(size);
  if (!base) return nullptr;
  auto* seg = new Segment();
  seg->base = reinterpret_cast<uintptr_t>(base);
  seg->size = size;
  seg->stream = r.stream;
  seg->pool = pool;
  seg->index = pool->index_or_create(r.stream);
  seg->order = ++segment_order_;
  seg->expandable = true;
  seg->page_size = page;
  seg->frames = *r.frames;
  seg->list_index = segments_.size();
  segments_.push_back(seg);
  if (pool->owner) pool->owner->segment_count += 1;
  Block* b = new_block();
  b->ptr = seg->base;
  b->size = size;
  b->order = seg->order;
  b->index = seg->index;
  b->seg = seg;
  b->expandable = true;
  b->mapped = false;
  seg->first = b;
  pool->unmapped.insert(b);
  return b;
}

// Maps the pages under [to_map->ptr, +size) of an unmapped block; the rest stays unmapped.
// The mapped block merges with free mapped neighbours and goes into the free index.
bool DeviceAllocator::map_block(Block* to_map, size_t size, const Request& r) {
  Segment* seg = to_map->seg;
  const size_t page = seg->page_size;
  const size_t offset = to_map->ptr - seg->base;  // unmapped blocks start on page boundaries
  const size_t bytes = ((offset + size + page - 1) / page) * page - offset;
  // No fraction check here: as in PyTorch, alloc_block checked the request's size, and
  // whole pages may take the total up to a page past the limit.
  DeviceMemory& mem = emulator_->device(device_).memory();
  if (!mem.map_pages(reinterpret_cast<void*>(to_map->ptr), bytes)) return false;
  BlockPool* pool = pool_of(to_map);
  pool->unmapped.erase(to_map);
  if (bytes < to_map->size) pool->unmapped.insert(split_off(to_map, bytes, false));
  to_map->mapped = true;
  const uintptr_t mapped_ptr = to_map->ptr;
  try_merge(to_map, to_map->prev);
  try_merge(to_map, to_map->next);
  set_gc_count_base(to_map, pool);
  seg->index->insert(to_map);
  total_allocated_memory_ += bytes;
  stat_add(stats_.reserved_bytes, pool->is_small, int64_t(bytes));
  stats_.num_device_alloc += 1;
  if (history_on_)
    record_trace(TraceAction::kSegmentMap, mapped_ptr, bytes, seg->stream,
                 pool_id_of(pool), *r.frames);
  return true;
}

Block* DeviceAllocator::try_allocate_expandable_block(const Request& r) {
  Block* c = find_expandable_block(r);
  if (!c) return nullptr;
  // c is: unmapped -> ..., or free -> unmapped -> ...: map until c covers the request.
  if (!c->mapped && !map_block(c, std::min(c->size, r.size), r)) return nullptr;
  while (c->size < r.size) {
    Block* next = c->next;  // unmapped
    if (!map_block(next, std::min(r.size - c->size, next->size), r)) return nullptr;
    c = next;  // map_block merged c into next
  }
  c->seg->index->erase(c);
  return c;
}

// Unmaps the whole free pages inside free block b; the edges stay mapped and free.
void DeviceAllocator::unmap_block(Block* b) {
  Segment* seg = b->seg;
  const size_t page = seg->page_size;
  const size_t off = b->ptr - seg->base;
  const size_t first = (off + page - 1) / page, last = (off + b->size) / page;
  if (last <= first) return;
  const uintptr_t uptr = seg->base + first * page;
  const size_t usize = (last - first) * page;
  BlockPool* pool = pool_of(b);
  seg->index->erase(b);
  const size_t before = uptr - b->ptr, after = b->size - before - usize;
  if (after > 0) {
    Block* tail = split_off(b, before + usize, true);
    set_gc_count_base(tail, pool);
    seg->index->insert(tail);
  }
  if (before > 0) {
    Block* middle = split_off(b, before, true);  // b keeps the mapped head
    set_gc_count_base(b, pool);
    seg->index->insert(b);
    b = middle;
  }
  b->mapped = false;
  merge_unmapped(b, b->prev);
  merge_unmapped(b, b->next);
  pool->unmapped.insert(b);
  emulator_->device(device_).memory().unmap_pages(reinterpret_cast<void*>(uptr), usize);
  total_allocated_memory_ -= usize;
  stat_sub(stats_.reserved_bytes, pool->is_small, int64_t(usize));
  stats_.num_device_free += 1;
  if (history_on_)
    record_trace(TraceAction::kSegmentUnmap, uptr, usize, seg->stream, pool_id_of(pool),
                 call_frames_or(seg->frames));
  if (!b->prev && !b->next) release_expandable_segment(b);
}

// A wholly unmapped expandable segment gives back its address space.
void DeviceAllocator::release_expandable_segment(Block* b) {
  Segment* seg = b->seg;
  pool_of(b)->unmapped.erase(b);
  emulator_->device(device_).memory().release_range(reinterpret_cast<void*>(seg->base), seg->size);
  if (pool_of(b)->owner) pool_of(b)->owner->segment_count -= 1;
  forget_segment(seg);
  recycle_block(b);
}

// ---------------------------------------------------------------- invariants of the above

// Unmapped ranges of expandable segments:
//   ¬b.mapped ⇒ seg.expandable ∧ ¬b.allocated ∧ ¬b.in_index ∧ b ∈ pool_of(b).unmapped
//   ¬(¬b.mapped ∧ ¬b.prev.mapped)   (merge_unmapped joined them)
//   b.mapped ∧ ¬b.prev.mapped ⇒ (b.ptr − seg.base) % seg.page_size == 0   (pages are mapped whole)
//   Σ over block pools of |pool.unmapped| == #unmapped blocks
void DeviceAllocator::check_expandable(InvariantReport& report) {
  size_t unmapped_blocks = 0;
  for (Segment* seg : segments_) {
    for (Block* b = seg->first, *prev = nullptr; b; prev = b, b = b->next) {
      if (b->mapped) {
        if (seg->expandable && (b->ptr - seg->base) % seg->page_size && prev && !prev->mapped)
          report.fail("mapped range does not start on a page boundary");
        continue;
      }
      unmapped_blocks += 1;
      if (!seg->expandable || b->allocated || b->in_index) report.fail("unmapped block in use or indexed");
      if (!pool_of(b)->unmapped.count(b)) report.fail("unmapped block missing from the pool's unmapped set");
      if (prev && !prev->mapped) report.fail("two adjacent unmapped blocks were not merged");
    }
  }
  size_t in_unmapped = 0;
  for_each_block_pool([&](BlockPool& bp) { in_unmapped += bp.unmapped.size(); });
  if (in_unmapped != unmapped_blocks) report.fail("unmapped sets hold blocks that are not in any segment");
}

}  // namespace mtia
