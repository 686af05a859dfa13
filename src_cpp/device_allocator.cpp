// device_allocator.cpp: the malloc ladder, split/merge, events, pools, empty_cache,
// stats, snapshot and invariants of one device. Section numbers refer to
// ../shared/spec/allocator_core.md (PyTorch's CUDACachingAllocator restated).
#include "device_allocator.h"

#include <algorithm>
#include <sstream>

#include "errors.h"
#include "size_policy.h"

namespace mtia {

void FreeIndex::throw_corrupt() { throw InvalidState("free index corrupted: a free block was not where its key says"); }

namespace {
BlockPool* pool_of(const Block* b) { return b->index->pool; }

MTIA_INLINE void stat_update(StatArray& s, bool small, int64_t delta) {
  if (delta > 0) stat_add(s, small, delta);
  else if (delta < 0) stat_sub(s, small, -delta);
}
}  // namespace

DeviceAllocator::DeviceAllocator(DeviceIndex device, Emulator* emulator, std::shared_ptr<RawAllocator> raw,
                                 const AllocatorConfig* config)
    : device_(device), emulator_(emulator), config_(config), raw_(std::move(raw)),
      small_blocks_(true, nullptr, &arena_), large_blocks_(false, nullptr, &arena_) {
  stats_.max_split_size =
      config->max_split_size == AllocatorConfig::kUnlimited ? -1 : int64_t(config->max_split_size);
  if (config->per_process_memory_fraction < 1.0) set_memory_fraction(config->per_process_memory_fraction);
}

DeviceAllocator::~DeviceAllocator() {
  // Memory still held goes back with the emulator's mapping; only metadata is freed here.
  for (Segment* seg : segments_) delete seg;
  // Free indexes hold arena nodes: drop the pools before the arena.
  small_blocks_.by_stream.clear();
  large_blocks_.by_stream.clear();
  pools_.clear();
}

// The GC clock at the time b became free. The clock only runs while garbage collection
// is on; while a pool's clock reads 0, its blocks' bases are 0 already (new_block clears
// recycled ones once any base was written), so the write, to the block's cold part,
// is skipped.
void DeviceAllocator::set_gc_count_base(Block* b, const BlockPool* pool) {
  if (pool->get_free_blocks_call_count) {
    b->cold().gc_count_base = pool->get_free_blocks_call_count;
    gc_bases_written_ = true;
  }
}

Block* DeviceAllocator::new_block() {
  if (!spare_blocks_) add_block_chunk();
  Block* b = spare_blocks_;
  spare_blocks_ = b->next;
  b->next = nullptr;
  if (gc_bases_written_) b->cold().gc_count_base = 0;
  return b;
}

// Blocks come in chunks, for locality; spare ones are linked through `next`.
void DeviceAllocator::add_block_chunk() {
  block_chunks_.emplace_back(new BlockChunk);
  for (size_t i = BlockChunk::kBlocks; i-- > 0;) recycle_clean_block(&block_chunks_.back()->hot[i]);
}

// A spare block must look new: no links, flags cleared, nothing in its cold part.
void DeviceAllocator::delete_block(Block* b) {
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

// For a block that is clean already but for its links (a free block of a plain segment
// just taken out of the index: not allocated, no events, stream uses or frames, mapped,
// not oversize). check_invariants verifies that every spare block is clean.
void DeviceAllocator::recycle_clean_block(Block* b) {
  b->prev = nullptr;
  b->next = spare_blocks_;
  spare_blocks_ = b;
}

bool DeviceAllocator::should_split(const Block* b, size_t size) const {
  if (pool_of(b)->owner && pool_of(b)->owner->no_split) return false;
  size_t remaining = b->size - size;
  if (pool_of(b)->is_small || config_->expandable_segments) return remaining >= kMinBlockSize;
  return size < max_split() && remaining > kSmallSize;
}

// The stack of the public call (malloc, free, empty_cache) running on this thread, for
// the trace entries of the frees and segment releases it causes: PyTorch gathers one per
// call (malloc at context "state", free and empty_cache at "all") and records it in place
// of the block's or the segment's own stack. Set only off the fast path (history is on,
// or a malloc missed the cache), as a thread_local costs a call in a shared object.
namespace {
thread_local const FramesPtr* t_call_frames = nullptr;
class CallFramesScope {
 public:
  explicit CallFramesScope(const FramesPtr* frames) : prev_(t_call_frames) { t_call_frames = frames; }
  ~CallFramesScope() { t_call_frames = prev_; }
  CallFramesScope(const CallFramesScope&) = delete;
  CallFramesScope& operator=(const CallFramesScope&) = delete;

 private:
  const FramesPtr* prev_;
};
const FramesPtr& call_frames_or(const FramesPtr& own) { return t_call_frames && *t_call_frames ? *t_call_frames : own; }
}  // namespace

// ---------------------------------------------------------------- malloc (§4.1)

uintptr_t DeviceAllocator::malloc(size_t orig_size, StreamId stream, const FramesPtr& frames) {
  lock_blocking(mu_);
  Lock lock(mu_, std::adopt_lock);

  // 1. Round; choose the pool (a capture may route it to a private one).
  Request r;
  r.orig_size = orig_size;
  r.size = round_size(orig_size, *config_);
  r.stream = stream;
  r.alloc_size = 0;  // sized on a miss
  if (plain_) {
    r.pool = default_pool(r.size);
    r.frames = &kNoFrames;
  } else {
    r.frames = frames && history_on_ && record_context_ >= RecordContext::kState ? &frames : &kNoFrames;
    // 2. Reclaim blocks whose cross-stream events completed (never during a capture).
    if (captures_underway_.empty() && (pending_event_count_ || !deferred_.empty())) process_events_in_call(*r.frames);
    r.pool = choose_pool(r.size, stream);
  }
  // 3. Best fit among cached blocks of this pool and stream; 4. else a new segment.
  Block* block = get_free_block(r, r.pool);
  if (!block) block = alloc_on_miss(lock, r);
  // 5. Out of memory.
  if (!block) raise_oom(lock, r);
  // 6. Hand out (splitting if the rules say so).
  return alloc_found_block(r, block);
}

// Steps 4a-4e of the ladder, out of line: the fast path keeps a small frame.
Block* DeviceAllocator::alloc_on_miss(Lock& lock, Request& r) {
  const CallFramesScope call(r.frames);  // for the frees and releases below
  r.alloc_size = segment_size_for(r.size);
  // 4a. Garbage-collect old cached blocks when a fraction and a threshold are set.
  if (fraction_limit_ && config_->garbage_collection_threshold > 0) garbage_collect_cached_blocks(lock);
  // 4b. A new segment from the device.
  Block* block = alloc_block(r, false);
  // 4c. Default-pool requests may take a cached block of a use_on_oom pool.
  if (!block && !r.pool->owner) block = try_use_on_oom_pools(r);
  // 4d. Release oversize cached blocks (only with max_split_size) and retry.
  if (!block && release_available_cached_blocks(lock, r)) block = alloc_block(r, false);
  // 4e. Empty the whole cache (not during a capture) and retry once more.
  if (!block && captures_underway_.empty()) {
    release_cached_blocks(lock, MempoolId{});
    block = alloc_block(r, true);
  }
  return block;
}

void DeviceAllocator::process_events_in_call(const FramesPtr& frames) {
  const CallFramesScope call(&frames);
  process_events();
}

BlockPool* DeviceAllocator::choose_pool(size_t size, StreamId stream) {
  for (auto it = captures_underway_.rbegin(); it != captures_underway_.rend(); ++it) {
    if (!filter_matches(it->second, stream)) continue;
    PrivatePool* p = find_pool(it->first);
    return p->blocks_for(size);
  }
  return default_pool(size);
}

bool DeviceAllocator::filter_matches(const AllocationFilter& f, StreamId stream) {
  switch (f.kind) {
    case AllocationFilter::kAll: return true;
    case AllocationFilter::kThread: return f.thread == std::this_thread::get_id();
    case AllocationFilter::kCapture:
      for (auto& [s, id] : stream_capture_)
        if (s == stream) return id == f.capture_id;
      return false;
  }
  return false;
}

// §3.2: exact best fit on the request's stream, then the oversize rules.
Block* DeviceAllocator::get_free_block(const Request& r, BlockPool* pool) {
  if (fraction_limit_ && config_->garbage_collection_threshold > 0) ++pool->get_free_blocks_call_count;
  FreeIndex* idx = pool->index(r.stream);
  if (!idx) return nullptr;
  Block* b = idx->lower_bound(r.size);
  if (!b) return nullptr;
  if (b->expandable) {
    if (expandable_active(pool)) {
      // Best fit counts what an expandable block can grow into (the unmapped space after it).
      auto grow = [](const Block* x) { return x->size + (x->next && !x->next->mapped ? x->next->size : 0); };
      for (Block* next = idx->successor(b); b->expandable && next && grow(next) < grow(b); next = idx->successor(b))
        b = next;
    } else {  // expandable segments were switched off: their blocks are not used
      do b = idx->successor(b);
      while (b && b->expandable);
      if (!b) return nullptr;
    }
  }
  const size_t M = max_split(), R = config_->max_non_split_rounding_size;
  if (r.size < M && b->size >= M) return nullptr;      // normal requests never take oversize blocks
  if (r.size >= M && b->size >= r.size + R) return nullptr;  // oversize: at most R - 1 bytes of slack
  idx->erase(b);
  return b;
}

// §4.2: a new segment. Fails (nullptr) on the fraction limit or a device OOM.
Block* DeviceAllocator::alloc_block(const Request& r, bool is_retry) {
  if (is_retry) stats_.num_alloc_retries += 1;
  if (fraction_limit_ && total_allocated_memory_ + r.alloc_size > allowed_memory_maximum_) return nullptr;
  if (expandable_active(r.pool)) return try_allocate_expandable_block(r);
  PrivatePool* owner = r.pool->owner;
  RawAllocator* raw = owner && owner->allocator ? owner->allocator.get() : raw_.get();
  void* p = raw->alloc(r.alloc_size, device_, r.stream);
  if (!p) return nullptr;
  total_allocated_memory_ += r.alloc_size;
  auto* seg = new Segment();
  seg->base = reinterpret_cast<uintptr_t>(p);
  seg->size = r.alloc_size;
  seg->stream = r.stream;
  seg->pool = r.pool;
  seg->index = r.pool->index_or_create(r.stream);
  seg->order = ++segment_order_;
  seg->raw = raw;
  seg->frames = *r.frames;
  seg->list_index = segments_.size();
  segments_.push_back(seg);
  Block* b = new_block();
  b->ptr = seg->base;
  b->size = r.alloc_size;
  b->requested_size = 0;
  b->order = seg->order;
  b->index = seg->index;
  b->seg = seg;
  seg->first = b;
  if (owner) owner->segment_count += 1;
  stat_add(stats_.segment, r.pool->is_small, 1);
  stat_add(stats_.reserved_bytes, r.pool->is_small, int64_t(r.alloc_size));
  seg->oversize = r.alloc_size >= max_split();  // remembered: max_split_size may change later
  if (seg->oversize) stats_.oversize_segments.increase(1);
  stats_.num_device_alloc += 1;
  if (history_on_)
    record_trace(TraceAction::kSegmentAlloc, seg->base, seg->size, r.stream,
                 owner ? owner->id : MempoolId{}, *r.frames);
  return b;
}

// pools_graphs_streams_api.md §1.5: cached blocks of use_on_oom pools, never new segments.
Block* DeviceAllocator::try_use_on_oom_pools(const Request& r) {
  for (MempoolId id : use_on_oom_pools_) {
    PrivatePool* p = find_pool(id);
    if (!p || p->use_count <= 0) continue;
    if (Block* b = get_free_block(r, p->blocks_for(r.size))) return b;
  }
  return nullptr;
}

// §4.5: with max_split_size set, give back oversize cached blocks of the request's pool.
bool DeviceAllocator::release_available_cached_blocks(Lock& lock, const Request& r) {
  const size_t M = max_split();
  if (M == AllocatorConfig::kUnlimited) return false;
  FreeIndex* idx = r.pool->index(r.stream);
  if (!idx || idx->empty()) return false;
  // Memory of a busy stream stays; a private pool's, while any stream is busy (see settle_streams).
  const std::vector<StreamId> busy = settle_streams(lock);
  if (is_busy(busy, r.stream) || (r.pool->owner && !busy.empty())) return false;
  size_t key = std::max(r.size, M);
  // A block of a split segment is never released. Blocks >= max_split_size are whole
  // segments while the setting stays put, but a lower max_split_size set at run time makes
  // older split blocks oversize: those fall to the loop, which skips them.
  if (Block* b = idx->lower_bound(key); b && !b->expandable && !b->is_split()) {
    release_block(b);
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
    release_block(b);
  }
  return total >= key;
}

// §4.4: release unsplit default large-pool blocks whose age is at least the mean, in
// passes, until the reserved memory is back under threshold * allowed. As in PyTorch a
// pass does not stop at the target (so the GC does not run again at once), and the mean
// counts expandable blocks, which are never released.
void DeviceAllocator::garbage_collect_cached_blocks(Lock& lock) {
  size_t threshold = size_t(config_->garbage_collection_threshold * double(allowed_memory_maximum_));
  if (total_allocated_memory_ <= threshold) return;
  const std::vector<StreamId> busy = settle_streams(lock);  // their blocks stay
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
        release_block(b);
      }
      freed_any = true;
      age_sum -= age;
      remaining -= 1;
      b = nullptr;
    }
  }
}

