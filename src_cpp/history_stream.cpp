// history_stream.cpp: the streamed history's buffers, writer thread and record
// encoding (history_stream.h), TraceRing::flush_stream (history.h: a ring's raw records
// to the stream), and set_user_metadata (history.h), which streams a new metadata
// string's definition.
#include "history_stream.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace mtia {

namespace {
constexpr size_t kBufferBytes = 1 << 20;
std::atomic<void (*)(const char*)> g_error_hook{nullptr};
std::mutex g_exchange_mu;
std::shared_ptr<HistoryStream> g_current;  // keeps active_ alive; under g_exchange_mu

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the .mtrace fields are stored as in memory");
// LEB128 (the context of an event): 7 bits a byte, low first; a signed value is
// zigzag-mapped first.
constexpr size_t kMaxEventBytes = 1 + 5 * 10 + 2 + 4 * 8 + 8;  // head, context, lengths, fields, store slack
inline char* put_varint(char* p, uint64_t v) {
  while (v >= 0x80) {
    *p++ = char(v | 0x80);
    v >>= 7;
  }
  *p++ = char(v);
  return p;
}
inline uint64_t zigzag(int64_t v) { return (uint64_t(v) << 1) ^ uint64_t(v >> 63); }
// A 'Y' field: its significant bytes (0 for 0), written by one 8-byte store (p needs 8
// writable bytes); no branch depends on the value, so none is mispredicted (LEB128's loop,
// in 'Z' batches, mispredicted about once per event: most of the encoding's cost).
inline unsigned byte_count(uint64_t v) { return (unsigned(71 - __builtin_clzll(v | 1)) >> 3) & -unsigned(v != 0); }
inline char* put_bytes(char* p, uint64_t v, unsigned n) {
  memcpy(p, &v, 8);  // little-endian
  return p + n;
}

}  // namespace

void TraceRing::flush_stream() {
  if (!stream_ || flushed_ == next_) return;
  const TraceExtra* x = extras_unflushed_ && extra_ ? &extra_[size_t(flushed_ - begin_)] : nullptr;
  stream_->push(device_, flushed_, size_t(next_ - flushed_), x, stacks_unflushed_, &stream_scratch_, &stream_tick_);
  flushed_ = next_;
  extras_unflushed_ = stacks_unflushed_ = false;
}

std::atomic<HistoryStream*> HistoryStream::active_{nullptr};

void HistoryStream::set_error_hook(void (*hook)(const char*)) { g_error_hook.store(hook); }

std::shared_ptr<HistoryStream> HistoryStream::open(const std::string& path, const std::string& header_json,
                                                   std::function<void()> pull, std::string* error) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    *error = "cannot write " + path + ": " + strerror(errno);
    return nullptr;
  }
  static const int atfork = pthread_atfork(nullptr, nullptr, [] {
    // A forked child does not stream: its records would only pile up (no writer thread).
    active_.store(nullptr, std::memory_order_relaxed);
    // Nor does it ever destroy the parent's stream, whose mutexes and condition variable
    // may be in the parent's use (destroying them hangs the child's exit): leaked here, as
    // the child's allocator, forgotten after fork, never stops it.
    if (g_current) {
      g_current->orphaned_ = true;  // nor do the rings still attached to it
      new std::shared_ptr<HistoryStream>(std::move(g_current));
    }
  });
  (void)atfork;
  std::shared_ptr<HistoryStream> s(new HistoryStream());
  s->owner_pid_ = getpid();
  s->path_ = path;
  s->fd_ = fd;
  s->pull_ = std::move(pull);
  s->cur_ = s->new_buffer(kBufferBytes);
  static const char magic[8] = {'M', 'T', 'R', 'A', 'C', 'E', 0, 1};
  memcpy(s->reserve(8), magic, 8);
  s->append('H', header_json.data(), uint32_t(header_json.size()));
  const ClockAnchor& first = first_clock_anchor();
  s->append('C', &first, sizeof first);
  ClockAnchor now = ClockAnchor::now();
  if (now.us - first.us < 2000) {  // two anchors far enough apart give the clock rate at once
    std::this_thread::sleep_for(std::chrono::microseconds(2000 - (now.us - first.us)));
    now = ClockAnchor::now();
  }
  s->append('C', &now, sizeof now);
  // The header goes out at once: a path that cannot take data fails here, not later.
  const bool ok = s->write_all(s->cur_.data.get(), s->cur_.used);
  s->cur_.used = 0;
  if (!ok) {
    *error = s->error();
    ::close(fd);
    s->fd_ = -1;
    s->closed_ = true;
    return nullptr;
  }
  s->writer_ = std::thread([p = s.get()] { p->writer_loop(); });
  return s;
}

