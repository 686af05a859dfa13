// device_allocator.cpp: the hot path of one device's allocator: the malloc ladder
// (§4.1: round, route, best fit, new segment, the retries of §4.2-§4.5, OOM), splitting
// (§3.4), free and merging (§3.5), cross-stream frees (record_stream and their events,
// §5.3), and the checkers of the invariants this code keeps (segment tiling, block
// states, spare blocks, the plain_ flag). Section numbers refer to
// ../shared/spec/allocator_core.md (PyTorch's CUDACachingAllocator restated).
//
// Relies on: device_allocator_internal.h (block recycling and merging, find_pool,
// inline), and, off the fast path only, the other device_allocator_*.cpp files: release
// and GC (the retries of a cache miss), expandable segments, stats (the OOM message) and
// history (record_trace). Everything malloc and free call on a cache hit
// is defined in this file or in a header, so that it inlines.
#include "device_allocator.h"

#include <algorithm>
#include <cstdio>
#include <string>

#include "device_allocator_internal.h"
#include "errors.h"
#include "size_policy.h"

namespace mtia {

// The caller-stack thread-local of device_allocator_internal.h: its one definition.
thread_local const FramesPtr* t_call_frames = nullptr;

DeviceAllocator::DeviceAllocator(DeviceIndex device, Emulator* emulator, std::shared_ptr<RawAllocator> raw,
                                 const AllocatorConfig& config)
    : device_(device), emulator_(emulator), config_(config), raw_(std::move(raw)),
      small_blocks_(true, nullptr, &arena_), large_blocks_(false, nullptr, &arena_) {
  check_meta_layout();
  stats_.max_split_size =
      config.max_split_size == AllocatorConfig::kUnlimited ? -1 : int64_t(config.max_split_size);
  if (config.per_process_memory_fraction < 1.0) set_memory_fraction(config.per_process_memory_fraction);
}

void DeviceAllocator::set_config(const AllocatorConfig& config, uint64_t version) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (version <= config_version_) return;  // a later set_config got here first
  config_ = config;
  config_version_ = version;
}

AllocatorConfig DeviceAllocator::config() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  return config_;
}

DeviceAllocator::~DeviceAllocator() {
  // Memory still held goes back with the emulator's mapping; only metadata is freed here.
  for (Segment* seg : segments_) delete seg;
  // Free indexes hold arena nodes: drop the pools before the arena.
  small_blocks_.by_stream.clear();
  large_blocks_.by_stream.clear();
  pools_.clear();
}

// Blocks come in chunks, for locality; spare ones are linked through `next`.
void DeviceAllocator::add_block_chunk() {
  block_chunks_.emplace_back(new BlockChunk);
  for (size_t i = BlockChunk::kBlocks; i-- > 0;) recycle_clean_block(&block_chunks_.back()->hot[i]);
}

template <bool kSmall, bool kDefaultPool>
MTIA_INLINE bool DeviceAllocator::should_split(const Block* b, const BlockPool* pool, size_t size) const {
  if (!kDefaultPool && __builtin_expect(pool->owner != nullptr, 0) && pool->owner->no_split) return false;
  size_t remaining = b->size - size;
  if (kSmall || config_.expandable_segments) return remaining >= kMinBlockSize;
  return size < max_split() && remaining > kSmallSize;
}

// ---------------------------------------------------------------- malloc (§4.1)

uintptr_t DeviceAllocator::malloc(size_t orig_size, StreamId stream, const FramesPtr& frames, bool array_owned) {
  return malloc_entry(orig_size, stream, frames, array_owned);
}

// No stack, not a DeviceArray's: the same body with those arguments constant.
uintptr_t DeviceAllocator::malloc(size_t orig_size, StreamId stream) {
  return malloc_entry(orig_size, stream, kNoFrames, false);
}

