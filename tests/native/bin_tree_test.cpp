// bin_tree_test.cpp: BinTree (the B+ tree behind searched crowded free-index bins) against
// std::set as the model, over random inserts, erases and queries that grow the tree to
// several levels and shrink it back to empty; then FreeIndex (free_index.h) itself, whose
// bins move between one inline block and a crowd, and crowds between a bag and a tree.
// Run under the sanitizers by .ci/run.
// Exit code 0 = pass.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <vector>

#include "bin_tree.h"
#include "free_index.h"
#include "check.h"

using namespace mtia;

namespace {

// Blocks are only carried as values: the key decides the order.
struct Item {
  FreeKey key;
  Block* block;
  bool operator<(const Item& o) const { return key < o.key; }
};

Block* block_for(const FreeKey& k) { return reinterpret_cast<Block*>(uintptr_t(k.ptr) * 64 + 64); }

void run(uint64_t seed, size_t max_live, size_t steps, int size_kinds) {
  std::mt19937_64 rng(seed);
  NodeArena arena;
  BinTree tree(&arena);
  std::set<Item> model;
  std::vector<FreeKey> live;
  auto random_key = [&] {
    // Few sizes and orders, so ties on the first fields are common.
    return FreeKey{size_t(rng() % size_kinds) * 512 + 512, rng() % 50, (rng() % (1u << 20)) * 512};
  };
  for (size_t step = 0; step < steps; ++step) {
    // Grow towards max_live, then drain to empty, then grow again.
    const bool growing = (step / (max_live * 3)) % 2 == 0;
    const int op = int(rng() % 100);
    if ((growing ? op < 60 : op < 25) && model.size() < max_live) {
      FreeKey k = random_key();
      if (model.count(Item{k, nullptr})) continue;
      model.insert(Item{k, block_for(k)});
      live.push_back(k);
      tree.insert(k, block_for(k));
    } else if (!live.empty() && op < 90) {
      size_t i = rng() % live.size();
      FreeKey k = live[i];
      live[i] = live.back();
      live.pop_back();
      model.erase(Item{k, nullptr});
      CHECK(tree.erase(k), "erase of a present key failed (seed %llu step %zu)", (unsigned long long)seed, step);
      CHECK(!tree.erase(k), "second erase succeeded");
    } else {
      FreeKey q = random_key();
      auto it = model.lower_bound(Item{q, nullptr});
      Block* want = it == model.end() ? nullptr : it->block;
      CHECK(tree.lower_bound(q) == want, "lower_bound differs (seed %llu step %zu)", (unsigned long long)seed, step);
      if (!live.empty()) {
        FreeKey k = live[rng() % live.size()];
        auto at = model.find(Item{k, nullptr});
        auto next = std::next(at);
        CHECK(tree.successor(k) == (next == model.end() ? nullptr : next->block), "successor differs");
      }
    }
    CHECK(tree.size() == model.size(), "size %zu, model %zu", tree.size(), model.size());
    CHECK(tree.empty() == model.empty(), "empty() differs");
    if (!model.empty()) {
      CHECK(tree.first() == model.begin()->block, "first differs (step %zu)", step);
      CHECK(tree.last() == model.rbegin()->block, "last differs (step %zu)", step);
    }
    if (step % 997 == 0) {
      std::vector<Block*> walked;
      tree.for_each([&](Block* b) { walked.push_back(b); });
      std::vector<Block*> expected;
      for (const Item& it : model) expected.push_back(it.block);
      CHECK(walked == expected, "for_each order differs (step %zu)", step);
    }
  }
}

// Best fit's pattern: mostly erase the first entry and insert keys that sort first (the
// leaf offset's fast paths: free slots before the first leaf's entries, or none), mixed
// with inserts and erases anywhere, so leaves split and empty with every offset.
void run_front(uint64_t seed, size_t max_live, size_t steps, int front_percent) {
  std::mt19937_64 rng(seed);
  NodeArena arena;
  BinTree tree(&arena);
  std::set<Item> model;
  std::vector<FreeKey> live;  // may hold erased keys: checked against the model
  auto random_key = [&] { return FreeKey{size_t(rng() % 6) * 512 + 512, rng() % 8, (rng() % (1u << 20)) * 512}; };
  auto add = [&](const FreeKey& k) {
    if (model.count(Item{k, nullptr})) return;
    model.insert(Item{k, block_for(k)});
    live.push_back(k);
    tree.insert(k, block_for(k));
  };
  auto remove = [&](FreeKey k) {  // by value: k may live in a model node
    const bool present = model.erase(Item{k, nullptr}) > 0;
    CHECK(tree.erase(k) == present, "erase result differs (seed %llu)", (unsigned long long)seed);
  };
  for (size_t step = 0; step < steps; ++step) {
    const bool growing = (step / (max_live * 4)) % 2 == 0;
    const int op = int(rng() % 100);
    if (op < front_percent) {
      if (rng() % 2 == 0 || model.empty()) {
        // A key just before the first one (or a random one while the tree is empty).
        FreeKey k = random_key();
        if (!model.empty()) {
          k = model.begin()->key;
          const uint64_t back = 1 + rng() % 3;
          if (k.ptr >= back * 512) k.ptr -= back * 512;
          else if (k.order > 0) --k.order;
          else if (k.size > 512) k.size -= 512;
        }
        if (growing || model.size() < max_live / 4) add(k);
      }
      if (!model.empty() && (!growing || rng() % 2 == 0)) remove(model.begin()->key);
    } else if (op < front_percent + (100 - front_percent) / 2) {
      if (model.size() < max_live && (growing || rng() % 3 == 0)) add(random_key());
    } else if (!model.empty()) {
      // Erase anywhere: a random live key, or the last one.
      if (rng() % 4 == 0) {
        remove(model.rbegin()->key);
      } else if (!live.empty()) {
        size_t i = rng() % live.size();
        FreeKey k = live[i];
        live[i] = live.back();
        live.pop_back();
        remove(k);
      }
    }
    CHECK(tree.size() == model.size(), "size %zu, model %zu (seed %llu step %zu)", tree.size(), model.size(),
          (unsigned long long)seed, step);
    if (!model.empty()) {
      CHECK(tree.first() == model.begin()->block, "first differs (seed %llu step %zu)", (unsigned long long)seed, step);
      CHECK(tree.last() == model.rbegin()->block, "last differs (seed %llu step %zu)", (unsigned long long)seed, step);
      FreeKey q = random_key();
      auto it = model.lower_bound(Item{q, nullptr});
      CHECK(tree.lower_bound(q) == (it == model.end() ? nullptr : it->block), "lower_bound differs (step %zu)", step);
      auto at = model.begin();
      CHECK(tree.successor(at->key) == (std::next(at) == model.end() ? nullptr : std::next(at)->block),
            "successor of first differs (step %zu)", step);
    }
    if (step % 61 == 0) {
      std::vector<Block*> walked, expected;
      tree.for_each([&](Block* b) { walked.push_back(b); });
      for (const Item& it : model) expected.push_back(it.block);
      CHECK(walked == expected, "for_each order differs (seed %llu step %zu)", (unsigned long long)seed, step);
    }
  }
}

// FreeIndex against a std::set of (size, order, address): few sizes, so bins go from one
// inline block to a crowd (insert_pair) and back (take_only) all the time, in exact bins
// (<= 2 MiB) and in the 64-per-power-of-two bins above. Searches come in phases: every
// step (crowds become trees), rarely (trees become bags again), and every step with a
// successor walk, so that both crowd modes and the turns between them are checked.
void run_index(uint64_t seed, size_t max_live, size_t steps) {
  std::mt19937_64 rng(seed);
  NodeArena arena;
  FreeIndex index(&arena, nullptr, false);
  std::vector<Block> blocks(max_live);
  std::vector<Block*> spare, live;
  for (Block& b : blocks) spare.push_back(&b);
  auto less = [](const Block* a, const Block* b) { return BlockLess()(a, b); };
  std::set<Block*, decltype(less)> model(less);
  static const size_t kSizes[] = {512, 1024, 4096, (size_t(2) << 20), (size_t(3) << 20), (size_t(3) << 20) + 512};
  uint64_t next_ptr = 1;
  for (size_t step = 0; step < steps; ++step) {
    const bool insert = spare.size() == blocks.size() || (!spare.empty() && rng() % 100 < 52);
    if (insert) {
      Block* b = spare.back();
      spare.pop_back();
      b->size = kSizes[rng() % 6];
      b->order = rng() % 4;
      b->ptr = (next_ptr++) * 512 * 8192;
      index.insert(b);
      model.insert(b);
      live.push_back(b);
    } else {
      const size_t i = rng() % live.size();
      Block* b = live[i];
      live[i] = live.back();
      live.pop_back();
      index.erase(b);
      model.erase(b);
      spare.push_back(b);
      CHECK(b->event_count == 0 && !b->in_index, "an erased block keeps a bag slot (step %zu)", step);
    }
    const int phase = int(step / 1500 % 3);
    if (phase == 1 && rng() % 64) continue;  // updates alone
    const size_t q = std::max<size_t>(512, kSizes[rng() % 6] - (rng() % 2) * 512);  // requests are >= 512
    Block* expect = nullptr;
    for (Block* b : model)
      if (b->size >= q) {
        expect = b;
        break;
      }
    CHECK(index.lower_bound(q) == expect, "FreeIndex lower_bound(%zu) differs (seed %llu step %zu)", q,
          (unsigned long long)seed, step);
    CHECK(index.largest() == (model.empty() ? nullptr : *model.rbegin()), "FreeIndex largest differs (step %zu)",
          step);
    CHECK(index.empty() == model.empty(), "FreeIndex empty() differs (step %zu)", step);
    if (phase == 2 && expect) {
      auto it = model.find(expect);
      for (int k = 0; k < 3 && it != model.end(); ++k, ++it) {
        Block* next = std::next(it) == model.end() ? nullptr : *std::next(it);
        CHECK(index.successor(*it) == next, "FreeIndex successor differs (step %zu)", step);
      }
    }
    if (step % 17 == 0) {
      std::vector<Block*> walked;
      index.for_each([&](const Block* b) { walked.push_back(const_cast<Block*>(b)); });
      CHECK(walked == std::vector<Block*>(model.begin(), model.end()), "FreeIndex order differs (step %zu)", step);
    }
  }
}

}  // namespace

int main() {
  for (uint64_t seed = 50; seed < 56; ++seed) run_index(seed, 6 + seed % 3 * 20, 20000);
  run_index(60, 400, 40000);
  run_index(61, 3000, 60000);
  run(1, 40, 20000, 4);        // one or two levels
  run(2, 3000, 200000, 3);     // three levels, heavy ties
  run(3, 20000, 300000, 200);  // four levels, then drained to empty and regrown
  for (uint64_t seed = 10; seed < 20; ++seed) run(seed, 300, 20000, 8);
  for (uint64_t seed = 30; seed < 36; ++seed) run_front(seed, 200, 30000, 70);   // front-heavy, two levels
  run_front(40, 3000, 150000, 50);                                               // three levels
  run_front(41, 40, 20000, 90);                                                  // one leaf to a few
  if (failures) {
    std::fprintf(stderr, "bin_tree_test: %d failures\n", failures.load());
    return 1;
  }
  std::printf("bin_tree_test: ok\n");
  return 0;
}
