// replay_harness.cpp: replays an allocation trace through PyTorch's own
// c10::cuda::CUDACachingAllocator (the unmodified libc10_cuda.so of a torch wheel) on the
// emulated runtime of emu_cudart.cpp. Built by `python -m mtia_alloc peer build DIR` as
// DIR/bin/harness; mtia_alloc's `bench` and `replay --compare-torch DIR` run it.
//
//   harness trace FILE [--repeat N] [--empty-cache-between]
//   harness synthetic [--n PAIRS] [--size BYTES] [--batch B]
//
// Trace: lines `op,id,size_bytes[,stream]` (op a or f; a header line, blank lines and
// lines starting with '#' are skipped; FILE may end in .gz, '-' is stdin). Stream 0 is the
// default stream, every other number gets a stream of its own. Allocating a live id or
// freeing an id that is not live drops the line (counted as skipped_lines).
//
// Each pass resets the allocator's peak and accumulated statistics, runs the events with
// raw_alloc_with_stream / raw_delete under the clock (wall and thread CPU time), frees
// what is left live (untimed) and prints `passN.*` lines and one line
// `RESULT {json}` with: mode, events, total_ns, ns_per_op, thread_cpu_ns_per_op,
// peak_requested_bytes, peak_allocated_bytes, peak_reserved_bytes, num_device_alloc,
// num_device_free, num_alloc_retries, num_ooms, ooms_caught. Pass 1 starts from an empty
// cache; later ones from what the previous pass cached (unless --empty-cache-between).
// `synthetic` times PAIRS cached alloc+free pairs of BYTES (B allocations, then B frees)
// and prints `synthetic.ns_per_pair: X  thread_cpu_ns_per_pair: Y`.
// Environment: PYTORCH_CUDA_ALLOC_CONF, and emu_cudart's FAKE_CUDA_MEM_BYTES.
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/PeerToPeerAccess.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

// Defined in libc10_cuda.so, declared in no installed header: libtorch_cuda registers the
// real primary-context check with it.
namespace c10::cuda::_internal {
C10_CUDA_API void setHasPrimaryContext(bool (*func)(c10::DeviceIndex));
}

namespace {

namespace alloc = c10::cuda::CUDACachingAllocator;

uint64_t clock_ns(clockid_t which) {
  timespec t;
  clock_gettime(which, &t);
  return uint64_t(t.tv_sec) * 1000000000ull + uint64_t(t.tv_nsec);
}

[[noreturn]] void die(int status, const std::string& message) {
  fprintf(stderr, "harness: %s\n", message.c_str());
  exit(status);
}

struct Op {
  uint64_t size;    // 0: free
  uint32_t slot;    // dense index of the allocation's id
  uint32_t stream;  // dense index of the stream (0: the default stream)
};

struct Trace {
  std::vector<Op> ops;
  uint32_t slots = 0;
  uint32_t streams = 1;
  uint64_t skipped = 0;
};

// The whole input as text (a .gz file through `gzip -dc`, run without a shell).
std::string slurp(const std::string& path) {
  int fd = -1;
  pid_t child = -1;
  if (path == "-") {
    fd = 0;
  } else if (path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0) {
    if (access(path.c_str(), R_OK) != 0) die(2, "cannot read " + path + ": " + strerror(errno));
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) die(2, "pipe failed");
    child = fork();
    if (child == 0) {
      dup2(pipe_fds[1], 1);
      close(pipe_fds[0]);
      close(pipe_fds[1]);
      execlp("gzip", "gzip", "-dc", "--", path.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    close(pipe_fds[1]);
    fd = pipe_fds[0];
  } else {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) die(2, "cannot read " + path + ": " + strerror(errno));
    fd = dup(fileno(f));
    fclose(f);
  }
  std::string text;
  char buf[1 << 16];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) text.append(buf, size_t(n));
  if (fd != 0) close(fd);
  if (child > 0) {
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) die(2, "gzip -dc " + path + " failed");
  }
  return text;
}

