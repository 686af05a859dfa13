// allocator.h: the process-wide allocator: the emulated devices, one DeviceAllocator
// per device, the shared config, pool-id counters, pointer -> device dispatch, and the
// history record level of all devices. This is the whole C++ API the binding (and the
// native replayer) use.
// Relies on: device_allocator.h (one per device), emulated_device.h, config.h.
#pragma once
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "config.h"
#include "device_allocator.h"
#include "emulated_device.h"

namespace mtia {

// The emulated device's memory as a RawAllocator (what the default pools use).
class DeviceRawAllocator : public RawAllocator {
 public:
  explicit DeviceRawAllocator(Emulator* emu) : emu_(emu) {}
  void* alloc(size_t size, DeviceIndex device, StreamId) override { return emu_->device(device).memory().malloc(size); }
  void free(void* ptr, size_t size, DeviceIndex device, StreamId) override {
    emu_->device(device).memory().free(ptr, size);
  }

 private:
  Emulator* emu_;
};

class Allocator {
 public:
  // `raw` replaces the device memory under the default pools (change_current_allocator).
  Allocator(int device_count, size_t memory_per_device, const std::string& conf,
            std::shared_ptr<RawAllocator> raw = nullptr);
  ~Allocator();

  int device_count() const { return emulator_.device_count(); }
  Emulator& emulator() { return emulator_; }
  DeviceAllocator& device(DeviceIndex d) { return *devices_[size_t(d)]; }
  void check_device(DeviceIndex d) const;  // throws InvalidArgument naming the valid range

  // size 0 returns 0; size >= 1 EB throws OutOfMemory at once. `array_owned`: for a
  // DeviceArray, whose death (free with by_array) is then the block's only free.
  uintptr_t malloc(DeviceIndex device, size_t size, StreamId stream, const FramesPtr& frames = kNoFrames,
                   bool array_owned = false) {
    if (size == 0) return 0;
    if (size >= kOneExaByte) throw_exabyte();
    return devices_[size_t(device)]->malloc(size, stream, frames, array_owned);
  }
  // Throws InvalidState("invalid device pointer: ...") for unknown pointers, and for a live
  // DeviceArray's block unless `by_array`; 0 is a no-op.
  void free(uintptr_t ptr, const FramesPtr& frames = kNoFrames, bool by_array = false) {
    if (ptr == 0) return;
    for (size_t d = 0; d < device_ranges_.size(); ++d)  // fast path: the device whose range holds ptr
      if (in_device_range(d, ptr)) {
        if (devices_[d]->free(ptr, frames, by_array)) return;
        break;
      }
    free_elsewhere(ptr, frames, by_array);
  }
  // The device whose allocator owns allocated block `ptr`, or -1.
  DeviceIndex device_of(uintptr_t ptr);

  void empty_cache(MempoolId pool = MempoolId{}, const FramesPtr& frames = kNoFrames);
  void set_config(const std::string& conf);  // throws; keeps the old config on error
  const AllocatorConfig& config() const { return config_; }

  MempoolId new_user_pool_id() { return MempoolId{0, next_user_pool_.fetch_add(1)}; }
  MempoolId new_graph_pool_id() { return MempoolId{next_graph_pool_.fetch_add(1), 0}; }

  void shutdown() { emulator_.shutdown(); }

  // History on every device (DeviceAllocator::set_history), and the process-wide level
  // it leaves: `context` while enabled, kNever otherwise. Callers read the level before a
  // malloc or free to decide whether to capture the caller's stack (kState and up: for
  // mallocs; kAll: for frees and empty_cache too). Set under the binding's GIL; read
  // without any lock (a stale level only means one stack more or less).
  void set_history(bool enabled, RecordContext context, size_t max_entries, bool clear, uint32_t skip_mask = 0);
  // The streamed history (history_stream.h): start opens `path` (returns "" or the error,
  // "cannot write PATH: reason"); stop detaches the stream, waits for calls still
  // recording into it, writes and closes the file, and returns the error that stopped it
  // (or ""). Starting while a stream is open stops that one first.
  std::string start_history_stream(const std::string& path, const std::string& header_json);
  std::string stop_history_stream();
  RecordContext record_level() const { return record_level_.load(std::memory_order_relaxed); }

 private:
  [[noreturn]] static void throw_exabyte();
  void free_elsewhere(uintptr_t ptr, const FramesPtr& frames, bool by_array);  // expandable or pluggable memory
  bool in_device_range(size_t d, uintptr_t ptr) const {
    return ptr - device_ranges_[d].base < device_ranges_[d].size;
  }
  struct Range {
    uintptr_t base;
    size_t size;
  };
  // The settings last parsed (the devices hold copies, see set_config): written under
  // config_mu_; the binding reads them under the GIL, which every writer holds too.
  AllocatorConfig config_;
  std::mutex config_mu_;
  uint64_t config_version_ = 0;  // bumped by each set_config, under config_mu_
  Emulator emulator_;
  std::vector<std::unique_ptr<DeviceAllocator>> devices_;
  std::vector<Range> device_ranges_;  // each device's memory range, for free()'s dispatch
  std::atomic<uint64_t> next_user_pool_{1}, next_graph_pool_{1};
  std::atomic<RecordContext> record_level_{RecordContext::kNever};
};

}  // namespace mtia
