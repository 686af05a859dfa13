// ptr_map.h: address -> Block* for allocated blocks, so free(ptr) finds its block in
// O(1) without touching the heap. An open-addressing hash map: linear probing,
// Fibonacci hashing (the product's top bits), backward-shift deletion (no tombstones),
// at most 3/8 full so a probe run is short (1/8 saved 4 instructions per op but, four
// times bigger than the live set's 16 B per block, lost time on rmm_random_100k_*).
// Why a hash and not a direct-mapped table over the device range (one slot per 512 B,
// issue 22's step 1): the table saved ~15 instructions per op but cost 30-40% more time
// on traces whose blocks are large or sparse (rmm_random_100k_*: 240 against 178 ns per
// op), where every lookup touched a cache line and page of its own; this table stays
// small and warm whatever the address pattern.
// Not thread-safe: used under a device lock.
// Relies on: types.h (Block is only named).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <new>

#include "types.h"

namespace mtia {

struct Block;

class PtrMap {
 public:
  PtrMap() {
    Slot* slots = static_cast<Slot*>(std::calloc(size_t(1) << kInitialLog2, sizeof(Slot)));
    if (!slots) throw std::bad_alloc();
    set_table(slots, kInitialLog2);
  }
  ~PtrMap() { std::free(slots_); }
  PtrMap(const PtrMap&) = delete;
  PtrMap& operator=(const PtrMap&) = delete;
  size_t size() const { return grow_at_ - room_; }

  // Key must be nonzero and not present.
  MTIA_INLINE void insert(uintptr_t key, Block* value) {
    if (__builtin_expect(room_-- == 0, 0)) grow();
    Slot* s = slots_;
    size_t i = home(key);
    while (s[i].key) i = (i + 1) & mask_;
    s[i] = {key, value};
  }

  MTIA_INLINE Block* find(uintptr_t key) const {
    const Slot* s = slots_;
    for (size_t i = home(key);; i = (i + 1) & mask_) {
      if (s[i].key == key) return s[i].value;
      if (!s[i].key) return nullptr;
    }
  }

  // Removes key and returns its value, or nullptr if absent.
  MTIA_INLINE Block* erase(uintptr_t key) {
    Slot* s = slots_;
    const size_t mask = mask_;
    size_t i = home(key);
    while (s[i].key != key) {
      if (!s[i].key) return nullptr;
      i = (i + 1) & mask;
    }
    Block* value = s[i].value;
    ++room_;
    // Backward shift: an entry later in the probe run moves into the hole unless its
    // home lies after the hole (it would then be unreachable from its home).
    for (size_t j = (i + 1) & mask; s[j].key; j = (j + 1) & mask) {
      if (((j - home(s[j].key)) & mask) >= ((j - i) & mask)) {
        s[i] = s[j];
        i = j;
      }
    }
    s[i].key = 0;
    return value;
  }

 private:
  struct Slot {
    uintptr_t key;
    Block* value;
  };
  static constexpr unsigned kInitialLog2 = 10;

  MTIA_INLINE size_t home(uintptr_t key) const { return size_t((key * 0x9E3779B97F4A7C15ull) >> shift_); }

  // Doubles the table; insert() has already counted the key it is adding (room_ wrapped).
  __attribute__((noinline, cold)) void grow() {
    Slot* old = slots_;
    const size_t old_slots = mask_ + 1;
    const unsigned log2 = 64 - shift_ + 1;
    Slot* fresh = static_cast<Slot*>(std::calloc(size_t(1) << log2, sizeof(Slot)));
    if (!fresh) {
      room_ = 0;
      throw std::bad_alloc();
    }
    const size_t live = grow_at_ + 1;  // with the key being added
    set_table(fresh, log2);
    room_ = grow_at_ - live;
    for (size_t k = 0; k < old_slots; ++k) {
      if (!old[k].key) continue;
      size_t i = home(old[k].key);
      while (slots_[i].key) i = (i + 1) & mask_;
      slots_[i] = old[k];
    }
    std::free(old);
  }

  void set_table(Slot* slots, unsigned log2) {
    slots_ = slots;
    mask_ = (size_t(1) << log2) - 1;
    shift_ = 64 - log2;
    grow_at_ = (mask_ + 1) / 8 * 3;
    room_ = grow_at_;
  }

  Slot* slots_ = nullptr;
  size_t mask_ = 0;     // slot count - 1
  unsigned shift_ = 0;  // 64 - log2(slot count): home() keeps the product's top bits
  size_t grow_at_ = 0;  // 3/8 of the slots: the most keys the table holds
  size_t room_ = 0;     // grow_at_ - keys held: one decrement (and its test) per insert
};

}  // namespace mtia