// §3.4: take `block` (not in any index), split off the request if the rules say so.
uintptr_t DeviceAllocator::alloc_found_block(const Request& r, Block* block) {
  BlockPool* pool = pool_of(block);
  const bool small = pool->is_small;
  const bool already_split = block->is_split();
  Block* result = block;
  if (should_split(block, r.size)) {
    size_t remaining = block->size - r.size;
    result = new_block();
    result->ptr = block->ptr;
    result->size = r.size;
    result->order = block->order;
    result->index = block->index;
    result->seg = block->seg;
    result->expandable = block->expandable;
    result->prev = block->prev;
    if (result->prev) result->prev->next = result;
    else block->seg->first = result;
    result->next = block;
    block->prev = result;
    block->ptr += r.size;
    block->size = remaining;
    block->requested_size = 0;
    set_gc_count_base(block, pool);
    block->index->insert(block);
    if (block->expandable) {
      // expandable blocks are left out of the inactive_split stats on purpose
    } else if (already_split) {
      stat_sub(stats_.inactive_split_bytes, small, int64_t(r.size));
    } else {
      stat_add(stats_.inactive_split, small, 1);
      stat_add(stats_.inactive_split_bytes, small, int64_t(remaining));
    }
  } else if (already_split && !block->expandable) {
    stat_sub(stats_.inactive_split, small, 1);
    stat_sub(stats_.inactive_split_bytes, small, int64_t(block->size));
  }
  result->allocated = true;
  result->requested_size = r.orig_size;
  if (*r.frames || result->has_frames) {  // without history, the cold part stays untouched
    result->cold().frames = *r.frames;
    result->has_frames = *r.frames != nullptr;
  }
  allocated_.insert(result->ptr, result);
  stat_add(stats_.allocation, small, 1);
  stat_add(stats_.allocated_bytes, small, int64_t(result->size));
  if (pending_.count[kAggregate]) note_active_peaks(small);  // else active == allocation
  stat_add(stats_.requested_bytes, small, int64_t(r.orig_size));
  result->oversize = result->size >= max_split();
  if (result->oversize) stats_.oversize_allocations.increase(1);
  if (history_on_)
    record_trace(TraceAction::kAlloc, result->ptr, r.orig_size, r.stream,
                 pool->owner ? pool->owner->id : MempoolId{}, *r.frames);
  return result->ptr;
}

