// free_index.h: the free blocks of one (pool, stream), with exact best fit in O(1)
// bitmap steps plus a lookup inside one small size bin.
//
// Best fit means: the smallest block by (size, segment order, address) whose size is
// >= the request, exactly what PyTorch's std::set lower_bound returns. Blocks sit in
// size bins: one bin per 512-byte size up to 2 MiB (every small-pool block but those of
// expandable segments), then 64 bins per power of two. A two-level bitmap finds the
// first non-empty bin at or above the request's bin; inside a bin of two blocks or more,
// a CrowdedBin (crowded_bin.h: a bag, or a B+ tree when searches outweigh updates) gives
// the exact answer. The cost does not grow with the number of bins in use.
// Relies on: crowded_bin.h, bin_tree.h and block.h (its pool, BlockPool, is only named).
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "bin_tree.h"
#include "block.h"
#include "crowded_bin.h"

namespace mtia {

class FreeIndex {
 public:
  FreeIndex(NodeArena* arena, BlockPool* pool, bool small)
      : pool(pool), small(small), arena_(arena) {}

  BlockPool* const pool;  // whose free blocks these are
  const bool small;       // == pool->is_small, one load nearer for free()

  bool empty() const { return (summary_[0] | summary_[1]) == 0; }
  // Counted, not kept: only the invariant checker asks.
  size_t size() const {
    size_t n = 0;
    for_each([&](const Block*) { ++n; });
    return n;
  }

  // The bitmap says which bins are non-empty; a bin with one block keeps it inline
  // (`solo`, and then its crowd is empty), so the common cases never touch a crowd. A
  // crowd holds two blocks or more: the second block's insert fills it (insert_pair), the
  // erase that leaves one block moves that block back inline (take_only).
  // kFreed: b is still marked allocated (a free on its fast path): one store clears that
  // mark and sets in_index.
  template <bool kFreed = false>
  MTIA_INLINE void insert(Block* b) {
    const size_t bin = bin_of(b->size);
    Bin& slot = bins_[bin];
    uint64_t& word = words_[bin >> 6];
    const uint64_t bit = uint64_t(1) << (bin & 63);
    if (!(word & bit)) {
      slot.solo = b;
      word |= bit;
      summary_[bin >> 12] |= uint64_t(1) << ((bin >> 6) & 63);
    } else if (__builtin_expect(!slot.solo, 1)) {  // a crowd already (a bin of one has no crowd in use)
      slot.crowd->insert(key_of(b), b);
    } else {
      insert_crowded(slot, b);
    }
    if (kFreed) b->meta ^= Block::kAllocatedBit | Block::kInIndexBit;  // allocated 1 -> 0, in_index 0 -> 1
    else b->in_index = true;
  }

  MTIA_INLINE void erase(Block* b) { erase_in(b, bin_of(b->size)); }

  // erase(b), given b's bin (bin == bin_of(b->size), as lower_bound reports it).
  MTIA_INLINE void erase_in(Block* b, size_t bin) {
    Bin& slot = bins_[bin];
    b->in_index = false;
    if (slot.solo == b) {
      slot.solo = nullptr;
    } else {
      slot.crowd->erase(key_of(b), b);
      if (slot.crowd->size() == 1) {  // back to one block: inline again
        slot.solo = slot.crowd->take_only();
        return;
      }
      if (!slot.crowd->empty()) return;
    }
    uint64_t& word = words_[bin >> 6];
    word &= ~(uint64_t(1) << (bin & 63));
    if (!word) summary_[bin >> 12] &= ~(uint64_t(1) << ((bin >> 6) & 63));
  }

  // Smallest block with size >= `size` (by size, order, address), or nullptr; its bin
  // goes to *found_bin (for erase_in).
  MTIA_INLINE Block* lower_bound(size_t size, size_t* found_bin) {
    size_t bin = bin_of(size);  // < kBins: the bins cover every size
    Bin& slot = bins_[bin];
    *found_bin = bin;
    if (words_[bin >> 6] & (uint64_t(1) << (bin & 63))) {
      Block* first = slot.first();
      if (first->size >= size) return first;  // exact bins always take this path
      if (!slot.solo)
        if (Block* b = slot.crowd->lower_bound(FreeKey{size, 0, 0})) return b;
    }
    size_t next = next_nonempty(bin + 1);
    *found_bin = next;
    return next < kBins ? bins_[next].first() : nullptr;
  }
  Block* lower_bound(size_t size) {
    size_t bin;
    return lower_bound(size, &bin);
  }

  static size_t bin_for(size_t size) { return bin_of(size); }

