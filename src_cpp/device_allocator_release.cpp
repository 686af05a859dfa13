// device_allocator_release.cpp: giving cached memory back to the device. empty_cache
// (§6) and release_cached_blocks (also the last retry of a cache miss), the oversize
// release of §4.5 and the garbage collection of §4.4 (earlier retries of a miss),
// synchronize_and_free_events (waiting for every pending cross-stream free), waiting for
// the device's streams before memory goes back (busy_streams_after_waiting), and
// releasing whole free segments.
//
// Relies on: device_allocator_internal.h (recycling, find_pool, the caller-stack scope),
// process_events (device_allocator.cpp), unmap_block (device_allocator_expandable.cpp)
// and record_trace (device_allocator_history.cpp). None of it runs on a cache hit: every
// entry here is a call from a miss or a public method of its own.
#include <algorithm>

#include "device_allocator.h"
#include "device_allocator_internal.h"

namespace mtia {

// ---------------------------------------------------------------- retries of a cache miss (§4.4, §4.5)

// §4.5: with max_split_size set, give back oversize cached blocks of the request's pool.
bool DeviceAllocator::release_available_cached_blocks(Lock& lock, const Request& r) {
  const size_t M = max_split();
  if (M == AllocatorConfig::kUnlimited) return false;
  FreeIndex* idx = r.pool->index(r.stream);
  if (!idx || idx->empty()) return false;
  // Memory of a busy stream stays; a private pool's, while any stream is busy (see busy_streams_after_waiting).
  const std::vector<StreamId> busy = busy_streams_after_waiting(lock);
  if (is_busy(busy, r.stream) || (r.pool->owner && !busy.empty())) return false;
  size_t key = std::max(r.size, M);
  // A block of a split segment is never released. Blocks >= max_split_size are whole
  // segments while the setting stays put, but a lower max_split_size set at run time makes
  // older split blocks oversize: those fall to the loop, which skips them.
  if (Block* b = idx->lower_bound(key); b && !b->expandable && !b->is_split()) {
    release_segment(b);
    return true;
  }
  std::vector<Block*> oversize;  // largest first
  idx->for_each([&](Block* b) {
    if (b->size >= M && !b->expandable) oversize.push_back(b);
  });
  std::sort(oversize.begin(), oversize.end(), [](Block* a, Block* b) { return BlockLess{}(b, a); });
  size_t total = 0;
  for (Block* b : oversize) {
    if (total >= key) break;
    if (!b->in_index || b->is_split()) continue;  // a Python raw free may have re-entered
    total += b->size;
    release_segment(b);
  }
  return total >= key;
}

// §4.4: release unsplit default large-pool blocks whose age is at least the mean, in
// passes, until the reserved memory is back under threshold * allowed. As in PyTorch a
// pass does not stop at the target (so the GC does not run again at once), and the mean
// counts expandable blocks, which are never released.
void DeviceAllocator::garbage_collect_cached_blocks(Lock& lock) {
  size_t threshold = size_t(config_.garbage_collection_threshold * double(allowed_memory_maximum_));
  if (total_allocated_memory_ <= threshold) return;
  const std::vector<StreamId> busy = busy_streams_after_waiting(lock);  // their blocks stay
  if (total_allocated_memory_ <= threshold) return;  // the lock was dropped: look again
  const size_t target = total_allocated_memory_ - threshold;
  const uint64_t now = large_blocks_.get_free_blocks_call_count;
  std::vector<std::pair<Block*, uint64_t>> candidates;  // (block, age); block nulled once released
  uint64_t age_sum = 0;
  for (auto& [s, idx] : large_blocks_.by_stream) {
    if (is_busy(busy, s)) continue;
    idx->for_each([&](Block* b) {
      if (!b->is_split()) {
        candidates.emplace_back(b, now - b->cold().gc_count_base);
        age_sum += now - b->cold().gc_count_base;
      }
    });
  }
  size_t reclaimed = 0, remaining = candidates.size();
  bool freed_any = true;
  while (reclaimed < target && freed_any && remaining > 0) {
    const double mean_age = double(age_sum) / double(remaining);
    freed_any = false;
    for (auto& [b, age] : candidates) {
      if (!b || b->expandable || double(age) < mean_age) continue;
      if (b->in_index && !b->is_split()) {  // a Python raw free may have re-entered
        reclaimed += b->size;
        release_segment(b);
      }
      freed_any = true;
      age_sum -= age;
      remaining -= 1;
      b = nullptr;
    }
  }
}

// ---------------------------------------------------------------- empty_cache (§6)

void DeviceAllocator::empty_cache(MempoolId pool, const FramesPtr& frames) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  const CallFramesScope call(&frames);
  release_cached_blocks(lock, pool);
}