MTIA_INLINE uintptr_t DeviceAllocator::malloc_entry(size_t orig_size, StreamId stream, const FramesPtr& frames,
                                                     bool array_owned) {
  lock_blocking(mu_);
  Lock lock(mu_, std::adopt_lock);

  // 1. Round; choose the pool (a capture may route it to a private one).
  Request r;
  r.orig_size = orig_size;
  r.size = round_size(orig_size, config_);
  r.stream = stream;
  r.alloc_size = 0;  // sized on a miss
  r.array_owned = array_owned;
  // The rest is compiled once per pool kind (every block found is of the request's kind:
  // a use_on_oom pool is asked for the same size class), and once more, out of line, for
  // when a capture, a pending free or history keeping stacks is about (not plain_).
  if (__builtin_expect(!plain_, 0)) {
    lock.release();  // to malloc_not_plain
    return malloc_not_plain(orig_size, stream, array_owned, frames);
  }
  r.frames = &kNoFrames;
  if (r.size <= kSmallSize) {
    r.pool = &small_blocks_;
    return malloc_in_pool<true, true>(lock, r);
  }
  r.pool = &large_blocks_;
  return malloc_in_pool<false, true>(lock, r);
}

// The fast path hands the out-of-line paths the request's fields, in registers, not the
// request, and the lock, not its Lock: either needing an address (or the request a
// 64-byte copy on the stack) would keep the fast path from holding them in registers.
uintptr_t DeviceAllocator::malloc_not_plain(size_t orig_size, StreamId stream, bool array_owned,
                                            const FramesPtr& frames) {
  Lock lock(mu_, std::adopt_lock);  // taken by malloc()
  Request r;
  r.orig_size = orig_size;
  r.size = round_size(orig_size, config_);
  r.stream = stream;
  r.alloc_size = 0;
  r.array_owned = array_owned;
  r.frames = frames && history_on_ && record_context_ >= RecordContext::kState ? &frames : &kNoFrames;
  // 2. Reclaim blocks whose cross-stream events completed (never during a capture).
  if (captures_underway_.empty() && (pending_event_count_ || !deferred_.empty()))
    process_events_with_call_frames(*r.frames);
  r.pool = captures_underway_.empty() ? default_pool(r.size) : choose_pool(r.size, r.stream);
  if (r.pool->is_small) return malloc_in_pool<true, false>(lock, r);
  return malloc_in_pool<false, false>(lock, r);
}

// kPlain: plain_ holds (no capture, pending free or history keeping stacks), so the
// request has no frames to record and active == allocation.
template <bool kSmall, bool kPlain>
MTIA_INLINE uintptr_t DeviceAllocator::malloc_in_pool(Lock& lock, const Request& r) {
  // 3. Best fit among cached blocks of this pool and stream; 4. else a new segment.
  Block* block = get_free_block<kPlain>(r, r.pool);
  if (__builtin_expect(!block, 0)) {
    if constexpr (kPlain) {
      lock.release();  // to malloc_miss_plain
      return malloc_miss_plain<kSmall>(r.orig_size, r.size, r.stream, r.array_owned);
    } else {
      return malloc_miss<kSmall, false>(lock, r);
    }
  }
  // 6. Hand out (splitting if the rules say so).
  return alloc_found_block<kSmall, kPlain>(r, block);
}

template <bool kSmall>
uintptr_t DeviceAllocator::malloc_miss_plain(size_t orig_size, size_t size, StreamId stream, bool array_owned) {
  Lock lock(mu_, std::adopt_lock);  // taken by malloc()
  Request r;
  r.orig_size = orig_size;
  r.size = size;
  r.alloc_size = 0;
  r.stream = stream;
  r.pool = kSmall ? &small_blocks_ : &large_blocks_;
  r.frames = &kNoFrames;
  r.array_owned = array_owned;
  return malloc_miss<kSmall, true>(lock, r);
}

template <bool kSmall, bool kPlain>
uintptr_t DeviceAllocator::malloc_miss(Lock& lock, Request r) {
  Block* block = alloc_on_miss(lock, r);
  // 5. Out of memory.
  if (!block) raise_oom(lock, r);
  // A raw allocator that ran Python may have changed what plain_ said; a use_on_oom
  // pool's block is not of the request's (default) pool.
  if (kPlain && (!plain_ || pool_of(block) != r.pool)) return alloc_found_block<kSmall, false>(r, block);
  // 6. Hand out (splitting if the rules say so).
  return alloc_found_block<kSmall, kPlain>(r, block);
}

