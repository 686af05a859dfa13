// history_stream.h: the memory history streamed to a file as it happens (issue 21: a
// recording that never drops the oldest entries). One process-wide stream; while it is
// open, every trace record a device keeps (history.h, after skip_actions) is also
// appended, delta-encoded (a few bytes an event: the writer's and the disk's work is what
// the encoding saves), to an in-memory buffer under a small spin lock. A writer thread
// writes full buffers (and, every 50 ms, the partial one) to the file, so the allocator
// never waits for the disk: when the writer falls behind, the next buffer is a new one. A write error (disk full, ...) stops the stream: later
// records are dropped, error() says why and the on-error hook is told once.
//
// File format (.mtrace, little-endian): the 8-byte magic "MTRACE\0\1", then records
// [u8 kind][u32 payload bytes][payload]. Kinds:
//   'H' header: JSON text (written by the caller of start(): devices, settings, ...)
//   'C' clock anchor: u64 tick, i64 epoch us (one at start, one per flush, one at stop)
//   'F' frame: u32 id, i32 line, u16 n + filename bytes, u16 n + name bytes
//   'S' stack: u32 id, u32 n, n x u32 frame ids (innermost first)
//   'M' metadata string: u32 id, the bytes
//   'Z' batch of events, each relative to the previous one in the batch (the first to
//       zeros, device -1): a head byte (bits 0-3 the action, 0x10 context follows, 0x20
//       stack id follows, 0x40 addr and size as the previous event's), then LEB128
//       varints: [context: device, zigzag stream, pool.first, pool.second, metadata id]
//       zigzag tick delta, [zigzag addr delta, size], [stack id]
//   'E' event (files of earlier versions; still read): u8 action, u8 0, i16 device,
//       u32 stack id (0: none), u32 metadata id, u32 0, u64 tick, u64 addr, u64 size,
//       i64 stream, u64 pool.first, u64 pool.second
// A definition ('F', 'S', 'M') precedes the first event that uses it. A batch ends before
// any other record and at the end of each buffer written, so the file is whole records;
// a file cut short (crash, kill) reads up to its last complete event, inside a batch too.
// Relies on: history.h (TraceRecord, the clock), blocking.h (SpinMutex).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "blocking.h"
#include "history.h"

namespace mtia {

class HistoryStream {
 public:
  // Opens `path` (truncating it) and starts the writer; the header is `header_json`.
  // On failure returns null and sets *error ("cannot write PATH: reason").
  static std::shared_ptr<HistoryStream> open(const std::string& path, const std::string& header_json,
                                             std::string* error);
  ~HistoryStream();

  // The open stream records go to, or null (read on every record: one relaxed load).
  static HistoryStream* active() { return active_.load(std::memory_order_acquire); }
  // Makes `s` (may be null) the stream records go to; returns the previous one.
  static std::shared_ptr<HistoryStream> exchange(std::shared_ptr<HistoryStream> s);

  void event(DeviceIndex device, const TraceRecord& r);
  void define_frame(uint32_t id, const std::string& filename, int line, const std::string& name);
  void define_stack(uint32_t id, const uint32_t* frames, size_t n);
  void define_metadata(uint32_t id, const std::string& text);

  // Writes everything buffered so far, waits for it, stops the writer and closes the
  // file. Idempotent. Returns the error that stopped the stream, or "".
  std::string close();
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  // Inherited across fork(): its mutexes and condition variable may be in the parent's
  // use, so the child never destroys it (stop_history_stream leaks it).
  bool inherited() const;
  std::string error();
  const std::string& path() const { return path_; }

  // Called once, from the writer thread, when a write fails (the binding warns).
  static void set_error_hook(void (*hook)(const char* message));

 private:
  // A fixed-size buffer; written ones go back to spare_ for reuse (no page faults and no
  // allocation on the record path once the stream runs).
  struct Buffer {
    std::unique_ptr<char[]> data;
    size_t used = 0, size = 0;
  };
  HistoryStream() = default;
  void append(char kind, const void* payload, uint32_t n);
  void append2(char kind, const void* a, uint32_t na, const void* b, uint32_t nb);
  // Delta state of the open event batch: the previous event's fields.
  struct Delta {
    int device = -1;  // no event yet: the first one writes its context
    int64_t stream = 0;
    uint64_t pool_a = 0, pool_b = 0, tick = 0, addr = 0, size = 0;
    uint32_t metadata = 0;
  };
  void ensure_room(size_t n);  // under mu_: cur_ has room for n more bytes
  char* reserve(uint32_t n);   // under mu_: n bytes taken in cur_
  void close_batch();          // under mu_: the open 'Z' record gets its length
  Buffer new_buffer(size_t at_least);  // under mu_
  void writer_loop();
  bool write_all(const char* p, size_t n);
  void fail(const std::string& why);

  static std::atomic<HistoryStream*> active_;

  std::string path_;
  int fd_ = -1;
  int owner_pid_ = 0;  // the process that opened it (a forked child does not write)
  SpinMutex mu_;  // guards cur_, full_, spare_, batch_at_, last_ and events_
  Buffer cur_;
  std::vector<Buffer> full_, spare_;
  std::mutex wmu_;  // the writer's sleep
  std::condition_variable wake_;
  bool stop_ = false;  // under wmu_
  bool closed_ = false;
  std::thread writer_;
  std::atomic<bool> failed_{false};
  size_t batch_at_ = ~size_t(0);  // offset of the open 'Z' record in cur_, or none
  Delta last_;
  uint64_t events_ = 0, anchored_events_ = 0;
  std::mutex err_mu_;
  std::string error_;
};

}  // namespace mtia
