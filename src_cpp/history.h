// history.h: the memory-history trace (allocator_core.md §9): a ring buffer of trace
// records per device, recorded under the device lock only while history is enabled (the
// fast path pays one branch when it is off), and optionally streamed to a file
// (history_stream.h). Skipped actions (skip_actions) are dropped before anything is
// written.
//
// Streaming costs the record no more: while a stream is attached (attach_stream) the ring
// hands its raw slots, in chunks of up to kStreamChunk, to the stream (flush_stream,
// history_stream.cpp): the fast path stops at the chunk's end (limit_) instead of the
// slots' end, and the general path that then runs encodes the chunk (while it is in
// cache) into the stream's buffer (HistoryStream::push); the writer thread only writes
// the buffers, and pulls the records of an idle ring every tick.
//
// Recording is cheap because a record is raw data, decoded only when the trace is read:
// a slot holds the time as a raw clock reading (TSC ticks, converted to epoch
// microseconds by trace()), the address, size, stream, action and the id of its
// interned stack (frames.h; 0: none). The common record (no pool or per-thread metadata)
// is written by TraceRing::try_record (no stack: inline on the allocator's fast path) or
// try_record_stack: a few plain stores into a preallocated array. Anything else takes
// the general path (TraceRing::record), which also keeps the rest of a record (pool, a
// stack that is not interned, the id of the thread's metadata string) in a parallel
// array of extras.
//
// Time stamps: reading the TSC costs ~14 ns on a VM (RDTSC is microcoded), more than the
// rest of a record, so a record normally reads a coarse clock instead: a TSC reading a
// background thread stores every kCoarsePeriod (1 ms) while history is on (CoarseClock).
// The first kExactPerPeriod records of each period on a device still read the TSC itself,
// so a device recording fewer than 16 events a millisecond gets exact times (those take
// the general path; then the rest of the period may take the fast one); in a burst,
// later records of the period repeat the previous record's time. So a time stamp is
// exact or at most about one period (plus the clock thread's scheduling delay) early,
// and never decreases on a device.
// Relies on: frames.h and types.h.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

#include "frames.h"
#include "types.h"

namespace mtia {

class HistoryStream;  // history_stream.h

enum class TraceAction : uint8_t {
  kAlloc, kFreeRequested, kFreeCompleted, kSegmentAlloc, kSegmentFree, kSnapshot, kOom, kSegmentMap,
  kSegmentUnmap,
};
constexpr int kTraceActionCount = 9;

inline const char* trace_action_name(TraceAction a) {
  switch (a) {
    case TraceAction::kAlloc: return "alloc";
    case TraceAction::kFreeRequested: return "free_requested";
    case TraceAction::kFreeCompleted: return "free_completed";
    case TraceAction::kSegmentAlloc: return "segment_alloc";
    case TraceAction::kSegmentFree: return "segment_free";
    case TraceAction::kSnapshot: return "snapshot";
    case TraceAction::kOom: return "oom";
    case TraceAction::kSegmentMap: return "segment_map";
    case TraceAction::kSegmentUnmap: return "segment_unmap";
  }
  return "?";
}

// How many stacks are kept: the `context` argument of record_memory_history.
enum class RecordContext : uint8_t { kNever = 0, kState = 1, kAlloc = 2, kAll = 3 };

// A trace entry as trace() returns it (time converted, metadata looked up).
struct TraceEntry {
  TraceAction action;
  uintptr_t addr;    // device_free for kOom
  size_t size;
  StreamId stream;
  int64_t time_us;   // Unix epoch microseconds
  MempoolId pool;
  FramesPtr frames;  // null when no stack was captured
  std::string user_metadata;
};

// ------------------------------------------------------------------ the clock
// trace_clock(): a raw, cheap, monotonic reading (the TSC on x86, steady-clock ns
// elsewhere). ClockAnchor pairs a reading with epoch microseconds; a reading converts to
// epoch microseconds by interpolating between two anchors (the first one of the process
// and one taken when the trace is read), so the clock rate needs no calibration.
inline uint64_t trace_clock() {
#if defined(__x86_64__) || defined(__i386__)
  return __rdtsc();
#else
  return uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
#endif
}

inline int64_t epoch_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

struct ClockAnchor {
  uint64_t tick;
  int64_t us;
  static ClockAnchor now() {
    // The epoch reading sits between two clock readings: use their midpoint.
    uint64_t a = trace_clock();
    int64_t us = epoch_us();
    uint64_t b = trace_clock();
    return ClockAnchor{a + (b - a) / 2, us};
  }
};

// The process's first anchor (taken when history is first enabled).
inline const ClockAnchor& first_clock_anchor() {
  static const ClockAnchor anchor = ClockAnchor::now();
  return anchor;
}

// The coarse clock (see the top comment): a TSC reading refreshed every kCoarsePeriod by a
// background thread that runs while some ring holds a user (TraceRing::start/stop);
// now() is one relaxed load. Never decreases (the thread stores max(old, TSC)).
class CoarseClock {
 public:
  static uint64_t now() { return tick_.load(std::memory_order_relaxed); }
  static uint64_t now_acquire() { return tick_.load(std::memory_order_acquire); }
  static void acquire();  // history_clock.cpp: refreshes now() at once; starts the thread
  static void release();  // the last user's release stops the thread
  // Moves now() on at once (above every earlier reading): a new period begins, so no
  // ring's fast path records until its general path has run again (g_general_records).
  static void advance();
  static constexpr std::chrono::microseconds kCoarsePeriod{1000};

