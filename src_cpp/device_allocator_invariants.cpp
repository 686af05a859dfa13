// device_allocator_invariants.cpp: check_invariants(), the debugging entry point that
// tests and the stress drivers call after every step. It owns no invariant itself: each
// checker sits next to the code whose invariants it states (as a formula in its comment),
// and this runs them all under the device lock and joins their failures.
//
// Relies on: the checkers in device_allocator.cpp (segment tiling, block states, spare
// blocks, the plain_ flag), device_allocator_expandable.cpp (unmapped ranges),
// device_allocator_pools.cpp (private pools) and device_allocator_stats.cpp (the stats
// recount); InvariantReport (device_allocator_internal.h).
#include "device_allocator.h"
#include "device_allocator_internal.h"

namespace mtia {

std::string DeviceAllocator::check_invariants() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  InvariantReport report(device_);
  check_segment_tiling(report);
  check_block_states(report);
  check_expandable(report);
  check_spare_blocks(report);
  check_plain_flag(report);
  check_private_pools(report);
  check_stats(report);
  return report.str();
}

}  // namespace mtia