HistoryStream::~HistoryStream() { close(); }

bool HistoryStream::inherited() const { return getpid() != owner_pid_; }

std::shared_ptr<HistoryStream> HistoryStream::exchange(std::shared_ptr<HistoryStream> s) {
  std::lock_guard<std::mutex> g(g_exchange_mu);
  active_.store(s.get(), std::memory_order_release);
  std::swap(g_current, s);
  return s;
}

HistoryStream::Buffer HistoryStream::new_buffer(size_t at_least) {
  if (!spare_.empty() && spare_.back().size >= at_least) {
    Buffer b = std::move(spare_.back());
    spare_.pop_back();
    b.used = 0;
    return b;
  }
  Buffer b;
  b.size = at_least > kBufferBytes ? at_least : kBufferBytes;
  b.data.reset(new char[b.size]);
  return b;
}

void HistoryStream::ensure_room(size_t n) {
  if (cur_.used + n > cur_.size) {
    if (cur_.used) full_.push_back(std::move(cur_));
    cur_ = new_buffer(n);
    full_count_.fetch_add(1, std::memory_order_relaxed);
    wake_.notify_one();  // without wmu_: a missed wake-up costs at most one 50 ms tick
  }
}

char* HistoryStream::reserve(uint32_t n) {
  ensure_room(n);
  char* p = cur_.data.get() + cur_.used;
  cur_.used += n;
  return p;
}

void HistoryStream::append(char kind, const void* payload, uint32_t n) { append2(kind, payload, n, nullptr, 0); }

void HistoryStream::append2(char kind, const void* a, uint32_t na, const void* b, uint32_t nb) {
  if (failed()) return;
  uint32_t len = na + nb;
  mu_.lock();
  char* p = reserve(5 + len);
  p[0] = kind;
  memcpy(p + 1, &len, 4);
  if (na) memcpy(p + 5, a, na);
  if (nb) memcpy(p + 5 + na, b, nb);
  mu_.unlock();
}

