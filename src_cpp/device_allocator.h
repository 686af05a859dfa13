// device_allocator.h: one device's caching allocator (allocator_core.md §2-§7, and the
// private pools of pools_graphs_streams_api.md §1-§2).
//
// Locking: every field below is guarded by mu_ unless marked otherwise. Public methods
// take mu_ (through lock_blocking, so a contended lock releases the GIL while waiting).
// No Python is ever called with mu_ held except a Python RawAllocator of a private
// pool, which takes the GIL itself; waits for events drop mu_ first.
//
// Invariants (check_invariants() verifies them all):
//   reserved_bytes[ALL] == sum of segment sizes; segment[ALL] == number of segments
//   allocated_bytes[ALL] == sum of allocated block sizes; allocation == their count
//   active_bytes == allocated + pending-free block sizes
//   inactive_split(_bytes) == inactive blocks (and bytes) of split segments
//   stat[ALL] == stat[SMALL] + stat[LARGE] for every stat and field
//   every segment's blocks tile it; no two adjacent inactive blocks
#pragma once
#include <algorithm>
#include <array>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "block.h"
#include "blocking.h"
#include "config.h"
#include "emulated_device.h"
#include "free_index.h"
#include "history.h"
#include "ptr_map.h"
#include "stats.h"

namespace mtia {

// Unmapped ranges of expandable segments, ordered by (stream, address).
struct UnmappedLess {
  bool operator()(const Block* a, const Block* b) const {
    return a->seg->stream != b->seg->stream ? a->seg->stream < b->seg->stream : a->ptr < b->ptr;
  }
};

// The free blocks of one pool kind (small or large) of one pool, per stream.
struct BlockPool {
  BlockPool(bool small, PrivatePool* owner, NodeArena* arena) : is_small(small), owner(owner), arena(arena) {}
  const bool is_small;
  PrivatePool* const owner;  // null for the default pools
  NodeArena* arena;
  uint64_t get_free_blocks_call_count = 0;  // the GC clock
  std::vector<std::pair<StreamId, std::unique_ptr<FreeIndex>>> by_stream;
  static constexpr StreamId kDirectStreams = 8;
  FreeIndex* direct[kDirectStreams] = {};  // by_stream's entries for stream ids 0..7, one load away
  std::set<Block*, UnmappedLess> unmapped;  // expandable address space not backed by pages

  MTIA_INLINE FreeIndex* index(StreamId s) {
    if (uint64_t(s) < uint64_t(kDirectStreams)) return direct[s];
    for (auto& [id, idx] : by_stream)
      if (id == s) return idx.get();
    return nullptr;
  }
  FreeIndex* index_or_create(StreamId s) {
    if (FreeIndex* idx = index(s)) return idx;
    by_stream.emplace_back(s, std::make_unique<FreeIndex>(arena, this));
    if (uint64_t(s) < uint64_t(kDirectStreams)) direct[s] = by_stream.back().second.get();
    return by_stream.back().second.get();
  }
};

struct PrivatePool {
  PrivatePool(MempoolId id, std::shared_ptr<RawAllocator> alloc, NodeArena* arena)
      : id(id), allocator(std::move(alloc)), small_blocks(true, this, arena), large_blocks(false, this, arena) {}
  MempoolId id;
  std::shared_ptr<RawAllocator> allocator;  // null: the device's
  int use_count = 1;
  int64_t segment_count = 0;  // device allocations made for this pool and not yet freed
  bool no_split = false;
  BlockPool small_blocks, large_blocks;
  BlockPool* blocks_for(size_t rounded) { return rounded <= kSmallSize ? &small_blocks : &large_blocks; }
};

// Who a routing context (use_mem_pool, graph capture) applies to.
struct AllocationFilter {
  enum Kind { kAll, kThread, kCapture } kind = kAll;
  std::thread::id thread;
  uint64_t capture_id = 0;
};

struct BlockInfo {
  uintptr_t address;
  size_t size, requested_size;
  const char* state;  // "active_allocated" | "active_pending_free" | "inactive"
  FramesPtr frames;
};

struct SegmentInfo {
  DeviceIndex device = 0;
  uintptr_t address = 0;
  size_t total_size = 0, allocated_size = 0, active_size = 0, requested_size = 0;
  StreamId stream = 0;
  bool is_small = false;
  bool is_expandable = false;
  MempoolId pool;
  FramesPtr frames;
  std::vector<BlockInfo> blocks;
};

class alignas(64) DeviceAllocator {
 public:
  DeviceAllocator(DeviceIndex device, Emulator* emulator, std::shared_ptr<RawAllocator> raw,
                  const AllocatorConfig* config);
  ~DeviceAllocator();