 private:
  static std::atomic<uint64_t> tick_;
  friend struct CoarseClockThread;
};
constexpr uint32_t kExactPerPeriod = 16;

// Epoch microseconds of `tick`, interpolated (or extrapolated) through anchors a and b.
inline int64_t ticks_to_us(uint64_t tick, const ClockAnchor& a, const ClockAnchor& b) {
  if (b.tick == a.tick) return a.us;
  long double rate = (long double)(b.us - a.us) / (long double)((int64_t)(b.tick - a.tick));
  return a.us + (int64_t)((long double)(int64_t)(tick - a.tick) * rate);
}

// ------------------------------------------------------------ user metadata
// Process-wide table of metadata strings (id 0 is ""): an entry stores the id of its
// thread's string, copied nowhere on the hot path. Interned strings live for the process.
class MetadataTable {
 public:
  static MetadataTable& get() {
    static auto* t = new MetadataTable();
    return *t;
  }
  // The id of `s` and whether it is new.
  std::pair<uint32_t, bool> intern(const std::string& s) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = ids_.find(s);
    if (it != ids_.end()) return {it->second, false};
    uint32_t id = uint32_t(strings_.size());
    strings_.push_back(s);
    ids_.emplace(s, id);
    return {id, true};
  }
  std::string lookup(uint32_t id) {
    std::lock_guard<std::mutex> g(mu_);
    return id < strings_.size() ? strings_[id] : std::string();
  }
  std::vector<std::string> all() {
    std::lock_guard<std::mutex> g(mu_);
    return std::vector<std::string>(strings_.begin(), strings_.end());
  }

 private:
  MetadataTable() {
    strings_.emplace_back();
    ids_.emplace(std::string(), 0);
  }
  std::mutex mu_;
  std::deque<std::string> strings_;
  std::unordered_map<std::string, uint32_t> ids_;
};

