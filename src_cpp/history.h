// history.h: the memory-history trace (allocator_core.md §9): a ring buffer of trace
// entries per device, recorded under the device lock only while history is enabled
// (the fast path pays one branch when it is off).
// Relies on: frames.h and types.h.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "frames.h"
#include "types.h"

namespace mtia {

enum class TraceAction : uint8_t {
  kAlloc, kFreeRequested, kFreeCompleted, kSegmentAlloc, kSegmentFree, kSnapshot, kOom, kSegmentMap,
  kSegmentUnmap,
};

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

// A per-thread string copied into every trace entry this thread records
// (torch.cuda.memory._set_memory_metadata).
inline std::string& user_metadata() {
  static thread_local std::string metadata;
  return metadata;
}

inline int64_t epoch_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

class TraceRing {
 public:
  void set_capacity(size_t n) {
    capacity_ = n < 1 ? 1 : n;
    clear();
  }
  void clear() {
    entries_.clear();
    next_ = 0;
  }
  void push(TraceEntry&& e) {
    if (entries_.size() < capacity_) {
      entries_.push_back(std::move(e));
    } else {
      entries_[next_] = std::move(e);
      next_ = (next_ + 1) % capacity_;
    }
  }
  // New capacity keeping the newest entries (history stays on).
  void resize(size_t n) {
    std::vector<TraceEntry> keep = ordered();
    capacity_ = n < 1 ? 1 : n;
    if (keep.size() > capacity_) keep.erase(keep.begin(), keep.end() - std::ptrdiff_t(capacity_));
    entries_ = std::move(keep);
    next_ = 0;  // oldest first again
  }
  std::vector<TraceEntry> ordered() const {  // oldest first
    std::vector<TraceEntry> out;
    out.reserve(entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) out.push_back(entries_[(next_ + i) % entries_.size()]);
    return out;
  }

 private:
  size_t capacity_ = 1;
  std::vector<TraceEntry> entries_;
  size_t next_ = 0;  // oldest entry once full
};

}  // namespace mtia