// Steps 4a-4e of the ladder, out of line: the fast path keeps a small frame.
Block* DeviceAllocator::alloc_on_miss(Lock& lock, Request& r) {
  const CallFramesScope call(r.frames);  // for the frees and releases below
  r.alloc_size = segment_size_for(r.size);
  // 4a. Garbage-collect old cached blocks when a fraction and a threshold are set.
  if (fraction_limit_ && config_.garbage_collection_threshold > 0) garbage_collect_cached_blocks(lock);
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

void DeviceAllocator::process_events_with_call_frames(const FramesPtr& frames) {
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
template <bool kPlain>
Block* DeviceAllocator::get_free_block(const Request& r, BlockPool* pool) {
  // The GC clock ticks only while a fraction (so no plain path) and a threshold are set.
  if (!kPlain && fraction_limit_ && config_.garbage_collection_threshold > 0) {
    ++pool->get_free_blocks_call_count;
    if (__builtin_expect(!gc_clock_started_, 0)) {
      gc_clock_started_ = true;
      update_plain();
    }
  }
  FreeIndex* idx = pool->index(r.stream);
  if (!idx) return nullptr;
  size_t bin;
  Block* b = idx->lower_bound(r.size, &bin);
  if (!b) return nullptr;
  if (b->expandable) {
    if (expandable_active(pool)) {
      // Best fit counts what an expandable block can grow into (the unmapped space after it).
      // A block that cannot grow is the best already: a later one is no smaller.
      auto grow = [](const Block* x) { return x->size + (x->next && !x->next->mapped ? x->next->size : 0); };
      if (grow(b) != b->size) {
        for (Block* next = idx->successor(b); b->expandable && next && grow(next) < grow(b);
             next = idx->successor(b))
          b = next;
        bin = FreeIndex::bin_for(b->size);
      }
    } else {  // expandable segments were switched off: their blocks are not used
      do b = idx->successor(b);
      while (b && b->expandable);
      if (!b) return nullptr;
      bin = FreeIndex::bin_for(b->size);
    }
  }
  // Below max_split_size (the common case) both rules pass: r.size <= b->size, or b is an
  // expandable block that grows to r.size, and then b->size < r.size + R.
  const size_t M = max_split();
  if (__builtin_expect(b->size >= M, 0)) {
    if (r.size < M) return nullptr;  // normal requests never take oversize blocks
    if (b->size >= r.size + config_.max_non_split_rounding_size) return nullptr;  // oversize: < R of slack
  }
  idx->erase_in(b, bin);
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
    if (Block* b = get_free_block<false>(r, p->blocks_for(r.size))) return b;
  }
  return nullptr;
}

// §3.4: take `block` (not in any index), split off the request if the rules say so.
template <bool kSmall, bool kPlain>
MTIA_INLINE uintptr_t DeviceAllocator::alloc_found_block(const Request& r, Block* block) {
  // On the plain path the block is of the request's pool, a default one (malloc_miss
  // sends a use_on_oom pool's block the other way).
  BlockPool* const pool = kPlain ? r.pool : pool_of(block);
  constexpr bool small = kSmall;
  const bool already_split = block->is_split();
  // The hand-out's flags: allocated, and the DeviceArray mark (block.h) if asked for.
  const uint64_t hand_out = Block::kAllocatedBit | (r.array_owned ? Block::kDeferredBit : 0);
  Block* result = block;
  if (should_split<kSmall, kPlain>(block, pool, r.size)) {
    size_t remaining = block->size - r.size;
    result = new_block();
    result->ptr = block->ptr;
    result->size = r.size;
    // One word: block's order and expandable flag, mapped, the hand-out's flags (a spare
    // block is clean: no events, stream uses, frames or other flags).
    result->meta = (block->meta & (Block::kOrderMask | Block::kExpandableBit)) | Block::kMappedBit | hand_out;
    result->index = block->index;
    result->seg = block->seg;
    result->prev = block->prev;
    if (result->prev) result->prev->next = result;
    else block->seg->first = result;
    result->next = block;
    block->prev = result;
    block->ptr += r.size;
    block->size = remaining;
    block->requested_size = 0;
    if (!kPlain) set_gc_count_base(block, pool);  // plain: no GC clock has started
    block->index->insert(block);
    if (block->expandable) {
      // expandable blocks are left out of the inactive_split stats on purpose
    } else if (already_split) {
      stat_sub(stats_.inactive_split_bytes, small, int64_t(r.size));
    } else {
      stat_add(stats_.inactive_split, small, 1);
      stat_add(stats_.inactive_split_bytes, small, int64_t(remaining));
    }
  } else {
    if (already_split && !block->expandable) {
      stat_sub(stats_.inactive_split, small, 1);
      stat_sub(stats_.inactive_split_bytes, small, int64_t(block->size));
    }
    block->meta |= hand_out;
  }
  result->requested_size = r.orig_size;
  if ((!kPlain && *r.frames) || result->has_frames) {  // without history, the cold part stays untouched
    result->cold().frames = *r.frames;
    result->has_frames = *r.frames != nullptr;
  }
  allocated_.insert(result->ptr, result);
  stat_add(stats_.allocation, small, 1);
  stat_add(stats_.allocated_bytes, small, int64_t(result->size));
  if (!kPlain && pending_.count[kAggregate]) note_active_peaks(small);  // else active == allocation
  stat_add(stats_.requested_bytes, small, int64_t(r.orig_size));
  if (__builtin_expect(result->size >= max_split(), 0)) {  // result->oversize is false: free clears it
    result->oversize = true;
    stats_.oversize_allocations.increase(1);
  }
  if (kPlain) {  // history without stacks keeps the plain path: its fast record inline
    if (__builtin_expect(history_on_, 0) &&
        !((kPlain || !pool->owner) && trace_.try_record(TraceAction::kAlloc, result->ptr, r.orig_size, r.stream)))
      record_plain_alloc(result);
  } else if (history_on_) {
    record_trace(TraceAction::kAlloc, result->ptr, r.orig_size, r.stream, pool_id_of(pool), *r.frames);
  }
  return result->ptr;
}

// The plain path's alloc record when the ring's fast path cannot take it: out of line
// and from the block alone (its stream is the request's), so that the plain path keeps
// its registers, and its cost, with history off.
void DeviceAllocator::record_plain_alloc(const Block* b) {
  record_trace(TraceAction::kAlloc, b->ptr, b->requested_size, b->seg->stream, pool_id_of(pool_of(b)), kNoFrames);
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

// ---------------------------------------------------------------- free (§5)

bool DeviceAllocator::owns(uintptr_t ptr) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  return allocated_.find(ptr) != nullptr;
}

bool DeviceAllocator::free(uintptr_t ptr, const FramesPtr& free_frames, bool by_array) {
  return free_entry(ptr, free_frames, by_array);
}

bool DeviceAllocator::free(uintptr_t ptr) { return free_entry(ptr, kNoFrames, false); }

MTIA_INLINE bool DeviceAllocator::free_entry(uintptr_t ptr, const FramesPtr& free_frames, bool by_array) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  Block* b = allocated_.erase(ptr);
  if (!b) return false;
  // The common free, tested at once: a block of a plain segment, with no stream uses,
  // stack, oversize count or DeviceArray mark, while history is off and no GC clock runs.
  constexpr uint64_t kUnusual = Block::kDeferredBit | Block::kStreamUsesBit | Block::kExpandableBit |
                                Block::kOversizeBit | Block::kFramesBit;
  if (__builtin_expect(!(b->meta & kUnusual), 1) && __builtin_expect(!free_watched_, 1)) {
    free_plain_of_either_kind<false>(b);
    return true;
  }
  // The same of an expandable segment's block (an allocated block is mapped), or with
  // history on (without stacks), when the ring's fast path takes the free's pair record.
  if (!(b->meta & (kUnusual & ~Block::kExpandableBit)) && !gc_clock_started_ &&
      (!history_on_ || try_record_free_pair(b))) {
    if (b->expandable) free_plain_of_either_kind<true>(b);
    else free_plain_of_either_kind<false>(b);
    return true;
  }
  free_unusual(b, free_frames, by_array);
  return true;
}

