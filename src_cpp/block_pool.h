// block_pool.h: BlockPool, the free blocks of one pool kind (small or large) of one pool
// (the default pools, or a private pool's), per stream: one FreeIndex per stream, and the
// unmapped ranges of its expandable segments. Relies on block.h and free_index.h; the
// owning PrivatePool (private_pool.h) is only named. Guarded by the device lock.
#pragma once
#include <cstdint>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "block.h"
#include "free_index.h"

namespace mtia {

struct PrivatePool;

// Unmapped ranges of expandable segments, ordered by (stream, address).
struct UnmappedLess {
  bool operator()(const Block* a, const Block* b) const {
    return a->seg->stream != b->seg->stream ? a->seg->stream < b->seg->stream : a->ptr < b->ptr;
  }
};

// The free blocks of one pool kind (small or large) of one pool, per stream.
struct BlockPool {
  BlockPool(bool small, PrivatePool* owner, NodeArena* arena) : is_small(small), owner(owner), arena(arena) {}
  const bool is_small;
  PrivatePool* const owner;  // null for the default pools
  NodeArena* arena;
  uint64_t get_free_blocks_call_count = 0;  // the GC clock
  std::vector<std::pair<StreamId, std::unique_ptr<FreeIndex>>> by_stream;
  static constexpr StreamId kDirectStreams = 8;
  FreeIndex* direct[kDirectStreams] = {};  // by_stream's entries for stream ids 0..7, one load away
  std::set<Block*, UnmappedLess> unmapped;  // expandable address space not backed by pages

  MTIA_INLINE FreeIndex* index(StreamId s) {
    if (uint64_t(s) < uint64_t(kDirectStreams)) return direct[s];
    for (auto& [id, idx] : by_stream)
      if (id == s) return idx.get();
    return nullptr;
  }
  FreeIndex* index_or_create(StreamId s) {
    if (FreeIndex* idx = index(s)) return idx;
    by_stream.emplace_back(s, std::make_unique<FreeIndex>(arena, this, is_small));
    if (uint64_t(s) < uint64_t(kDirectStreams)) direct[s] = by_stream.back().second.get();
    return by_stream.back().second.get();
  }
};

}  // namespace mtia
