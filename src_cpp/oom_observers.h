// oom_observers.h: the process-wide list of out-of-memory observers (PyTorch's
// attachOutOfMemoryObserver). The core keeps them as opaque handles with a call function
// and never calls them itself: whoever turns an OutOfMemory whose notify_observers is set
// into its own error (the binding) calls notify() once no allocator lock is held, before
// the error propagates. Observers are never detached; the list lives as long as the
// process. Relies on nothing but the standard library.
#pragma once
#include <cstddef>
#include <mutex>
#include <vector>

namespace mtia {

// What an observer is told: the device, the size that was tried, the device's total (or
// the allowed maximum under a memory fraction) and its free bytes.
struct OomReport {
  int device;
  size_t alloc_size, total_or_allowed, device_free;
};

struct OomObserver {
  void* handle;                                     // owned by the registrant, kept for life
  bool (*call)(void* handle, const OomReport& oom);  // false: the observer failed, stop
};

class OomObservers {
 public:
  void add(OomObserver o);
  // Calls every observer attached so far, in order (not those attached meanwhile);
  // false as soon as one fails.
  bool notify(const OomReport& oom) const;

 private:
  mutable std::mutex mu_;
  std::vector<OomObserver> list_;
};

OomObservers& oom_observers();  // the process's

}  // namespace mtia