  // --- the fast path ---
  // Returns the block's address; throws OutOfMemory. size > 0. `frames` may be null.
  uintptr_t malloc(size_t size, StreamId stream, const FramesPtr& frames);
  // Frees an allocated block of this device; false if ptr is not one.
  bool free(uintptr_t ptr, const FramesPtr& frames);
  bool owns(uintptr_t ptr);  // is ptr an allocated block of this device?

  void record_stream(uintptr_t ptr, StreamId stream);  // throws InvalidArgument for unknown ptr
  size_t block_size(uintptr_t ptr);                      // 0 if ptr is not allocated here
  // `frames`: the caller's stack, for the trace when history records context "all".
  void empty_cache(MempoolId pool = MempoolId{}, const FramesPtr& frames = kNoFrames);
  void process_events();

  // --- limits and stats ---
  void set_memory_fraction(double fraction);
  double memory_fraction();
  DeviceStats stats();
  void reset_peak_stats();
  void reset_accumulated_stats();
  // Largest free cached block of each pool kind (small, large) over all pools.
  std::pair<size_t, size_t> largest_free_blocks();

  // --- pools and routing ---
  void create_or_incref_pool(MempoolId id, std::shared_ptr<RawAllocator> allocator);
  void release_pool(MempoolId id);
  int pool_use_count(MempoolId id);  // 0 if no such pool
  void begin_allocate_to_pool(MempoolId id, AllocationFilter filter);
  void end_allocate_to_pool(MempoolId id);
  void set_use_on_oom(MempoolId id, bool on);
  void set_no_split(MempoolId id);
  void set_stream_capture(StreamId stream, uint64_t capture_id);  // 0 = not capturing
  bool any_capture_underway();

  // --- observability ---
  std::vector<SegmentInfo> snapshot(MempoolId pool, bool all_pools);
  std::vector<TraceEntry> trace();
  void set_history(bool enabled, RecordContext context, size_t max_entries, bool clear);
  RecordContext record_context() const { return record_context_; }  // read without the lock
  std::string check_invariants();  // "" when all hold

 private:
  using Lock = AdoptedLock;
  struct Request {
    size_t orig_size, size, alloc_size;
    StreamId stream;
    BlockPool* pool;
    const FramesPtr* frames;  // the caller's stack to record, or kNoFrames (no refcounting per malloc)
  };