namespace {
// The most bytes a batch of n slots takes: the record's kind and length, and two events
// a slot (a slot may hold two records).
constexpr size_t batch_bytes(size_t n) { return 5 + 2 * n * kMaxEventBytes; }

// One 'Y' batch (history_stream.h) of n slots at `begin` (room for batch_bytes(n));
// returns its end. The previous event's fields live in locals (byte stores through a char
// pointer would make the compiler reload members); kExtras: some slots have extras (pool,
// metadata), else none is looked at; kStacks: some have a stack, else none is.
template <bool kExtras, bool kStacks>
char* encode_batch(char* const begin, DeviceIndex device, const TraceSlot* slots, size_t n,
                   const TraceExtra* extras, uint64_t* last_tick) {
  char* p = begin + 5;
  uint64_t last = *last_tick;  // time stamps non-decreasing, as TraceRing::ordered makes them
  uint64_t prev_tick = 0, prev_addr = 0, prev_size = 0;
  bool context = false;  // the batch's first event writes its context
  int64_t stream = 0;
  uint64_t pool_a = 0, pool_b = 0;
  uint32_t metadata = 0;
  for (size_t i = 0; i < n; ++i) {
    const TraceSlot& s = slots[i];
    uint64_t e_pool_a = 0, e_pool_b = 0;
    const uint64_t stack = kStacks ? s.stack : 0;  // an interned stack's id (one in extras is not: none)
    uint32_t e_metadata = 0;
    if (kExtras && (s.action_bits & TraceSlot::kHasExtra)) {
      const TraceExtra& x = extras[i];
      e_metadata = x.metadata;
      e_pool_a = x.pool.first;
      e_pool_b = x.pool.second;
    }
    unsigned head = s.action_bits & 0x0f;
    char* const start = p++;
    if (__builtin_expect(!context || s.stream != stream || e_pool_a != pool_a || e_pool_b != pool_b ||
                             e_metadata != metadata,
                         0)) {
      head |= 0x10;
      context = true;
      stream = s.stream;
      pool_a = e_pool_a;
      pool_b = e_pool_b;
      metadata = e_metadata;
      p = put_varint(p, uint64_t(uint16_t(device)));
      p = put_varint(p, zigzag(stream));
      p = put_varint(p, pool_a);
      p = put_varint(p, pool_b);
      p = put_varint(p, metadata);
    }
    *start = char(head);
    if (s.tick > last) last = s.tick;
    const uint64_t tick = last - prev_tick, addr = zigzag(int64_t(s.addr - prev_addr)),
                   size = zigzag(int64_t(s.size - prev_size));
    prev_tick = last;
    prev_addr = s.addr;
    prev_size = s.size;
    const unsigned nt = byte_count(tick), na = byte_count(addr), ns = byte_count(size);
    const unsigned nk = kStacks ? byte_count(stack) : 0;
    const uint16_t lens = uint16_t(nt | na << 4 | ns << 8 | nk << 12);
    memcpy(p, &lens, 2);
    p = put_bytes(p + 2, tick, nt);
    p = put_bytes(p, addr, na);
    p = put_bytes(p, size, ns);
    if (kStacks) p = put_bytes(p, stack, nk);
    // A slot's second record (TraceSlot::kPair; never with extras): its action, all deltas
    // 0 and the first's stack, always written, kept only for a pair (no branch to
    // mispredict).
    *p = char((s.action_bits >> TraceSlot::kSecondShift) & 0x0f);
    const uint16_t lens2 = uint16_t(nk << 12);
    memcpy(p + 1, &lens2, 2);
    if (kStacks) put_bytes(p + 3, stack, nk);
    p += (3 + nk) * ((s.action_bits & TraceSlot::kPair) != 0);
  }
  *last_tick = last;
  const uint32_t len = uint32_t(p - begin - 5);
  begin[0] = 'Y';
  memcpy(begin + 1, &len, 4);
  return p;
}
}  // namespace

void HistoryStream::push(DeviceIndex device, const TraceSlot* slots, size_t n, const TraceExtra* extras,
                         bool stacks, std::vector<char>* scratch, uint64_t* last_tick) {
  if (failed() || orphaned_ || !n) return;
  // Encoded outside the stream's lock (the slots were just written: they are in cache).
  if (scratch->size() < batch_bytes(n)) scratch->resize(batch_bytes(n));
  char* const begin = scratch->data();
  char* const end =
      extras ? (stacks ? encode_batch<true, true>(begin, device, slots, n, extras, last_tick)
                       : encode_batch<true, false>(begin, device, slots, n, extras, last_tick))
             : (stacks ? encode_batch<false, true>(begin, device, slots, n, nullptr, last_tick)
                       : encode_batch<false, false>(begin, device, slots, n, nullptr, last_tick));
  const uint32_t used = uint32_t(end - begin);
  mu_.lock();
  memcpy(reserve(used), begin, used);
  events_ += n;  // slots: what tells the writer that events came
  mu_.unlock();
}

void HistoryStream::define_frame(uint32_t id, const std::string& filename, int line, const std::string& name) {
  std::string p;
  uint16_t nf = uint16_t(std::min<size_t>(filename.size(), 65535)), nn = uint16_t(std::min<size_t>(name.size(), 65535));
  p.append(reinterpret_cast<const char*>(&id), 4);
  int32_t l = line;
  p.append(reinterpret_cast<const char*>(&l), 4);
  p.append(reinterpret_cast<const char*>(&nf), 2);
  p.append(filename.data(), nf);
  p.append(reinterpret_cast<const char*>(&nn), 2);
  p.append(name.data(), nn);
  append('F', p.data(), uint32_t(p.size()));
}

