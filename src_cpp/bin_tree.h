// bin_tree.h: the ordered set behind a crowded free-index bin that is searched often (a
// CrowdedBin in its sorted mode, crowded_bin.h), a B+ tree with its sort keys inline.
//
// A bin can hold thousands of blocks (e.g. every free 2 MiB segment of a long random
// run). A red-black tree then costs a dozen dependent cache misses per insert; here a
// node holds 16 entries, so the same set is three levels deep and the upper levels stay
// cached. Entries are found by key, so blocks carry no iterator. Erase never rebalances:
// a leaf leaves the tree only when it is empty, which keeps every operation simple and
// the tree no deeper than its fullest past.
//
// A leaf keeps its entries at e[begin .. end), not from e[0]: best fit takes a bin's
// first block and the block mostly comes back as the first again, so the hot operations
// are erase and insert at the front of the first leaf, and with the offset those are
// ++begin and --begin instead of moving the whole leaf by one entry.
// Relies on: block.h (the entries are Block pointers) and errors.h; nothing else.
#pragma once
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "block.h"
#include "errors.h"

namespace mtia {

// Recycles the tree nodes, so the fast path never calls malloc. Not thread-safe: each
// DeviceAllocator owns one and uses it under its lock.
class NodeArena {
 public:
  static constexpr size_t kNodeSize = 576;  // >= BinTree's nodes, whole cache lines
  void* get() {
    if (!head_) grow();
    void* p = head_;
    head_ = *static_cast<void**>(p);
    return p;
  }
  void put(void* p) {
    *static_cast<void**>(p) = head_;
    head_ = p;
  }

 private:
  static constexpr size_t kChunk = 64;
  void grow() {
    chunks_.emplace_back(new Node[kChunk]);
    for (size_t i = 0; i < kChunk; ++i) put(&chunks_.back()[i]);
  }
  struct alignas(64) Node {
    char bytes[kNodeSize];
  };
  void* head_ = nullptr;
  std::vector<std::unique_ptr<Node[]>> chunks_;
};

// Best-fit order: (size, segment order, address), as PyTorch's std::set compares blocks.
struct FreeKey {
  size_t size;
  uint64_t order;
  uintptr_t ptr;
  bool operator<(const FreeKey& o) const {
    if (size != o.size) return size < o.size;
    if (order != o.order) return order < o.order;
    return ptr < o.ptr;
  }
  bool operator==(const FreeKey& o) const { return size == o.size && order == o.order && ptr == o.ptr; }
};

// A FreeKey as the tree stores and compares it: one 128-bit number, so that a compare is
// a compare-and-subtract-with-borrow instead of up to three compares and branches (in a
// crowded bin all sizes, and often the orders, tie). From the top: the size in 512-byte
// units, rounded up (39 bits: blocks are < 2^48 bytes), the segment order (40 bits, as
// Block keeps it), the address / 512 (49 bits: addresses are < 2^58). Block sizes are
// multiples of 512, so the rounding changes no block's key and makes a query for any size
// find the first block at least that large; the blocks of one segment that tie on size and
// order differ in address by multiples of 512, which the division keeps apart and in order.
struct PackedKey {
  uint64_t hi, lo;
  static PackedKey of(const FreeKey& k) {
    const uint64_t units = (k.size + 511) >> 9, order = k.order & ((uint64_t(1) << 40) - 1);
    return PackedKey{units << 25 | order >> 15, order << 49 | k.ptr >> 9};
  }
  unsigned __int128 wide() const { return (unsigned __int128)hi << 64 | lo; }
  bool operator<(const PackedKey& o) const { return wide() < o.wide(); }
  bool operator==(const PackedKey& o) const { return ((hi ^ o.hi) | (lo ^ o.lo)) == 0; }
};

class BinTree {
 public:
  explicit BinTree(NodeArena* arena) : arena_(arena) {}
  ~BinTree() { destroy(root_, height_); }
  BinTree(const BinTree&) = delete;
  BinTree& operator=(const BinTree&) = delete;

  bool empty() const { return count_ == 0; }
  size_t size() const { return count_; }
  Block* first() const { return first_->e[first_->begin].block; }
  Block* last() const { return last_->e[last_->end - 1].block; }

  // insert and erase are split: the inline part is the hot front-of-first-leaf case
  // (a few instructions, no stack frame), the searching part stays out of line.
  MTIA_INLINE void insert(const FreeKey& fkey, Block* block) {
    const PackedKey key = PackedKey::of(fkey);
    if (!insert_front(key, block)) insert_searched(key, block);
  }
  // A block that sorts first (the block best fit just took, coming back) goes straight
  // into the free slot before the first leaf's entries; false if that is not the case.
  MTIA_INLINE bool insert_front(const PackedKey& key, Block* block) {
    Leaf* first = first_;
    if (first && first->begin > 0 && first->end > first->begin && key < first->e[first->begin].key) {
      first->e[--first->begin] = Entry{key, block};
      ++count_;
      return true;
    }
    return false;
  }

