// device_allocator.h: one device's caching allocator (allocator_core.md §2-§7, and the
// private pools of pools_graphs_streams_api.md §1-§2). Declares DeviceAllocator only;
// the types it is made of have headers of their own (block.h, block_pool.h,
// private_pool.h, segment_info.h, stats.h, history.h).
//
// One class, several files, one concern each (every file opens with what it owns):
//   device_allocator.cpp             the hot path: the malloc ladder, split, free, merge,
//                                    cross-stream events, record_stream
//   device_allocator_internal.h      inline helpers several of those files share
//   device_allocator_release.cpp     empty_cache, oversize release, GC, waiting for streams
//   device_allocator_expandable.cpp  expandable segments (map / unmap pages)
//   device_allocator_pools.cpp       private pools and allocation routing
//   device_allocator_stats.cpp       limits and stats: memory fraction, OOM message, stats
//   device_allocator_history.cpp     history trace and snapshot
//   device_allocator_invariants.cpp  check_invariants(), which runs the checkers that sit
//                                    next to the code whose invariants they state
// Everything the malloc/free fast path calls is in device_allocator.cpp or in a header,
// so it stays inlinable (the other files hold only calls made off the fast path).
//
// Locking: every field below is guarded by mu_ unless marked otherwise. Public methods
// take mu_ (through lock_blocking, so a contended lock releases the GIL while waiting).
// No Python is ever called with mu_ held except a Python RawAllocator of a private
// pool, which takes the GIL itself; waits for events drop mu_ first.
#pragma once
#include <algorithm>
#include <array>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block.h"
#include "block_pool.h"
#include "blocking.h"
#include "config.h"
#include "emulated_device.h"
#include "free_index.h"
#include "history.h"
#include "private_pool.h"
#include "ptr_map.h"
#include "segment_info.h"
#include "stats.h"

namespace mtia {

class InvariantReport;

class alignas(64) DeviceAllocator {
 public:
  DeviceAllocator(DeviceIndex device, Emulator* emulator, std::shared_ptr<RawAllocator> raw,
                  const AllocatorConfig& config);
  ~DeviceAllocator();
  // New settings (Allocator::set_config), taken under this device's lock unless a newer
  // version came first; and the settings in force.
  void set_config(const AllocatorConfig& config, uint64_t version);
  AllocatorConfig config();

  // --- the fast path (device_allocator.cpp) ---
  // Returns the block's address; throws OutOfMemory. size > 0. `frames` may be null.
  // `array_owned`: the block belongs to a DeviceArray (only its death may free it).
  uintptr_t malloc(size_t size, StreamId stream, const FramesPtr& frames, bool array_owned = false);
  // Frees an allocated block of this device; false if ptr is not one. An array-owned
  // block is freed only `by_array` (its DeviceArray dying): any other free of it throws
  // InvalidState and frees nothing.
  bool free(uintptr_t ptr, const FramesPtr& frames, bool by_array = false);
  // The same without a caller stack, for no DeviceArray: what the replay loop calls (the
  // two arguments fewer to pass, and their tests compiled away).
  uintptr_t malloc(size_t size, StreamId stream);
  bool free(uintptr_t ptr);
  bool owns(uintptr_t ptr);  // is ptr an allocated block of this device?

  void record_stream(uintptr_t ptr, StreamId stream);  // throws InvalidArgument for unknown ptr
  size_t block_size(uintptr_t ptr);                      // 0 if ptr is not allocated here
  void process_events();

  // --- release (device_allocator_release.cpp) ---
  // `frames`: the caller's stack, for the trace when history records context "all".
  void empty_cache(MempoolId pool = MempoolId{}, const FramesPtr& frames = kNoFrames);

  // --- limits and stats (device_allocator_stats.cpp) ---
  void set_memory_fraction(double fraction);
  double memory_fraction();
  DeviceStats stats();
  void reset_peak_stats();
  void reset_accumulated_stats();
  // Largest free cached block of each pool kind (small, large) over all pools.
  std::pair<size_t, size_t> largest_free_blocks();