// A free's request and completion in one slot by the ring's fast path (no stack: a
// default pool's block); false: not taken, nothing written.
MTIA_INLINE bool DeviceAllocator::try_record_free_pair(const Block* b) {
  return !pool_of(b)->owner && trace_.try_record_pair(TraceAction::kFreeRequested, TraceAction::kFreeCompleted,
                                                      b->ptr, b->requested_size, b->seg->stream);
}

// free() of the common block (see free_entry): its flags need no more tests, and its
// neighbours in the index, of the same segment, are clean once out of it (but for the
// expandable flag, which kExpandable says they have).
template <bool kSmall, bool kExpandable>
MTIA_INLINE void DeviceAllocator::free_plain(Block* b) {
  // b stays marked allocated until the index takes it (nothing on the way reads the mark).
  stat_sub(stats_.allocation, kSmall, 1);
  stat_sub(stats_.allocated_bytes, kSmall, int64_t(b->size));
  free_block_of<kSmall, false, true, kExpandable>(b);
}

template <bool kExpandable>
MTIA_INLINE void DeviceAllocator::free_plain_of_either_kind(Block* b) {
  if (is_small_block(b)) free_plain<true, kExpandable>(b);
  else free_plain<false, kExpandable>(b);
}

// Everything else free() may meet, out of line: the fast path keeps its registers.
void DeviceAllocator::free_unusual(Block* b, const FramesPtr& free_frames, bool by_array) {
  if (__builtin_expect(b->deferred && !by_array, 0)) refuse_array_owned_free(b);
  if (is_small_block(b)) free_allocated<true>(b, free_frames);
  else free_allocated<false>(b, free_frames);
}