  // The searching halves of insert and erase (after insert_front or erase_front said no),
  // and insert() of a key packed already (a bag turning into a tree, in key order).
  void insert_packed(const PackedKey& key, Block* block) { insert_searched(key, block); }
  bool erase_packed(const PackedKey& key) { return erase_searched(key); }

  // The first two entries of an empty tree (a bin's inline block and a second one): no
  // search, and they go mid-leaf, so that the next entry finds room on either side.
  void insert_pair(const FreeKey& fa, Block* a, const FreeKey& fb, Block* b) {
    if (!root_) {
      root_ = first_ = last_ = new_leaf();
      height_ = 1;
    }
    // Empty, so its height is 1: erase steps the root down to the last leaf.
    Leaf* leaf = first_;
    PackedKey ka = PackedKey::of(fa), kb = PackedKey::of(fb);
    if (kb < ka) {
      std::swap(ka, kb);
      std::swap(a, b);
    }
    leaf->begin = kLeafCap / 2 - 1;
    leaf->end = kLeafCap / 2 + 1;
    leaf->e[leaf->begin] = Entry{ka, a};
    leaf->e[leaf->begin + 1] = Entry{kb, b};
    count_ = 2;
  }

  // Empties a tree of one entry and returns that entry's block (the bin keeps it inline).
  Block* take_only() {
    Leaf* leaf = first_;  // one entry: one leaf, the root
    Block* b = leaf->e[leaf->begin].block;
    leaf->end = leaf->begin;
    count_ = 0;
    return b;
  }

  // Removes the entry with exactly this key; false if there is none.
  MTIA_INLINE bool erase(const FreeKey& fkey) {
    const PackedKey key = PackedKey::of(fkey);
    return erase_front(key) || erase_searched(key);
  }
  // Best fit mostly takes a bin's first block: no search for that one unless its leaf
  // empties (then the path is needed to unlink it). False if that is not the case.
  MTIA_INLINE bool erase_front(const PackedKey& key) {
    Leaf* first = first_;
    if (first && first->end - first->begin > 1 && first->e[first->begin].key == key) {
      ++first->begin;
      --count_;
      return true;
    }
    return false;
  }

  // First entry with key >= `key`, or nullptr.
  Block* lower_bound(const FreeKey& fkey) const {
    if (!root_) return nullptr;
    const PackedKey key = PackedKey::of(fkey);
    Path path;
    const Leaf* leaf = descend(key, path);
    int pos = leaf_lower_bound(leaf, key);
    if (pos < leaf->end) return leaf->e[pos].block;
    return leaf->next ? leaf->next->e[leaf->next->begin].block : nullptr;
  }

  // The entry after the one with exactly this key, or nullptr.
  Block* successor(const FreeKey& fkey) const {
    const PackedKey key = PackedKey::of(fkey);
    Path path;
    const Leaf* leaf = descend(key, path);
    int pos = leaf_lower_bound(leaf, key) + 1;
    if (pos < leaf->end) return leaf->e[pos].block;
    return leaf->next ? leaf->next->e[leaf->next->begin].block : nullptr;
  }

  template <class F>
  void for_each(F f) const {
    for (const Leaf* l = first_; l; l = l->next)
      for (int i = l->begin; i < l->end; ++i) f(l->e[i].block);
  }
  // f(key, block) in key order.
  template <class F>
  void for_each_entry(F f) const {
    for (const Leaf* l = first_; l; l = l->next)
      for (int i = l->begin; i < l->end; ++i) f(l->e[i].key, l->e[i].block);
  }

  // Empties the tree (its nodes go back to the arena).
  void clear() {
    destroy(root_, height_);
    root_ = nullptr;
    first_ = last_ = nullptr;
    height_ = 0;
    count_ = 0;
  }

 private:
  static constexpr int kLeafCap = 16;   // entries per leaf
  static constexpr int kInnerCap = 16;  // children per inner node
  static constexpr int kMaxHeight = 24;

