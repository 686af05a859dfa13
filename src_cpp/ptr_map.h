// ptr_map.h: address -> Block* for allocated blocks, an open-addressing hash map with
// linear probing and backward-shift deletion (no tombstones), so free(ptr) finds its
// block in O(1) without touching the heap. Not thread-safe: used under a device lock.
// Relies on: types.h (Block is only named).
#pragma once
#include <cstdint>
#include <vector>

#include "types.h"

namespace mtia {

struct Block;

class PtrMap {
 public:
  PtrMap() { slots_.resize(1024); }
  size_t size() const { return count_; }

  MTIA_INLINE void insert(uintptr_t key, Block* value) {
    if ((count_ + 1) * 2 > slots_.size()) grow();
    const size_t mask = mask_;
    for (size_t i = hash(key) & mask;; i = (i + 1) & mask) {
      if (!slots_[i].key) {
        slots_[i] = {key, value};
        ++count_;
        return;
      }
    }
  }

  Block* find(uintptr_t key) const {
    const size_t mask = mask_;
    for (size_t i = hash(key) & mask;; i = (i + 1) & mask) {
      if (slots_[i].key == key) return slots_[i].value;
      if (!slots_[i].key) return nullptr;
    }
  }

  // Removes key and returns its value, or nullptr if absent.
  MTIA_INLINE Block* erase(uintptr_t key) {
    const size_t mask = mask_;
    size_t i = hash(key) & mask;
    while (slots_[i].key != key) {
      if (!slots_[i].key) return nullptr;
      i = (i + 1) & mask;
    }
    Block* value = slots_[i].value;
    // Backward shift: move later entries of the probe run into the hole.
    size_t hole = i;
    for (size_t j = (i + 1) & mask; slots_[j].key; j = (j + 1) & mask) {
      size_t home = hash(slots_[j].key) & mask;
      if (((j - home) & mask) >= ((j - hole) & mask)) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole] = {0, nullptr};
    --count_;
    return value;
  }

  template <class F>
  void for_each(F f) const {
    for (const Slot& s : slots_)
      if (s.key) f(s.key, s.value);
  }

 private:
  struct Slot {
    uintptr_t key;
    Block* value;
  };
  static size_t hash(uintptr_t key) { return size_t((key >> 9) * 0x9E3779B97F4A7C15ull >> 20); }
  __attribute__((noinline)) void grow() {
    std::vector<Slot> old(slots_.size() * 2);
    old.swap(slots_);
    mask_ = slots_.size() - 1;
    count_ = 0;
    for (const Slot& s : old)
      if (s.key) insert(s.key, s.value);
  }
  std::vector<Slot> slots_;
  size_t mask_ = 1023;  // slots_.size() - 1
  size_t count_ = 0;
};

}  // namespace mtia
