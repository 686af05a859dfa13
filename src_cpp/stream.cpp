// stream.cpp: worker threads, waiting and timing for emulated streams and events.
// Relies on: stream.h, blocking.h (the GIL hook around waits), errors.h.
#include "stream.h"

#include <chrono>
#include <string>

#include "blocking.h"
#include "errors.h"

namespace mtia {

namespace {
thread_local const Stream* t_worker_stream = nullptr;  // the stream whose worker this thread is
}  // namespace

bool Stream::is_current_worker() const { return t_worker_stream == this; }
bool Stream::on_worker_thread() { return t_worker_stream != nullptr; }

bool worker_stopping() {
  const Stream* s = t_worker_stream;
  return s && s->stopping();
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t Stream::enqueue(Task task) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) {
    lock.unlock();
    if (task.release) task.release(task.arg);
    return completed();
  }
  uint64_t seq = enqueued_.load(std::memory_order_relaxed) + 1;
  queue_.emplace_back(seq, task);
  enqueued_.store(seq, std::memory_order_release);
  if (!worker_.joinable()) worker_ = std::thread([this] { worker_loop(); });
  lock.unlock();
  work_cv_.notify_one();
  return seq;
}

void Stream::worker_loop() {
  t_worker_stream = this;
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;
    auto [seq, task] = queue_.front();
    queue_.pop_front();
    lock.unlock();
    if (task.run) task.run(task.arg);
    if (task.release) task.release(task.arg);
    lock.lock();
    completed_.store(seq, std::memory_order_release);
    if (waiters_.load(std::memory_order_acquire) > 0) done_cv_.notify_all();
  }
}

void Stream::wait_until(uint64_t seq) {
  if (!reached(seq) && is_current_worker())
    throw InvalidState("cannot wait for stream " + std::to_string(id_) + " of device " + std::to_string(device_) +
                       " from one of its own kernels: the stream runs one kernel at a time, so the wait would "
                       "never end (synchronize from the host, or from a kernel on another stream)");
  // Spin briefly, yielding after the first hundred tries, for at most ~200 µs: on a loaded
  // host each yield can give the core away for a whole time slice, and 4000 of them would
  // delay the interruptible wait below (Ctrl-C) by the better part of a second.
  std::chrono::steady_clock::time_point spin_until{};
  for (int spin = 0; spin < 4000; ++spin) {
    if (reached(seq)) return;
    if (spin == 100) spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
    if (spin > 100) {
      if (std::chrono::steady_clock::now() > spin_until) break;
      std::this_thread::yield();
    }
  }
  BlockingScope blocking;
  std::unique_lock<std::mutex> lock(mu_);
  waiters_.fetch_add(1, std::memory_order_acq_rel);
  struct Leave {
    std::atomic<int>& waiters;
    ~Leave() { waiters.fetch_sub(1, std::memory_order_acq_rel); }
  } leave{waiters_};
  auto done = [&] { return reached(seq) || stopping_; };
  bool (*interrupted)() = blocking_hooks().interrupted;
  if (!interrupted || on_worker_thread()) {  // a kernel's wait is never abandoned (nothing would catch it)
    done_cv_.wait(lock, done);
    return;
  }
  // In slices, polling the hook between them without mu_ (the binding's takes the GIL,
  // which a Python kernel finishing on this stream may hold while it waits for mu_).
  while (!done_cv_.wait_for(lock, kWaitSlice, done)) {
    lock.unlock();
    if (interrupted()) throw Interrupted();
    lock.lock();
  }
}

void Stream::begin_shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  done_cv_.notify_all();  // waiters for this stream (other streams' tasks among them) return
}

void Stream::finish_shutdown() {
  std::deque<std::pair<uint64_t, Task>> dropped;
  if (worker_.joinable() && is_current_worker()) {
    worker_.detach();  // shut down from one of its own tasks: the loop ends after it
  } else if (worker_.joinable()) {
    BlockingScope blocking;
    worker_.join();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    dropped.swap(queue_);
    // Work that will never run counts as done, so no waiter hangs.
    completed_.store(enqueued_.load(std::memory_order_relaxed), std::memory_order_release);
  }
  done_cv_.notify_all();
  for (auto& [seq, task] : dropped)
    if (task.release) task.release(task.arg);
}

namespace {
using Stamp = Event::Stamp;
void stamp_time(void* arg) { static_cast<Stamp*>(arg)->get()->store(now_ns()); }
void release_stamp(void* arg) { delete static_cast<Stamp*>(arg); }

struct WaitArg {
  EventMark mark;
};
void run_wait(void* arg) { static_cast<WaitArg*>(arg)->mark.synchronize(); }
void release_wait(void* arg) { delete static_cast<WaitArg*>(arg); }
}  // namespace

uint64_t Event::record(Stream* s) {
  EventMark mark;
  Stamp stamp;
  uint64_t position = s->enqueued();
  if (!timing_) {
    if (!s->reached(position)) mark = EventMark{s, position};
  } else {
    stamp = std::make_shared<std::atomic<int64_t>>(0);
    if (s->reached(position)) {  // idle stream: the event completes now
      stamp->store(now_ns());
    } else {
      position = s->enqueue(Task{stamp_time, new Stamp(stamp), release_stamp});
      mark = EventMark{s, position};
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  recorded_ = true;
  mark_ = mark;
  time_ns_ = std::move(stamp);
  return position;
}

double Event::elapsed_ms(const Event& end) const {
  auto [start_mark, start_stamp] = state();
  auto [end_mark, end_stamp] = end.state();
  start_mark.synchronize();
  end_mark.synchronize();
  int64_t t0 = start_stamp ? start_stamp->load() : 0, t1 = end_stamp ? end_stamp->load() : 0;
  return double(t1 - t0) / 1e6;
}

void stream_wait_mark(Stream* s, const EventMark& mark) {
  if (mark.query() || mark.stream == s) return;  // done, or ordered by the stream itself
  s->enqueue(Task{run_wait, new WaitArg{mark}, release_wait});
}

}  // namespace mtia

namespace mtia {
BlockingHooks& blocking_hooks() {
  static BlockingHooks hooks;
  return hooks;
}
}  // namespace mtia