  // --- pools and routing (device_allocator_pools.cpp) ---
  void create_or_incref_pool(MempoolId id, std::shared_ptr<RawAllocator> allocator);
  void release_pool(MempoolId id);
  int pool_use_count(MempoolId id);  // 0 if no such pool
  void begin_allocate_to_pool(MempoolId id, AllocationFilter filter);
  void end_allocate_to_pool(MempoolId id);
  void set_use_on_oom(MempoolId id, bool on);
  void set_no_split(MempoolId id);
  void set_stream_capture(StreamId stream, uint64_t capture_id);  // 0 = not capturing
  bool any_capture_underway();

  // --- observability (device_allocator_history.cpp, device_allocator_invariants.cpp) ---
  std::vector<SegmentInfo> snapshot(MempoolId pool, bool all_pools);
  std::vector<TraceEntry> trace();
  // skip_mask: bit (1 << action) set = that action is not recorded (skip_actions).
  void set_history(bool enabled, RecordContext context, size_t max_entries, bool clear, uint32_t skip_mask = 0);
  // The streamed history (history_stream.h): every record from now on also goes to `s`
  // (null: no longer; the records not yet handed over go first); and the records the
  // ring holds back go now (the stream's writer, every tick).
  void attach_history_stream(HistoryStream* s);
  void flush_history_stream();
  RecordContext record_context() const { return record_context_; }  // read without the lock
  std::string check_invariants();  // "" when all hold

 private:
  using Lock = AdoptedLock;
  struct Request {
    size_t orig_size, size, alloc_size;
    StreamId stream;
    BlockPool* pool;
    const FramesPtr* frames;  // the caller's stack to record, or kNoFrames (no refcounting per malloc)
    bool array_owned;         // for a DeviceArray (the block's mark, see free())
  };
  using BlockActivity = std::array<int64_t, 3>;

  MTIA_INLINE void lock() { lock_blocking(mu_); }
  MTIA_INLINE uintptr_t malloc_entry(size_t size, StreamId stream, const FramesPtr& frames, bool array_owned);
  MTIA_INLINE bool free_entry(uintptr_t ptr, const FramesPtr& frames, bool by_array);
  BlockPool* default_pool(size_t rounded) { return rounded <= kSmallSize ? &small_blocks_ : &large_blocks_; }
  // f(BlockPool&) for the default pools, then each private pool's.
  template <class F>
  void for_each_block_pool(F f) {
    f(small_blocks_);
    f(large_blocks_);
    for (auto& [id, p] : pools_) {
      f(p->small_blocks);
      f(p->large_blocks);
    }
  }
  size_t capacity() const { return emulator_->device(device_).memory().capacity(); }
  size_t max_split() const { return config_.max_split_size; }