// ---------------------------------------------------------------- free (§5)

bool DeviceAllocator::owns(uintptr_t ptr) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  return allocated_.find(ptr) != nullptr;
}

bool DeviceAllocator::free(uintptr_t ptr, const FramesPtr& free_frames) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  Block* b = allocated_.erase(ptr);
  if (!b) return false;
  const bool small = pool_of(b)->is_small;
  b->allocated = false;
  stat_sub(stats_.allocation, small, 1);
  stat_sub(stats_.allocated_bytes, small, int64_t(b->size));
  if (b->oversize) stats_.oversize_allocations.decrease(1);
  b->oversize = false;
  if (__builtin_expect(history_on_ || b->has_stream_uses, 0)) free_noted(b, free_frames);
  else free_block(b);
  return true;
}

// The rest of free() when history is on or the block has stream uses, out of line: the
// fast path keeps a small frame.
void DeviceAllocator::free_noted(Block* b, const FramesPtr& free_frames) {
  if (history_on_) {
    const FramesPtr& frames = record_context_ < RecordContext::kAll || !free_frames ? b->cold().frames : free_frames;
    record_trace(TraceAction::kFreeRequested, b->ptr, b->requested_size, b->seg->stream,
                 pool_of(b)->owner ? pool_of(b)->owner->id : MempoolId{}, frames);
  }
  if (b->has_stream_uses) {
    begin_pending(b);
    if (!captures_underway_.empty()) {
      b->deferred = true;  // no event may be recorded or queried during a capture
      deferred_.push_back(b);
      update_plain();
    } else {
      insert_events(b);
    }
  } else {
    free_block_in_call(b, free_frames);
  }
}

