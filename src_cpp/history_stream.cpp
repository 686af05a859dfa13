// history_stream.cpp: the streamed history's buffers, writer thread and record
// encoding (history_stream.h), and set_user_metadata (history.h), which streams a new
// metadata string's definition.
#include "history_stream.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

namespace mtia {

namespace {
constexpr size_t kBufferBytes = 1 << 20;
std::atomic<void (*)(const char*)> g_error_hook{nullptr};
std::mutex g_exchange_mu;
std::shared_ptr<HistoryStream> g_current;  // keeps active_ alive; under g_exchange_mu

// LEB128: 7 bits a byte, low first; a signed value is zigzag-mapped first.
constexpr size_t kMaxEventBytes = 1 + 5 * 10 + 3 * 10 + 5;  // head, context, tick/addr/size, stack
inline char* put_varint(char* p, uint64_t v) {
  while (v >= 0x80) {
    *p++ = char(v | 0x80);
    v >>= 7;
  }
  *p++ = char(v);
  return p;
}
inline uint64_t zigzag(int64_t v) { return (uint64_t(v) << 1) ^ uint64_t(v >> 63); }
constexpr size_t kNoBatch = ~size_t(0);
}  // namespace

std::atomic<HistoryStream*> HistoryStream::active_{nullptr};

void HistoryStream::set_error_hook(void (*hook)(const char*)) { g_error_hook.store(hook); }

std::shared_ptr<HistoryStream> HistoryStream::open(const std::string& path, const std::string& header_json,
                                                   std::string* error) {
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
    if (g_current) new std::shared_ptr<HistoryStream>(std::move(g_current));
  });
  (void)atfork;
  std::shared_ptr<HistoryStream> s(new HistoryStream());
  s->owner_pid_ = getpid();
  s->path_ = path;
  s->fd_ = fd;
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
  // An open stream sends records to the general path (the one that streams them).
  if (s) set_general_records(kGeneralStream);
  else g_general_records.fetch_and(~uint32_t(kGeneralStream), std::memory_order_relaxed);
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
    close_batch();  // a batch never spans two buffers
    if (cur_.used) full_.push_back(std::move(cur_));
    cur_ = new_buffer(n);
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
  close_batch();
  char* p = reserve(5 + len);
  p[0] = kind;
  memcpy(p + 1, &len, 4);
  if (na) memcpy(p + 5, a, na);
  if (nb) memcpy(p + 5 + na, b, nb);
  mu_.unlock();
}

void HistoryStream::close_batch() {
  if (batch_at_ == kNoBatch) return;
  const uint32_t len = uint32_t(cur_.used - batch_at_ - 5);
  memcpy(cur_.data.get() + batch_at_ + 1, &len, 4);
  batch_at_ = kNoBatch;
}

// The event, encoded into the open batch (opened here, with the delta state reset).
void HistoryStream::event(DeviceIndex device, const TraceRecord& r) {
  if (failed()) return;
  const uint32_t stack = r.frames ? r.frames->id : 0;
  mu_.lock();
  if (__builtin_expect(batch_at_ == kNoBatch || cur_.used + kMaxEventBytes > cur_.size, 0)) {
    ensure_room(5 + kMaxEventBytes);  // closes the batch if it moves to a new buffer
    batch_at_ = cur_.used;
    char* b = cur_.data.get() + cur_.used;
    b[0] = 'Z';
    cur_.used += 5;
    last_ = Delta{};
  }
  char* const start = cur_.data.get() + cur_.used;
  char* p = start + 1;
  unsigned head = unsigned(r.action);
  Delta& d = last_;
  if (__builtin_expect(device != d.device || r.stream != d.stream || r.pool.first != d.pool_a ||
                           r.pool.second != d.pool_b || r.metadata != d.metadata,
                       0)) {
    head |= 0x10;
    d.device = device;
    d.stream = r.stream;
    d.pool_a = r.pool.first;
    d.pool_b = r.pool.second;
    d.metadata = r.metadata;
    p = put_varint(p, uint64_t(uint16_t(device)));
    p = put_varint(p, zigzag(r.stream));
    p = put_varint(p, r.pool.first);
    p = put_varint(p, r.pool.second);
    p = put_varint(p, r.metadata);
  }
  p = put_varint(p, zigzag(int64_t(r.tick - d.tick)));
  d.tick = r.tick;
  if (r.addr == d.addr && r.size == d.size) {
    head |= 0x40;
  } else {
    p = put_varint(p, zigzag(int64_t(r.addr - d.addr)));
    p = put_varint(p, r.size);
    d.addr = r.addr;
    d.size = r.size;
  }
  if (stack) {
    head |= 0x20;
    p = put_varint(p, stack);
  }
  *start = char(head);
  cur_.used += size_t(p - start);
  ++events_;
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
  for (bool last = false; !last;) {
    {
      std::unique_lock<std::mutex> g(wmu_);
      wake_.wait_for(g, std::chrono::milliseconds(50));
      last = stop_;
    }
    // Take every full buffer and the partial one, with a fresh clock anchor at its end.
    std::vector<Buffer> out;
    ClockAnchor now = ClockAnchor::now();
    mu_.lock();
    close_batch();
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