struct ThreadMetadata {
  std::string text;
  uint32_t id = 0;
};
inline ThreadMetadata& thread_metadata() {
  static thread_local ThreadMetadata m;
  return m;
}
// Process-wide conditions that send every record to the general path: a thread has set
// a metadata string (until then a record reads no thread-local). The fast path never
// reads them: a ring lets it record only in a period its general path began with none of
// them set (TraceRing::stamp), and setting one calls set_general_records, which starts a
// new period.
enum : uint32_t { kGeneralMetadata = 1 };
inline std::atomic<uint32_t> g_general_records{0};
inline void set_general_records(uint32_t bits) {
  g_general_records.fetch_or(bits, std::memory_order_relaxed);
  CoarseClock::advance();  // its store releases the bits to a stamp() that reads the new period
}
inline bool metadata_in_use() { return g_general_records.load(std::memory_order_relaxed) & kGeneralMetadata; }
inline uint32_t current_metadata_id() { return metadata_in_use() ? thread_metadata().id : 0; }
// A per-thread string copied into every trace entry this thread records
// (torch.cuda.memory._set_memory_metadata). Read-only: set it with set_user_metadata.
inline const std::string& user_metadata() { return thread_metadata().text; }
void set_user_metadata(const std::string& s);  // history_stream.cpp (a new string is streamed)

// ------------------------------------------------------------------ the ring
// A record in full: what the general path writes, the stream gets and ordered() returns.
struct TraceRecord {
  uint64_t tick;     // trace_clock()
  uintptr_t addr;
  uint64_t size;
  StreamId stream;
  MempoolId pool;
  FramesPtr frames;  // set only when the context keeps stacks in entries
  uint32_t metadata;
  TraceAction action;
};

// A slot of the ring: a record's raw fields, written by plain stores. The rest of a
// record (pool, stack, metadata id), when it has any, sits in the parallel extras array.
struct TraceSlot {
  uint64_t tick;  // 0: never written (a coarse or TSC reading is never 0)
  uintptr_t addr;
  uint64_t size;
  StreamId stream;
  uint32_t action_bits;  // the TraceAction, | kHasExtra when extras hold the rest
  uint32_t stack;        // the interned stack's id (InternedStacks), 0: none (or in extras)
  static constexpr uint32_t kHasExtra = 0x100;
  // Two records of one block in one slot (a free's request and completion, written by
  // try_record_pair): the second's action in bits 16-23, its other fields (stack too) the
  // first's.
  static constexpr uint32_t kPair = 0x200;
  static constexpr unsigned kSecondShift = 16;
};
struct TraceExtra {
  FramesPtr frames;  // a stack that is not interned (an interned one's id is in the slot)
  MempoolId pool;
  uint32_t metadata = 0;
};

class TraceRing {
 public:
  TraceRing() = default;
  TraceRing(const TraceRing&) = delete;
  TraceRing& operator=(const TraceRing&) = delete;
  ~TraceRing() {
    detach_stream();
    stop();
  }

  // History on (with room for n records, emptied) / off (emptied). The coarse clock runs
  // while some ring is started.
  void start(size_t n) {
    if (!clock_held_) {
      CoarseClock::acquire();
      clock_held_ = true;
    }
    allocate(n < 1 ? 1 : n);
  }
  void stop() {
    allocate(0);
    if (clock_held_) {
      clock_held_ = false;
      CoarseClock::release();
    }
  }
  // New capacity keeping the newest records (history stays on; the kept records were
  // streamed already).
  void resize(size_t n) {
    std::vector<TraceRecord> keep = ordered();
    const uint64_t last_coarse = last_coarse_, last_tick = last_tick_;
    const uint32_t exact_left = exact_left_;
    flush_stream();
    HistoryStream* const stream = stream_;
    stream_ = nullptr;
    allocate(n < 1 ? 1 : n);
    last_coarse_ = last_coarse, last_tick_ = last_tick, exact_left_ = exact_left;
    if (keep.size() > capacity_) keep.erase(keep.begin(), keep.end() - std::ptrdiff_t(capacity_));
    for (const TraceRecord& r : keep) write(r);
    stream_ = stream;
    flushed_ = next_;
    extras_unflushed_ = stacks_unflushed_ = false;
    set_limit();
  }
  // While attached (under the owner's lock), every record from now on also goes to `s`,
  // as `device`'s. detach_stream flushes what is left and stops that.
  void attach_stream(HistoryStream* s, DeviceIndex device) {
    detach_stream();
    stream_ = s;
    device_ = device;
    stream_tick_ = 0;
    flushed_ = next_;
    extras_unflushed_ = stacks_unflushed_ = false;
    set_limit();
  }
  void detach_stream() {
    flush_stream();
    stream_ = nullptr;
    set_limit();
  }
  // The records since the last flush go to the attached stream (history_stream.cpp).
  void flush_stream();
  // skip_actions (bit 1 << action: not recorded), which sends every record to the general
  // path, and whether entries keep stacks, which sends try_record's (no stack) there.
  void configure(uint32_t skip_mask, bool keeps_stacks) {
    skip_mask_ = skip_mask;
    keeps_stacks_ = keeps_stacks;
    update_fast();
  }
  bool skips(TraceAction a) const { return skip_mask_ & (1u << unsigned(a)); }