void DeviceAllocator::release_cached_blocks(Lock& lock, MempoolId id) {
  if (id.is_default()) {
    if (captures_underway_.empty()) synchronize_and_free_events(lock, nullptr);
  } else if (PrivatePool* p = find_pool(id); p && p->use_count == 0 && captures_underway_.empty()) {
    synchronize_and_free_events(lock, p);
  }
  // Nothing that could go back: no wait for busy streams (it would release nothing).
  const std::vector<StreamId> busy = anything_to_release(id) ? busy_streams_after_waiting(lock)
                                                             : std::vector<StreamId>{};
  if (id.is_default() && captures_underway_.empty()) {
    release_free_segments(large_blocks_, busy);
    release_free_segments(small_blocks_, busy);
  }
  // Freeable private pools (use count 0) give back their fully free segments, once no
  // stream is busy: a graph replays its pool's memory on whatever stream is current.
  std::vector<MempoolId> gone;
  for (auto& [pid, p] : pools_) {
    if (p->use_count > 0 || (!id.is_default() && pid != id) || !busy.empty()) continue;
    release_free_segments(p->large_blocks, busy);
    release_free_segments(p->small_blocks, busy);
    if (p->segment_count == 0) gone.push_back(pid);
  }
  for (MempoolId pid : gone) pools_.erase(pid);
}

// Whether release_cached_blocks(id) would give anything back were every stream idle: a
// whole free segment or a free block of an expandable segment, in the default pools (for
// the default id, while no capture is underway) or in a freeable private pool (use count
// 0) that `id` selects. A freeable pool without segments only needs erasing: no wait.
bool DeviceAllocator::anything_to_release(MempoolId id) const {
  const bool defaults = id.is_default() && captures_underway_.empty();
  for (const Segment* seg : segments_) {
    const PrivatePool* owner = seg->pool->owner;
    if (owner ? owner->use_count > 0 || (!id.is_default() && owner->id != id) : !defaults) continue;
    if (!seg->expandable) {
      if (seg->first->in_index && !seg->first->next) return true;
      continue;
    }
    for (const Block* b = seg->first; b; b = b->next)
      if (b->in_index) return true;
  }
  return false;
}

// Waits (with mu_ released, so kernels that allocate can finish) for every outstanding
// event, then frees the blocks. `only` limits it to one private pool's blocks. A kernel
// (a stream worker) waits for nothing: the streams it would wait for may be waiting for
// it, directly or through other streams; the blocks whose events are done are freed.
void DeviceAllocator::synchronize_and_free_events(Lock& lock, PrivatePool* only) {
  if (!only) stats_.num_sync_all_streams += 1;
  process_events();  // also turns deferred blocks into events
  if (Stream::on_worker_thread()) return;
  std::vector<EventMark> marks;
  for (auto& [s, fifo] : stream_events_) {
    for (auto& [mark, b] : fifo)
      if (!only || pool_of(b)->owner == only) marks.push_back(mark);
  }
  if (marks.empty()) return;
  lock.unlock();
  {
    BlockingScope blocking;
    for (const EventMark& m : marks) m.synchronize();
  }
  lock_blocking(mu_);
  lock = Lock(mu_, std::adopt_lock);
  process_events();
}

