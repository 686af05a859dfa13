// size_policy.h: pure size arithmetic of allocator_core.md §1 (rounding, segment sizes,
// split rules) and PyTorch's format_size. No state: the config is passed in.
// Relies on: config.h and types.h.
#pragma once
#include <cstdio>
#include <string>

#include "config.h"
#include "types.h"

namespace mtia {

inline size_t roundup_power2_next_division(size_t size, size_t divisions) {
  if ((size & (size - 1)) == 0) return size;  // already a power of two
  size_t floor_pow2 = size_t(1) << (63 - __builtin_clzll(size));
  size_t step = floor_pow2 >> __builtin_ctzll(divisions);
  if (step == 0) return floor_pow2 << 1;
  return ((size + step - 1) / step) * step;
}

inline size_t round_size(size_t size, const AllocatorConfig& cfg) {
  if (size < kMinBlockSize) return kMinBlockSize;
  if (cfg.any_roundup_divisions) {
    size_t divisions = cfg.roundup_power2_divisions_for(size);
    if (divisions > 1 && size > kMinBlockSize * divisions) return roundup_power2_next_division(size, divisions);
  }
  return kMinBlockSize * ((size + kMinBlockSize - 1) / kMinBlockSize);
}

// Size of the device allocation (segment) made for a rounded request.
inline size_t segment_size_for(size_t rounded) {
  if (rounded <= kSmallSize) return kSmallBuffer;
  if (rounded < kMinLargeAlloc) return kLargeBuffer;
  return kRoundLarge * ((rounded + kRoundLarge - 1) / kRoundLarge);
}

inline std::string format_size(uint64_t size) {
  char buf[64];
  if (size <= 1024) {
    snprintf(buf, sizeof buf, "%llu bytes", (unsigned long long)size);
  } else if (size <= 1048576) {
    snprintf(buf, sizeof buf, "%.2f KiB", size / 1024.0);
  } else if (size <= 1073741824ull) {
    snprintf(buf, sizeof buf, "%.2f MiB", size / 1048576.0);
  } else {
    snprintf(buf, sizeof buf, "%.2f GiB", size / 1073741824.0);
  }
  return buf;
}

}  // namespace mtia
