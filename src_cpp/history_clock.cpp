// history_clock.cpp: the coarse clock of trace time stamps (history.h, CoarseClock): a
// detached thread that stores a TSC reading every kCoarsePeriod while some trace ring
// holds a user, so a record reads the time with one load instead of RDTSC; advance()
// starts a new period at once (set_general_records).
// Relies on: history.h (trace_clock).
#include <pthread.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "history.h"

namespace mtia {

std::atomic<uint64_t> CoarseClock::tick_{0};

struct CoarseClockThread {
  std::mutex mu;
  std::condition_variable wake;
  int users = 0;
  uint64_t generation = 0;  // a thread whose generation is stale exits

  // Under mu: the one writer of tick_, so max() keeps it from ever decreasing (the
  // thread may move between cores whose TSCs differ slightly).
  static void refresh() {
    const uint64_t t = trace_clock();
    if (t > CoarseClock::tick_.load(std::memory_order_relaxed)) CoarseClock::tick_.store(t, std::memory_order_relaxed);
  }
  void run(uint64_t gen) {
    std::unique_lock<std::mutex> g(mu);
    while (gen == generation) {
      wake.wait_for(g, CoarseClock::kCoarsePeriod);
      refresh();
    }
  }
};

namespace {
// Leaked (a detached thread may still use it at exit); replaced in a forked child,
// which has no clock thread and whose mutex may have been held by the parent's.
CoarseClockThread* g_clock = new CoarseClockThread();
}  // namespace

void CoarseClock::acquire() {
  static const int atfork = pthread_atfork(nullptr, nullptr, [] { g_clock = new CoarseClockThread(); });
  (void)atfork;
  CoarseClockThread* c = g_clock;
  std::lock_guard<std::mutex> g(c->mu);
  CoarseClockThread::refresh();
  if (c->users++ == 0) {
    const uint64_t gen = ++c->generation;
    std::thread([c, gen] { c->run(gen); }).detach();
  }
}

void CoarseClock::advance() {
  CoarseClockThread* c = g_clock;
  std::lock_guard<std::mutex> g(c->mu);
  const uint64_t t = trace_clock(), old = CoarseClock::tick_.load(std::memory_order_relaxed);
  CoarseClock::tick_.store(t > old ? t : old + 1, std::memory_order_release);
}

void CoarseClock::release() {
  CoarseClockThread* c = g_clock;
  std::lock_guard<std::mutex> g(c->mu);
  if (c->users > 0 && --c->users == 0) {
    ++c->generation;
    c->wake.notify_all();
  }
}

}  // namespace mtia
