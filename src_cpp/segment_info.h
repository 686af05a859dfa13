// segment_info.h: SegmentInfo and BlockInfo, what DeviceAllocator::snapshot() returns (one
// run of mapped blocks per entry, as PyTorch's memory_snapshot shows segments). Plain
// values: they share no state with the allocator. Relies on frames.h and types.h.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "frames.h"
#include "types.h"

namespace mtia {

struct BlockInfo {
  uintptr_t address;
  size_t size, requested_size;
  const char* state;  // "active_allocated" | "active_pending_free" | "inactive"
  FramesPtr frames;
};

struct SegmentInfo {
  DeviceIndex device = 0;
  uintptr_t address = 0;
  size_t total_size = 0, allocated_size = 0, active_size = 0, requested_size = 0;
  StreamId stream = 0;
  bool is_small = false;
  bool is_expandable = false;
  MempoolId pool;
  FramesPtr frames;
  std::vector<BlockInfo> blocks;
};

}  // namespace mtia