Trace parse(const std::string& text) {
  Trace t;
  std::unordered_map<std::string, uint32_t> slot_of;
  std::unordered_map<long long, uint32_t> stream_of{{0, 0}};
  std::vector<char> live;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> f;
    size_t a = 0;
    for (;;) {
      size_t c = line.find(',', a);
      f.push_back(line.substr(a, c == std::string::npos ? std::string::npos : c - a));
      if (c == std::string::npos) break;
      a = c + 1;
    }
    if (f.size() < 2 || (f[0] != "a" && f[0] != "f")) {
      if (!(t.ops.empty() && f[0] == "op")) ++t.skipped;  // the header is not a skipped line
      continue;
    }
    auto s = slot_of.emplace(f[1], uint32_t(slot_of.size())).first->second;
    if (live.size() <= s) live.resize(s + 1, 0);
    long long stream = f.size() >= 4 && !f[3].empty() ? strtoll(f[3].c_str(), nullptr, 10) : 0;
    uint32_t si = stream_of.emplace(stream, uint32_t(stream_of.size())).first->second;
    bool is_alloc = f[0] == "a";
    uint64_t size = is_alloc && f.size() >= 3 ? strtoull(f[2].c_str(), nullptr, 10) : 0;
    if (is_alloc == bool(live[s]) || (is_alloc && size == 0)) {  // double allocation, free of a dead id
      ++t.skipped;
      continue;
    }
    live[s] = is_alloc;
    t.ops.push_back(Op{size, s, si});
  }
  t.slots = uint32_t(slot_of.size());
  t.streams = uint32_t(stream_of.size());
  return t;
}

std::vector<cudaStream_t> make_streams(uint32_t n) {
  std::vector<cudaStream_t> out{nullptr};  // the default (legacy) stream
  for (uint32_t i = 1; i < n; ++i) {
    cudaStream_t s;
    cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, 0);
    out.push_back(s);
  }
  return out;
}

void report(const char* mode, uint64_t events, uint64_t wall_ns, uint64_t cpu_ns, uint64_t ooms_caught) {
  const auto st = alloc::getDeviceStats(0);
  const size_t all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  const double n = events ? double(events) : 1.0;
  printf("%s.events: %" PRIu64 "\n", mode, events);
  printf("%s.ns_per_op: %.2f  thread_cpu_ns_per_op: %.2f\n", mode, wall_ns / n, cpu_ns / n);
  printf("%s.peak_requested_bytes: %" PRId64 "\n", mode, st.requested_bytes[all].peak);
  printf("%s.peak_allocated_bytes: %" PRId64 "\n", mode, st.allocated_bytes[all].peak);
  printf("%s.peak_reserved_bytes: %" PRId64 "\n", mode, st.reserved_bytes[all].peak);
  printf("%s.num_device_alloc: %" PRId64 "  num_device_free: %" PRId64 "\n", mode, st.num_device_alloc,
         st.num_device_free);
  printf("%s.num_alloc_retries: %" PRId64 "  num_ooms: %" PRId64 "\n", mode, st.num_alloc_retries, st.num_ooms);
  printf("RESULT {\"mode\": \"%s\", \"events\": %" PRIu64 ", \"total_ns\": %" PRIu64
         ", \"ns_per_op\": %.3f, \"thread_cpu_ns_per_op\": %.3f, \"peak_requested_bytes\": %" PRId64
         ", \"peak_allocated_bytes\": %" PRId64 ", \"peak_reserved_bytes\": %" PRId64
         ", \"num_device_alloc\": %" PRId64 ", \"num_device_free\": %" PRId64 ", \"num_alloc_retries\": %" PRId64
         ", \"num_ooms\": %" PRId64 ", \"ooms_caught\": %" PRIu64 "}\n",
         mode, events, wall_ns, wall_ns / n, cpu_ns / n, st.requested_bytes[all].peak, st.allocated_bytes[all].peak,
         st.reserved_bytes[all].peak, st.num_device_alloc, st.num_device_free, st.num_alloc_retries, st.num_ooms,
         ooms_caught);
  fflush(stdout);
}

