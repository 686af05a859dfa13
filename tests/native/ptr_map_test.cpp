// ptr_map_test.cpp: PtrMap (ptr_map.h, the allocated blocks' address map) against
// std::unordered_map as the model: random inserts, erases (of present and absent keys)
// and finds, with a live set that grows, churns in place (tombstones pile up and the
// table rehashes at the same size) and shrinks; keys collide on purpose (few high bits
// differ). Run under the sanitizers by .ci/run. Exit code 0 = pass.
#include <cstdio>
#include <random>
#include <unordered_map>
#include <vector>

#include "check.h"
#include "ptr_map.h"

using namespace mtia;

namespace {

void run(uint64_t seed, size_t max_live, size_t steps, uintptr_t stride) {
  std::mt19937_64 rng(seed);
  PtrMap map;
  std::unordered_map<uintptr_t, Block*> model;
  std::vector<uintptr_t> live;
  auto key_at = [&](uint64_t i) { return uintptr_t(512) + uintptr_t(i) * stride; };
  const uint64_t key_space = max_live * 4;
  for (size_t step = 0; step < steps; ++step) {
    // Phases: grow towards max_live, churn around it, shrink towards empty.
    const size_t phase = step * 3 / steps;
    const int insert_pct = phase == 0 ? 70 : phase == 1 ? 50 : 30;
    const uintptr_t k = key_at(rng() % key_space);
    Block* v = reinterpret_cast<Block*>(k * 3);
    if (int(rng() % 100) < insert_pct && live.size() < max_live) {
      if (model.count(k)) continue;
      map.insert(k, v);
      model[k] = v;
      live.push_back(k);
    } else if (!live.empty() && rng() % 4) {
      const size_t i = rng() % live.size();
      const uintptr_t key = live[i];
      live[i] = live.back();
      live.pop_back();
      CHECK(map.erase(key) == model[key], "erase of a present key (seed %llu step %zu)", (unsigned long long)seed, step);
      model.erase(key);
    } else {
      auto it = model.find(k);
      CHECK(map.erase(k) == (it == model.end() ? nullptr : it->second), "erase of a random key (step %zu)", step);
      if (it != model.end()) {
        model.erase(it);
        for (size_t i = 0; i < live.size(); ++i)
          if (live[i] == k) {
            live[i] = live.back();
            live.pop_back();
            break;
          }
      }
    }
    const uintptr_t q = key_at(rng() % key_space);
    auto it = model.find(q);
    CHECK(map.find(q) == (it == model.end() ? nullptr : it->second), "find differs (seed %llu step %zu)",
          (unsigned long long)seed, step);
    if (step % 997 == 0) CHECK(map.size() == model.size(), "size %zu, expected %zu", map.size(), model.size());
  }
  for (auto& [k, v] : model) CHECK(map.find(k) == v, "a live key is lost at the end");
}

}  // namespace

int main() {
  run(1, 50, 200000, 512);              // one table size: churn rehashes in place
  run(2, 5000, 400000, 512);            // grows several times
  run(3, 3000, 300000, uintptr_t(1) << 40);  // keys differing only in high bits
  run(4, 20000, 300000, 4096 * 512);
  if (failures) {
    std::fprintf(stderr, "ptr_map_test: %d failures\n", failures.load());
    return 1;
  }
  std::printf("ptr_map_test: ok\n");
  return 0;
}
