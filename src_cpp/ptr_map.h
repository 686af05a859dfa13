// ptr_map.h: address -> Block* for allocated blocks, so free(ptr) finds its block in
// O(1) without touching the heap. Addresses inside the device's own range (every block
// of the default pools) go to a direct-mapped table, one 8-byte slot per 512 bytes of
// the range, reserved as MAP_NORESERVE address space (1/64 of the range; only the pages
// of slots in use are ever touched, so resident memory is at most 1/64 of the device
// addresses that ever held a block start, in practice far less). A lookup is a rotate,
// a compare and one load. Any other address (a pluggable or Python raw allocator's
// memory, expandable ranges reserved elsewhere, or a misaligned pointer) goes to an
// open-addressing hash map with linear probing and backward-shift deletion (no
// tombstones). Which of the two holds a key depends on the key alone.
// Not thread-safe: used under a device lock.
// Relies on: types.h (Block is only named).
#pragma once
#include <sys/mman.h>

#include <cstdint>
#include <vector>

#include "types.h"

namespace mtia {

struct Block;

class PtrMap {
 public:
  PtrMap() { slots_.resize(1024); }
  ~PtrMap() {
    if (direct_) munmap(direct_, direct_slots_ * sizeof(Block*));
  }
  PtrMap(const PtrMap&) = delete;
  PtrMap& operator=(const PtrMap&) = delete;
  size_t size() const { return count_ + direct_count_; }

  // Maps [base, base + span) directly (call once, while empty). Without the table (the
  // reservation failed) every key goes to the hash map.
  void set_direct_range(uintptr_t base, size_t span) {
    const size_t slots = span >> kDirectShift;
    void* p = mmap(nullptr, slots * sizeof(Block*), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return;
    direct_ = static_cast<Block**>(p);
    direct_base_ = base;
    direct_slots_ = slots;
  }

  MTIA_INLINE void insert(uintptr_t key, Block* value) {
    const size_t i = direct_slot(key);
    if (__builtin_expect(i < direct_slots_, 1)) {
      direct_[i] = value;
      ++direct_count_;
      return;
    }
    insert_hashed(key, value);
  }

  MTIA_INLINE Block* find(uintptr_t key) const {
    const size_t i = direct_slot(key);
    if (__builtin_expect(i < direct_slots_, 1)) return direct_[i];
    return find_hashed(key);
  }

  // Removes key and returns its value, or nullptr if absent.
  MTIA_INLINE Block* erase(uintptr_t key) {
    const size_t i = direct_slot(key);
    if (__builtin_expect(i < direct_slots_, 1)) {
      Block* value = direct_[i];
      if (value) {
        direct_[i] = nullptr;
        --direct_count_;
      }
      return value;
    }
    return erase_hashed(key);
  }

 private:
  static constexpr int kDirectShift = 9;  // one slot per 512 bytes (kMinBlockSize)
  // The slot of `key`, or a number >= direct_slots_ if key is outside the range or not a
  // multiple of 512 from its base: rotating the offset right puts its low bits on top.
  MTIA_INLINE size_t direct_slot(uintptr_t key) const {
    const uintptr_t off = key - direct_base_;
    return size_t((off >> kDirectShift) | (off << (64 - kDirectShift)));
  }

  __attribute__((noinline)) void insert_hashed(uintptr_t key, Block* value) {
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

  Block* find_hashed(uintptr_t key) const {
    const size_t mask = mask_;
    for (size_t i = hash(key) & mask;; i = (i + 1) & mask) {
      if (slots_[i].key == key) return slots_[i].value;
      if (!slots_[i].key) return nullptr;
    }
  }

  __attribute__((noinline)) Block* erase_hashed(uintptr_t key) {
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
      if (s.key) insert_hashed(s.key, s.value);
  }
  std::vector<Slot> slots_;
  size_t mask_ = 1023;  // slots_.size() - 1
  size_t count_ = 0;         // keys in the hash map
  Block** direct_ = nullptr;  // the direct table: slot (key - direct_base_) / 512
  uintptr_t direct_base_ = 0;
  size_t direct_slots_ = 0;
  size_t direct_count_ = 0;   // keys in the direct table
};

}  // namespace mtia