  // device_allocator.cpp: the malloc ladder and split (§3-§4)
  BlockPool* choose_pool(size_t size, StreamId stream);  // the default pool unless a capture routes it
  bool filter_matches(const AllocationFilter& f, StreamId stream);
  template <bool kPlain>
  MTIA_INLINE Block* get_free_block(const Request& r, BlockPool* pool);
  __attribute__((noinline)) Block* alloc_on_miss(Lock& lock, Request& r);
  Block* alloc_block(const Request& r, bool is_retry);
  Block* try_use_on_oom_pools(const Request& r);
  // The rest of malloc and free, compiled once per pool kind (small or large).
  template <bool kSmall, bool kPlain>
  MTIA_INLINE uintptr_t malloc_in_pool(Lock& lock, const Request& r);
  template <bool kSmall, bool kPlain>
  __attribute__((noinline)) uintptr_t malloc_miss(Lock& lock, Request r);  // steps 4-6 after a cache miss
  // These two adopt the lock malloc() took (and release it).
  template <bool kSmall>  // malloc_miss of the plain path, from the request's fields
  __attribute__((noinline)) uintptr_t malloc_miss_plain(size_t orig_size, size_t size, StreamId stream,
                                                        bool array_owned);
  __attribute__((noinline)) uintptr_t malloc_not_plain(size_t orig_size, StreamId stream, bool array_owned,
                                                       const FramesPtr& frames);
  template <bool kSmall, bool kDefaultPool>  // kDefaultPool: pool has no owner (no no_split)
  MTIA_INLINE bool should_split(const Block* b, const BlockPool* pool, size_t size) const;
  template <bool kSmall, bool kPlain>
  MTIA_INLINE uintptr_t alloc_found_block(const Request& r, Block* block);
  __attribute__((noinline)) void record_plain_alloc(const Block* b);
  void note_active_peaks(bool small);
  void add_block_chunk();
  // device_allocator.cpp: free, merge and events (§5)
  template <bool kSmall>
  MTIA_INLINE void free_allocated(Block* b, const FramesPtr& free_frames);
  // kMayRecord: false where history is off or the completion recorded already.
  // kPlainBlock: b has no stack, stream uses or oversize count, is mapped, and is still
  // marked allocated (free_plain: the index's insert clears the mark); kExpandable: b is
  // of an expandable segment (else of a plain one).
  template <bool kSmall, bool kMayRecord = true, bool kPlainBlock = false, bool kExpandable = false>
  MTIA_INLINE void free_block_of(Block* b);
  template <bool kSmall, bool kExpandable>
  MTIA_INLINE void free_plain(Block* b);
  template <bool kExpandable>
  MTIA_INLINE void free_plain_of_either_kind(Block* b);  // dispatches on the pool kind
  MTIA_INLINE bool try_record_free_pair(const Block* b);
  __attribute__((noinline)) void free_unusual(Block* b, const FramesPtr& free_frames, bool by_array);
  void free_block(Block* b);  // dispatches on the pool kind
  [[noreturn]] __attribute__((noinline)) void refuse_array_owned_free(Block* b);
  template <bool kSmall>
  __attribute__((noinline)) void free_with_history_or_uses(Block* b, const FramesPtr& free_frames);
  void free_block_with_call_frames(Block* b, const FramesPtr& frames);  // free_block, the caller's stack noted
  void process_events_with_call_frames(const FramesPtr& frames);        // process_events, likewise
  void begin_pending(Block* b);  // a user free that must wait (events or a capture)
  void end_pending(Block* b);    // ... and its wait is over
  void insert_events(Block* b);
  // device_allocator_internal.h: block recycling and merging, shared by several files
  MTIA_INLINE Block* new_block();
  MTIA_INLINE void set_gc_count_base(Block* b, const BlockPool* pool);
  MTIA_INLINE void recycle_block(Block* b);        // clears it, then recycle_clean_block
  MTIA_INLINE void recycle_clean_block(Block* b);  // b is clean already but for its links
  // kPlain: src is clean once out of the index but for its expandable flag, which
  // kExpandable says it has (dst's segment is plain, or expandable).
  template <bool kPlain = false, bool kExpandable = false>
  MTIA_INLINE size_t try_merge(Block* dst, Block* src);
  template <bool kPlain = false, bool kExpandable = false>
  MTIA_INLINE void absorb(Block* dst, Block* src);

  // device_allocator_release.cpp: giving memory back (§4.4, §4.5, §6)
  bool release_available_cached_blocks(Lock& lock, const Request& r);
  void garbage_collect_cached_blocks(Lock& lock);
  void release_cached_blocks(Lock& lock, MempoolId pool);
  void synchronize_and_free_events(Lock& lock, PrivatePool* only);
  // Waits (lock dropped) for the device's busy streams; returns the streams still busy,
  // whose memory must stay cached (empty: everything may go).
  std::vector<StreamId> busy_streams_after_waiting(Lock& lock);
  bool anything_to_release(MempoolId id) const;  // could release_cached_blocks(id) give back memory?
  BlockActivity block_activity() const;
  static bool is_busy(const std::vector<StreamId>& busy, StreamId s) {
    return std::find(busy.begin(), busy.end(), s) != busy.end();
  }
  // Releases whole free segments and unmaps free expandable pages, except those of the
  // `busy` streams.
  void release_free_segments(BlockPool& pool, const std::vector<StreamId>& busy);
  void release_segment(Block* b);  // b: a whole free segment, given back to its RawAllocator
  void forget_segment(Segment* seg);

  // device_allocator_expandable.cpp: expandable segments (§11)
  bool expandable_active(const BlockPool* pool) const {
    return config_.expandable_segments && !(pool->owner && pool->owner->allocator);
  }
  Block* try_allocate_expandable_block(const Request& r);
  Block* find_expandable_block(const Request& r);
  bool map_block(Block* to_map, size_t size, const Request& r);
  void unmap_block(Block* b);
  void release_expandable_segment(Block* b);
  void merge_unmapped(Block* dst, Block* src);
  Block* split_off(Block* b, size_t offset, bool mapped);  // new block for [b->ptr + offset, end)

