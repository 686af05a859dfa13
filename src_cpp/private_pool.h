// private_pool.h: PrivatePool (a MemPool or a graph's pool: its own small and large
// BlockPools, optionally over a user's RawAllocator) and AllocationFilter (who a routing
// context, use_mem_pool or a graph capture, applies to). pools_graphs_streams_api.md
// §1-§2. Relies on block_pool.h and raw_allocator.h. Guarded by the device lock.
#pragma once
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "block_pool.h"
#include "raw_allocator.h"
#include "types.h"

namespace mtia {

struct PrivatePool {
  PrivatePool(MempoolId id, std::shared_ptr<RawAllocator> alloc, NodeArena* arena)
      : id(id), allocator(std::move(alloc)), small_blocks(true, this, arena), large_blocks(false, this, arena) {}
  MempoolId id;
  std::shared_ptr<RawAllocator> allocator;  // null: the device's
  int use_count = 1;
  int64_t segment_count = 0;  // device allocations made for this pool and not yet freed
  bool no_split = false;
  BlockPool small_blocks, large_blocks;
  BlockPool* blocks_for(size_t rounded) { return rounded <= kSmallSize ? &small_blocks : &large_blocks; }
};

// Who a routing context (use_mem_pool, graph capture) applies to.
struct AllocationFilter {
  enum Kind { kAll, kThread, kCapture } kind = kAll;
  std::thread::id thread;
  uint64_t capture_id = 0;
};

}  // namespace mtia