  // The fast path: records without stack, pool or metadata, while entries keep no stacks,
  // the action not skipped, in a period (of the coarse clock) whose exact time stamps are
  // used up (all that fast_period_ says, see stamp()), before limit_. Then a record is
  // five plain stores: true. Else nothing is written: false, the general path's turn.
  MTIA_INLINE bool try_record(TraceAction a, uintptr_t addr, uint64_t size, StreamId stream) {
    return try_fill(fast_period_, uint32_t(a), addr, size, stream, 0);
  }
  // Two records of one block at once (a free's request and its completion), likewise, in
  // one slot (TraceSlot::kPair): a slot can thus hold two records, and ordered() keeps
  // the newest capacity_ records.
  MTIA_INLINE bool try_record_pair(TraceAction a, TraceAction b, uintptr_t addr, uint64_t size, StreamId stream) {
    return try_fill(fast_period_, pair_bits(a, b), addr, size, stream, 0);
  }
  // As try_record(_pair), for a record with an interned stack (its id; 0: no stack)
  // whatever the context: while entries keep stacks, the allocator records through these.
  MTIA_INLINE bool try_record_stack(TraceAction a, uintptr_t addr, uint64_t size, StreamId stream, uint32_t stack) {
    if (!try_fill(stack_period_, uint32_t(a), addr, size, stream, stack)) return false;
    stacks_unflushed_ |= stack != 0;
    return true;
  }
  MTIA_INLINE bool try_record_pair_stack(TraceAction a, TraceAction b, uintptr_t addr, uint64_t size,
                                         StreamId stream, uint32_t stack) {
    if (!try_fill(stack_period_, pair_bits(a, b), addr, size, stream, stack)) return false;
    stacks_unflushed_ |= stack != 0;
    return true;
  }
  // The general path: stamps r and writes it.
  void record(TraceRecord& r) {
    r.tick = stamp();
    write(r);
  }

  // Oldest first, decoded. Time stamps never decrease along it (a fast record stores the
  // coarse reading, which may be below the exact stamps of its period's first records:
  // it reads as the previous record's stamp, as stamp() would have made it).
  std::vector<TraceRecord> ordered() const {
    std::vector<TraceRecord> out;
    if (!begin_) return out;
    out.reserve(size_t(end_ - begin_));
    const auto stacks = InternedStacks::lock();
    uint64_t last = 0;
    auto take = [&](const TraceSlot* from, const TraceSlot* to) {
      for (const TraceSlot* s = from; s != to; ++s) {
        if (!s->tick) continue;  // never written
        TraceRecord r{};
        last = r.tick = s->tick > last ? s->tick : last;
        r.addr = s->addr;
        r.size = s->size;
        r.stream = s->stream;
        r.action = TraceAction(s->action_bits & 0xff);
        if (s->stack) r.frames = InternedStacks::get_locked(s->stack);
        if (s->action_bits & TraceSlot::kHasExtra) {
          const TraceExtra& x = extra_[size_t(s - begin_)];
          if (x.frames) r.frames = x.frames;
          r.pool = x.pool;
          r.metadata = x.metadata;
        }
        if (s->action_bits & TraceSlot::kPair) {
          out.push_back(r);
          r.action = TraceAction((s->action_bits >> TraceSlot::kSecondShift) & 0xff);
        }
        out.push_back(std::move(r));
      }
    };
    take(next_, end_);
    take(begin_, next_);
    if (out.size() > capacity_) out.erase(out.begin(), out.end() - std::ptrdiff_t(capacity_));
    return out;
  }