  // device_allocator_internal.h
  inline PrivatePool* find_pool(MempoolId id);

  // device_allocator_stats.cpp
  [[noreturn]] void raise_oom(Lock& lock, const Request& r);

  // A trace record (history on): the common one (no pool or metadata; no stack, or an
  // interned one) written inline by the ring's fast path, the rest by
  // record_trace_general (device_allocator_history.cpp).
  MTIA_INLINE void record_trace(TraceAction a, uintptr_t addr, size_t size, StreamId stream, MempoolId pool,
                                const FramesPtr& frames) {
    const uint32_t stack = trace_stack_id(frames);
    if (__builtin_expect(pool == MempoolId{} && stack != kStackNotInterned &&
                             trace_.try_record_stack(a, addr, size, stream, stack),
                         1))
      return;
    record_trace_general(a, addr, size, stream, pool, frames);
  }
  // The stack id a record keeps (frames.h): 0 when the context keeps no stacks in entries
  // or there is none, kStackNotInterned for one that is not interned (kept in extras).
  static constexpr uint32_t kStackNotInterned = ~uint32_t(0);
  MTIA_INLINE uint32_t trace_stack_id(const FramesPtr& frames) const {
    if (record_context_ < RecordContext::kAlloc || !frames) return 0;
    return frames->id ? frames->id : kStackNotInterned;
  }
  __attribute__((noinline)) void record_trace_general(TraceAction a, uintptr_t addr, size_t size, StreamId stream,
                                                      MempoolId pool, const FramesPtr& frames);

  // The checkers check_invariants() runs, each next to the code it checks.
  void check_segment_tiling(InvariantReport& report);   // device_allocator.cpp
  void check_block_states(InvariantReport& report);     // device_allocator.cpp
  void check_spare_blocks(InvariantReport& report);     // device_allocator.cpp
  void check_plain_flag(InvariantReport& report);       // device_allocator.cpp
  void check_expandable(InvariantReport& report);       // device_allocator_expandable.cpp
  void check_private_pools(InvariantReport& report);    // device_allocator_pools.cpp
  void check_stats(InvariantReport& report);            // device_allocator_stats.cpp

  const DeviceIndex device_;
  Emulator* const emulator_;
  // The allocator's settings, this device's copy: read and written under mu_ (a copy per
  // device, so that a change never waits for two devices' locks at once; and one load
  // nearer for malloc than a shared one).
  AllocatorConfig config_;
  uint64_t config_version_ = 0;  // Allocator::set_config's version of config_
  std::shared_ptr<RawAllocator> raw_;    // the default pools' memory
  alignas(64) SpinMutex mu_;  // its own cache line: threads of other devices never share it

  NodeArena arena_;
  BlockPool small_blocks_, large_blocks_;
  PtrMap allocated_;
  std::vector<Segment*> segments_;
  std::vector<std::unique_ptr<BlockChunk>> block_chunks_;  // owns every Block
  Block* spare_blocks_ = nullptr;  // recycled blocks, linked through `next`
  // The GC clock has ticked (some pool's get_free_blocks_call_count is nonzero; sticky):
  // freed blocks' gc_count_base must be written, and new blocks need theirs reset.
  bool gc_clock_started_ = false;
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
  // No capture, pending free, history keeping stacks, memory fraction or GC clock: malloc
  // skips those checks (history without stacks records on the plain path; a fraction may
  // start the GC clock, whose bases the plain paths do not write). Every change to
  // captures_underway_, pending_event_count_, deferred_, history_on_, record_context_,
  // fraction_limit_ or gc_clock_started_ calls update_plain().
  bool plain_ = true;
  // History on or the GC clock started: free's first test sends the block on (its fast
  // path neither records nor writes a GC base).
  bool free_watched_ = false;
  void update_plain() {
    plain_ = captures_underway_.empty() && !pending_event_count_ && deferred_.empty() &&
             !(history_on_ && record_context_ >= RecordContext::kState) && !fraction_limit_ && !gc_clock_started_;
    free_watched_ = history_on_ || gc_clock_started_;
  }
  RecordContext record_context_ = RecordContext::kNever;
  TraceRing trace_;
};

}  // namespace mtia