void DeviceAllocator::free_block_in_call(Block* b, const FramesPtr& frames) {
  const CallFramesScope call(&frames);
  free_block(b);
}

void DeviceAllocator::insert_events(Block* b) {
  for (const StreamUse& use : b->cold().stream_uses) {
    Stream* s = emulator_->stream(device_, use.stream);
    auto it = std::find_if(stream_events_.begin(), stream_events_.end(),
                           [&](auto& e) { return e.first == s; });
    if (it == stream_events_.end()) {
      stream_events_.emplace_back(s, std::deque<std::pair<EventMark, Block*>>());
      it = std::prev(stream_events_.end());
    }
    EventMark mark{s, s->enqueued()};
    it->second.emplace_back(mark, b);
    b->event_count += 1;
    pending_event_count_ += 1;
  }
  b->cold().stream_uses.clear();
  b->has_stream_uses = false;
  update_plain();
}

// §5.3: free the blocks whose events completed, in per-stream FIFO order.
void DeviceAllocator::process_events() {
  if (!deferred_.empty() && captures_underway_.empty()) {
    std::vector<Block*> deferred;
    deferred.swap(deferred_);
    for (Block* b : deferred) {
      b->deferred = false;
      std::vector<StreamUse>& uses = b->cold().stream_uses;
      uses.erase(std::remove_if(uses.begin(), uses.end(), [](const StreamUse& u) { return u.during_capture; }),
                 uses.end());
      b->has_stream_uses = !uses.empty();
      if (!b->has_stream_uses) {
        end_pending(b);
        free_block(b);
      } else {
        insert_events(b);
      }
    }
  }
  for (auto it = stream_events_.begin(); it != stream_events_.end();) {
    auto& fifo = it->second;
    while (!fifo.empty() && fifo.front().first.query()) {
      Block* b = fifo.front().second;
      fifo.pop_front();
      pending_event_count_ -= 1;
      if (--b->event_count == 0) {
        end_pending(b);
        free_block(b);
      }
    }
    it = fifo.empty() ? stream_events_.erase(it) : std::next(it);
  }
  update_plain();
}