 private:
  static constexpr uint64_t kNoFastPeriod = ~uint64_t(0);  // no coarse reading equals it

  static constexpr uint32_t pair_bits(TraceAction a, TraceAction b) {
    return uint32_t(a) | TraceSlot::kPair | uint32_t(b) << TraceSlot::kSecondShift;
  }
  // The fast path's slot, if it may take one (see try_record; `period`: fast_period_ or
  // stack_period_): five plain stores (the action and the stack are one 8-byte store).
  MTIA_INLINE bool try_fill(const uint64_t& period, uint32_t action_bits, uintptr_t addr, uint64_t size,
                            StreamId stream, uint32_t stack) {
    const uint64_t now = CoarseClock::now();
    TraceSlot* s = next_;
    if (__builtin_expect(now != period || s == limit_, 0)) return false;
    next_ = s + 1;
    s->tick = now;  // may sit below an earlier exact stamp: ordered() evens that out
    s->addr = addr;
    s->size = size;
    s->stream = stream;
    s->action_bits = action_bits;
    s->stack = stack;
    return true;
  }

  // Empties the ring, for up to n records (none: 0). The slots are calloc'ed (a large
  // ring's pages are zero-filled by the kernel as records first reach them), at most
  // kFirstSlots at first: the ring grows (doubling) as it fills, up to n.
  static constexpr size_t kFirstSlots = size_t(1) << 16;
  void allocate(size_t n) {
    flush_stream();
    const size_t first = n < kFirstSlots ? n : kFirstSlots;
    slots_.reset(first ? static_cast<TraceSlot*>(calloc(first, sizeof(TraceSlot))) : nullptr);
    if (first && !slots_) throw std::bad_alloc();
    extra_.reset();
    capacity_ = n;
    begin_ = next_ = flushed_ = slots_.get();
    end_ = begin_ + first;
    set_limit();
    extras_unflushed_ = stacks_unflushed_ = false;
    holds_frames_ = false;
    last_coarse_ = last_tick_ = 0;
    exact_left_ = 0;
    update_fast();
  }
  void update_fast() {
    stack_ok_ = begin_ && !skip_mask_ && !holds_frames_;
    fast_ok_ = stack_ok_ && !keeps_stacks_;
    if (!fast_ok_) fast_period_ = kNoFastPeriod;
    if (!stack_ok_) stack_period_ = kNoFastPeriod;
  }
  // The time stamp of a general record (see the top comment): the coarse clock, or the
  // TSC for the first kExactPerPeriod records of a period; never below the previous
  // stamp. Once the exact ones are used up, the rest of the period may take the fast
  // path, unless a process-wide condition is set (read after the clock: a condition set
  // later starts a new period, see set_general_records).
  uint64_t stamp() {
    const uint64_t coarse = CoarseClock::now_acquire();
    uint64_t t = coarse;
    if (coarse != last_coarse_) {
      last_coarse_ = coarse;
      exact_left_ = kExactPerPeriod;
    }
    if (exact_left_) {
      --exact_left_;
      t = trace_clock();
    } else if (stack_ok_ && !g_general_records.load(std::memory_order_relaxed)) {
      stack_period_ = coarse;
      if (fast_ok_) fast_period_ = coarse;
    }
    if (t > last_tick_) last_tick_ = t;
    return last_tick_;
  }
  // The fast path's end: the slots' end, or, while streaming, the current chunk's.
  static constexpr size_t kStreamChunk = 2048;
  void set_limit() {
    limit_ = stream_ && size_t(end_ - next_) > kStreamChunk ? next_ + kStreamChunk : end_;
  }
  // The slots hold fewer than capacity_ records: twice as many slots (at most capacity_).
  void grow() {
    const size_t have = size_t(end_ - begin_);
    const size_t want = have * 2 < capacity_ ? have * 2 : capacity_;
    TraceSlot* slots = static_cast<TraceSlot*>(calloc(want, sizeof(TraceSlot)));
    if (!slots) throw std::bad_alloc();
    memcpy(static_cast<void*>(slots), begin_, have * sizeof(TraceSlot));
    if (extra_) {
      std::unique_ptr<TraceExtra[]> extra(new TraceExtra[want]);
      std::move(extra_.get(), extra_.get() + have, extra.get());
      extra_ = std::move(extra);
    }
    slots_.reset(slots);
    begin_ = slots;
    next_ = slots + have;
    end_ = slots + want;
  }
  // The next slot (the oldest record once full) gets r.
  void write(const TraceRecord& r) {
    if (next_ == limit_) {  // a chunk's end (streamed out) or the slots' end: grow, or wrap
      flush_stream();
      if (next_ == end_) {
        if (size_t(end_ - begin_) < capacity_) grow();
        else next_ = begin_;
        flushed_ = next_;
      }
      set_limit();
    }
    TraceSlot* s = next_++;
    s->tick = r.tick;
    s->addr = r.addr;
    s->size = r.size;
    s->stream = r.stream;
    s->stack = r.frames ? r.frames->id : 0;
    const bool own_frames = r.frames && !s->stack;  // not interned: kept in extras
    const bool extra = own_frames || r.pool != MempoolId{} || r.metadata;
    s->action_bits = uint32_t(r.action) | (extra ? TraceSlot::kHasExtra : 0);
    extras_unflushed_ |= extra;
    stacks_unflushed_ |= s->stack != 0;
    if (extra || (extra_ && holds_frames_)) {  // the slot's old stack, if any, is dropped
      if (!extra_) extra_.reset(new TraceExtra[size_t(end_ - begin_)]);
      TraceExtra& x = extra_[size_t(s - begin_)];
      x.frames = own_frames ? r.frames : FramesPtr();
      x.pool = r.pool;
      x.metadata = r.metadata;
      if (own_frames && !holds_frames_) {
        holds_frames_ = true;  // the fast path would overwrite slots without dropping it
        update_fast();
      }
    }
  }

