// raw_allocator.h: RawAllocator, the device memory under the cache (the emulated
// device's, or a user's pluggable allocator). Relies on types.h only.
#pragma once
#include <cstddef>

#include "types.h"

namespace mtia {

// Raw device memory under the cache: the emulated device, or a user's allocator.
// alloc returns nullptr for "out of memory" (and must not throw).
class RawAllocator {
 public:
  virtual ~RawAllocator() = default;
  virtual void* alloc(size_t size, DeviceIndex device, StreamId stream) = 0;
  virtual void free(void* ptr, size_t size, DeviceIndex device, StreamId stream) = 0;
};

}  // namespace mtia
