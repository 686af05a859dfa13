// crowded_bin.h: the blocks of one free-index bin that holds two or more, kept either
// unsorted (a bag) or sorted (a BinTree), whichever the bin's use pays for.
//
// Most crowded bins are updated far more often than they are searched: the small
// leftovers of splits (512 B, 1 KiB, ...) pile up by the hundred, go in and out at random
// places in best-fit order as their neighbours are freed and merged, and a request of
// their size is rare (rmm_random_100k_1MiB_2streams: ~3500 updates and ~20-70 searches a
// bin). Keeping such a bin sorted costs a B+ tree insert or erase (150-200 instructions)
// per update; a bag costs ~15 (an append; an erase moves the last entry into the hole,
// found through the block's bag slot), and a search scans it. A bin whose searches scan
// more than its updates save becomes a tree, and a tree updated many times between
// searches becomes a bag again. The accounting: a bag earns kUpdateCredit per update
// (capped, so it adapts within a few scans) and pays one per entry scanned; it turns into
// a tree when its credit runs out. A tree turns into a bag after more than 2 × size + 64
// updates without a search (counting those that searched the tree: one at the front of
// its first leaf costs what a bag's does). So scanning costs at most kUpdateCredit
// entries per update, and each conversion (O(n log n) to a tree, O(n) to a bag) follows
// Ω(n) updates or scans.
//
// A bag knows its smallest entry until that entry leaves; then the next search finds it
// by a scan. Best fit takes a bin's smallest block, so in an exact bin (one size) a search
// is a load while the smallest stays; in the wider bins above 2 MiB a request may skip the
// smaller blocks, and the scan then looks for the smallest entry at or above it. (Keeping
// the 8 smallest instead, to scan once per 8 hand-outs, cost more on every insert and
// erase than it saved: +4 to +22 instructions an op over the shipped traces.)
//
// A block's slot in a bag lives in Block::event_count's bits (bag_slot()): those count
// cross-stream events only while a block is pending, and a pending block is never in a
// free index. A bag holds at most kMaxBag blocks (the slot's range); past that the bin is a
// tree. Every slot is 0 outside a bag, so a block leaves the index as clean as it came.
// Relies on: bin_tree.h (BinTree, PackedKey, FreeKey, NodeArena) and block.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "bin_tree.h"
#include "block.h"

namespace mtia {

class CrowdedBin {
 public:
  explicit CrowdedBin(NodeArena* arena) : tree_(arena) {}
  ~CrowdedBin() { std::free(bag_); }
  CrowdedBin(const CrowdedBin&) = delete;
  CrowdedBin& operator=(const CrowdedBin&) = delete;

  size_t size() const { return sorted_ ? tree_.size() : n_; }
  bool empty() const { return size() == 0; }

  // The first two blocks (the bin's inline block and a second one); the bin is empty.
  void insert_pair(const FreeKey& fa, Block* a, const FreeKey& fb, Block* b) {
    if (sorted_) {
      tree_.insert_pair(fa, a, fb, b);
      return;
    }
    credit_ = kStartCredit;
    reserve(2);
    put(0, PackedKey::of(fa), a);
    put(1, PackedKey::of(fb), b);
    n_ = 2;
    min_ = bag_[1].key < bag_[0].key ? 1 : 0;
  }

  MTIA_INLINE void insert(const FreeKey& fkey, Block* b) {
    if (sorted_) {
      const PackedKey key = PackedKey::of(fkey);
      if (!tree_.insert_front(key, b)) {
        tree_.insert_packed(key, b);
        note_tree_update();
      }
      return;
    }
    if (__builtin_expect(n_ == cap_, 0)) {
      if (!grow()) {  // the bag is as large as a slot can index: a tree from here on
        to_tree();
        tree_.insert(fkey, b);
        return;
      }
    }
    earn();
    const PackedKey key = PackedKey::of(fkey);
    const uint32_t at = n_++;
    put(at, key, b);
    if (min_ >= 0 && key < bag_[min_].key) min_ = int32_t(at);
  }

  // Removes b (in this bin, with this key).
  MTIA_INLINE void erase(const FreeKey& fkey, Block* b) {
    if (sorted_) {
      const PackedKey key = PackedKey::of(fkey);
      if (!tree_.erase_front(key)) {
        if (!tree_.erase_packed(key)) throw_corrupt();
        note_tree_update();
      }
      return;
    }
    const uint32_t at = b->bag_slot();
    if (__builtin_expect(at >= n_ || bag_[at].block != b, 0)) throw_corrupt();
    earn();
    b->set_bag_slot(0);
    const uint32_t last = --n_;
    if (min_ == int32_t(at)) min_ = -1;
    if (at != last) {
      bag_[at] = bag_[last];
      bag_[at].block->set_bag_slot(at);
      if (min_ == int32_t(last)) min_ = int32_t(at);
    }
  }

  // Empties a bin of one block and returns it (the free index keeps it inline).
  Block* take_only() {
    if (sorted_) return tree_.take_only();
    Block* b = bag_[0].block;
    b->set_bag_slot(0);
    n_ = 0;
    min_ = -1;
    return b;
  }

  // The smallest block (the bin is not empty).
  MTIA_INLINE Block* first() {
    if (sorted_) {
      tree_updates_ = 0;
      return tree_.first();
    }
    if (__builtin_expect(min_ < 0, 0)) return find_first();
    return bag_[min_].block;
  }

  // The first block whose key is >= key, or nullptr.
  Block* lower_bound(const FreeKey& fkey) {
    if (sorted_) {
      tree_updates_ = 0;
      return tree_.lower_bound(fkey);
    }
    return scan_from(PackedKey::of(fkey), false);
  }

