// history.h: the memory-history trace (allocator_core.md §9): a ring buffer of compact
// trace records per device, recorded under the device lock only while history is enabled
// (the fast path pays one branch when it is off), and optionally streamed to a file
// (history_stream.h). A record is plain data plus an interned stack: the time is a raw
// clock reading (TSC ticks) converted to epoch microseconds when the trace is read, the
// per-thread user metadata is an id into a process-wide string table, and skipped
// actions (skip_actions) are dropped before anything is written.
//
// Time stamps: reading the TSC costs ~14 ns on a VM (RDTSC is microcoded), more than the
// rest of a record, so a record normally reads a coarse clock instead: a TSC reading a
// background thread stores every kCoarsePeriod (1 ms) while history is on (CoarseClock).
// The first kExactPerPeriod records of each period on a device still read the TSC itself,
// so a device recording fewer than 16 events a millisecond gets exact times; in a burst,
// later records of the period repeat the previous record's time. So a time stamp is
// exact or at most about one period (plus the clock thread's scheduling delay) early,
// and never decreases on a device.
// Relies on: frames.h and types.h.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <mutex>
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
  static void acquire();  // history_clock.cpp: refreshes now() at once; starts the thread
  static void release();  // the last user's release stops the thread
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
// Set once any thread sets a metadata string: until then a record reads no thread-local.
inline std::atomic<bool>& metadata_in_use() {
  static std::atomic<bool> used{false};
  return used;
}
inline uint32_t current_metadata_id() {
  return metadata_in_use().load(std::memory_order_relaxed) ? thread_metadata().id : 0;
}
// A per-thread string copied into every trace entry this thread records
// (torch.cuda.memory._set_memory_metadata). Read-only: set it with set_user_metadata.
inline const std::string& user_metadata() { return thread_metadata().text; }
void set_user_metadata(const std::string& s);  // history_stream.cpp (a new string is streamed)

// ------------------------------------------------------------------ the ring
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

class TraceRing {
 public:
  TraceRing() = default;
  TraceRing(const TraceRing&) = delete;
  TraceRing& operator=(const TraceRing&) = delete;
  ~TraceRing() { stop(); }

  // History on (with room for n entries, emptied) / off (emptied). The coarse clock runs
  // while some ring is started.
  void start(size_t n) {
    if (!clock_held_) {
      CoarseClock::acquire();
      clock_held_ = true;
    }
    set_capacity(n);
  }
  void stop() {
    clear();
    if (clock_held_) {
      clock_held_ = false;
      CoarseClock::release();
    }
  }
  void clear() {
    entries_.clear();
    entries_.shrink_to_fit();
    next_ = filled_ = 0;
    holds_frames = false;
  }
  // The time stamp of a new record (see the top comment): the coarse clock, or the TSC
  // for the first kExactPerPeriod records of a period; never below the previous stamp.
  uint64_t stamp() {
    const uint64_t coarse = CoarseClock::now();
    uint64_t t = coarse;
    if (coarse != last_coarse_) {
      last_coarse_ = coarse;
      exact_left_ = kExactPerPeriod;
    }
    if (exact_left_) {
      --exact_left_;
      t = trace_clock();
    }
    if (t > last_tick_) last_tick_ = t;
    return last_tick_;
  }
  // The fast path's slot: the oldest entry (to overwrite) once the ring is full, else
  // null; advance() takes it.
  TraceRecord* next_slot() { return next_ < filled_ ? &entries_[next_] : nullptr; }
  void advance() {
    if (++next_ == capacity_) next_ = 0;
  }
  TraceRecord& push() {  // the slot to fill: the oldest overwritten, or appended
    if (__builtin_expect(next_ >= filled_, 0)) return append();
    TraceRecord& r = entries_[next_];
    if (++next_ == capacity_) next_ = 0;
    return r;
  }
  // New capacity keeping the newest entries (history stays on).
  void resize(size_t n) {
    std::vector<TraceRecord> keep = ordered();
    capacity_ = n < 1 ? 1 : n;
    if (keep.size() > capacity_) keep.erase(keep.begin(), keep.end() - std::ptrdiff_t(capacity_));
    entries_ = std::move(keep);
    filled_ = entries_.size();
    next_ = filled_ == capacity_ ? 0 : filled_;  // oldest first again
  }
  std::vector<TraceRecord> ordered() const {  // oldest first
    std::vector<TraceRecord> out;
    out.reserve(entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) out.push_back(entries_[(next_ + i) % entries_.size()]);
    return out;
  }

  uint32_t skip_mask = 0;  // bit (1 << action): not recorded (skip_actions)
  // Some entry may hold a stack (to drop when overwritten): the fast path reads no slot.
  bool holds_frames = false;

 private:
  // Filling up: next_ == filled_ until the ring is full, then the oldest entry.
  __attribute__((noinline)) TraceRecord& append() {
    TraceRecord& r = entries_.emplace_back();
    filled_ = entries_.size();
    next_ = filled_ == capacity_ ? 0 : filled_;
    return r;
  }
  void set_capacity(size_t n) {
    capacity_ = n < 1 ? 1 : n;
    clear();
    // Room up front (address space only: pages are touched as records arrive), so the
    // record path never copies the buffer to grow it below a million entries.
    entries_.reserve(capacity_ < (size_t(1) << 20) ? capacity_ : (size_t(1) << 20));
  }

  size_t capacity_ = 1;
  std::vector<TraceRecord> entries_;
  size_t next_ = 0;    // the slot push() fills: the oldest entry once full
  size_t filled_ = 0;  // entries_.size()
  uint64_t last_coarse_ = 0, last_tick_ = 0;
  uint32_t exact_left_ = 0;
  bool clock_held_ = false;
};

}  // namespace mtia
