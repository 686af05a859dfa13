// ptr_map.h: address -> Block* for allocated blocks, so free(ptr) finds its block in
// O(1) without touching the heap. An open-addressing hash map: linear probing,
// Fibonacci hashing (the product's top bits), deletion by tombstone (one store; a
// backward shift cost a loop over the rest of the probe run on every free), at most 3/8
// full counting tombstones, so a probe run is short (1/8 saved 4 instructions per op but, four
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
  // Counted, not kept: only the invariant checker asks.
  size_t size() const {
    size_t n = 0;
    for (size_t i = 0; i <= mask_; ++i) n += slots_[i].key > kTombstone;
    return n;
  }

  // Key must be > 1 (a block address: nonzero, 512-aligned) and not present. It goes to
  // the first empty or erased slot of its probe run.
  MTIA_INLINE void insert(uintptr_t key, Block* value) {
    if (__builtin_expect(room_ == 0, 0)) rehash();
    Slot* s = slots_;
    size_t i = home(key);
    while (s[i].key > kTombstone) i = (i + 1) & mask_;
    room_ -= s[i].key == kEmpty;  // an erased slot was counted when it was first taken
    s[i] = {key, value};
  }

  MTIA_INLINE Block* find(uintptr_t key) const {
    const Slot* s = slots_;
    for (size_t i = home(key);; i = (i + 1) & mask_) {
      if (s[i].key == key) return s[i].value;
      if (s[i].key == kEmpty) return nullptr;
    }
  }

  // Removes key and returns its value, or nullptr if absent. The slot is marked erased
  // (a tombstone), not emptied, so probe runs through it stay intact without moving
  // entries; tombstones are cleared when the room runs out (rehash).
  MTIA_INLINE Block* erase(uintptr_t key) {
    Slot* s = slots_;
    size_t i = home(key);
    while (s[i].key != key) {
      if (s[i].key == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
    s[i].key = kTombstone;
    return s[i].value;
  }

 private:
  struct Slot {
    uintptr_t key;  // kEmpty, kTombstone, or a block address
    Block* value;
  };
  static constexpr uintptr_t kEmpty = 0, kTombstone = 1;
  static constexpr unsigned kInitialLog2 = 10;

  MTIA_INLINE size_t home(uintptr_t key) const { return size_t((key * 0x9E3779B97F4A7C15ull) >> shift_); }

  // Out of room (live + erased slots reached 3/8). The tombstones are cleared in place,
  // which counts the live entries; if these fill more than half of what the table may
  // hold, they then move to a table twice as large. (A replay that frees everything at its
  // end leaves a table of tombstones: a fresh table for them cost ~20 instructions an op
  // on rmm_random_100k_1MiB_2streams.) Either way at least half the room is free after
  // it, so its cost is spread over that many inserts.
  __attribute__((noinline, cold)) void rehash() {
    const size_t live = clear_tombstones();  // counts them on the way (no walk of its own)
    if (live + 1 > grow_at_ / 2) grow();
    room_ = grow_at_ - live;
  }

  void grow() {
    Slot* old = slots_;
    const size_t old_slots = mask_ + 1;
    Slot* fresh = static_cast<Slot*>(std::calloc(old_slots * 2, sizeof(Slot)));
    if (!fresh) throw std::bad_alloc();
    set_table(fresh, 64 - shift_ + 1);
    for (size_t k = 0; k < old_slots; ++k) {
      if (old[k].key <= kTombstone) continue;
      size_t i = home(old[k].key);
      while (slots_[i].key) i = (i + 1) & mask_;
      slots_[i] = old[k];
    }
    std::free(old);
  }

  // From an empty slot on, once round the table: a tombstone becomes empty, a live entry
  // moves to the first empty slot from its home (at or before where it was: its home lies
  // after the empty slot the walk started from, and every slot from there to the entry's
  // has been made final already).
  // Returns the live entries.
  size_t clear_tombstones() {
    Slot* s = slots_;
    const size_t mask = mask_;
    size_t start = 0, live = 0;
    while (s[start].key != kEmpty) ++start;  // exists: the table is at most 3/8 full
    for (size_t n = 1, i = (start + 1) & mask; n <= mask; ++n, i = (i + 1) & mask) {
      if (s[i].key == kEmpty) continue;
      const Slot entry = s[i];
      s[i].key = kEmpty;
      if (entry.key == kTombstone) continue;
      ++live;
      size_t j = home(entry.key);
      while (s[j].key != kEmpty) j = (j + 1) & mask;
      s[j] = entry;
    }
    return live;
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
  size_t grow_at_ = 0;  // 3/8 of the slots: the most live and erased slots the table holds
  size_t room_ = 0;     // grow_at_ - (live + erased slots): one test per insert
};

}  // namespace mtia