template <bool kSmall>
MTIA_INLINE void DeviceAllocator::free_allocated(Block* b, const FramesPtr& free_frames) {
  constexpr bool small = kSmall;
  b->allocated = false;
  b->deferred = false;
  stat_sub(stats_.allocation, small, 1);
  stat_sub(stats_.allocated_bytes, small, int64_t(b->size));
  if (__builtin_expect(b->oversize, 0)) {
    stats_.oversize_allocations.decrease(1);
    b->oversize = false;
  }
  if (__builtin_expect(history_on_ || b->has_stream_uses, 0)) {
    // History without stacks and a block without stream uses (its free completes at
    // once): the request and the completion go in one ring slot, here, and the free goes
    // on as with history off; anything else takes the out-of-line path.
    if (b->has_stream_uses || !try_record_free_pair(b)) {
      free_with_history_or_uses<kSmall>(b, free_frames);
      return;
    }
  }
  free_block_of<kSmall, false>(b);
}

// A free of a live DeviceArray's block by anyone but the array: the block stays allocated
// (back in the pointer map) and the caller gets InvalidState. Out of line (cold).
void DeviceAllocator::refuse_array_owned_free(Block* b) {
  allocated_.insert(b->ptr, b);
  char buf[32];
  snprintf(buf, sizeof buf, "%#llx", static_cast<unsigned long long>(b->ptr));
  throw InvalidState(std::string("pointer ") + buf +
                     " belongs to a live DeviceArray: it is freed when the array is deleted, and freeing it "
                     "now would let the array's memory be handed out again while the array still uses it");
}

// The rest of free() when the block has stream uses, or history is on and the ring's
// fast path did not take the free's pair record (stacks, a private pool, a new clock
// period, a full chunk): out of line, so the fast path keeps a small frame.
template <bool kSmall>
void DeviceAllocator::free_with_history_or_uses(Block* b, const FramesPtr& free_frames) {
  if (history_on_) {
    const FramesPtr& frames = record_context_ < RecordContext::kAll || !free_frames ? b->cold().frames : free_frames;
    // The completion's stack (free_block_of: the call's, else the block's) is the
    // request's unless the context is "alloc" and the call brought one: then the pair
    // takes one slot, with its stack, as without stacks.
    if (!b->has_stream_uses && !pool_of(b)->owner && (!free_frames || frames == free_frames)) {
      const uint32_t stack = trace_stack_id(frames);
      if (stack != kStackNotInterned &&
          trace_.try_record_pair_stack(TraceAction::kFreeRequested, TraceAction::kFreeCompleted, b->ptr,
                                       b->requested_size, b->seg->stream, stack)) {
        free_block_of<kSmall, false>(b);
        return;
      }
    }
    record_trace(TraceAction::kFreeRequested, b->ptr, b->requested_size, b->seg->stream,
                 pool_id_of(pool_of(b)), frames);
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
  } else if (record_context_ < RecordContext::kAlloc) {
    // No trace entry keeps a stack: the call's need not be noted.
    free_block_of<kSmall>(b);
  } else {
    free_block_with_call_frames(b, free_frames);
  }
}