void HistoryStream::define_stack(uint32_t id, const uint32_t* frames, size_t n) {
  uint32_t head[2] = {id, uint32_t(n)};
  append2('S', head, 8, frames, uint32_t(n * 4));
}

void HistoryStream::define_metadata(uint32_t id, const std::string& text) {
  append2('M', &id, 4, text.data(), uint32_t(text.size()));
}

bool HistoryStream::write_all(const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd_, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail("cannot write " + path_ + ": " + strerror(errno));
      return false;
    }
    p += w;
    n -= size_t(w);
  }
  return true;
}

void HistoryStream::fail(const std::string& why) {
  {
    std::lock_guard<std::mutex> g(err_mu_);
    if (!error_.empty()) return;
    error_ = why;
  }
  failed_.store(true, std::memory_order_relaxed);
}

std::string HistoryStream::error() {
  std::lock_guard<std::mutex> g(err_mu_);
  return error_;
}

void HistoryStream::writer_loop() {
  std::vector<Buffer> out;
  for (bool last = false; !last;) {
    bool tick = false;
    {
      // Woken by a full buffer (it goes back to spare_ soon enough that the record path
      // need not allocate), or every 50 ms.
      std::unique_lock<std::mutex> g(wmu_);
      if (!stop_ && !full_count_.load(std::memory_order_relaxed))
        tick = wake_.wait_for(g, std::chrono::milliseconds(50)) == std::cv_status::timeout;
      last = stop_;
    }
    full_count_.store(0, std::memory_order_relaxed);
    // The records the rings hold back (not when woken for a full buffer: the rings are
    // busy then, and their chunks come on their own).
    if (pull_ && (tick || last)) pull_();
    // Take every full buffer and the partial one, with a fresh clock anchor at its end.
    ClockAnchor now = ClockAnchor::now();
    mu_.lock();
    if (events_ != anchored_events_ || last) {  // an idle stream does not grow
      anchored_events_ = events_;
      char* p = reserve(5 + sizeof now);
      p[0] = 'C';
      const uint32_t len = sizeof now;
      memcpy(p + 1, &len, 4);
      memcpy(p + 5, &now, sizeof now);
    }
    out.swap(full_);
    out.push_back(std::move(cur_));
    cur_ = new_buffer(kBufferBytes);
    mu_.unlock();
    bool ok = !failed();
    for (auto& b : out)
      if (ok && !write_all(b.data.get(), b.used)) {
        ok = false;
        auto hook = g_error_hook.load();
        if (hook) hook(error().c_str());
      }
    mu_.lock();
    for (auto& b : out)
      if (spare_.size() < 4 && b.size == kBufferBytes) spare_.push_back(std::move(b));
    mu_.unlock();
    out.clear();
  }
}

std::string HistoryStream::close() {
  if (closed_) return error();
  closed_ = true;
  if (getpid() != owner_pid_) {
    // Inherited across fork(): the writer thread is the parent's. Its handle is leaked
    // (joining or destroying it would fail), the buffers are dropped, the parent's file is
    // left to the parent.
    new std::thread(std::move(writer_));
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    return "";
  }
  {
    std::lock_guard<std::mutex> g(wmu_);
    stop_ = true;
  }
  wake_.notify_one();
  if (writer_.joinable()) writer_.join();
  if (fd_ >= 0) {
    if (::close(fd_) != 0 && !failed()) fail("cannot write " + path_ + ": " + strerror(errno));
    fd_ = -1;
  }
  return error();
}

void set_user_metadata(const std::string& s) {
  auto [id, fresh] = MetadataTable::get().intern(s);
  if (!metadata_in_use()) set_general_records(kGeneralMetadata);
  ThreadMetadata& m = thread_metadata();
  m.text = s;
  m.id = id;
  if (fresh) {
    std::lock_guard<std::mutex> g(g_exchange_mu);
    if (g_current) g_current->define_metadata(id, s);
  }
}

}  // namespace mtia
