// blocking.h: a hook around every place where the core may block (waiting for a
// contended allocator lock, an event, a stream). The Python binding installs it to
// release the GIL while blocked, so a thread holding the GIL never waits on a thread
// that needs the GIL (a Python kernel, a Python raw allocator). The core itself has no
// Python headers; without the hook a blocking scope does nothing. A second hook,
// `interrupted`, is polled between the slices (kWaitSlice) of every wait for a stream or
// an event: when it says so the wait throws Interrupted (errors.h); the binding's runs
// the Python signal handlers on the main thread, so Ctrl-C ends a wait.
// Relies on: nothing but pthreads (the hooks are installed by the binding).
#pragma once
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MTIA_CPU_RELAX() _mm_pause()
#else
#define MTIA_CPU_RELAX() std::this_thread::yield()
#endif

namespace mtia {

struct BlockingHooks {
  void* (*enter)() = nullptr;      // e.g. release the GIL; returns a token
  void (*leave)(void*) = nullptr;  // e.g. re-acquire it
  // Called, with no lock of the core held, between the slices of a host thread's wait for
  // a stream or an event (never on a stream worker); true abandons the wait (it throws
  // Interrupted). May be null.
  bool (*interrupted)() = nullptr;
};
BlockingHooks& blocking_hooks();

// How long a wait blocks before it polls BlockingHooks::interrupted.
constexpr std::chrono::milliseconds kWaitSlice{25};

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

// The device lock: a recursive test-and-test-and-set spin lock on one word, the owning
// thread's id. Critical sections are a few hundred nanoseconds, so an uncontended
// lock/unlock pair (one compare-and-swap, one store) is far cheaper than a pthread mutex;
// a waiter spins briefly, then yields its core. It is recursive (as PyTorch's allocator
// mutex is) because a Python raw allocator called under it may free memory of the same
// device, e.g. when the garbage collector runs inside it.
class SpinMutex {
 public:
  // One compare-and-swap when the lock is free; a failed one tells who holds it.
  __attribute__((always_inline)) bool try_lock() {
    const void* me = self();
    const void* holder = nullptr;
    if (__builtin_expect(owner_.compare_exchange_strong(holder, me, std::memory_order_acquire,
                                                         std::memory_order_relaxed), 1))
      return true;  // depth_ is 0 whenever the lock is free
    if (holder == me) {  // only this thread can have stored `me`
      ++depth_;
      return true;
    }
    return false;
  }
  void lock() {
    while (!try_lock()) wait_until_free();
  }
  // Waits, without taking the lock, until it looks free. Plain loads: a CAS per spin
  // would keep stealing the holder's cache line.
  void wait_until_free() const {
    for (int spins = 0; owner_.load(std::memory_order_relaxed); ++spins) {
      if (spins < 64) MTIA_CPU_RELAX();
      else std::this_thread::yield();
    }
  }
  __attribute__((always_inline)) void unlock() {
    if (__builtin_expect(depth_ > 0, 0)) {
      --depth_;
      return;
    }
    owner_.store(nullptr, std::memory_order_release);
  }

 private:
  // The thread pointer identifies the running thread in one register read (a thread_local
  // in a shared object would cost a __tls_get_addr call, pthread_self() a libc call).
  static const void* self() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__))
    return __builtin_thread_pointer();
#else
    return reinterpret_cast<const void*>(pthread_self());
#endif
  }
  std::atomic<const void*> owner_{nullptr};
  int depth_ = 0;  // re-entries beyond the first lock: written only by the owner
};

// The wait leaves the blocking scope (takes the GIL back) before it takes the lock, never
// while holding it: a thread that cannot have the GIL back (a daemon thread during
// interpreter finalization parks for good) must not keep the device locked.
template <class Mutex>
__attribute__((noinline)) void lock_contended(Mutex& mu) {
  do {
    BlockingScope scope;
    mu.wait_until_free();
  } while (!mu.try_lock());
}

// Locks `mu`, leaving a blocking scope only if the lock is contended.
template <class Mutex>
__attribute__((always_inline)) inline void lock_blocking(Mutex& mu) {
  if (__builtin_expect(mu.try_lock(), 1)) return;
  lock_contended(mu);
}

// A held SpinMutex, adopted from lock_blocking: released at scope exit, or earlier by
// unlock() (a wait that must not hold it) and then re-adopted by assignment. Leaner than
// std::unique_lock, whose checks cost more than the uncontended lock itself.
class AdoptedLock {
 public:
  AdoptedLock(SpinMutex& mu, std::adopt_lock_t) : mu_(&mu) {}
  __attribute__((always_inline)) ~AdoptedLock() {
    if (mu_) mu_->unlock();
  }
  AdoptedLock(AdoptedLock&& o) noexcept : mu_(o.mu_) { o.mu_ = nullptr; }
  AdoptedLock& operator=(AdoptedLock&& o) noexcept {
    if (this != &o) {
      if (mu_) mu_->unlock();
      mu_ = o.mu_;
      o.mu_ = nullptr;
    }
    return *this;
  }
  AdoptedLock(const AdoptedLock&) = delete;
  AdoptedLock& operator=(const AdoptedLock&) = delete;
  void unlock() {
    mu_->unlock();
    mu_ = nullptr;
  }
  // Hands the held lock to the caller (who must adopt it): this one no longer unlocks.
  void release() { mu_ = nullptr; }

 private:
  SpinMutex* mu_;
};

}  // namespace mtia