  struct Entry {
    PackedKey key;
    Block* block;
  };
  struct Leaf {
    int begin = 0, end = 0;  // the entries are e[begin .. end)
    Leaf* prev = nullptr;
    Leaf* next = nullptr;
    Entry e[kLeafCap];
  };
  // keys[i] <= every key under children[i + 1]; every key under children[i] < keys[i].
  struct Inner {
    int count = 0;  // children
    PackedKey keys[kInnerCap - 1];
    void* children[kInnerCap];
  };
  struct Path {
    Inner* node[kMaxHeight];
    int slot[kMaxHeight];
  };

  // Entry moves inside a leaf, as plain loops: a libc memmove call costs more than
  // moving the few entries a leaf holds (the empty asm keeps the compiler from turning
  // a loop into a memmove call). Both move the shorter side of `pos`, if it has room; a
  // leaf that is not full always has room on one side.

  static void move(Entry& to, const Entry& from) {
    asm volatile("");
    to = from;
  }
  // Makes room for an entry before e[pos] (begin <= pos <= end, leaf not full) and
  // returns the index the new entry goes to.
  static int open_slot(Leaf* l, int pos) {
    const int b = l->begin, e = l->end;
    if (pos == b && b == 0) {
      // Front of a leaf with no room there: move it to the end of the array, so the
      // next front inserts (the common ones) find room.
      const int to = kLeafCap - (e - b);
      for (int i = e - 1; i >= b; --i) move(l->e[i + to], l->e[i]);
      l->end = kLeafCap;
      l->begin = to - 1;
      return to - 1;
    }
    // Left if that side is shorter or the right one is full (then, not being full, the
    // leaf has room on the left: b > 0, which is spelled out for the compiler's sake).
    if (b > 0 && (pos - b < e - pos || e == kLeafCap)) {
      for (int i = b; i < pos; ++i) move(l->e[i - 1], l->e[i]);
      l->begin = b - 1;
      return pos - 1;
    }
    for (int i = e; i > pos; --i) move(l->e[i], l->e[i - 1]);
    l->end = e + 1;
    return pos;
  }
  // Removes e[pos].
  static void close_slot(Leaf* l, int pos) {
    const int b = l->begin, e = l->end;
    if (pos - b < e - pos - 1) {
      for (int i = pos; i > b; --i) move(l->e[i], l->e[i - 1]);
      l->begin = b + 1;
    } else {
      for (int i = pos + 1; i < e; ++i) move(l->e[i - 1], l->e[i]);
      l->end = e - 1;
    }
  }

