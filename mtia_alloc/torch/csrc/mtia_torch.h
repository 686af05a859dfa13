// mtia_torch.h: what the two translation units of the PyTorch backend share.
// backend.cpp: the C table from mtia_alloc._C, the c10::DeviceAllocator, the device guard
// (streams and events), the MTIA generator, the hooks and the Python module.
// kernels.cpp: the MTIA kernels, the zero-copy CPU fallback and graph op recording.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>
#include <string>

#include "../../_capi.h"

namespace mtia_torch {

extern const MtiaAllocCAPI* capi;  // set by install(); null before

const MtiaAllocCAPI& api();  // throws if mtia_alloc._C's table is not installed yet
void ensure_init();          // mtia_alloc's lazy init (the devices and allocators)
int device_count();
int check_device(int64_t index);  // returns it; ValueError naming the valid range otherwise
[[noreturn]] void raise_capi_error(int rc, const std::string& context);

struct MtiaAllocator final : c10::DeviceAllocator {
  c10::DataPtr allocate(size_t n) override;
  c10::DataPtr allocate_on(int device, size_t n);  // on the device's current stream
  c10::DeleterFnPtr raw_deleter() const override;
  void copy_data(void* dest, const void* src, std::size_t count) const override;
  bool initialized() override;
  void emptyCache(c10::MempoolId_t mempool_id) override;
  void recordStream(const c10::DataPtr& ptr, c10::Stream stream) override;
  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex device) override;
  void resetAccumulatedStats(c10::DeviceIndex device) override;
  void resetPeakStats(c10::DeviceIndex device) override;
  std::pair<size_t, size_t> getMemoryInfo(c10::DeviceIndex device) override;
};
MtiaAllocator& allocator();

// The CPU generator an MTIA generator wraps (random ops run the CPU kernel with it).
at::Generator cpu_generator_of(const at::Generator& mtia_gen);
const at::Generator& default_generator(c10::DeviceIndex device);

// Graph capture: ops run on a capturing (device, stream) are recorded for replay.
void capture_begin(int64_t handle, int device, int64_t stream);
void capture_end(int64_t handle);
void replay(int64_t handle);
void forget(int64_t handle);
size_t recorded_ops(int64_t handle);

}  // namespace mtia_torch