  MTIA_INLINE void lock() { lock_blocking(mu_); }
  BlockPool* default_pool(size_t rounded) { return rounded <= kSmallSize ? &small_blocks_ : &large_blocks_; }
  BlockPool* choose_pool(size_t size, StreamId stream);  // the default pool unless a capture routes it
  bool filter_matches(const AllocationFilter& f, StreamId stream);
  MTIA_INLINE Block* get_free_block(const Request& r, BlockPool* pool);
  Block* alloc_block(const Request& r, bool is_retry);
  __attribute__((noinline)) Block* alloc_on_miss(Lock& lock, Request& r);
  void process_events_in_call(const FramesPtr& frames);  // process_events with the caller's stack
  Block* try_use_on_oom_pools(const Request& r);
  bool release_available_cached_blocks(Lock& lock, const Request& r);
  void release_cached_blocks(Lock& lock, MempoolId pool);
  std::vector<StreamId> settle_streams(Lock& lock);  // the streams whose memory must stay
  using BlockActivity = std::array<int64_t, 3>;
  BlockActivity block_activity() const;
  static bool is_busy(const std::vector<StreamId>& busy, StreamId s) {
    return std::find(busy.begin(), busy.end(), s) != busy.end();
  }
  // Releases whole free segments and unmaps free expandable pages, except those of the
  // `busy` streams.
  void release_pool_blocks(BlockPool& pool, const std::vector<StreamId>& busy);
  void release_block(Block* b);
  void forget_segment(Segment* seg);
  void garbage_collect_cached_blocks(Lock& lock);
  MTIA_INLINE uintptr_t alloc_found_block(const Request& r, Block* block);
  MTIA_INLINE void free_block(Block* b);
  void free_block_in_call(Block* b, const FramesPtr& frames);  // free_block with the caller's stack
  __attribute__((noinline)) void free_noted(Block* b, const FramesPtr& free_frames);
  void begin_pending(Block* b);  // a user free that must wait (events or a capture)
  void end_pending(Block* b);    // ... and its wait is over
  void note_active_peaks(bool small);
  MTIA_INLINE size_t try_merge(Block* dst, Block* src);
  MTIA_INLINE void absorb(Block* dst, Block* src);
  void insert_events(Block* b);
  void synchronize_and_free_events(Lock& lock, PrivatePool* only);
  [[noreturn]] void raise_oom(Lock& lock, const Request& r);
  void record_trace(TraceAction a, uintptr_t addr, size_t size, StreamId stream, MempoolId pool,
                    const FramesPtr& frames);
  MTIA_INLINE Block* new_block();
  MTIA_INLINE void set_gc_count_base(Block* b, const BlockPool* pool);
  MTIA_INLINE void delete_block(Block* b);
  MTIA_INLINE void recycle_clean_block(Block* b);
  void add_block_chunk();
  PrivatePool* find_pool(MempoolId id);
  bool should_split(const Block* b, size_t size) const;
  size_t capacity() const { return emulator_->device(device_).memory().capacity(); }
  // Expandable segments (allocator_core.md §11).
  bool expandable_active(const BlockPool* pool) const {
    return config_->expandable_segments && !(pool->owner && pool->owner->allocator);
  }
  Block* try_allocate_expandable_block(const Request& r);
  Block* find_expandable_block(const Request& r);
  bool map_block(Block* to_map, size_t size, const Request& r);
  void unmap_block(Block* b);
  void release_expandable_segment(Block* b);
  void merge_unmapped(Block* dst, Block* src);
  Block* split_off(Block* b, size_t offset, bool mapped);  // new block for [b->ptr + offset, end)
  size_t max_split() const { return config_->max_split_size; }

  const DeviceIndex device_;
  Emulator* const emulator_;
  const AllocatorConfig* const config_;  // shared; read under mu_
  std::shared_ptr<RawAllocator> raw_;    // the default pools' memory
  alignas(64) SpinMutex mu_;  // its own cache line: threads of other devices never share it

  NodeArena arena_;
  BlockPool small_blocks_, large_blocks_;
  PtrMap allocated_;
  std::vector<Segment*> segments_;
  std::vector<std::unique_ptr<BlockChunk>> block_chunks_;  // owns every Block
  Block* spare_blocks_ = nullptr;  // recycled blocks, linked through `next`
  bool gc_bases_written_ = false;  // some block's gc_count_base was set (new blocks need a reset)
  uint64_t segment_order_ = 0;
  DeviceStats stats_;
  size_t total_allocated_memory_ = 0;  // bytes held from the device (all pools)
  bool fraction_limit_ = false;        // a memory fraction < 1 is set ...
  size_t allowed_memory_maximum_ = 0;  // ... and allows this much (0 for a fraction of 0.0)

  // Cross-stream frees waiting for events: per recorded stream, FIFO of (event, block).
  std::vector<std::pair<Stream*, std::deque<std::pair<EventMark, Block*>>>> stream_events_;
  size_t pending_event_count_ = 0;
  PendingFrees pending_;  // blocks waiting for events or deferred (active, not allocated)
  int64_t pending_frees_done_ = 0;  // pending frees completed so far (see block_activity)
  std::vector<Block*> deferred_;  // freed during capture with stream uses

  std::unordered_map<MempoolId, std::unique_ptr<PrivatePool>, MempoolIdHash> pools_;
  std::vector<std::pair<MempoolId, AllocationFilter>> captures_underway_;
  std::vector<MempoolId> use_on_oom_pools_;
  std::vector<std::pair<StreamId, uint64_t>> stream_capture_;

  bool history_on_ = false;
  // No capture, pending free or history: malloc skips those checks. Every change to
  // captures_underway_, pending_event_count_, deferred_ or history_on_ calls update_plain().
  bool plain_ = true;
  void update_plain() {
    plain_ = captures_underway_.empty() && !pending_event_count_ && deferred_.empty() && !history_on_;
  }
  RecordContext record_context_ = RecordContext::kNever;
  TraceRing trace_;
};

}  // namespace mtia