  // The first index in [begin, end] whose key is >= key.
  static int leaf_lower_bound(const Leaf* l, const PackedKey& key) {
    int lo = l->begin, hi = l->end;
    while (lo < hi) {
      int mid = (lo + hi) >> 1;
      if (l->e[mid].key < key) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
  // The child whose range holds key: the number of separators <= key.
  static int child_slot(const Inner* n, const PackedKey& key) {
    int lo = 0, hi = n->count - 1;
    while (lo < hi) {
      int mid = (lo + hi) >> 1;
      if (key < n->keys[mid]) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  Leaf* descend(const PackedKey& key, Path& path) const {
    void* node = root_;
    for (int level = 0; level < height_ - 1; ++level) {
      Inner* in = static_cast<Inner*>(node);
      int slot = child_slot(in, key);
      path.node[level] = in;
      path.slot[level] = slot;
      node = in->children[slot];
    }
    return static_cast<Leaf*>(node);
  }

  __attribute__((noinline)) void insert_searched(const PackedKey& key, Block* block) {
    if (!root_) {
      Leaf* leaf = new_leaf();
      root_ = first_ = last_ = leaf;
      height_ = 1;
    }
    // Sorts first, but the first leaf has no free slot before its entries (insert took
    // any other front insert): still no search while the leaf has room.
    Leaf* first = first_;
    if (first->begin == 0 && first->end > 0 && first->end < kLeafCap && key < first->e[0].key) {
      first->e[open_slot(first, 0)] = Entry{key, block};
      ++count_;
      return;
    }
    Path path;
    Leaf* leaf = descend(key, path);
    int pos = leaf_lower_bound(leaf, key);
    if (leaf->end - leaf->begin == kLeafCap) {
      Leaf* right = split_leaf(leaf);
      insert_separator(path, height_ - 1, right->e[0].key, right);
      if (pos > leaf->end) {
        pos -= leaf->end;
        leaf = right;
      }
    }
    leaf->e[open_slot(leaf, pos)] = Entry{key, block};
    ++count_;
  }

  __attribute__((noinline)) bool erase_searched(const PackedKey& key) {
    if (!root_) return false;
    Path path;
    Leaf* leaf = descend(key, path);
    int pos = leaf_lower_bound(leaf, key);
    if (pos == leaf->end || !(leaf->e[pos].key == key)) return false;
    close_slot(leaf, pos);
    --count_;
    if (leaf->begin == leaf->end) remove_empty_leaf(leaf, path);
    return true;
  }

  // Splits a full leaf (begin 0, end kLeafCap): it keeps e[0 .. keep), the new right
  // leaf gets the rest at its e[0 ..).
  Leaf* split_leaf(Leaf* leaf) {
    Leaf* right = new_leaf();
    const int keep = kLeafCap / 2, move = kLeafCap - keep;
    std::memcpy(right->e, &leaf->e[keep], sizeof(Entry) * size_t(move));
    right->end = move;
    leaf->end = keep;
    right->prev = leaf;
    right->next = leaf->next;
    if (leaf->next) leaf->next->prev = right;
    else last_ = right;
    leaf->next = right;
    return right;
  }

  // Adds `right` (whose keys are >= sep) just after the child path.slot[level] of
  // path.node[level]; level -1 means the root itself split.
  void insert_separator(Path& path, int level, PackedKey sep, void* right) {
    if (level == 0) {  // the root split: grow a level
      if (height_ >= kMaxHeight) throw_too_deep();
      Inner* root = new_inner();
      root->count = 2;
      root->children[0] = root_;
      root->children[1] = right;
      root->keys[0] = sep;
      root_ = root;
      ++height_;
      return;
    }
    Inner* parent = path.node[level - 1];
    int slot = path.slot[level - 1] + 1;  // right goes here
    if (parent->count == kInnerCap) {
      Inner* sibling = new_inner();
      const int keep = kInnerCap / 2, move = kInnerCap - keep;
      PackedKey up = parent->keys[keep - 1];
      std::memcpy(sibling->children, &parent->children[keep], sizeof(void*) * size_t(move));
      std::memcpy(sibling->keys, &parent->keys[keep], sizeof(PackedKey) * size_t(move - 1));
      sibling->count = move;
      parent->count = keep;
      insert_separator(path, level - 1, up, sibling);
      if (slot > keep) {
        parent = sibling;
        slot -= keep;
      }
    }
    std::memmove(&parent->children[slot + 1], &parent->children[slot], sizeof(void*) * size_t(parent->count - slot));
    std::memmove(&parent->keys[slot], &parent->keys[slot - 1], sizeof(PackedKey) * size_t(parent->count - slot));
    parent->children[slot] = right;
    parent->keys[slot - 1] = sep;
    ++parent->count;
  }

  void remove_empty_leaf(Leaf* leaf, Path& path) {
    if (height_ == 1) return;  // an empty root leaf stays
    (leaf->prev ? leaf->prev->next : first_) = leaf->next;
    (leaf->next ? leaf->next->prev : last_) = leaf->prev;
    arena_->put(leaf);
    for (int level = height_ - 2; level >= 0; --level) {
      Inner* n = path.node[level];
      int slot = path.slot[level];
      std::memmove(&n->children[slot], &n->children[slot + 1], sizeof(void*) * size_t(n->count - slot - 1));
      int k = slot > 0 ? slot - 1 : 0;  // the separator that bounded the removed child
      if (n->count - 2 - k > 0) std::memmove(&n->keys[k], &n->keys[k + 1], sizeof(PackedKey) * size_t(n->count - 2 - k));
      --n->count;
      if (n->count > 0) break;
      if (level == 0) break;  // cannot happen: the root keeps a child while the tree is non-empty
      arena_->put(n);
    }
    while (height_ > 1 && static_cast<Inner*>(root_)->count == 1) {  // a root with one child steps down
      Inner* old = static_cast<Inner*>(root_);
      root_ = old->children[0];
      arena_->put(old);
      --height_;
    }
  }

  static_assert(sizeof(Leaf) <= NodeArena::kNodeSize && sizeof(Inner) <= NodeArena::kNodeSize, "node size");
  // Default-initialised: only the header fields are written, not the entry arrays.
  Leaf* new_leaf() { return new (arena_->get()) Leaf; }
  Inner* new_inner() { return new (arena_->get()) Inner; }
  [[noreturn]] static void throw_too_deep() { throw InvalidState("free index bin tree grew too deep"); }

  void destroy(void* node, int height) {
    if (!node) return;
    if (height > 1) {
      Inner* in = static_cast<Inner*>(node);
      for (int i = 0; i < in->count; ++i) destroy(in->children[i], height - 1);
    }
    arena_->put(node);
  }

  NodeArena* arena_;
  void* root_ = nullptr;
  Leaf* first_ = nullptr;
  Leaf* last_ = nullptr;
  int height_ = 0;
  size_t count_ = 0;
};

}  // namespace mtia
