// allocator.cpp: process-wide dispatch over the per-device allocators, and the history
// record level they share. Relies on device_allocator.h and emulated_device.h.
#include "allocator.h"
#include "history_stream.h"

#include "errors.h"

namespace mtia {

Allocator::Allocator(int device_count, size_t memory_per_device, const std::string& conf,
                     std::shared_ptr<RawAllocator> raw)
    : emulator_(device_count, memory_per_device) {
  config_.parse(conf);
  if (!raw) raw = std::make_shared<DeviceRawAllocator>(&emulator_);
  for (int d = 0; d < device_count; ++d) {
    devices_.push_back(std::make_unique<DeviceAllocator>(d, &emulator_, raw, config_));
    DeviceMemory& mem = emulator_.device(d).memory();
    device_ranges_.push_back(Range{mem.base(), mem.span()});
  }
}

Allocator::~Allocator() {
  stop_history_stream();
  emulator_.shutdown();
  devices_.clear();
}

void Allocator::check_device(DeviceIndex d) const {
  if (d < 0 || d >= device_count())
    throw InvalidArgument("Invalid device argument " + std::to_string(d) + ": the device index must be in [0, " +
                          std::to_string(device_count() - 1) + "]");
}

void Allocator::throw_exabyte() {
  OutOfMemory oom("MTIA out of memory. Tried to allocate more than 1EB memory.");
  throw oom;
}

DeviceIndex Allocator::device_of(uintptr_t ptr) {
  for (int d = 0; d < device_count(); ++d)
    if (in_device_range(size_t(d), ptr) && devices_[size_t(d)]->owns(ptr)) return d;
  for (int d = 0; d < device_count(); ++d)  // memory from a pluggable allocator lies anywhere
    if (devices_[size_t(d)]->owns(ptr)) return d;
  return -1;
}

void Allocator::free_elsewhere(uintptr_t ptr, const FramesPtr& frames, bool by_array) {
  for (int d = 0; d < device_count(); ++d)
    if (!in_device_range(size_t(d), ptr) && devices_[size_t(d)]->free(ptr, frames, by_array)) return;
  char buf[64];
  snprintf(buf, sizeof buf, "%p", reinterpret_cast<void*>(ptr));
  throw InvalidState(std::string("invalid device pointer: ") + buf);
}

void Allocator::empty_cache(MempoolId pool, const FramesPtr& frames) {
  for (auto& d : devices_) d->empty_cache(pool, frames);
}

// Parsed here, then handed to each device under its lock, one device at a time. A wait
// for a device's lock lets go of the GIL, so another set_config may run meanwhile: each
// hands out its own copy with its version, and a device keeps the newest it was given.
void Allocator::set_config(const std::string& conf) {
  AllocatorConfig next;
  uint64_t version;
  {
    std::lock_guard<std::mutex> guard(config_mu_);
    next = config_;
    next.parse(conf);  // throws, leaving everything as it was
    config_ = next;
    version = ++config_version_;
  }
  for (auto& d : devices_) d->set_config(next, version);
}

void Allocator::set_history(bool enabled, RecordContext context, size_t max_entries, bool clear,
                            uint32_t skip_mask) {
  for (auto& d : devices_) d->set_history(enabled, context, max_entries, clear, skip_mask);
  record_level_.store(enabled ? context : RecordContext::kNever, std::memory_order_relaxed);
}

std::string Allocator::start_history_stream(const std::string& path, const std::string& header_json) {
  stop_history_stream();
  std::string error;
  // The writer pulls the records the devices' rings hold back (it runs until
  // stop_history_stream, which runs before the devices go).
  std::shared_ptr<HistoryStream> s = HistoryStream::open(
      path, header_json,
      [this] {
        for (auto& d : devices_) d->flush_history_stream();
      },
      &error);
  if (!s) return error;
  // Every metadata string so far, before any event can name one.
  std::vector<std::string> meta = MetadataTable::get().all();
  for (size_t i = 1; i < meta.size(); ++i) s->define_metadata(uint32_t(i), meta[i]);
  HistoryStream* const stream = s.get();
  HistoryStream::exchange(std::move(s));
  for (auto& d : devices_) d->attach_history_stream(stream);
  return "";
}

std::string Allocator::stop_history_stream() {
  std::shared_ptr<HistoryStream> s = HistoryStream::exchange(nullptr);
  if (!s) return "";
  for (auto& d : devices_) d->attach_history_stream(nullptr);  // their last records go out first
  std::string error = s->close();
  if (s->inherited()) new std::shared_ptr<HistoryStream>(std::move(s));  // never destroyed in a forked child
  return error;
}

}  // namespace mtia
