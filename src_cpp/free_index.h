// free_index.h: the free blocks of one (pool, stream), with exact best fit in O(1)
// bitmap steps plus a lookup inside one small size bin.
//
// Best fit means: the smallest block by (size, segment order, address) whose size is
// >= the request, exactly what PyTorch's std::set lower_bound returns. Blocks sit in
// size bins: small pools use one bin per 512-byte size (blocks are <= 2 MiB), large
// pools use 64 bins per power of two. A two-level bitmap finds the first non-empty bin
// at or above the request's bin; inside a bin a small ordered set gives the exact
// answer. The cost does not grow with the number of bins in use, only (logarithmically)
// with the population of one bin.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "block.h"

namespace mtia {

class FreeIndex {
 public:
  FreeIndex(bool small, NodeArena* arena)
      : small_(small), arena_(arena), nbins_(small ? kSmallBins : kLargeBins), bins_(new Bin[nbins_]) {}

  bool empty() const { return count_ == 0; }
  size_t size() const { return count_; }

  void insert(Block* b) {
    size_t bin = bin_of(b->size);
    Bin& slot = bins_[bin];
    if (slot.empty()) {
      slot.solo = b;  // most bins hold one block: no tree node at all
    } else {
      if (!slot.set) slot.set = new BinSet(BlockLess{}, ArenaAllocator<Block*>(arena_));
      if (slot.solo) {
        slot.solo->index_pos = slot.set->insert(slot.solo).first;
        slot.solo = nullptr;
      }
      // Hint: a block that sorts first (the common "just freed the oldest" case) is O(1).
      BinSet& set = *slot.set;
      b->index_pos = BlockLess{}(b, *set.begin()) ? set.emplace_hint(set.begin(), b) : set.insert(b).first;
    }
    b->in_index = true;
    words_[bin >> 6] |= uint64_t(1) << (bin & 63);
    summary_ |= uint64_t(1) << (bin >> 6);
    ++count_;
  }

  void erase(Block* b) {
    size_t bin = bin_of(b->size);
    Bin& slot = bins_[bin];
    if (slot.solo == b) slot.solo = nullptr;
    else slot.set->erase(b->index_pos);
    b->in_index = false;
    if (slot.empty()) {
      words_[bin >> 6] &= ~(uint64_t(1) << (bin & 63));
      if (!words_[bin >> 6]) summary_ &= ~(uint64_t(1) << (bin >> 6));
    }
    --count_;
  }

  // Smallest block with size >= `size` (by size, order, address), or nullptr.
  Block* lower_bound(size_t size) const {
    if (!count_) return nullptr;
    size_t bin = bin_of(size);
    if (bin >= nbins_) return nullptr;
    const Bin& slot = bins_[bin];
    if (!slot.empty()) {
      Block* first = slot.first();
      if (first->size >= size) return first;  // exact bins always take this path
      if (slot.set) {
        Block key;
        key.size = size;
        key.order = 0;
        key.ptr = 0;
        auto it = slot.set->lower_bound(&key);
        if (it != slot.set->end()) return *it;
      }
    }
    size_t next = next_nonempty(bin + 1);
    return next < nbins_ ? bins_[next].first() : nullptr;
  }

  // Largest free block, or nullptr.
  Block* largest() const {
    if (!count_) return nullptr;
    int w = 63 - __builtin_clzll(summary_);
    size_t bin = (size_t(w) << 6) + size_t(63 - __builtin_clzll(words_[size_t(w)]));
    const Bin& slot = bins_[bin];
    return slot.solo ? slot.solo : *slot.set->rbegin();
  }

  // Calls f(block) for every free block (f must not modify the index).
  template <class F>
  void for_each(F f) const {
    for (size_t bin = next_nonempty(0); bin < nbins_; bin = next_nonempty(bin + 1)) {
      const Bin& slot = bins_[bin];
      if (slot.solo) f(slot.solo);
      else
        for (Block* b : *slot.set) f(b);
    }
  }

  ~FreeIndex() {
    for (size_t i = 0; i < nbins_; ++i) delete bins_[i].set;
  }
  FreeIndex(const FreeIndex&) = delete;
  FreeIndex& operator=(const FreeIndex&) = delete;

 private:
  static constexpr size_t kSmallBins = 4096;        // 512 B .. 2 MiB, one bin per size
  static constexpr int kLargeSubBits = 6;           // 64 bins per power of two
  static constexpr int kLargeMinLog2 = 20;          // large blocks are > 1 MiB
  static constexpr size_t kLargeBins = (64 - kLargeMinLog2) << kLargeSubBits;

  size_t bin_of(size_t size) const {
    if (small_) return size <= kMinBlockSize ? 0 : (size - 1) / kMinBlockSize;
    if (size < (size_t(1) << kLargeMinLog2)) return 0;
    int log2 = 63 - __builtin_clzll(size);
    size_t sub = (size >> (log2 - kLargeSubBits)) & ((size_t(1) << kLargeSubBits) - 1);
    return (size_t(log2 - kLargeMinLog2) << kLargeSubBits) + sub;
  }

  // First non-empty bin >= from, or bins_.size().
  size_t next_nonempty(size_t from) const {
    if (from >= nbins_) return nbins_;
    size_t w = from >> 6;
    uint64_t bits = words_[w] & (~uint64_t(0) << (from & 63));
    if (bits) return (w << 6) + __builtin_ctzll(bits);
    if (w + 1 >= 64) return nbins_;
    uint64_t s = summary_ & (~uint64_t(0) << (w + 1));
    if (!s) return nbins_;
    w = __builtin_ctzll(s);
    return (w << 6) + __builtin_ctzll(words_[w]);
  }

  // A bin holds one block inline (`solo`) or, from two blocks on, an ordered set.
  struct Bin {
    Block* solo = nullptr;
    BinSet* set = nullptr;
    bool empty() const { return !solo && (!set || set->empty()); }
    Block* first() const { return solo ? solo : *set->begin(); }
  };

  bool small_;
  NodeArena* arena_;
  size_t nbins_;
  std::unique_ptr<Bin[]> bins_;
  std::array<uint64_t, 64> words_{};  // bit b%64 of word b/64: bin b is non-empty
  uint64_t summary_ = 0;
  size_t count_ = 0;
};

}  // namespace mtia