void DeviceAllocator::free_block_with_call_frames(Block* b, const FramesPtr& frames) {
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

// §3.5: return a freed block to its pool, merging with free neighbours.
void DeviceAllocator::free_block(Block* b) {
  if (is_small_block(b)) free_block_of<true>(b);
  else free_block_of<false>(b);
}

template <bool kSmall, bool kMayRecord, bool kPlainBlock, bool kExpandable>
MTIA_INLINE void DeviceAllocator::free_block_of(Block* b) {
  BlockPool* pool = pool_of(b);
  constexpr bool small = kSmall;
  if (kMayRecord && history_on_)
    record_trace(TraceAction::kFreeCompleted, b->ptr, b->requested_size, b->seg->stream,
                 pool_id_of(pool),
                 record_context_ >= RecordContext::kAlloc ? call_frames_or(b->cold().frames) : kNoFrames);
  if (!kPlainBlock && b->has_frames) {
    b->cold().frames.reset();
    b->has_frames = false;
  }
  const int64_t freed_size = int64_t(b->size);  // before merging
  const int64_t merged = int64_t(try_merge<kPlainBlock, kExpandable>(b, b->prev) != 0) +
                         int64_t(try_merge<kPlainBlock, kExpandable>(b, b->next) != 0);
  stat_sub(stats_.requested_bytes, small, int64_t(b->requested_size));
  if (kPlainBlock ? !kExpandable : !b->expandable) {
    if (b->is_split()) {
      // Still a piece of a split segment: one inactive split block for the merged ones,
      // holding their bytes and the freed block's.
      stat_update(stats_.inactive_split, small, 1 - merged);
      stat_add(stats_.inactive_split_bytes, small, freed_size);
    } else {
      // The whole segment is free again: the merged neighbours stop being split blocks.
      stat_sub(stats_.inactive_split, small, merged);
      stat_sub(stats_.inactive_split_bytes, small, int64_t(b->size) - freed_size);
    }
  }
  if (!kPlainBlock) set_gc_count_base(b, pool);  // free_plain: no GC clock has started
  b->index->insert<kPlainBlock>(b);  // free_plain left b marked allocated
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

// ---------------------------------------------------------------- invariants of the above

// Every segment's blocks tile it, in address order, and agree with it:
//   segments_[i].list_index == i;  seg.first.prev == null;  b.next.prev == b
//   seg.first.ptr == seg.base;  b.next.ptr == b.ptr + b.size   (no gap, no overlap)
//   Σ block.size over a segment == segment.size
//   b.seg == seg ∧ b.index == seg.index ∧ pool_of(b) == seg.pool ∧ b.expandable == seg.expandable
//   b.size > 0 ∧ b.size % 512 == 0;  b.has_frames == (b.cold().frames != null)
void DeviceAllocator::check_segment_tiling(InvariantReport& report) {
  for (size_t i = 0; i < segments_.size(); ++i) {
    Segment* seg = segments_[i];
    if (seg->list_index != i) report.fail("segment list index mismatch");
    if (!seg->first || seg->first->prev) report.fail("segment head is not the first block");
    uintptr_t expect = seg->base;
    Block* prev = nullptr;
    for (Block* b = seg->first; b; prev = b, b = b->next) {
      if (b->ptr != expect) report.fail("blocks do not tile segment at " + std::to_string(seg->base));
      if (b->prev != prev) report.fail("broken prev link");
      if (b->seg != seg || b->index != seg->index || pool_of(b) != seg->pool) report.fail("block/segment mismatch");
      if (b->expandable != seg->expandable) report.fail("block/segment expandable mismatch");
      if (b->has_frames != (b->cold().frames != nullptr)) report.fail("has_frames out of step with frames");
      if (b->size == 0 || b->size % kMinBlockSize) report.fail("block size not a positive multiple of 512");
      expect += b->size;
    }
    if (expect != seg->base + seg->size) report.fail("blocks do not cover segment at " + std::to_string(seg->base));
  }
}

// Each mapped block is in exactly one state, and the containers say the same:
//   allocated                                             ⇔ allocated_.find(b.ptr) == b, and ¬b.in_index
//   pending  = ¬allocated ∧ (events ∨ stream uses ∨ deferred) ⇒ ¬b.in_index
//   inactive = ¬allocated ∧ ¬pending                      ⇔ b.in_index
//   |allocated_| == #allocated blocks;  Σ over every free index of idx.size() == #inactive blocks
//   ¬(inactive(b) ∧ inactive(b.prev))   (free_block merged them)
void DeviceAllocator::check_block_states(InvariantReport& report) {
  size_t allocated_blocks = 0, inactive_blocks = 0;
  for (Segment* seg : segments_) {
    for (Block* b = seg->first, *prev = nullptr; b; prev = b, b = b->next) {
      if (!b->mapped) continue;  // check_expandable's
      const bool pending = !b->allocated && (b->events_pending() || !b->cold().stream_uses.empty() || b->deferred);
      if (b->allocated) {
        allocated_blocks += 1;
        if (allocated_.find(b->ptr) != b) report.fail("allocated block missing from the pointer map");
        if (b->in_index) report.fail("allocated block is in a free index");
      } else if (pending) {
        if (b->in_index) report.fail("active block is in a free index");
      } else {
        inactive_blocks += 1;
        if (!b->in_index) report.fail("inactive block is not in its free index");
        if (prev && !prev->allocated && prev->in_index) report.fail("two adjacent inactive blocks were not merged");
      }
    }
  }
  if (allocated_blocks != allocated_.size()) report.fail("pointer map holds blocks that are not allocated");
  size_t in_indexes = 0;
  for_each_block_pool([&](BlockPool& bp) {
    for (auto& [s, idx] : bp.by_stream) in_indexes += idx->size();
  });
  if (in_indexes != inactive_blocks)
    report.fail("free indexes hold " + std::to_string(in_indexes) + " blocks, expected " +
                std::to_string(inactive_blocks));
}

// Every spare block is clean (what recycle_clean_block relies on):
//   ∀ b ∈ spare_blocks_: b.prev == null ∧ ¬(allocated ∨ deferred ∨ in_index ∨ has_stream_uses ∨
//   expandable ∨ oversize ∨ has_frames) ∧ b.mapped ∧ b.event_count == 0 ∧ b.cold() empty
void DeviceAllocator::check_spare_blocks(InvariantReport& report) {
  for (Block* b = spare_blocks_; b; b = b->next)
    if (b->prev || b->allocated || b->deferred || b->in_index || b->has_stream_uses || !b->mapped ||
        b->expandable || b->oversize || b->has_frames || b->event_count || b->cold().frames ||
        !b->cold().stream_uses.empty()) {
      report.fail("a spare block is not clean");
      return;
    }
}

// plain_ == (captures_underway_ == ∅ ∧ pending_event_count_ == 0 ∧ deferred_ == ∅ ∧
//            ¬(history_on_ ∧ record_context_ ≥ kState) ∧ ¬fraction_limit_ ∧ ¬gc_clock_started_)
// free_watched_ == (history_on_ ∨ gc_clock_started_)
// gc_clock_started_ ⇐ some pool's GC clock is nonzero
// (the flags are recomputed, and so repaired, by the check)
void DeviceAllocator::check_plain_flag(InvariantReport& report) {
  const bool plain = plain_, watched = free_watched_;
  update_plain();
  if (plain != plain_) report.fail("plain_ is out of date");
  if (watched != free_watched_) report.fail("free_watched_ is out of date");
  bool ticked = false;
  for_each_block_pool([&](BlockPool& bp) { ticked |= bp.get_free_blocks_call_count != 0; });
  if (ticked && !gc_clock_started_) report.fail("a GC clock runs but gc_clock_started_ is unset");
}

}  // namespace mtia
