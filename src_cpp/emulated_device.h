// emulated_device.h: the emulated MTIA devices under the allocator.
//
// Contract (what the allocator relies on):
//  - DeviceMemory::malloc(n) returns n bytes at the lowest free address that fits (first
//    fit, address-ordered; freed ranges coalesce), or nullptr when the device is out of
//    memory (capacity exhausted or an injected fault). It never throws for OOM, so "out of
//    memory" is distinct from every other error (those throw).
//  - Memory is one anonymous MAP_NORESERVE mapping per device: a 16 GiB device costs
//    nothing until touched; freed ranges are given back to the OS (MADV_DONTNEED).
//  - Like a real device, whose runtime context takes some memory before the first
//    allocation, a device may keep the top of its range for its "runtime"
//    (reserve_for_runtime): it counts as used, so mem_get_info's free < total from the start.
//  - Streams are created once and live until shutdown(); id 0 is each device's default
//    stream; new ids come from one process-wide counter starting at 1.
// Relies on: stream.h and types.h.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "stream.h"
#include "types.h"

namespace mtia {

class DeviceMemory {
 public:
  DeviceMemory(DeviceIndex device, size_t capacity);
  ~DeviceMemory();
  void* malloc(size_t size);  // nullptr = out of memory
  void free(void* ptr, size_t size);
  // Expandable segments: address space reserved outside the device range (no memory),
  // then pages mapped into it and charged against the capacity like a malloc.
  void* reserve_range(size_t size);
  void release_range(void* ptr, size_t size);
  bool map_pages(void* ptr, size_t size);  // false = out of memory (or an injected fault)
  void unmap_pages(void* ptr, size_t size);
  size_t capacity() const { return capacity_; }
  uintptr_t base() const { return base_; }
  size_t span() const { return span_; }  // the address range: [base, base + span)
  size_t used() const;
  // Keeps the top `bytes` of the range as used by the runtime; only before any allocation.
  void reserve_for_runtime(size_t bytes);
  size_t runtime_reserved() const { return runtime_reserved_; }
  // Fault injection: after `after_n` more successful allocations the next one fails;
  // then (if every > 0) every `every`-th allocation fails. after_n < 0 turns it off.
  void fail_allocations(int64_t after_n, int64_t every);
  uint64_t malloc_calls() const { return malloc_calls_; }
  uint64_t free_calls() const { return free_calls_; }

 private:
  bool inject_failure();  // caller holds mu_
  DeviceIndex device_;
  size_t capacity_;  // bytes that can be in use at once
  // Addresses: twice the capacity, as the peer harness's fake cudaMalloc has, so that only
  // bytes run out, never contiguous addresses (a real cudaMalloc is not limited by the
  // fragmentation of physical memory either). Placement stays first fit, lowest address.
  size_t span_;
  uintptr_t base_ = 0;
  mutable std::mutex mu_;                 // guards everything below
  std::map<uintptr_t, size_t> free_;      // offset -> length, address-ordered, coalesced
  size_t used_ = 0;
  size_t runtime_reserved_ = 0;
  int64_t fail_countdown_ = -1, fail_every_ = 0;
  uint64_t malloc_calls_ = 0, free_calls_ = 0;
};

class EmulatedDevice {
 public:
  EmulatedDevice(DeviceIndex index, size_t capacity);
  DeviceIndex index() const { return index_; }
  DeviceMemory& memory() { return memory_; }
  Stream* default_stream() { return default_stream_; }
  Stream* stream(StreamId id);  // nullptr if unknown
  Stream* new_stream(StreamId id, int priority);
  std::vector<Stream*> streams();
  void synchronize();  // waits for every stream of the device
  void begin_shutdown();   // see Stream::begin_shutdown
  void finish_shutdown();

 private:
  DeviceIndex index_;
  DeviceMemory memory_;
  std::mutex mu_;  // guards streams_
  std::unordered_map<StreamId, std::unique_ptr<Stream>> streams_;
  Stream* default_stream_;
};

// Parses "16GiB", "512MiB", "1.5G", "4096" (bytes). Throws InvalidArgument naming `what`.
size_t parse_memory_size(const std::string& text, const std::string& what);

class Emulator {
 public:
  Emulator(int device_count, size_t memory_per_device);
  ~Emulator() { shutdown(); }
  int device_count() const { return int(devices_.size()); }
  EmulatedDevice& device(DeviceIndex d) { return *devices_.at(size_t(d)); }
  Stream* new_stream(DeviceIndex d, int priority);
  // The stream with this id on device d; throws InvalidArgument if there is none.
  Stream* stream(DeviceIndex d, StreamId id);
  void shutdown();

 private:
  std::vector<std::unique_ptr<EmulatedDevice>> devices_;
  std::atomic<StreamId> next_stream_id_{1};
  std::atomic<bool> shut_down_{false};
};

}  // namespace mtia