// Memory goes back to the device only once the streams that may still use it are idle,
// as cudaFree (and unmapping) synchronizes the device: a kernel queued before a free on
// the same stream may still use the block, and a graph's replay uses its pool's memory
// on the stream it was replayed on. From the host this waits, with the lock dropped (as
// for events), for every stream of the device with queued work (release_cached_blocks
// calls it only when it has something to release). A wait the interrupt hook abandons
// (Ctrl-C, blocking.h) throws Interrupted with the lock dropped and nothing changed. If the device saw no
// malloc and no free meanwhile, all free memory predates the wait and none of it is in
// use: everything may go, even if other threads queued new work (kernels that touch no
// memory must not keep a cache from ever being released). Otherwise it waits again, up to
// three times, and then returns the streams still busy: their segments and pages stay
// cached, and so does every private pool while any stream is busy. A kernel (a stream
// worker) waits for nothing, since the streams it would wait for may be waiting for it,
// and gets the busy streams at once (its own among them).
std::vector<StreamId> DeviceAllocator::busy_streams_after_waiting(Lock& lock) {
  auto busy_streams = [&] {
    std::vector<Stream*> busy;
    for (Stream* st : emulator_->device(device_).streams())
      if (!st->query()) busy.push_back(st);
    return busy;
  };
  std::vector<Stream*> busy = busy_streams();
  if (!Stream::on_worker_thread()) {
    for (int round = 0; round < 3 && !busy.empty(); ++round) {
      const BlockActivity before = block_activity();
      lock.unlock();
      {
        BlockingScope blocking;
        for (Stream* st : busy) st->synchronize();
      }
      lock_blocking(mu_);
      lock = Lock(mu_, std::adopt_lock);
      if (block_activity() == before) return {};
      busy = busy_streams();
    }
  }
  std::vector<StreamId> ids;
  for (Stream* st : busy) ids.push_back(st->id());
  return ids;
}

// Changes with every malloc, free and completed pending free of this device.
DeviceAllocator::BlockActivity DeviceAllocator::block_activity() const {
  return {stats_.allocation[kSmallPool].allocated + stats_.allocation[kLargePool].allocated,
          stats_.allocation[kSmallPool].current + stats_.allocation[kLargePool].current, pending_frees_done_};
}

void DeviceAllocator::release_free_segments(BlockPool& pool, const std::vector<StreamId>& busy) {
  std::vector<Block*> whole, to_unmap;
  for (auto& [s, idx] : pool.by_stream) {
    if (is_busy(busy, s)) continue;
    idx->for_each([&](Block* b) {
      if (b->expandable) to_unmap.push_back(b);
      else if (!b->is_split()) whole.push_back(b);
    });
  }
  for (Block* b : whole)
    if (b->in_index && !b->is_split()) release_segment(b);  // a Python raw free may have re-entered
  for (Block* b : to_unmap) {
    if (!b->in_index) continue;
    unmap_block(b);
  }
}

// Removes seg from segments_ (swap with the last) and deletes it.
void DeviceAllocator::forget_segment(Segment* seg) {
  Segment* last = segments_.back();
  last->list_index = seg->list_index;
  segments_[seg->list_index] = last;
  segments_.pop_back();
  delete seg;
}

// Gives a whole free segment back to the device.
void DeviceAllocator::release_segment(Block* b) {
  Segment* seg = b->seg;
  BlockPool* pool = pool_of(b);
  seg->index->erase(b);
  seg->raw->free(reinterpret_cast<void*>(seg->base), seg->size, device_, seg->stream);
  total_allocated_memory_ -= seg->size;
  stat_sub(stats_.segment, pool->is_small, 1);
  stat_sub(stats_.reserved_bytes, pool->is_small, int64_t(seg->size));
  if (seg->oversize) stats_.oversize_segments.decrease(1);
  stats_.num_device_free += 1;
  if (history_on_)
    record_trace(TraceAction::kSegmentFree, seg->base, seg->size, seg->stream,
                 pool_id_of(pool), call_frames_or(seg->frames));
  if (pool->owner) pool->owner->segment_count -= 1;
  forget_segment(seg);
  recycle_block(b);
}

}  // namespace mtia