void DeviceAllocator::begin_pending(Block* b) { pending_.add(pool_of(b)->is_small, int64_t(b->size), 1); }
void DeviceAllocator::end_pending(Block* b) {
  pending_.add(pool_of(b)->is_small, int64_t(b->size), -1);
  ++pending_frees_done_;
}

// A malloc while frees are pending: active (allocation + pending) may reach a new peak
// that the allocation's own peak does not show.
void DeviceAllocator::note_active_peaks(bool small) {
  const int k = small ? kSmallPool : kLargePool;
  auto raise = [&](StatArray& active, const StatArray& alloc, const int64_t* extra) {
    active[k].peak = std::max(active[k].peak, alloc[k].current + extra[k]);
    const int64_t all = both_kinds_current(alloc) + extra[kAggregate];
    active[kAggregate].peak = std::max(active[kAggregate].peak, all);
  };
  raise(stats_.active, stats_.allocation, pending_.count);
  raise(stats_.active_bytes, stats_.allocated_bytes, pending_.bytes);
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

// §3.5: return a freed block to its pool, merging with free neighbours.
void DeviceAllocator::free_block(Block* b) {
  BlockPool* pool = pool_of(b);
  const bool small = pool->is_small;
  if (history_on_)
    record_trace(TraceAction::kFreeCompleted, b->ptr, b->requested_size, b->seg->stream,
                 pool->owner ? pool->owner->id : MempoolId{}, call_frames_or(b->cold().frames));
  if (b->has_frames) {
    b->cold().frames.reset();
    b->has_frames = false;
  }
  int64_t net_split_blocks = 0, net_split_bytes = 0;
  if (size_t subsumed = try_merge(b, b->prev)) {
    net_split_blocks -= 1;
    net_split_bytes -= int64_t(subsumed);
  }
  if (size_t subsumed = try_merge(b, b->next)) {
    net_split_blocks -= 1;
    net_split_bytes -= int64_t(subsumed);
  }
  stat_sub(stats_.requested_bytes, small, int64_t(b->requested_size));
  if (b->is_split()) {
    net_split_blocks += 1;
    net_split_bytes += int64_t(b->size);
  }
  if (!b->expandable) {
    stat_update(stats_.inactive_split, small, net_split_blocks);
    stat_update(stats_.inactive_split_bytes, small, net_split_bytes);
  }
  set_gc_count_base(b, pool);
  b->index->insert(b);
}

// Merges free neighbour `src` into `dst`; returns the bytes taken over (0 if not mergeable).
size_t DeviceAllocator::try_merge(Block* dst, Block* src) {
  if (!src || !src->in_index) return 0;  // indexed == free: not allocated, nothing pending
  dst->index->erase(src);  // neighbours share the segment's index
  size_t subsumed = src->size;
  absorb(dst, src);
  return subsumed;
}

// dst takes over the range of its neighbour src (either side); src is recycled.
void DeviceAllocator::absorb(Block* dst, Block* src) {
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
  if (src->mapped && !src->expandable) recycle_clean_block(src);  // out of the free index: clean
  else delete_block(src);
}

void DeviceAllocator::record_stream(uintptr_t ptr, StreamId stream) {
  emulator_->stream(device_, stream);  // validates the stream id
  lock();
  Lock lock(mu_, std::adopt_lock);
  Block* b = allocated_.find(ptr);
  if (!b) throw InvalidState("invalid device pointer: " + std::to_string(ptr));
  if (stream == b->seg->stream) return;  // its own stream: nothing to wait for
  for (const StreamUse& u : b->cold().stream_uses)
    if (u.stream == stream) return;
  b->cold().stream_uses.push_back(StreamUse{stream, !captures_underway_.empty()});
  b->has_stream_uses = true;
}

size_t DeviceAllocator::block_size(uintptr_t ptr) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  Block* b = allocated_.find(ptr);
  return b ? b->size : 0;
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
  const std::vector<StreamId> busy = settle_streams(lock);
  if (id.is_default() && captures_underway_.empty()) {
    release_pool_blocks(large_blocks_, busy);
    release_pool_blocks(small_blocks_, busy);
  }
  // Freeable private pools (use count 0) give back their fully free segments, once no
  // stream is busy: a graph replays its pool's memory on whatever stream is current.
  std::vector<MempoolId> gone;
  for (auto& [pid, p] : pools_) {
    if (p->use_count > 0 || (!id.is_default() && pid != id) || !busy.empty()) continue;
    release_pool_blocks(p->large_blocks, busy);
    release_pool_blocks(p->small_blocks, busy);
    if (p->segment_count == 0) gone.push_back(pid);
  }
  for (MempoolId pid : gone) pools_.erase(pid);
}

