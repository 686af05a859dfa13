// core_stress.cpp: a native test driver for the C++ core, meant to run under
// AddressSanitizer + UndefinedBehaviorSanitizer and, in a second build, ThreadSanitizer
// (see .ci/run). Several threads on two devices interleave malloc, free, record_stream
// with busy streams, private pools, empty_cache, snapshots, history, settings changed
// under them (from two threads) and injected device-allocation failures; every block
// carries a fill pattern that must survive until it is freed. Some blocks are array-owned (a plain free of one must throw and free
// nothing), and an interrupt hook abandons some of the waits for busy streams (empty_cache,
// the OOM path, pending frees) with Interrupted. Afterwards every invariant must hold and
// all memory must be back. First, two settings changes waiting for the same device's lock
// must leave it with the newer one.
// Exit code 0 = pass.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "allocator.h"
#include "check.h"
#include "errors.h"

using namespace mtia;

namespace {

struct Live {
  uintptr_t ptr;
  size_t size;
  unsigned char pattern;
  int device;
  bool array_owned;
};

void sleep_task(void* arg) { std::this_thread::sleep_for(std::chrono::microseconds(reinterpret_cast<uintptr_t>(arg))); }

// The interrupt hook (blocking.h): abandons every other poll of a driver thread's waits
// while its t_interruptible is set.
thread_local bool t_interruptible = false;
thread_local unsigned t_polls = 0;
std::atomic<uint64_t> interrupted_waits{0};
bool interrupt_every_other_poll() {
  if (!t_interruptible || ++t_polls % 2) return false;
  interrupted_waits++;
  return true;
}

void worker(Allocator& a, int id, int steps, std::atomic<uint64_t>& ops) {
  std::mt19937_64 rng(1234 + id);
  std::vector<Live> live;
  const int device = id % a.device_count();
  Stream* side = a.emulator().new_stream(device, 0);
  MempoolId pool = a.new_user_pool_id();
  a.device(device).create_or_incref_pool(pool, nullptr);
  bool routed = false;
  t_interruptible = true;
  for (int step = 0; step < steps; ++step) {
    int op = int(rng() % 100);
    if (op < 45 || live.empty()) {
      size_t size;
      switch (rng() % 3) {
        case 0: size = 1 + rng() % 4096; break;
        case 1: size = 1 + rng() % (1 << 20); break;
        default: size = 1 + rng() % (24 << 20); break;
      }
      StreamId s = (rng() % 4 == 0) ? side->id() : 0;
      const bool owned = rng() % 4 == 0;
      try {
        uintptr_t p = a.malloc(device, size, s, kNoFrames, owned);
        unsigned char pat = static_cast<unsigned char>(rng());
        size_t touch = size < 4096 ? size : 4096;  // first page only: keeps RSS small
        std::memset(reinterpret_cast<void*>(p), pat, touch);
        live.push_back({p, size, pat, device, owned});
      } catch (const OutOfMemory&) {
      } catch (const Interrupted&) {  // the OOM path's wait for a busy stream, abandoned
      }
    } else if (op < 85) {
      size_t i = rng() % live.size();
      Live l = live[i];
      live[i] = live.back();
      live.pop_back();
      size_t touch = l.size < 4096 ? l.size : 4096;
      auto* bytes = reinterpret_cast<unsigned char*>(l.ptr);
      for (size_t k = 0; k < touch; k += 97) CHECK(bytes[k] == l.pattern, "block %#lx lost its fill", l.ptr);
      if (rng() % 5 == 0) {
        // now and then long enough for a waiter to poll the interrupt hook
        uintptr_t us = rng() % 500 == 0 ? 30000 + rng() % 20000 : rng() % 200;
        side->enqueue(Task{sleep_task, reinterpret_cast<void*>(us), nullptr});
        a.device(device).record_stream(l.ptr, side->id());
      }
      if (l.array_owned) {
        try {
          a.free(l.ptr);
          CHECK(false, "a plain free of an array-owned block did not throw");
        } catch (const InvalidState&) {
        }
        CHECK(a.device(device).block_size(l.ptr) >= l.size, "a refused free changed block %#lx", l.ptr);
      }
      a.free(l.ptr, kNoFrames, l.array_owned);
    } else if (op < 88) {
      try {
        a.device(device).empty_cache(MempoolId{});
      } catch (const Interrupted&) {
      }
    } else if (op < 92) {
      if (!routed) {
        AllocationFilter f;
        f.kind = AllocationFilter::kThread;
        f.thread = std::this_thread::get_id();
        a.device(device).create_or_incref_pool(pool, nullptr);
        a.device(device).begin_allocate_to_pool(pool, f);
      } else {
        a.device(device).end_allocate_to_pool(pool);
        a.device(device).release_pool(pool);
      }
      routed = !routed;
    } else if (op < 95) {
      auto segs = a.device(device).snapshot(MempoolId{}, true);
      for (auto& s : segs) {
        size_t sum = 0;
        for (auto& b : s.blocks) sum += b.size;
        CHECK(sum == s.total_size, "snapshot blocks do not tile a segment");
      }
      DeviceStats st = a.device(device).stats();  // read while other threads allocate
      CHECK(st.allocated_bytes[0].current <= st.reserved_bytes[0].current, "allocated exceeds reserved");
    } else if (op < 97) {
      a.emulator().device(device).memory().fail_allocations(int64_t(rng() % 3), 0);
    } else {
      a.device(device).set_history(rng() % 2 == 0, RecordContext::kAlloc, 1000, false);
    }
    ops++;
  }
  t_interruptible = false;
  if (routed) {
    a.device(device).end_allocate_to_pool(pool);
    a.device(device).release_pool(pool);
  }
  for (auto& l : live) a.free(l.ptr, kNoFrames, l.array_owned);
  a.device(device).release_pool(pool);
  t_interruptible = false;
  side->synchronize();
}

// Each of the allocator's waits for a busy stream, abandoned by the interrupt hook: the
// call throws Interrupted and leaves every invariant holding; the same calls afterwards
// (the stream idle) do their work.
void interrupted_waits_leave_the_state_intact(Allocator& a, int device) {
  DeviceAllocator& dev = a.device(device);
  Stream* side = a.emulator().new_stream(device, 0);
  auto busy = [&] { side->enqueue(Task{sleep_task, reinterpret_cast<void*>(uintptr_t(200000)), nullptr}); };
  auto expect_interrupted = [&](const char* what, auto call) {
    t_interruptible = true;
    uint64_t before = interrupted_waits.load();
    try {
      call();
      CHECK(false, "%s: the wait was not interrupted", what);
    } catch (const Interrupted&) {
    }
    t_interruptible = false;
    CHECK(interrupted_waits.load() == before + 1, "%s: the hook did not end the wait", what);
    std::string err = dev.check_invariants();
    CHECK(err.empty(), "%s: %s", what, err.c_str());
  };
  const size_t big = a.emulator().device(device).memory().capacity() / 4 * 3;
  // empty_cache waiting for a busy stream that owns a free segment
  a.free(a.malloc(device, 64 << 20, side->id()));
  busy();
  expect_interrupted("empty_cache", [&] { dev.empty_cache(MempoolId{}); });
  // the OOM path: a segment cached on the busy stream must go before `big` fits
  side->synchronize();
  a.free(a.malloc(device, big, side->id()));
  busy();
  expect_interrupted("malloc's release of cached blocks", [&] { a.malloc(device, big, 0); });
  // a pending cross-stream free: empty_cache waits for its event first
  side->synchronize();
  dev.empty_cache(MempoolId{});
  uintptr_t p = a.malloc(device, 1 << 20, 0, kNoFrames, true);
  dev.record_stream(p, side->id());
  busy();
  a.free(p, kNoFrames, true);
  expect_interrupted("empty_cache's wait for a pending free", [&] { dev.empty_cache(MempoolId{}); });
  // Stream and event waits
  Event ev(false);
  busy();
  ev.record(side);
  expect_interrupted("Event::synchronize", [&] { ev.synchronize(); });
  busy();
  expect_interrupted("Stream::synchronize", [&] { side->synchronize(); });
  busy();
  expect_interrupted("EmulatedDevice::synchronize", [&] { a.emulator().device(device).synchronize(); });
  side->synchronize();
  a.free(a.malloc(device, big, 0));  // all of it can go now
  dev.empty_cache(MempoolId{});
}

// Device memory from the host heap, handed out only while the gate is open: a malloc that
// needs a new segment holds its device's lock inside alloc() until then.
class GatedRawAllocator : public RawAllocator {
 public:
  std::atomic<bool> entered{false}, open{true};
  void* alloc(size_t size, DeviceIndex, StreamId) override {
    entered = true;
    while (!open.load()) std::this_thread::yield();
    return std::aligned_alloc(512, size);
  }
  void free(void* ptr, size_t, DeviceIndex, StreamId) override { std::free(ptr); }
};

// Two set_config calls that both wait for a device's lock must leave that device with the
// newer settings, whichever of them takes the lock first (a coin toss each round).
void concurrent_settings_keep_the_newest() {
  for (int round = 0; round < 24; ++round) {
    auto raw = std::make_shared<GatedRawAllocator>();
    Allocator a(2, size_t(1) << 30, "", raw);
    raw->open = false;
    uintptr_t p = 0;
    std::thread holder([&] { p = a.malloc(1, 4096, 0); });  // device 1's lock, held in alloc()
    while (!raw->entered.load()) std::this_thread::yield();
    auto wait_until_device_0_has = [&](const char* settings) {
      while (a.device(0).config().last_settings != settings) std::this_thread::yield();
    };
    std::thread older([&] { a.set_config("max_split_size_mb:20"); });
    wait_until_device_0_has("max_split_size_mb:20");  // now waiting for device 1
    std::thread newer([&] { a.set_config("max_split_size_mb:40"); });
    wait_until_device_0_has("max_split_size_mb:40");
    raw->open = true;
    holder.join();
    older.join();
    newer.join();
    CHECK(a.device(1).config().last_settings == "max_split_size_mb:40",
          "round %d: device 1 kept the older settings, \"%s\"", round, a.device(1).config().last_settings.c_str());
    a.free(p);
    a.empty_cache();  // the segment goes back to the raw allocator (the destructor leaves it)
  }
}

}  // namespace

