// replay.cpp: timed native replay of an allocation trace (replay.h), and the argument
// checks the binding runs before it. Relies on allocator.h and the clocks of
// bench_loops.h.
#include "replay.h"

#include <algorithm>
#include <string>
#include <type_traits>

#include "bench_loops.h"
#include "errors.h"

namespace mtia {

void check_replay_args(Allocator& a, int device, const std::vector<ReplayEvent>& events, uint32_t slots,
                       const std::vector<StreamId>& streams) {
  check_bench_device(a, device);
  for (size_t i = 0; i < events.size(); ++i)
    if (events[i].slot >= slots || events[i].stream >= streams.size())
      throw InvalidArgument("event " + std::to_string(i) + ": slot " + std::to_string(events[i].slot) +
                            " or stream index " + std::to_string(events[i].stream) + " out of range");
  for (StreamId s : streams) a.emulator().stream(device, s);  // validates the id
}

ReplayResult replay_checked(Allocator& a, int device, const std::vector<ReplayEvent>& events, uint32_t slots,
                            const std::vector<StreamId>& streams, bool latency, size_t prefix) {
  check_replay_args(a, device, events, slots, streams);
  return replay_trace(a, device, events, slots, streams, latency, prefix);
}

ReplayResult replay_trace(Allocator& a, int device, const std::vector<ReplayEvent>& events, uint32_t slots,
                          const std::vector<StreamId>& streams, bool latency, size_t prefix) {
  ReplayResult res;
  DeviceAllocator& dev = a.device(device);
  std::vector<uintptr_t> ptrs(slots, 0);
  // Plain pointers, as the peer harness's loop has: the vectors' members would otherwise be
  // reloaded after every call into the allocator.
  const ReplayEvent* const ev = events.data();
  uintptr_t* const live = ptrs.data();
  const StreamId* const stream_of = streams.data();
  // One event: true if it ran (a free of a slot that is not live is skipped).
  auto apply = [&](size_t i) {
    const ReplayEvent& e = ev[i];
    uintptr_t& p = live[e.slot];
    if (e.size) {
      try {
        // Straight to the device (as free below); Allocator::malloc refuses sizes of 1 EB
        // and more before rounding could overflow.
        p = __builtin_expect(e.size < kOneExaByte, 1) ? dev.malloc(e.size, stream_of[e.stream])
                                                       : a.malloc(device, e.size, stream_of[e.stream]);
      } catch (const OutOfMemory&) {
        p = 0;
        if (res.first_failure < 0) res.first_failure = int64_t(i);
      }
      return true;
    }
    if (!p) return false;
    if (!dev.free(p)) a.free(p);  // the device that made it
    p = 0;
    return true;
  };
  prefix = std::min(prefix, events.size());
  for (size_t i = 0; i < prefix; ++i) apply(i);  // untimed: the starting state
  dev.reset_peak_stats();
  dev.reset_accumulated_stats();
  if (latency) {
    res.alloc_latency_ns.reserve(events.size() - prefix);
    res.free_latency_ns.reserve(events.size() - prefix);
  }
  // Two copies of the timed loop, so the common one has no latency bookkeeping at all.
  const size_t n = events.size();
  auto timed = [&](auto with_latency) {
    if constexpr (decltype(with_latency)::value) {
      for (size_t i = prefix; i < n; ++i) {
        const uint64_t l0 = wall_ns();
        if (!apply(i)) {
          ++res.skipped;
          continue;
        }
        (ev[i].size ? res.alloc_latency_ns : res.free_latency_ns).push_back(uint32_t(wall_ns() - l0));
      }
    } else {
      // By pointer, as the peer harness's loop: no index or bound to keep in registers
      // besides the cursor and the end (the loop state must survive the calls).
      for (const ReplayEvent *e = ev + prefix, *end = ev + n; e != end; ++e)
        if (!apply(size_t(e - ev))) ++res.skipped;
    }
  };
  const uint64_t t0 = wall_ns(), c0 = thread_cpu_ns();
  if (latency) timed(std::true_type{});
  else timed(std::false_type{});
  res.cpu_ns = thread_cpu_ns() - c0;
  res.total_ns = wall_ns() - t0;
  res.events = events.size() - prefix;
  for (uintptr_t p : ptrs)
    if (p) {
      a.free(p);
      ++res.leftover_freed;
    }
  DeviceStats st = dev.stats();
  res.peak_requested = st.requested_bytes[kAggregate].peak;
  res.peak_allocated = st.allocated_bytes[kAggregate].peak;
  res.peak_reserved = st.reserved_bytes[kAggregate].peak;
  res.num_device_alloc = st.num_device_alloc;
  res.num_device_free = st.num_device_free;
  res.num_alloc_retries = st.num_alloc_retries;
  res.num_ooms = st.num_ooms;
  return res;
}

}  // namespace mtia