// Memory goes back to the device only once the streams that may still use it are idle,
// as cudaFree (and unmapping) synchronizes the device: a kernel queued before a free on
// the same stream may still use the block, and a graph's replay uses its pool's memory
// on the stream it was replayed on. From the host this waits, with the lock dropped (as
// for events), for every stream of the device with queued work. If the device saw no
// malloc and no free meanwhile, all free memory predates the wait and none of it is in
// use: everything may go, even if other threads queued new work (kernels that touch no
// memory must not keep a cache from ever being released). Otherwise it waits again, up to
// three times, and then returns the streams still busy: their segments and pages stay
// cached, and so does every private pool while any stream is busy. A kernel (a stream
// worker) waits for nothing, since the streams it would wait for may be waiting for it,
// and gets the busy streams at once (its own among them).
std::vector<StreamId> DeviceAllocator::settle_streams(Lock& lock) {
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

void DeviceAllocator::release_pool_blocks(BlockPool& pool, const std::vector<StreamId>& busy) {
  std::vector<Block*> whole, to_unmap;
  for (auto& [s, idx] : pool.by_stream) {
    if (is_busy(busy, s)) continue;
    idx->for_each([&](Block* b) {
      if (b->expandable) to_unmap.push_back(b);
      else if (!b->is_split()) whole.push_back(b);
    });
  }
  for (Block* b : whole)
    if (b->in_index && !b->is_split()) release_block(b);  // a Python raw free may have re-entered
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
void DeviceAllocator::release_block(Block* b) {
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
                 pool->owner ? pool->owner->id : MempoolId{}, call_frames_or(seg->frames));
  if (pool->owner) pool->owner->segment_count -= 1;
  forget_segment(seg);
  delete_block(b);
}

// ---------------------------------------------------------------- expandable segments (§11)
//
// One reserved range per (pool, stream), 1.125 x the device capacity; pages (2 MiB small,
// 20 MiB large) are mapped at the lowest address where the request fits, and fully free
// pages are unmapped by empty_cache. Mapped pages count as reserved memory and as
// num_device_alloc; the `segment` stats are not touched.

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
    return b && b->mapped && !b->allocated && b->event_count == 0 && !b->has_stream_uses && !b->deferred;
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
                 pool->owner ? pool->owner->id : MempoolId{}, *r.frames);
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
    record_trace(TraceAction::kSegmentUnmap, uptr, usize, seg->stream, pool->owner ? pool->owner->id : MempoolId{},
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
  delete_block(b);
}

// ---------------------------------------------------------------- OOM (§4.6)

void DeviceAllocator::raise_oom(Lock& lock, const Request& r) {
  DeviceMemory& mem = emulator_->device(device_).memory();
  const size_t total = mem.capacity(), device_free = total - mem.used();
  stats_.num_ooms += 1;
  if (history_on_) {
    record_trace(TraceAction::kOom, device_free, r.size, r.stream,
                 r.pool->owner ? r.pool->owner->id : MempoolId{}, *r.frames);
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
      if (Block* b = idx->largest()) m = std::max(m, b->size);  // O(1) per index
  };
  scan(small_blocks_);
  scan(large_blocks_);
  for (auto& [id, p] : pools_) {
    scan(p->small_blocks);
    scan(p->large_blocks);
  }
  return {small, large};
}

// ---------------------------------------------------------------- pools and routing

PrivatePool* DeviceAllocator::find_pool(MempoolId id) {
  auto it = pools_.find(id);
  return it == pools_.end() ? nullptr : it->second.get();
}

void DeviceAllocator::create_or_incref_pool(MempoolId id, std::shared_ptr<RawAllocator> allocator) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (id.is_default()) throw InvalidArgument("the default pool (0, 0) is not a private pool");
  PrivatePool* p = find_pool(id);
  if (!p) {
    pools_.emplace(id, std::make_unique<PrivatePool>(id, std::move(allocator), &arena_));
    return;
  }
  if (p->use_count <= 0)
    throw InvalidState("mempool (" + std::to_string(id.first) + ", " + std::to_string(id.second) +
                       ") was released and cannot be used again");
  if (allocator) throw InvalidArgument("an allocator can only be given when a pool is created");
  p->use_count += 1;
}