int main(int argc, char** argv) {
  int threads = argc > 1 ? std::atoi(argv[1]) : 4;
  int steps = argc > 2 ? std::atoi(argv[2]) : 20000;
  std::atomic<uint64_t> ops{0};
  concurrent_settings_keep_the_newest();
  blocking_hooks().interrupted = interrupt_every_other_poll;
  for (const char* conf : {"", "expandable_segments:True", "max_split_size_mb:40,roundup_power2_divisions:4"}) {
    Allocator a(2, size_t(4) << 30, conf);
    // Bad input leaves the state unchanged.
    try {
      a.free(12345);
      CHECK(false, "free of an unknown pointer did not throw");
    } catch (const InvalidState&) {
    }
    try {
      a.malloc(0, kOneExaByte, 0);
      CHECK(false, "1 EB did not throw");
    } catch (const OutOfMemory&) {
    }
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(worker, std::ref(a), t, steps, std::ref(ops));
    // Settings change under the workers, from two threads at once (the expandable setting
    // stays: no parse names it); afterwards every device must hold the last one parsed.
    std::atomic<bool> done{false};
    auto change_settings = [&](unsigned first) {
      const char* changes[] = {"max_split_size_mb:20", "roundup_power2_divisions:8", "garbage_collection_threshold:0.5",
                               "max_split_size_mb:40,roundup_power2_divisions:4", ""};
      for (unsigned i = first; !done.load(); ++i) {
        a.set_config(changes[i % 5]);
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
    };
    std::thread settings[2] = {std::thread(change_settings, 0), std::thread(change_settings, 2)};
    for (auto& t : pool) t.join();
    done = true;
    for (auto& t : settings) t.join();
    for (int d = 0; d < a.device_count(); ++d)
      CHECK(a.device(d).config().last_settings == a.config().last_settings,
            "device %d holds the settings \"%s\", not the last parsed, \"%s\"", d,
            a.device(d).config().last_settings.c_str(), a.config().last_settings.c_str());
    a.set_config(conf);
    for (int d = 0; d < a.device_count(); ++d) {
      a.emulator().device(d).memory().fail_allocations(-1, 0);
      interrupted_waits_leave_the_state_intact(a, d);
      a.device(d).empty_cache(MempoolId{});
      std::string err = a.device(d).check_invariants();
      CHECK(err.empty(), "%s", err.c_str());
      DeviceStats st = a.device(d).stats();
      CHECK(st.reserved_bytes[0].current == 0, "device %d still reserves %ld bytes", d, long(st.reserved_bytes[0].current));
      CHECK(st.allocated_bytes[0].current == 0, "device %d still has %ld bytes allocated", d,
            long(st.allocated_bytes[0].current));
      CHECK(a.emulator().device(d).memory().used() == 0, "device %d memory not all returned", d);
    }
  }
  std::printf("core_stress: %d threads x 3 configurations, %llu operations, %llu interrupted waits, %d failures\n",
              threads, (unsigned long long)ops.load(), (unsigned long long)interrupted_waits.load(), failures.load());
  std::printf("%d passed, %d failed\n", failures.load() == 0 ? 1 : 0, failures.load() == 0 ? 0 : 1);
  return failures.load() == 0 ? 0 : 1;
}
