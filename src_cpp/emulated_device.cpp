// emulated_device.cpp: host-memory devices with a capacity, first-fit placement, streams.
// Relies on: emulated_device.h, stream.h, errors.h.
#include "emulated_device.h"

#include <sys/mman.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>

#include "errors.h"

namespace mtia {

DeviceMemory::DeviceMemory(DeviceIndex device, size_t capacity)
    : device_(device), capacity_(capacity), span_(2 * capacity) {
  if (capacity == 0) throw InvalidArgument("device memory capacity must be positive");
  void* p = mmap(nullptr, span_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED)
    throw InvalidState("could not reserve " + std::to_string(span_) + " bytes of address space for device " +
                       std::to_string(device));
  base_ = reinterpret_cast<uintptr_t>(p);
  free_.emplace(0, span_);
}

DeviceMemory::~DeviceMemory() { munmap(reinterpret_cast<void*>(base_), span_); }

size_t DeviceMemory::used() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

void DeviceMemory::reserve_for_runtime(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (used_ != 0 || runtime_reserved_ != 0)
    throw InvalidState("the runtime reservation is made before the device's first allocation");
  if (bytes >= capacity_)
    throw InvalidArgument("a runtime reservation of " + std::to_string(bytes) + " bytes leaves nothing of a " +
                          std::to_string(capacity_) + "-byte device");
  if (bytes == 0) return;
  free_.begin()->second -= bytes;  // the one free range [0, span) loses its top
  used_ = runtime_reserved_ = bytes;
}

void DeviceMemory::fail_allocations(int64_t after_n, int64_t every) {
  std::lock_guard<std::mutex> lock(mu_);
  fail_countdown_ = after_n;
  fail_every_ = every > 0 ? every : 0;
}

bool DeviceMemory::inject_failure() {
  if (fail_countdown_ < 0) return false;
  if (fail_countdown_ > 0) {
    --fail_countdown_;
    return false;
  }
  fail_countdown_ = fail_every_ > 0 ? fail_every_ - 1 : -1;
  return true;
}

void* DeviceMemory::malloc(size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  ++malloc_calls_;
  if (size == 0 || size > capacity_ - used_ || inject_failure()) return nullptr;
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < size) continue;
    uintptr_t off = it->first;
    size_t rest = it->second - size;
    free_.erase(it);
    if (rest) free_.emplace(off + size, rest);
    used_ += size;
    return reinterpret_cast<void*>(base_ + off);
  }
  return nullptr;  // unreachable while the span is twice the capacity
}

void DeviceMemory::free(void* ptr, size_t size) {
  uintptr_t off = reinterpret_cast<uintptr_t>(ptr) - base_;
  madvise(ptr, size, MADV_DONTNEED);  // give touched pages back to the host
  std::lock_guard<std::mutex> lock(mu_);
  ++free_calls_;
  used_ -= size;
  auto next = free_.lower_bound(off);
  if (next != free_.end() && off + size == next->first) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      prev->second += size;
      return;
    }
  }
  free_.emplace(off, size);
}

void* DeviceMemory::reserve_range(size_t size) {
  void* p = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

void DeviceMemory::release_range(void* ptr, size_t size) { munmap(ptr, size); }

bool DeviceMemory::map_pages(void* ptr, size_t size) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++malloc_calls_;
    if (size > capacity_ - used_ || inject_failure()) return false;
    used_ += size;
  }
  if (mprotect(ptr, size, PROT_READ | PROT_WRITE) != 0) {
    std::lock_guard<std::mutex> lock(mu_);
    used_ -= size;
    return false;
  }
  return true;
}

void DeviceMemory::unmap_pages(void* ptr, size_t size) {
  madvise(ptr, size, MADV_DONTNEED);
  mprotect(ptr, size, PROT_NONE);
  std::lock_guard<std::mutex> lock(mu_);
  ++free_calls_;
  used_ -= size;
}

EmulatedDevice::EmulatedDevice(DeviceIndex index, size_t capacity) : index_(index), memory_(index, capacity) {
  auto s = std::make_unique<Stream>(index, 0, 0);
  default_stream_ = s.get();
  streams_.emplace(0, std::move(s));
}