int replay(const std::string& path, int repeat, bool empty_between) {
  const Trace t = parse(slurp(path));
  printf("trace: %s  events: %zu  ids: %u  streams: %u  skipped_lines: %" PRIu64 "\n", path.c_str(), t.ops.size(),
         t.slots, t.streams, t.skipped);
  const std::vector<cudaStream_t> streams = make_streams(t.streams);
  std::vector<void*> ptr(t.slots, nullptr);
  alloc::CUDAAllocator* a = alloc::get();
  for (int pass = 1; pass <= repeat; ++pass) {
    alloc::resetPeakStats(0);
    alloc::resetAccumulatedStats(0);
    uint64_t ooms = 0;
    const uint64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID), wall0 = clock_ns(CLOCK_MONOTONIC);
    for (const Op& op : t.ops) {
      if (op.size) {
        try {
          ptr[op.slot] = a->raw_alloc_with_stream(op.size, streams[op.stream]);
        } catch (const c10::OutOfMemoryError&) {
          ++ooms;
        }
      } else if (ptr[op.slot]) {
        a->raw_delete(ptr[op.slot]);
        ptr[op.slot] = nullptr;
      }
    }
    const uint64_t wall = clock_ns(CLOCK_MONOTONIC) - wall0, cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    for (void*& p : ptr) {  // what the trace leaves live, untimed
      if (p) a->raw_delete(p);
      p = nullptr;
    }
    char mode[32];
    snprintf(mode, sizeof mode, "pass%d", pass);
    report(mode, t.ops.size(), wall, cpu, ooms);
    if (empty_between && pass < repeat) alloc::emptyCache();
  }
  return 0;
}

int synthetic(uint64_t pairs, size_t size, uint32_t batch) {
  alloc::CUDAAllocator* a = alloc::get();
  std::vector<void*> held(batch);
  for (auto& p : held) p = a->raw_alloc_with_stream(size, nullptr);  // warm the cache
  for (auto p : held) a->raw_delete(p);
  const uint64_t rounds = pairs / batch ? pairs / batch : 1;
  alloc::resetPeakStats(0);
  alloc::resetAccumulatedStats(0);
  const uint64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID), wall0 = clock_ns(CLOCK_MONOTONIC);
  for (uint64_t r = 0; r < rounds; ++r) {
    for (auto& p : held) p = a->raw_alloc_with_stream(size, nullptr);
    for (auto it = held.rbegin(); it != held.rend(); ++it) a->raw_delete(*it);
  }
  const uint64_t wall = clock_ns(CLOCK_MONOTONIC) - wall0, cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
  const double n = double(rounds * batch);
  printf("synthetic: size %zu  batch %u  pairs %" PRIu64 "\n", size, batch, rounds * batch);
  printf("synthetic.ns_per_pair: %.2f  thread_cpu_ns_per_pair: %.2f\n", wall / n, cpu / n);
  report("synthetic", 2 * rounds * batch, wall, cpu, 0);
  return 0;
}

const char kUsage[] =
    "usage: harness trace FILE [--repeat N] [--empty-cache-between]\n"
    "       harness synthetic [--n PAIRS] [--size BYTES] [--batch B]";

uint64_t number(const char* flag, const char* text) {
  char* end = nullptr;
  unsigned long long v = strtoull(text, &end, 10);
  if (!*text || *end || v == 0) die(2, std::string(flag) + " needs a positive integer, got '" + text + "'");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) die(2, kUsage);
  const std::string mode = argv[1];
  std::string path;
  int first = 2;
  if (mode == "trace") {
    if (argc < 3) die(2, kUsage);
    path = argv[2];
    first = 3;
  } else if (mode != "synthetic") {
    die(2, kUsage);
  }
  uint64_t repeat = 1, pairs = 10000000, size = 1 << 20, batch = 1;
  bool empty_between = false;
  for (int i = first; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--empty-cache-between") {
      empty_between = true;
      continue;
    }
    if (i + 1 >= argc) die(2, kUsage);
    const char* v = argv[++i];
    if (flag == "--repeat") repeat = number("--repeat", v);
    else if (flag == "--n") pairs = number("--n", v);
    else if (flag == "--size") size = number("--size", v);
    else if (flag == "--batch") batch = number("--batch", v);
    else die(2, kUsage);
  }

  // What torch's CUDA hooks do before the allocator's first use.
  c10::cuda::_internal::setHasPrimaryContext([](c10::DeviceIndex) { return true; });
  const int ndev = c10::cuda::device_count();
  if (ndev < 1) die(1, "no (emulated) CUDA device");
  try {
    c10::cuda::detail::init_p2p_access_cache(ndev);
    alloc::init(ndev);
    const char* conf = getenv("PYTORCH_CUDA_ALLOC_CONF");
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    printf("allocator: %s  PYTORCH_CUDA_ALLOC_CONF=%s  device capacity: %zu bytes\n", alloc::get()->name().c_str(),
           conf ? conf : "", total_bytes);
    return mode == "trace" ? replay(path, int(repeat), empty_between)
                           : synthetic(pairs, size, uint32_t(batch));
  } catch (const c10::Error& e) {
    die(1, e.what_without_backtrace());
  }
}
