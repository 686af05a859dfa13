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
#include <cstdint>
#include <memory>
#include <vector>

#include "block.h"

namespace mtia {

class FreeIndex {
 public:
  FreeIndex(bool small, NodeArena* arena)
      : small_(small), arena_(arena), bins_(small ? kSmallBins : kLargeBins), words_((bins_.size() + 63) / 64) {}

  bool empty() const { return count_ == 0; }
  size_t size() const { return count_; }

  void insert(Block* b) {
    size_t bin = bin_of(b->size);
    BinSet*& set = bins_[bin];
    if (!set) set = new BinSet(BlockLess{}, ArenaAllocator<Block*>(arena_));
    // Hint: a block that sorts first (the common "just freed the oldest" case) is O(1).
    b->index_pos = (!set->empty() && BlockLess{}(b, *set->begin())) ? set->emplace_hint(set->begin(), b)
                                                                      : set->insert(b).first;
    b->in_index = true;
    words_[bin >> 6] |= uint64_t(1) << (bin & 63);
    summary_ |= uint64_t(1) << (bin >> 6);
    ++count_;
  }

  void erase(Block* b) {
    size_t bin = bin_of(b->size);
    BinSet* set = bins_[bin];
    set->erase(b->index_pos);
    b->in_index = false;
    if (set->empty()) {
      words_[bin >> 6] &= ~(uint64_t(1) << (bin & 63));
      if (!words_[bin >> 6]) summary_ &= ~(uint64_t(1) << (bin >> 6));
    }
    --count_;
  }

  // Smallest block with size >= `size` (by size, order, address), or nullptr.
  Block* lower_bound(size_t size) const {
    if (!count_) return nullptr;
    size_t bin = bin_of(size);
    if (bin >= bins_.size()) return nullptr;
    if (BinSet* set = bins_[bin]; set && !set->empty()) {
      Block* first = *set->begin();
      if (first->size >= size) return first;  // exact bins always take this path
      Block key;
      key.size = size;
      key.order = 0;
      key.ptr = 0;
      auto it = set->lower_bound(&key);
      if (it != set->end()) return *it;
    }
    size_t next = next_nonempty(bin + 1);
    return next < bins_.size() ? *bins_[next]->begin() : nullptr;
  }

  // Calls f(block) for every free block (f must not modify the index).
  template <class F>
  void for_each(F f) const {
    for (size_t bin = next_nonempty(0); bin < bins_.size(); bin = next_nonempty(bin + 1))
      for (Block* b : *bins_[bin]) f(b);
  }

  ~FreeIndex() {
    for (BinSet* s : bins_) delete s;
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
    if (from >= bins_.size()) return bins_.size();
    size_t w = from >> 6;
    uint64_t bits = words_[w] & (~uint64_t(0) << (from & 63));
    if (bits) return (w << 6) + __builtin_ctzll(bits);
    if (w + 1 >= 64) return bins_.size();
    uint64_t s = summary_ & (~uint64_t(0) << (w + 1));
    if (!s) return bins_.size();
    w = __builtin_ctzll(s);
    return (w << 6) + __builtin_ctzll(words_[w]);
  }

  bool small_;
  NodeArena* arena_;
  std::vector<BinSet*> bins_;
  std::vector<uint64_t> words_;
  uint64_t summary_ = 0;
  size_t count_ = 0;
};

}  // namespace mtia
