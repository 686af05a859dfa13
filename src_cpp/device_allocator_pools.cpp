// device_allocator_pools.cpp: private pools (MemPool, graph pools) and allocation
// routing (pools_graphs_streams_api.md §1-§2): creating and releasing pools, the routing
// contexts that send a thread's or a capture's mallocs to a pool
// (begin/end_allocate_to_pool, set_stream_capture), use_on_oom and no_split, and the
// checker of the pools' invariants.
//
// Relies on: private_pool.h. choose_pool and try_use_on_oom_pools, which read what is set
// here, are steps of the malloc ladder and stay in device_allocator.cpp; releasing a
// pool's memory is release_cached_blocks' (device_allocator_release.cpp).
#include <algorithm>
#include <string>

#include "device_allocator.h"
#include "device_allocator_internal.h"
#include "errors.h"

namespace mtia {

void DeviceAllocator::create_or_incref_pool(MempoolId id, std::shared_ptr<RawAllocator> allocator) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (id.is_default()) throw InvalidArgument("the default pool (0, 0) is not a private pool");
  PrivatePool* p = find_pool(id);
  if (!p) {
    pools_.emplace(id, std::make_unique<PrivatePool>(id, std::move(allocator), &arena_));
    return;
  }
  if (p->use_count <= 0)
    throw InvalidState("mempool (" + std::to_string(id.first) + ", " + std::to_string(id.second) +
                       ") was released and cannot be used again");
  if (allocator) throw InvalidArgument("an allocator can only be given when a pool is created");
  p->use_count += 1;
}

void DeviceAllocator::release_pool(MempoolId id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  PrivatePool* p = find_pool(id);
  if (!p || p->use_count <= 0)
    throw InvalidState("releasePool: mempool (" + std::to_string(id.first) + ", " + std::to_string(id.second) +
                       ") is not in use");
  p->use_count -= 1;
  if (p->use_count == 0) {
    use_on_oom_pools_.erase(std::remove(use_on_oom_pools_.begin(), use_on_oom_pools_.end(), id),
                            use_on_oom_pools_.end());
  }
}

int DeviceAllocator::pool_use_count(MempoolId id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  PrivatePool* p = find_pool(id);
  return p ? p->use_count : 0;
}

void DeviceAllocator::begin_allocate_to_pool(MempoolId id, AllocationFilter filter) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (!find_pool(id)) throw InvalidState("beginAllocateToPool: unknown mempool_id");
  for (auto& [cid, f] : captures_underway_)
    if (cid == id) throw InvalidState("beginAllocateToPool: already recording to mempool_id");
  captures_underway_.emplace_back(id, filter);
  update_plain();
}

void DeviceAllocator::end_allocate_to_pool(MempoolId id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  for (auto it = captures_underway_.begin(); it != captures_underway_.end(); ++it) {
    if (it->first == id) {
      captures_underway_.erase(it);
      update_plain();
      return;
    }
  }
  throw InvalidState("endAllocatePool: not currently recording to mempool_id");
}

void DeviceAllocator::set_use_on_oom(MempoolId id, bool on) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  auto it = std::find(use_on_oom_pools_.begin(), use_on_oom_pools_.end(), id);
  if (on && it == use_on_oom_pools_.end()) use_on_oom_pools_.push_back(id);
  if (!on && it != use_on_oom_pools_.end()) use_on_oom_pools_.erase(it);
}

void DeviceAllocator::set_no_split(MempoolId id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  if (PrivatePool* p = find_pool(id)) p->no_split = true;
}

void DeviceAllocator::set_stream_capture(StreamId stream, uint64_t capture_id) {
  lock();
  Lock lock(mu_, std::adopt_lock);
  stream_capture_.erase(std::remove_if(stream_capture_.begin(), stream_capture_.end(),
                                       [&](auto& e) { return e.first == stream; }),
                        stream_capture_.end());
  if (capture_id) stream_capture_.emplace_back(stream, capture_id);
}

bool DeviceAllocator::any_capture_underway() {
  lock();
  Lock lock(mu_, std::adopt_lock);
  return !captures_underway_.empty();
}

// ---------------------------------------------------------------- invariants of the above

// Private pools own their segments' count, and outlive them:
//   ∀ p ∈ pools_: p.segment_count == #{seg ∈ segments_ : seg.pool.owner == p} ∧ p.use_count ≥ 0
//   ∀ seg ∈ segments_: seg.pool.owner == null ∨ pools_[seg.pool.owner.id] == seg.pool.owner
void DeviceAllocator::check_private_pools(InvariantReport& report) {
  std::unordered_map<const PrivatePool*, int64_t> segments_of;
  for (Segment* seg : segments_) {
    PrivatePool* owner = seg->pool->owner;
    if (!owner) continue;
    if (find_pool(owner->id) != owner) report.fail("a segment belongs to a private pool that is gone");
    else segments_of[owner] += 1;
  }
  for (auto& [id, p] : pools_) {
    auto it = segments_of.find(p.get());
    const int64_t counted = it == segments_of.end() ? 0 : it->second;
    if (p->segment_count != counted)
      report.fail("mempool (" + std::to_string(id.first) + ", " + std::to_string(id.second) + ") segment_count is " +
                  std::to_string(p->segment_count) + ", recount gives " + std::to_string(counted));
    if (p->use_count < 0) report.fail("a private pool's use count is negative");
  }
}

}  // namespace mtia
