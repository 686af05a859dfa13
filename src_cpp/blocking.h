// blocking.h: a hook around every place where the core may block (waiting for a
// contended allocator lock, an event, a stream). The Python binding installs it to
// release the GIL while blocked, so a thread holding the GIL never waits on a thread
// that needs the GIL (a Python kernel, a Python raw allocator). The core itself has no
// Python headers; without the hook a blocking scope does nothing.
#pragma once
#include <mutex>

namespace mtia {

struct BlockingHooks {
  void* (*enter)() = nullptr;      // e.g. release the GIL; returns a token
  void (*leave)(void*) = nullptr;  // e.g. re-acquire it
};
BlockingHooks& blocking_hooks();

class BlockingScope {
 public:
  BlockingScope() : token_(blocking_hooks().enter ? blocking_hooks().enter() : nullptr) {}
  ~BlockingScope() {
    if (blocking_hooks().leave) blocking_hooks().leave(token_);
  }
  BlockingScope(const BlockingScope&) = delete;
  BlockingScope& operator=(const BlockingScope&) = delete;

 private:
  void* token_;
};

// Locks `mu`, leaving a blocking scope only if the lock is contended.
template <class Mutex>
inline void lock_blocking(Mutex& mu) {
  if (mu.try_lock()) return;
  BlockingScope scope;
  mu.lock();
}

// A unique_lock-like guard that takes the lock through lock_blocking.
template <class Mutex>
class BlockingLock {
 public:
  explicit BlockingLock(Mutex& mu) : mu_(mu) { lock(); }
  ~BlockingLock() {
    if (owns_) mu_.unlock();
  }
  void lock() {
    lock_blocking(mu_);
    owns_ = true;
  }
  void unlock() {
    mu_.unlock();
    owns_ = false;
  }

 private:
  Mutex& mu_;
  bool owns_ = false;
};

}  // namespace mtia
