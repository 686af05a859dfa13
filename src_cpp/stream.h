// stream.h: emulated streams and events.
//
// A Stream runs its tasks in FIFO order on its own worker thread (started on the
// first enqueue), asynchronously to the caller. Every task gets a sequence number
// (1, 2, ...); the stream publishes `completed()`, the number of the last finished
// task. An Event is just (stream, sequence number): it is complete once the stream
// has completed that many tasks, so recording one on an idle stream costs nothing.
// Streams live until the emulator shuts down; the allocator keeps raw pointers.
// Relies on: types.h.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "types.h"

namespace mtia {

// One unit of work. `run` executes it on the worker (may be null: a marker);
// `release` frees `arg` afterwards, or when the task is discarded at shutdown.
struct Task {
  void (*run)(void* arg) = nullptr;
  void* arg = nullptr;
  void (*release)(void* arg) = nullptr;
};

int64_t now_ns();  // steady clock

// Inside a task: true once the stream running it is shutting down (long native tasks,
// such as the emulated sleep, poll it and return early). False outside tasks.
bool worker_stopping();

class Stream {
 public:
  Stream(DeviceIndex device, StreamId id, int priority) : device_(device), id_(id), priority_(priority) {}
  ~Stream() { shutdown(); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  DeviceIndex device() const { return device_; }
  StreamId id() const { return id_; }
  int priority() const { return priority_; }

  // Queues a task and returns its sequence number. After shutdown the task is released unrun.
  uint64_t enqueue(Task task);
  uint64_t enqueued() const { return enqueued_.load(std::memory_order_acquire); }
  uint64_t completed() const { return completed_.load(std::memory_order_acquire); }
  bool query() const { return completed() >= enqueued(); }
  bool reached(uint64_t seq) const { return completed() >= seq; }
  // Blocks until task `seq` has run (spins briefly first: short kernels finish in microseconds).
  // From inside one of this stream's own tasks a wait for a later task would wait for
  // itself forever: that throws InvalidState instead. Throws Interrupted if the interrupt
  // hook (blocking.h), polled every kWaitSlice, asks for it.
  void wait_until(uint64_t seq);
  void synchronize() { wait_until(enqueued()); }
  // True on this stream's worker thread, i.e. while one of its own tasks runs.
  bool is_current_worker() const;
  // True on any stream's worker thread: the caller is a kernel.
  static bool on_worker_thread();
  bool stopping() const { return stopping_.load(std::memory_order_acquire); }
  // Stops the worker after the running task; queued tasks are released unrun. In two
  // steps, so the emulator can stop every stream before it joins any worker: a task
  // waiting for another stream, or sleeping, then returns early (see worker_stopping()).
  void begin_shutdown();
  void finish_shutdown();
  void shutdown() {
    begin_shutdown();
    finish_shutdown();
  }

 private:
  void worker_loop();

  const DeviceIndex device_;
  const StreamId id_;
  const int priority_;
  std::mutex mu_;                 // guards queue_, worker_, stopping_
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<std::pair<uint64_t, Task>> queue_;
  std::thread worker_;
  std::atomic<bool> stopping_{false};  // written under mu_; read without it by tasks
  std::atomic<uint64_t> enqueued_{0};
  std::atomic<uint64_t> completed_{0};
  std::atomic<int> waiters_{0};
};

// A point in a stream's work. `seq == 0` means "already complete" (recorded on an idle stream).
struct EventMark {
  Stream* stream = nullptr;
  uint64_t seq = 0;
  bool query() const { return stream == nullptr || stream->reached(seq); }
  void synchronize() const {
    if (stream) stream->wait_until(seq);
  }
};


// A user-visible event (torch.mtia.Event). Timing events queue a marker task that
// stamps the time at which the stream reached them. One thread may re-record an event
// while others wait for it or time it: its state is read and written under mu_.
class Event {
 public:
  explicit Event(bool enable_timing) : timing_(enable_timing) {}
  // Returns the stream position the event follows: the number of tasks queued on `s`
  // before it (a timing event's marker included), read once, as the mark itself uses it.
  uint64_t record(Stream* s);
  bool query() const { return mark().query(); }
  void synchronize() const { mark().synchronize(); }
  bool recorded() const {
    std::lock_guard<std::mutex> lock(mu_);
    return recorded_;
  }
  bool timing() const { return timing_; }
  EventMark mark() const {
    std::lock_guard<std::mutex> lock(mu_);
    return mark_;
  }
  // Milliseconds between this event and `end`; both must be recorded timing events
  // (the binding checks that and gives PyTorch's messages). Waits for both.
  double elapsed_ms(const Event& end) const;
  using Stamp = std::shared_ptr<std::atomic<int64_t>>;  // the time, written by the marker task

 private:
  std::pair<EventMark, Stamp> state() const {
    std::lock_guard<std::mutex> lock(mu_);
    return {mark_, time_ns_};
  }

  const bool timing_;
  mutable std::mutex mu_;
  bool recorded_ = false;
  EventMark mark_;
  Stamp time_ns_;
};

// Makes future work on `s` wait until `mark` is reached (a task that blocks the worker).
void stream_wait_mark(Stream* s, const EventMark& mark);

}  // namespace mtia
