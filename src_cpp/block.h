// block.h: Block (a range inside a segment), its cold part BlockCold, the BlockChunk
// blocks are made in, and Segment (one device allocation, or one reserved expandable
// range). Relies on frames.h, raw_allocator.h and types.h; BlockPool (block_pool.h) and
// FreeIndex (free_index.h) are only named here.
//
// Invariants (each checked by a DeviceAllocator checker, see device_allocator.cpp):
//  - the blocks of a segment, linked by prev/next, tile [seg.base, seg.base + seg.size)
//  - a block is in exactly one of: its pool's FreeIndex (inactive), the allocated map
//    (allocated), pending (freed, event_count > 0 or stream uses or deferred)
//  - two neighbouring inactive blocks never both sit in the index (they merge)
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "frames.h"
#include "raw_allocator.h"
#include "types.h"

namespace mtia {

struct BlockPool;
class FreeIndex;
struct Block;

// Best-fit order inside one stream's free index: (size, segment order, address).
struct BlockLess {
  bool operator()(const Block* a, const Block* b) const;
};

// One device allocation, or (expandable) one reserved address range of which only
// mapped pages count as reserved memory.
struct Segment {
  uintptr_t base = 0;
  size_t size = 0;
  StreamId stream = 0;
  BlockPool* pool = nullptr;
  FreeIndex* index = nullptr;         // where its free blocks go (its pool's, for its stream)
  uint64_t order = 0;                 // allocation-order counter (best-fit tie break)
  bool oversize = false;              // counted in oversize_segments
  bool expandable = false;            // a reserved range whose pages are mapped on demand
  size_t page_size = 0;               // expandable: the mapping granularity
  Block* first = nullptr;             // the block at `base`
  RawAllocator* raw = nullptr;        // who gave the memory, and takes it back
  FramesPtr frames;                   // stack at the device allocation
  size_t list_index = 0;              // position in DeviceAllocator::segments_
};

struct StreamUse {
  StreamId stream;
  bool during_capture;  // recorded while a capture was underway (dropped when deferred)
};

// What a block needs only off the fast path: history, stream uses, GC age.
struct BlockCold {
  uint64_t gc_count_base = 0;
  FramesPtr frames;                   // stack at the last hand-out
  std::vector<StreamUse> stream_uses;
};

// Field order matters: one cache line holds everything malloc, free, split and merge
// touch, so a block costs one cache line on the fast path; the rest lives apart, in its
// chunk's BlockCold array (cold()), so that the hardware's adjacent-line prefetch brings
// in another block rather than this one's idle fields. The segment order and the flags
// share one word (2^40 device allocations before the order wraps, which would only change
// best-fit tie breaks). Every Block but a search key lives in a BlockChunk.
struct alignas(64) Block {
  Block() : meta(kMappedBit) {}
  uintptr_t ptr = 0;
  size_t size = 0;
  // The segment order, the event count and the flags share one word, which the split
  // writes whole (`meta`, the kOrderMask/k...Bit masks below; GCC and Clang lay the fields
  // out from bit 0 up, which check_meta_layout() verifies once per process).
  union {
    struct {
      uint64_t order : 40;            // == seg->order, kept here for the index key
      uint64_t event_count : 16;      // cross-stream events still pending; while the block is in a
                                      // free index: its bag slot (bag_slot(), crowded_bin.h)
      bool allocated : 1;
      bool deferred : 1;              // freed during a capture with stream uses; while allocated:
                                      // owned by a DeviceArray (see DeviceAllocator::free)
      bool in_index : 1;
      bool has_stream_uses : 1;       // == !cold().stream_uses.empty()
      bool mapped : 1;                // false: unmapped address space of an expandable segment
      bool expandable : 1;            // lives in an expandable segment
      bool oversize : 1;              // counted in oversize_allocations while allocated
      bool has_frames : 1;            // == (cold().frames != nullptr)
    };
    uint64_t meta;
  };
  static constexpr uint64_t kOrderMask = (uint64_t(1) << 40) - 1;
  static constexpr uint64_t kAllocatedBit = uint64_t(1) << 56, kDeferredBit = uint64_t(1) << 57;
  static constexpr uint64_t kInIndexBit = uint64_t(1) << 58, kStreamUsesBit = uint64_t(1) << 59;
  static constexpr uint64_t kMappedBit = uint64_t(1) << 60, kExpandableBit = uint64_t(1) << 61;
  static constexpr uint64_t kOversizeBit = uint64_t(1) << 62, kFramesBit = uint64_t(1) << 63;
  Block* prev = nullptr;              // neighbours in the segment, address order
  Block* next = nullptr;
  FreeIndex* index = nullptr;         // == seg->index: where it goes when free (gives its pool)
  Segment* seg = nullptr;             // (its stream is seg->stream)
  size_t requested_size = 0;

  bool is_split() const { return prev != nullptr || next != nullptr; }
  // A free block's place in its bin's bag (crowded_bin.h): event_count's bits, which count
  // events only while the block is pending, never while it is in a free index. 0 elsewhere.
  static constexpr uint32_t kMaxBagSlots = 0xffff;
  uint32_t bag_slot() const { return uint32_t(event_count); }
  void set_bag_slot(uint32_t slot) { event_count = slot; }
  // Waiting for cross-stream events (a pending free); a free block's bits are its bag slot.
  bool events_pending() const { return !in_index && event_count > 0; }
  inline BlockCold& cold() const;
};
static_assert(sizeof(Block) == 64, "Block: one cache line");

// Throws if the compiler laid Block's bit fields out other than the masks say.
inline void check_meta_layout() {
  Block b;
  b.meta = 0;
  b.order = Block::kOrderMask;
  b.allocated = b.deferred = b.in_index = b.has_stream_uses = b.mapped = b.expandable = b.oversize = b.has_frames = true;
  if (b.meta != (Block::kOrderMask | Block::kAllocatedBit | Block::kDeferredBit | Block::kInIndexBit | Block::kStreamUsesBit |
                 Block::kMappedBit | Block::kExpandableBit | Block::kOversizeBit | Block::kFramesBit))
    throw std::logic_error("Block: bit-field layout differs from its masks (block.h)");
}

// Blocks are made in chunks: the hot lines side by side, then their cold parts. A chunk
// is aligned to its own (power-of-two) size, so a block finds its cold part from its
// address alone.
struct alignas(32768) BlockChunk {
  static constexpr size_t kBlocks = 256;
  Block hot[kBlocks];
  BlockCold cold[kBlocks];
};
static_assert(sizeof(BlockChunk) == alignof(BlockChunk), "a chunk fills its alignment, no more");

inline BlockCold& Block::cold() const {
  auto* chunk = reinterpret_cast<BlockChunk*>(uintptr_t(this) & ~uintptr_t(alignof(BlockChunk) - 1));
  return chunk->cold[this - chunk->hot];
}

inline bool BlockLess::operator()(const Block* a, const Block* b) const {
  if (a->size != b->size) return a->size < b->size;
  if (a->order != b->order) return a->order < b->order;
  return a->ptr < b->ptr;
}

}  // namespace mtia