void DeviceAllocator::release_pool(MempoolId id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  PrivatePool* p = find_pool(id);
  if (!p || p->use_count <= 0)
    throw InvalidState("releasePool: mempool (" + std::to_string(id.first) + ", " + std::to_string(id.second) +
                       ") is not in use");
  p->use_count -= 1;
  if (p->use_count == 0) {
    use_on_oom_pools_.erase(std::remove(use_on_oom_pools_.begin(), use_on_oom_pools_.end(), id),
                            use_on_oom_pools_.end());
  }
}

int DeviceAllocator::pool_use_count(MempoolId id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  PrivatePool* p = find_pool(id);
  return p ? p->use_count : 0;
}

void DeviceAllocator::begin_allocate_to_pool(MempoolId id, AllocationFilter filter) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (!find_pool(id)) throw InvalidState("beginAllocateToPool: unknown mempool_id");
  for (auto& [cid, f] : captures_underway_)
    if (cid == id) throw InvalidState("beginAllocateToPool: already recording to mempool_id");
  captures_underway_.emplace_back(id, filter);
  update_plain();
}

void DeviceAllocator::end_allocate_to_pool(MempoolId id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  for (auto it = captures_underway_.begin(); it != captures_underway_.end(); ++it) {
    if (it->first == id) {
      captures_underway_.erase(it);
      update_plain();
      return;
    }
  }
  throw InvalidState("endAllocatePool: not currently recording to mempool_id");
}

void DeviceAllocator::set_use_on_oom(MempoolId id, bool on) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  auto it = std::find(use_on_oom_pools_.begin(), use_on_oom_pools_.end(), id);
  if (on && it == use_on_oom_pools_.end()) use_on_oom_pools_.push_back(id);
  if (!on && it != use_on_oom_pools_.end()) use_on_oom_pools_.erase(it);
}

void DeviceAllocator::set_no_split(MempoolId id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (PrivatePool* p = find_pool(id)) p->no_split = true;
}

void DeviceAllocator::set_stream_capture(StreamId stream, uint64_t capture_id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  stream_capture_.erase(std::remove_if(stream_capture_.begin(), stream_capture_.end(),
                                       [&](auto& e) { return e.first == stream; }),
                        stream_capture_.end());
  if (capture_id) stream_capture_.emplace_back(stream, capture_id);
}

bool DeviceAllocator::any_capture_underway() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  return !captures_underway_.empty();
}

// ---------------------------------------------------------------- observability

void DeviceAllocator::record_trace(TraceAction a, uintptr_t addr, size_t size, StreamId stream, MempoolId pool,
                                   const FramesPtr& frames) {
  TraceEntry e{a, addr, size, stream, epoch_us(), pool,
               record_context_ >= RecordContext::kAlloc ? frames : FramesPtr(), user_metadata()};
  trace_.push(std::move(e));
}

void DeviceAllocator::set_history(bool enabled, RecordContext context, size_t max_entries, bool clear) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (!enabled) {
    history_on_ = false;
    record_context_ = RecordContext::kNever;
    trace_.clear();
    update_plain();
    return;
  }
  if (!history_on_ || clear) trace_.set_capacity(max_entries);
  else trace_.resize(max_entries);  // PyTorch applies a new size without clearing
  history_on_ = true;
  record_context_ = context;
  update_plain();
}

std::vector<TraceEntry> DeviceAllocator::trace() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  return trace_.ordered();
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
                            : (b->event_count > 0 || b->has_stream_uses || b->deferred) ? "active_pending_free"
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