  // The block after `b` in best-fit order, or nullptr (b must be in the index).
  Block* successor(const Block* b) {
    size_t bin = bin_of(b->size);
    Bin& slot = bins_[bin];
    if (!slot.solo)
      if (Block* next = slot.crowd->successor(key_of(b))) return next;
    size_t next = next_nonempty(bin + 1);
    return next < kBins ? bins_[next].first() : nullptr;
  }

  // Largest free block, or nullptr.
  Block* largest() {
    if (empty()) return nullptr;
    int top = summary_[1] ? 1 : 0;
    size_t w = (size_t(top) << 6) + size_t(63 - __builtin_clzll(summary_[top]));
    size_t bin = (w << 6) + size_t(63 - __builtin_clzll(words_[w]));
    Bin& slot = bins_[bin];
    return slot.solo ? slot.solo : slot.crowd->last();
  }

  // Calls f(block) for every free block (f must not modify the index).
  template <class F>
  void for_each(F f) const {
    for (size_t bin = next_nonempty(0); bin < kBins; bin = next_nonempty(bin + 1)) {
      const Bin& slot = bins_[bin];
      if (slot.solo) f(slot.solo);
      else
        slot.crowd->for_each(f);
    }
  }

  ~FreeIndex() {
    for (size_t i = 0; i < kBins; ++i) delete bins_[i].crowd;
  }
  FreeIndex(const FreeIndex&) = delete;
  FreeIndex& operator=(const FreeIndex&) = delete;

 private:
  // A bin holds one block inline (`solo`) or, from two blocks on, a crowd.
  struct Bin {
    Block* solo = nullptr;
    CrowdedBin* crowd = nullptr;  // made for the bin's first second block, kept
    Block* first() { return solo ? solo : crowd->first(); }
  };

  static constexpr size_t kExactBins = 4096;     // 512 B .. 2 MiB, one bin per size
  static constexpr int kExactLimitLog2 = 21;      // 2 MiB
  static constexpr int kSubBits = 6;              // then 64 bins per power of two
  static constexpr int kMaxLog2 = 63;             // any size_t: bin_of needs no range check
  static constexpr size_t kBins = kExactBins + (size_t(kMaxLog2 - kExactLimitLog2 + 1) << kSubBits);
  static constexpr size_t kWords = (kBins + 63) / 64;
  static_assert(kWords <= 128, "two summary words cover 128 bitmap words");
  static_assert(kExactBins == (size_t(1) << kExactLimitLog2) / kMinBlockSize, "exact bins end at 2 MiB");

  static FreeKey key_of(const Block* b) { return FreeKey{b->size, b->order, b->ptr}; }

  // A second block for a bin of one: from here on the bin's blocks live in its crowd.
  __attribute__((noinline)) void insert_crowded(Bin& slot, Block* b) {
    if (!slot.crowd) slot.crowd = new CrowdedBin(arena_);
    slot.crowd->insert_pair(key_of(slot.solo), slot.solo, key_of(b), b);
    slot.solo = nullptr;
  }

  MTIA_INLINE static size_t bin_of(size_t size) {
    if (size <= (size_t(1) << kExactLimitLog2)) return (size - 1) / kMinBlockSize;  // size >= 1
    // kExactBins + (log2 - 21) * 64 + sub, where size >> (log2 - 6) == 64 + sub.
    const size_t log2 = size_t(63 - __builtin_clzll(size));
    return (log2 << kSubBits) + (size >> (log2 - kSubBits)) +
           (kExactBins - (size_t(kExactLimitLog2) << kSubBits) - (size_t(1) << kSubBits));
  }

  // First non-empty bin >= from, or kBins.
  size_t next_nonempty(size_t from) const {
    if (from >= kBins) return kBins;
    size_t w = from >> 6;
    uint64_t bits = words_[w] & (~uint64_t(0) << (from & 63));
    if (bits) return (w << 6) + __builtin_ctzll(bits);
    for (size_t sw = (w + 1) >> 6; sw < 2; ++sw) {
      uint64_t sbits = summary_[sw];
      if (sw == (w + 1) >> 6) sbits &= (w + 1) & 63 ? ~uint64_t(0) << ((w + 1) & 63) : ~uint64_t(0);
      if (sbits) {
        size_t word = (sw << 6) + __builtin_ctzll(sbits);
        return (word << 6) + __builtin_ctzll(words_[word]);
      }
    }
    return kBins;
  }

  NodeArena* arena_;
  uint64_t summary_[2] = {0, 0};          // bit w: words_[w] is non-zero
  std::array<uint64_t, kWords> words_{};  // bit b%64 of word b/64: bin b is non-empty
  Bin bins_[kBins];                       // inline: one load less than a separate array
};

}  // namespace mtia
