// history_stream_stress.cpp: the streamed memory history (history_stream.h) under
// ThreadSanitizer / AddressSanitizer: threads on two devices malloc and free with history
// on (stacks kept: interned ones, in ring slots, and others, in extras) while the stream
// is started, restarted with metadata strings and stopped under them, and the rings are
// read; then every complete record of the file must parse (each event batch exactly) and
// hold events.
//   g++ -std=c++17 -O1 -g -fsanitize=thread -Isrc_cpp tests/native/history_stream_stress.cpp \
//       src_cpp/*.cpp -o build/history_stream_tsan -lpthread && build/history_stream_tsan DIR
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "allocator.h"
#include "history_stream.h"

using namespace mtia;

// LEB128 varint at p (< end); false if it runs past end.
static bool varint(const unsigned char*& p, const unsigned char* end, uint64_t* v) {
  *v = 0;
  for (int shift = 0; p < end && shift < 64; shift += 7) {
    unsigned char b = *p++;
    *v |= uint64_t(b & 0x7f) << shift;
    if (b < 0x80) return true;
  }
  return false;
}

// The events of a 'Y' batch; false unless they fill it exactly.
static bool count_ybatch(const unsigned char* p, const unsigned char* end, size_t* events) {
  uint64_t v;
  while (p < end) {
    const unsigned head = *p++;
    if ((head & 0x0f) >= unsigned(kTraceActionCount) || (head & 0xe0)) return false;
    for (int fields = head & 0x10 ? 5 : 0; fields--;)
      if (!varint(p, end, &v)) return false;
    if (end - p < 2) return false;
    const unsigned lens = p[0] | unsigned(p[1]) << 8;
    p += 2;
    size_t bytes = 0;
    for (int k = 0; k < 4; ++k) {
      const unsigned n = (lens >> (4 * k)) & 15;
      if (n > 8) return false;
      bytes += n;
    }
    if (size_t(end - p) < bytes) return false;
    p += bytes;
    ++*events;
  }
  return p == end;
}

static size_t count_events(const std::string& path, bool* ok) {
  std::ifstream f(path, std::ios::binary);
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  *ok = data.size() >= 8 && memcmp(data.data(), "MTRACE\0\1", 8) == 0;
  size_t pos = 8, events = 0;
  while (pos + 5 <= data.size()) {
    uint32_t len;
    memcpy(&len, data.data() + pos + 1, 4);
    if (pos + 5 + len > data.size()) break;
    if (data[pos] == 'Y') {
      const auto* body = reinterpret_cast<const unsigned char*>(data.data() + pos + 5);
      if (len == 0 || !count_ybatch(body, body + len, &events)) *ok = false;
    } else if (data[pos] == 'Z' || data[pos] == 'E') {
      *ok = false;  // this version writes 'Y' batches only
    }
    pos += 5 + len;
  }
  if (pos != data.size()) *ok = false;  // a stopped stream ends on a record boundary
  return events;
}

int main(int argc, char** argv) {
  std::string dir = argc > 1 ? argv[1] : "/tmp";
  Allocator a(2, size_t(1) << 30, "");
  a.set_history(true, RecordContext::kAll, 1000, true, 0);
  // Stacks: two interned (ids 1, 2: registered, as the binding does) and one not.
  static int codes[3];
  std::vector<FramesPtr> stacks;
  for (uint32_t id = 1; id <= 3; ++id) {
    stacks.push_back(std::make_shared<const Frames>(std::vector<Frame>{Frame{&codes[id - 1], int(id), 0}},
                                                    id < 3 ? id : 0));
    if (id < 3) InternedStacks::add(stacks.back().get());
  }
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      set_user_metadata("thread " + std::to_string(t));
      std::vector<uintptr_t> live;
      while (!stop.load()) {
        const FramesPtr& frames = rng() % 4 ? stacks[rng() % 3] : kNoFrames;
        if (live.size() < 32 && rng() % 2) live.push_back(a.malloc(t % 2, 512 + rng() % 100000, 0, frames));
        else if (!live.empty()) {
          a.free(live.back(), frames);
          live.pop_back();
        }
      }
      for (uintptr_t p : live) a.free(p);
    });
  bool all_ok = true;
  for (int round = 0; round < 5; ++round) {
    std::string path = dir + "/stress" + std::to_string(round) + ".mtrace";
    std::string err = a.start_history_stream(path, "{}");
    if (!err.empty()) {
      fprintf(stderr, "start: %s\n", err.c_str());
      return 1;
    }
    for (int i = 0; i < 6; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      for (const TraceEntry& e : a.device(i % 2).trace())  // the rings, read under the writers
        if (e.frames && e.frames != stacks[0] && e.frames != stacks[1] && e.frames != stacks[2]) all_ok = false;
    }
    err = a.stop_history_stream();
    bool ok;
    size_t n = count_events(path, &ok);
    printf("round %d: %zu events, %s\n", round, n, ok ? "ok" : "BAD");
    all_ok = all_ok && ok && n > 0 && err.empty();
  }
  std::string err = a.start_history_stream("/dev/full", "{}");
  all_ok = all_ok && err.find("No space left") != std::string::npos;
  stop = true;
  for (auto& th : threads) th.join();
  a.set_history(false, RecordContext::kNever, 1, true, 0);
  printf("%s\n", all_ok ? "PASS" : "FAIL");
  return all_ok ? 0 : 1;
}