Stream* EmulatedDevice::stream(StreamId id) {
  if (id == 0) return default_stream_;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = streams_.find(id);
  return it == streams_.end() ? nullptr : it->second.get();
}

Stream* EmulatedDevice::new_stream(StreamId id, int priority) {
  auto s = std::make_unique<Stream>(index_, id, priority);
  Stream* raw = s.get();
  std::lock_guard<std::mutex> lock(mu_);
  streams_.emplace(id, std::move(s));
  return raw;
}

std::vector<Stream*> EmulatedDevice::streams() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Stream*> out;
  for (auto& [id, s] : streams_) out.push_back(s.get());
  return out;
}

void EmulatedDevice::synchronize() {
  std::vector<Stream*> all = streams();
  // From a kernel of this device its own stream comes first, so the wait for itself is
  // refused at once instead of after waiting for streams that may be waiting for it.
  std::stable_partition(all.begin(), all.end(), [](Stream* s) { return s->is_current_worker(); });
  for (Stream* s : all) s->synchronize();
}

void EmulatedDevice::begin_shutdown() {
  for (Stream* s : streams()) s->begin_shutdown();
}

void EmulatedDevice::finish_shutdown() {
  for (Stream* s : streams()) s->finish_shutdown();
}

size_t parse_memory_size(const std::string& text, const std::string& what) {
  std::string t;
  for (char c : text)
    if (!std::isspace(static_cast<unsigned char>(c))) t += c;
  char* end = nullptr;
  double v = std::strtod(t.c_str(), &end);
  std::string unit = end ? std::string(end) : std::string();
  for (auto& c : unit) c = char(std::tolower(static_cast<unsigned char>(c)));
  double mult = 0;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "kb" || unit == "kib") mult = 1024.0;
  else if (unit == "m" || unit == "mb" || unit == "mib") mult = 1024.0 * 1024;
  else if (unit == "g" || unit == "gb" || unit == "gib") mult = 1024.0 * 1024 * 1024;
  else if (unit == "t" || unit == "tb" || unit == "tib") mult = 1024.0 * 1024 * 1024 * 1024;
  if (t.empty() || end == t.c_str() || mult == 0 || !std::isfinite(v))
    throw InvalidArgument(what + ": cannot parse '" + text +
                          "' as a memory size; expected a positive number with an optional unit "
                          "(B, KiB, MiB, GiB, TiB), e.g. 512MiB or 16GiB, at most 64TiB");
  if (v <= 0 || v * mult > 64.0 * (1ull << 40))
    throw InvalidArgument(what + ": '" + text + "' is out of range: a device holds more than 0 bytes and at most 64TiB");
  return size_t(v * mult) & ~size_t(4095);  // whole pages (callers require at least 1 MiB)
}

Emulator::Emulator(int device_count, size_t memory_per_device) {
  if (device_count < 1 || device_count > 64)
    throw InvalidArgument("device count must be between 1 and 64, got " + std::to_string(device_count));
  if (memory_per_device < (size_t(1) << 20))
    throw InvalidArgument("memory per device must be at least 1 MiB, got " + std::to_string(memory_per_device));
  for (int d = 0; d < device_count; ++d) devices_.push_back(std::make_unique<EmulatedDevice>(d, memory_per_device));
}

Stream* Emulator::new_stream(DeviceIndex d, int priority) {
  return device(d).new_stream(next_stream_id_.fetch_add(1), priority);
}

Stream* Emulator::stream(DeviceIndex d, StreamId id) {
  Stream* s = device(d).stream(id);
  if (!s)
    throw InvalidArgument("unknown stream " + std::to_string(id) + " on device " + std::to_string(d));
  return s;
}

void Emulator::shutdown() {
  if (shut_down_.exchange(true)) return;
  // Every stream stops before any worker is joined, so no task is left waiting for a
  // stream that has not been told to stop yet.
  for (auto& d : devices_) d->begin_shutdown();
  for (auto& d : devices_) d->finish_shutdown();
}

}  // namespace mtia
