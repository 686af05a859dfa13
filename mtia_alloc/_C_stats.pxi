# _C_stats.pxi, part of _C.pyx (included; one extension module): stats, limits, the
# allocator config and empty_cache. Forwarding and conversion to dicts only.

cdef dict _stat(Stat& s):
    return {"current": s.current, "peak": s.peak, "allocated": s.allocated, "freed": s.freed}


cdef dict _stat_array(StatArray& a):
    return {"all": _stat(a[0]), "small_pool": _stat(a[1]), "large_pool": _stat(a[2])}


def memory_stats_nested(int device):
    cdef DeviceStats st = _allocator().device(device).stats()
    return {
        "active": _stat_array(st.active),
        "active_bytes": _stat_array(st.active_bytes),
        "allocated_bytes": _stat_array(st.allocated_bytes),
        "allocation": _stat_array(st.allocation),
        "inactive_split": _stat_array(st.inactive_split),
        "inactive_split_bytes": _stat_array(st.inactive_split_bytes),
        "requested_bytes": _stat_array(st.requested_bytes),
        "reserved_bytes": _stat_array(st.reserved_bytes),
        "segment": _stat_array(st.segment),
        "oversize_allocations": _stat(st.oversize_allocations),
        "oversize_segments": _stat(st.oversize_segments),
        "max_split_size": st.max_split_size,
        "num_alloc_retries": st.num_alloc_retries,
        "num_device_alloc": st.num_device_alloc,
        "num_device_free": st.num_device_free,
        "num_ooms": st.num_ooms,
        "num_sync_all_streams": st.num_sync_all_streams,
    }


def largest_free_blocks(int device):
    cdef pair[size_t, size_t] p = _allocator().device(device).largest_free_blocks()
    return p.first, p.second


def reset_peak_memory_stats(int device):
    _allocator().device(device).reset_peak_stats()


def reset_accumulated_memory_stats(int device):
    _allocator().device(device).reset_accumulated_stats()


def empty_cache(pool=None):
    cdef MempoolId pid = make_pool_id(0, 0)
    cdef FramesPtr frames
    if _alloc == NULL:
        return
    if pool is not None:
        pid = make_pool_id(pool[0], pool[1])
    if _record_level() >= 3:  # context "all": segment frees carry this call's stack
        frames = _capture_frames()
    with nogil:
        _alloc.empty_cache(pid, frames)


def empty_cache_device(int device, pool):
    cdef MempoolId pid = make_pool_id(pool[0], pool[1])
    cdef FramesPtr frames
    if _record_level() >= 3:
        frames = _capture_frames()
    cdef Allocator* a = _allocator()
    with nogil:
        a.device(device).empty_cache(pid, frames)


def set_memory_fraction(double fraction, int device):
    _allocator().device(device).set_memory_fraction(fraction)


def get_memory_fraction(int device):
    return _allocator().device(device).memory_fraction()


def mem_get_info(int device):
    cdef DeviceMemory* m = &_allocator().emulator().device(device).memory()
    return m.capacity() - m.used(), m.capacity()


def device_memory_counters(int device):
    cdef DeviceMemory* m = &_allocator().emulator().device(device).memory()
    return {"used": m.used(), "capacity": m.capacity(), "malloc_calls": m.malloc_calls(),
            "free_calls": m.free_calls(), "runtime_reserved": m.runtime_reserved()}


def fail_device_allocations(int device, int64_t after_n, int64_t every):
    _allocator().emulator().device(device).memory().fail_allocations(after_n, every)


def check_invariants(int device):
    return _allocator().device(device).check_invariants().decode()


def set_config(str conf):
    _allocator().set_config(conf.encode())


def round_size_(size_t size):
    return round_size(size, _allocator().config())


def format_size_(uint64_t size):
    return format_size(size).decode()


def allocator_settings():
    cdef const AllocatorConfig* c = &_allocator().config()
    return {
        "PYTORCH_CUDA_ALLOC_CONF": c.last_settings.decode(),
        "max_split_size": -1 if c.max_split_size == <size_t>-1 else <int64_t>c.max_split_size,
        "garbage_collection_threshold": c.garbage_collection_threshold,
        "expandable_segments": c.expandable_segments,
        "pinned_num_register_threads": 1,
        "release_lock_on_cudamalloc": c.release_lock_on_cudamalloc,
        "pinned_use_cuda_host_register": False,
        "graph_capture_record_stream_reuse": c.graph_capture_record_stream_reuse,
        "roundup_power2_divisions": {str(1 << i): <int64_t>c.roundup_power2_divisions[i] for i in range(16)},
    }