  // The block after the one with this key, or nullptr.
  Block* successor(const FreeKey& fkey) {
    if (sorted_) {
      tree_updates_ = 0;
      return tree_.successor(fkey);
    }
    return scan_from(PackedKey::of(fkey), true);
  }

  Block* last() {
    if (sorted_) return tree_.last();
    uint32_t best = 0;
    for (uint32_t i = 1; i < n_; ++i)
      if (bag_[best].key < bag_[i].key) best = i;
    return bag_[best].block;
  }

  // f(block) in best-fit order.
  template <class F>
  void for_each(F f) const {
    if (sorted_) {
      tree_.for_each(f);
      return;
    }
    std::vector<Entry> entries(bag_, bag_ + n_);
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.key < b.key; });
    for (const Entry& e : entries) f(e.block);
  }

 private:
  struct Entry {
    PackedKey key;
    Block* block;
  };
  static constexpr uint32_t kMaxBag = Block::kMaxBagSlots;
  // Entries a bag may scan per update (instructions an op, shipped traces, 16 / 8 / 4 / 2:
  // gpt2_train 255 / 254 / 254 / 258, resnet50_train 253 / 253 / 246 / 244,
  // rmm_random_100k_1MiB_2streams 324 / 324 / 325 / 364).
  static constexpr int64_t kUpdateCredit = 4;
  static constexpr int64_t kStartCredit = 256;

  MTIA_INLINE void put(uint32_t at, const PackedKey& key, Block* b) {
    bag_[at] = Entry{key, b};
    b->set_bag_slot(at);
  }
  MTIA_INLINE void earn() { credit_ += kUpdateCredit; }
  // A scan of the whole bag: paid from the credit; a bag that cannot pay becomes a tree.
  // The credit counts as at most ~8 scans of the whole bag: a bin whose use turns to
  // searching becomes a tree after a few scans, however long it was only updated before.
  void pay_scan() {
    credit_ = std::min(credit_, 8 * int64_t(n_) + kStartCredit) - int64_t(n_);
    if (credit_ < 0) to_tree();
  }
  // After an update that searched the tree (it may turn the tree into a bag; updates at
  // the front are as cheap as a bag's and are not counted).
  MTIA_INLINE void note_tree_update() {
    if (__builtin_expect(++tree_updates_ > 2 * tree_.size() + 64, 0)) to_bag();
  }

  // first() of a bag whose smallest entry left: a scan.
  __attribute__((noinline)) Block* find_first() {
    uint32_t best = 0;
    for (uint32_t i = 1; i < n_; ++i)
      if (bag_[i].key < bag_[best].key) best = i;
    min_ = int32_t(best);
    Block* found = bag_[best].block;
    pay_scan();
    return found;
  }

  // The smallest entry with key >= key (strictly > if `after`), or nullptr.
  __attribute__((noinline)) Block* scan_from(const PackedKey& key, bool after) {
    if (min_ >= 0 && !(bag_[min_].key < key) && !(after && bag_[min_].key == key)) return bag_[min_].block;
    int64_t best = -1;
    for (uint32_t i = 0; i < n_; ++i) {
      const PackedKey& k = bag_[i].key;
      if (k < key || (after && k == key)) continue;
      if (best < 0 || k < bag_[best].key) best = i;
    }
    Block* found = best < 0 ? nullptr : bag_[best].block;
    pay_scan();
    return found;
  }

  void reserve(uint32_t n) {
    if (n <= cap_) return;
    uint32_t cap = cap_ ? cap_ : 8;
    while (cap < n) cap *= 2;
    auto* grown = static_cast<Entry*>(std::realloc(bag_, sizeof(Entry) * cap));
    if (!grown) throw std::bad_alloc();
    bag_ = grown;
    cap_ = cap;
  }
  // Room for one more entry; false when the bag is as large as it may be.
  __attribute__((noinline)) bool grow() {
    if (n_ >= kMaxBag) return false;
    reserve(std::min<uint32_t>(n_ + 1 < 8 ? 8 : 2 * n_, kMaxBag));
    return true;
  }

  __attribute__((noinline)) void to_tree() {
    std::sort(bag_, bag_ + n_, [](const Entry& a, const Entry& b) { return a.key < b.key; });
    for (uint32_t i = 0; i < n_; ++i) {
      bag_[i].block->set_bag_slot(0);
      tree_.insert_packed(bag_[i].key, bag_[i].block);
    }
    n_ = 0;
    min_ = -1;
    sorted_ = true;
    tree_updates_ = 0;
  }
  __attribute__((noinline)) void to_bag() {
    const size_t n = tree_.size();
    if (n > kMaxBag) {  // too many for a bag: stay a tree, count again
      tree_updates_ = 0;
      return;
    }
    reserve(uint32_t(n));
    uint32_t at = 0;
    tree_.for_each_entry([&](const PackedKey& key, Block* b) { put(at++, key, b); });
    tree_.clear();
    n_ = at;
    min_ = n_ ? 0 : -1;  // the tree gave them in order
    sorted_ = false;
    credit_ = kStartCredit;
  }

  [[noreturn]] __attribute__((noinline, cold)) static void throw_corrupt() {
    throw InvalidState("free index corrupted: a free block was not where its bag slot says");
  }

  bool sorted_ = false;
  int32_t min_ = -1;           // bag: index of the smallest entry, -1 when unknown
  uint32_t n_ = 0, cap_ = 0;   // bag: entries, room
  Entry* bag_ = nullptr;
  int64_t credit_ = kStartCredit;
  size_t tree_updates_ = 0;    // tree: searched updates since the last search
  BinTree tree_;
};

}  // namespace mtia