std::string DeviceAllocator::check_invariants() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  std::ostringstream err;
  auto fail = [&](const std::string& what) {
    if (err.tellp() == 0) err << "device " << device_ << ": ";
    else err << "; ";
    err << what;
  };
  // Recount everything from the segments.
  int64_t seg_count[3] = {}, reserved[3] = {}, alloc_count[3] = {}, alloc_bytes[3] = {};
  int64_t active_count[3] = {}, active_bytes[3] = {}, split_count[3] = {}, split_bytes[3] = {}, requested[3] = {};
  size_t indexed = 0, allocated_blocks = 0, unmapped_blocks = 0;
  for (size_t i = 0; i < segments_.size(); ++i) {
    Segment* seg = segments_[i];
    int k = seg->pool->is_small ? kSmallPool : kLargePool;
    if (seg->list_index != i) fail("segment list index mismatch");
    if (!seg->expandable) {  // expandable: only mapped pages count, and not as segments
      seg_count[k] += 1;
      reserved[k] += int64_t(seg->size);
    }
    uintptr_t expect = seg->base;
    Block* prev = nullptr;
    if (!seg->first || seg->first->prev) fail("segment head is not the first block");
    for (Block* b = seg->first; b; prev = b, b = b->next) {
      if (b->ptr != expect) fail("blocks do not tile segment at " + std::to_string(seg->base));
      if (b->prev != prev) fail("broken prev link");
      if (b->seg != seg || b->index != seg->index || pool_of(b) != seg->pool)
        fail("block/segment mismatch");
      if (b->has_frames != (b->cold().frames != nullptr)) fail("has_frames out of step with frames");
      if (b->size == 0 || b->size % kMinBlockSize) fail("block size not a positive multiple of 512");
      expect += b->size;
      if (b->expandable != seg->expandable) fail("block/segment expandable mismatch");
      if (!b->mapped) {
        unmapped_blocks += 1;
        if (!seg->expandable || b->allocated || b->in_index) fail("unmapped block in use or indexed");
        if (!pool_of(b)->unmapped.count(b)) fail("unmapped block missing from the pool's unmapped set");
        if (prev && !prev->mapped) fail("two adjacent unmapped blocks were not merged");
        continue;
      }
      if (seg->expandable) {
        reserved[k] += int64_t(b->size);
        if ((b->ptr - seg->base) % seg->page_size && prev && !prev->mapped)
          fail("mapped range does not start on a page boundary");
      }
      bool pending = !b->allocated && (b->event_count > 0 || !b->cold().stream_uses.empty() || b->deferred);
      if (b->allocated) {
        alloc_count[k] += 1;
        alloc_bytes[k] += int64_t(b->size);
        allocated_blocks += 1;
        if (allocated_.find(b->ptr) != b) fail("allocated block missing from the pointer map");
        if (b->in_index) fail("allocated block is in a free index");
      }
      if (b->allocated || pending) {
        active_count[k] += 1;
        active_bytes[k] += int64_t(b->size);
        requested[k] += int64_t(b->requested_size);
        if (b->in_index) fail("active block is in a free index");
      } else {
        if (!b->in_index) fail("inactive block is not in its free index");
        indexed += 1;
        if (b->is_split() && !b->expandable) {
          split_count[k] += 1;
          split_bytes[k] += int64_t(b->size);
        }
        if (prev && !prev->allocated && prev->in_index) fail("two adjacent inactive blocks were not merged");
      }
    }
    if (expect != seg->base + seg->size) fail("blocks do not cover segment at " + std::to_string(seg->base));
  }
  if (allocated_blocks != allocated_.size()) fail("pointer map holds blocks that are not allocated");
  const bool plain = plain_;
  update_plain();
  if (plain != plain_) fail("plain_ is out of date");
  for (Block* b = spare_blocks_; b; b = b->next)
    if (b->prev || b->allocated || b->deferred || b->in_index || b->has_stream_uses || !b->mapped ||
        b->expandable || b->oversize || b->has_frames || b->event_count || b->cold().frames ||
        !b->cold().stream_uses.empty()) {
      fail("a spare block is not clean");
      break;
    }
  size_t in_indexes = 0;
  auto count_pool = [&](BlockPool& bp) {
    for (auto& [s, idx] : bp.by_stream) in_indexes += idx->size();
  };
  size_t in_unmapped = 0;
  auto count_unmapped = [&](BlockPool& bp) { in_unmapped += bp.unmapped.size(); };
  count_pool(small_blocks_);
  count_pool(large_blocks_);
  count_unmapped(small_blocks_);
  count_unmapped(large_blocks_);
  for (auto& [id, p] : pools_) {
    count_pool(p->small_blocks);
    count_pool(p->large_blocks);
    count_unmapped(p->small_blocks);
    count_unmapped(p->large_blocks);
  }
  if (in_unmapped != unmapped_blocks) fail("unmapped sets hold blocks that are not in any segment");
  if (in_indexes != indexed) fail("free indexes hold " + std::to_string(in_indexes) + " blocks, expected " +
                                  std::to_string(indexed));
  DeviceStats st = stats_;
  st.derive_active(pending_);
  st.finalize();
  auto check = [&](const char* name, StatArray& s, int64_t* expect) {
    for (int k : {kSmallPool, kLargePool})
      if (s[k].current != expect[k])
        fail(std::string(name) + (k == kSmallPool ? ".small_pool" : ".large_pool") + ".current is " +
             std::to_string(s[k].current) + ", recount gives " + std::to_string(expect[k]));
    for (int f = 0; f < 4; ++f) {
      auto field = [&](const Stat& st) {
        return f == 0 ? st.current : f == 1 ? st.peak : f == 2 ? st.allocated : st.freed;
      };
      if (f != 1 && field(s[kAggregate]) != field(s[kSmallPool]) + field(s[kLargePool]))
        fail(std::string(name) + ": all != small_pool + large_pool");
    }
    for (int k : {kAggregate, kSmallPool, kLargePool})
      if (s[k].peak < s[k].current) fail(std::string(name) + ": peak below current");
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
    fail("total_allocated_memory != reserved_bytes");
  return err.str();
}

}  // namespace mtia
