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

struct EventPayload {
  uint8_t action, zero;
  int16_t device;
  uint32_t stack, metadata, zero2;
  uint64_t tick, addr, size;
  int64_t stream;
  uint64_t pool_a, pool_b;
};
static_assert(sizeof(EventPayload) == 64, "the .mtrace event record is 64 bytes");
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

char* HistoryStream::reserve(uint32_t n) {
  if (cur_.used + n > cur_.size) {
    if (cur_.used) full_.push_back(std::move(cur_));
    cur_ = new_buffer(n);
    wake_.notify_one();  // without wmu_: a missed wake-up costs at most one 50 ms tick
  }
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

void HistoryStream::event(DeviceIndex device, const TraceRecord& r) {
  if (failed()) return;
  EventPayload e;
  e.action = uint8_t(r.action);
  e.zero = 0;
  e.device = int16_t(device);
  e.stack = r.frames ? r.frames->id : 0;
  e.metadata = r.metadata;
  e.zero2 = 0;
  e.tick = r.tick;
  e.addr = r.addr;
  e.size = r.size;
  e.stream = r.stream;
  e.pool_a = r.pool.first;
  e.pool_b = r.pool.second;
  constexpr uint32_t len = sizeof e;
  char head[5] = {'E', char(len & 0xff), 0, 0, 0};
  mu_.lock();
  char* p = reserve(5 + len);
  memcpy(p, head, 5);
  memcpy(p + 5, &e, len);
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
  metadata_in_use().store(true, std::memory_order_relaxed);
  ThreadMetadata& m = thread_metadata();
  m.text = s;
  m.id = id;
  if (fresh) {
    std::lock_guard<std::mutex> g(g_exchange_mu);
    if (g_current) g_current->define_metadata(id, s);
  }
}

}  // namespace mtia
