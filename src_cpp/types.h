// types.h: small value types shared by every layer of the core.
// Relies on: nothing.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>

#define MTIA_INLINE inline __attribute__((always_inline))  // hot-path helpers

namespace mtia {

using DeviceIndex = int;
using StreamId = int64_t;  // 0 = the default stream of a device; new streams get ids >= 1

// A memory pool's identity, as PyTorch's MempoolId_t: (0,0) = default pool,
// (0,n) = user-created (MemPool, graph_pool_handle), (n,0) = minted by a graph capture.
struct MempoolId {
  uint64_t first = 0, second = 0;
  bool is_default() const { return first == 0 && second == 0; }
  bool operator==(const MempoolId& o) const { return first == o.first && second == o.second; }
  bool operator!=(const MempoolId& o) const { return !(*this == o); }
};

struct MempoolIdHash {
  size_t operator()(const MempoolId& id) const { return id.first ? id.first : id.second; }
};

constexpr size_t kMinBlockSize = 512;
constexpr size_t kSmallSize = 1048576;        // largest small-pool request
constexpr size_t kSmallBuffer = 2097152;      // small-pool segment size
constexpr size_t kLargeBuffer = 20971520;     // segment for 1..10 MiB requests
constexpr size_t kMinLargeAlloc = 10485760;   // from here requests get their own segment
constexpr size_t kRoundLarge = 2097152;       // rounding of big segments
constexpr size_t kOneExaByte = size_t(1) << 60;

}  // namespace mtia