  struct FreeSlots {
    void operator()(TraceSlot* p) const { free(p); }
  };
  // Fast-path fields first.
  TraceSlot* next_ = nullptr;   // the slot the next record fills (the oldest once full; at end_: grow or wrap)
  TraceSlot* limit_ = nullptr;  // where the fast path stops: end_, or a streamed chunk's end
  TraceSlot* end_ = nullptr;
  TraceSlot* begin_ = nullptr;
  uint64_t fast_period_ = kNoFastPeriod;   // the coarse reading try_record may record in
  uint64_t stack_period_ = kNoFastPeriod;  // ... and try_record_stack
  std::unique_ptr<TraceSlot, FreeSlots> slots_;
  std::unique_ptr<TraceExtra[]> extra_;  // allocated for the first record that needs it
  size_t capacity_ = 0;
  uint64_t last_coarse_ = 0, last_tick_ = 0;
  uint32_t exact_left_ = 0;
  uint32_t skip_mask_ = 0;
  bool keeps_stacks_ = false;  // the context keeps stacks in entries
  bool holds_frames_ = false;  // some extra holds a stack (to drop when overwritten)
  bool stack_ok_ = false;      // none of the above but keeps_stacks_ sends records to the general path
  bool fast_ok_ = false;       // none of the above does
  bool clock_held_ = false;
  // Streaming (attach_stream): the first slot not yet given to stream_ (<= next_: a chunk
  // goes out before the slots grow or wrap), and whether a slot since then has extras, or
  // a stack (else the encoder skips them).
  HistoryStream* stream_ = nullptr;
  TraceSlot* flushed_ = nullptr;
  DeviceIndex device_ = 0;
  bool extras_unflushed_ = false;
  bool stacks_unflushed_ = false;
  std::vector<char> stream_scratch_;  // a chunk, encoded (HistoryStream::push)
  uint64_t stream_tick_ = 0;          // the last time stamp streamed
};

}  // namespace mtia
