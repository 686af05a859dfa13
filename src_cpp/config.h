// config.h: AllocatorConfig, the one table of allocator options, parsed from a
// PYTORCH_CUDA_ALLOC_CONF-style string (`MTIA_ALLOC_CONF`) with PyTorch's keys,
// syntax (`key:value,key:[k:v,>:v]`) and error messages.
// Relies on: nothing (the parser throws the errors of errors.h).
#pragma once
#include <array>
#include <cstdint>
#include <limits>
#include <string>

namespace mtia {

struct AllocatorConfig {
  static constexpr size_t kUnlimited = std::numeric_limits<size_t>::max();
  static constexpr int kRoundupIntervals = 16;

  size_t max_split_size = kUnlimited;                 // M; "unlimited" shows as -1
  size_t max_non_split_rounding_size = 20971520;      // R
  std::array<size_t, kRoundupIntervals> roundup_power2_divisions{};  // 0 = plain 512 rounding
  bool any_roundup_divisions = false;  // some entry > 1 (else rounding skips the table)
  double garbage_collection_threshold = 0.0;          // 0 = off
  bool expandable_segments = false;
  bool release_lock_on_cudamalloc = false;
  bool graph_capture_record_stream_reuse = false;
  double per_process_memory_fraction = 1.0;           // initial fraction for new devices
  std::string last_settings;                          // the raw string last parsed

  // Parses `conf` on top of the current values (PyTorch resets max_split_size,
  // roundup_power2_divisions and garbage_collection_threshold on every parse).
  // Throws InvalidArgument (bad boolean) or InvalidState (everything else) and
  // leaves *this unchanged on error.
  void parse(const std::string& conf);

  size_t roundup_power2_divisions_for(size_t size) const {
    int log2 = 63 - __builtin_clzll(size | 1);
    int index = log2 - 20;
    if (index < 0) index = 0;
    if (index >= kRoundupIntervals) index = kRoundupIntervals - 1;
    return roundup_power2_divisions[index];
  }
};

}  // namespace mtia
