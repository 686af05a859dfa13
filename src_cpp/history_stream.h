// history_stream.h: the memory history streamed to a file as it happens (issue 21: a
// recording that never drops the oldest entries). One process-wide stream; while it is
// open, every device's trace ring (history.h) is attached to it and hands it its raw
// records (after skip_actions), a chunk at a time (push): the record itself costs what an
// in-memory one does, and the chunk is encoded at once, while in cache (delta-encoded, a
// few bytes an event: the disk's work is what the encoding saves), then copied under a
// small spin lock into the stream's buffer. A writer thread writes the buffers to the
// file: every 50 ms it first pulls the records the rings hold back (the `pull`
// callback), so a file lags the allocator by at most about one tick; the allocator never
// waits for the disk. A write error (disk full, ...) stops the stream: later records are
// dropped, error() says why and the on-error hook is told once.
//
// File format (.mtrace, little-endian): the 8-byte magic "MTRACE\0\1", then records
// [u8 kind][u32 payload bytes][payload]. Kinds:
//   'H' header: JSON text (written by the caller of start(): devices, settings, ...)
//   'C' clock anchor: u64 tick, i64 epoch us (one at start, one per flush, one at stop)
//   'F' frame: u32 id, i32 line, u16 n + filename bytes, u16 n + name bytes
//   'S' stack: u32 id, u32 n, n x u32 frame ids (innermost first)
//   'M' metadata string: u32 id, the bytes
//   'Y' batch of events of one device, each relative to the previous one in the batch
//       (the first to zeros): a head byte (bits 0-3 the action, 0x10 context follows),
//       [context: LEB128 varints: device, zigzag stream, pool.first, pool.second, metadata
//       id], a u16 of four 4-bit byte counts (bits 0-3 the tick delta's, 4-7 the zigzag
//       addr delta's, 8-11 the zigzag size delta's, 12-15 the stack id's; 0-8, 0 for a
//       value 0), then those values, little-endian, in that many bytes each. (Byte counts
//       rather than LEB128: the encoder has no branch that depends on a value.)
//   'Z' batch of events (files of earlier versions; still read), each relative to the
//       previous one in the batch (the first to zeros, device -1): a head byte (bits 0-3
//       the action, 0x10 context follows, 0x20 stack id follows, 0x40 addr and size as
//       the previous event's), then LEB128 varints: [context: device, zigzag stream,
//       pool.first, pool.second, metadata id] zigzag tick delta, [zigzag addr delta,
//       size], [stack id]
//   'E' event (files of earlier versions; still read): u8 action, u8 0, i16 device,
//       u32 stack id (0: none), u32 metadata id, u32 0, u64 tick, u64 addr, u64 size,
//       i64 stream, u64 pool.first, u64 pool.second
// A definition ('F', 'S', 'M') precedes the first event that uses it. A batch holds a
// chunk of one device's records (TraceRing::flush_stream), in record order; the batches
// of several devices interleave by chunk, so readers merge the events by time (stably:
// a device's time stamps never decrease). The file is whole records at the end of every
// write; a file cut short (crash, kill) reads up to its last complete event, inside a
// batch too.
// Relies on: history.h (TraceRecord, the clock), blocking.h (SpinMutex).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
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
  // `pull` (called by the writer before each write, holding none of the stream's locks)
  // flushes the attached rings. On failure returns null and sets *error ("cannot write
  // PATH: reason").
  static std::shared_ptr<HistoryStream> open(const std::string& path, const std::string& header_json,
                                             std::function<void()> pull, std::string* error);
  ~HistoryStream();

  // The open stream, or null.
  static HistoryStream* active() { return active_.load(std::memory_order_acquire); }
  // Makes `s` (may be null) the open stream; returns the previous one.
  static std::shared_ptr<HistoryStream> exchange(std::shared_ptr<HistoryStream> s);

  // n raw records of `device` (TraceRing::flush_stream, under the device's lock); `extras`,
  // when not null, parallels `slots` and holds the rest of the slots marked kHasExtra;
  // `stacks`: some slot has a stack id.
  // They are encoded in the ring's `scratch`, their time stamps made non-decreasing from
  // the ring's *last_tick on, then appended.
  void push(DeviceIndex device, const TraceSlot* slots, size_t n, const TraceExtra* extras, bool stacks,
            std::vector<char>* scratch, uint64_t* last_tick);
  void define_frame(uint32_t id, const std::string& filename, int line, const std::string& name);
  void define_stack(uint32_t id, const uint32_t* frames, size_t n);
  void define_metadata(uint32_t id, const std::string& text);

  // Writes everything pushed so far, waits for it, stops the writer and closes the file.
  // Idempotent. Returns the error that stopped the stream, or "".
  std::string close();
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  // Inherited across fork(): its mutexes and condition variable may be in the parent's
  // use, so the child never destroys it (stop_history_stream leaks it) nor pushes to it.
  bool inherited() const;
  std::string error();
  const std::string& path() const { return path_; }

  // Called once, from the writer thread, when a write fails (the binding warns).
  static void set_error_hook(void (*hook)(const char* message));

 private:
  // A fixed-size buffer; written ones go back to spare_ for reuse (no page faults and no
  // allocation on the record path once the stream runs). It holds file records (the
  // definitions) and raw chunks (kind kRawChunk, never written as they are).
  struct Buffer {
    std::unique_ptr<char[]> data;
    size_t used = 0, size = 0;
  };
  HistoryStream() = default;
  void append(char kind, const void* payload, uint32_t n);
  void append2(char kind, const void* a, uint32_t na, const void* b, uint32_t nb);
  void ensure_room(size_t n);  // under mu_: cur_ has room for n more bytes
  char* reserve(uint32_t n);   // under mu_: n bytes taken in cur_
  Buffer new_buffer(size_t at_least);  // under mu_
  void writer_loop();
  // The writer's work on the buffers taken: the file's bytes into out_.
  bool write_all(const char* p, size_t n);
  void fail(const std::string& why);

  static std::atomic<HistoryStream*> active_;

  std::string path_;
  int fd_ = -1;
  int owner_pid_ = 0;     // the process that opened it (a forked child does not write)
  bool orphaned_ = false;  // set in a forked child (single-threaded then): push drops records
  std::function<void()> pull_;
  SpinMutex mu_;  // guards cur_, full_, spare_ and events_
  Buffer cur_;
  std::vector<Buffer> full_, spare_;
  uint64_t events_ = 0;
  std::atomic<uint32_t> full_count_{0};  // buffers filled since the writer last looked
  std::mutex wmu_;  // the writer's sleep
  std::condition_variable wake_;
  bool stop_ = false;  // under wmu_
  bool closed_ = false;
  std::thread writer_;
  std::atomic<bool> failed_{false};
  std::mutex err_mu_;
  std::string error_;
  uint64_t anchored_events_ = 0;  // the writer's: events_ at its last clock anchor
};

}  // namespace mtia
