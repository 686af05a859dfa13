# _C_bench.pxi, part of _C.pyx (included; one extension module): the native benchmark
# loops. The loops and their argument checks are the core's (src_cpp/bench_loops.cpp,
# replay.cpp); each function here initialises the allocator if the loop needs it,
# converts, and forwards (the loop runs without the GIL).


def replay(int device, const uint64_t[:] sizes, const unsigned int[:] slots, const unsigned int[:] streams,
           unsigned int nslots, list stream_ids, cbool latency=False, size_t prefix=0):
    """Replays a parsed trace natively (size 0 = free). The first `prefix` events run
    untimed, before the stats reset (replay.h). Returns a dict of figures."""
    cdef vector[ReplayEvent] ev
    cdef ReplayEvent e
    cdef vector[int64_t] sids
    cdef ReplayResult r
    cdef Py_ssize_t i, n = sizes.shape[0]
    _ensure_init()
    ev.reserve(n)
    for i in range(n):
        e.size = sizes[i]
        e.slot = slots[i]
        e.stream = streams[i]
        ev.push_back(e)
    for s in stream_ids:
        sids.push_back(s)
    cdef Allocator* a = _allocator()
    with nogil:
        r = replay_checked(a[0], device, ev, nslots, sids, latency, prefix)
    out = {
        "events": r.events, "total_ns": r.total_ns,
        "ns_per_op": r.total_ns / r.events if r.events else 0.0,
        "thread_cpu_ns_per_op": r.cpu_ns / r.events if r.events else 0.0,
        "peak_requested_bytes": r.peak_requested, "peak_allocated_bytes": r.peak_allocated,
        "peak_reserved_bytes": r.peak_reserved, "num_device_alloc": r.num_device_alloc,
        "num_device_free": r.num_device_free, "num_alloc_retries": r.num_alloc_retries,
        "num_ooms": r.num_ooms, "first_failing_event": r.first_failure, "skipped_frees": r.skipped,
    }
    if latency:
        out["alloc_latency_ns"] = list(r.alloc_latency_ns)
        out["free_latency_ns"] = list(r.free_latency_ns)
    return out


def native_pair(int device, size_t size, uint64_t n):
    """(wall ns, CPU ns) per malloc+free pair in a native loop."""
    cdef pair[double, double] r
    _ensure_init()
    cdef Allocator* a = _allocator()
    with nogil:
        r = native_pair_ns(a[0], device, size, n)
    return r.first, r.second


def glibc_pair(size_t size, uint64_t n):
    cdef pair[double, double] r
    with nogil:
        r = glibc_pair_ns(size, n)
    return r.first, r.second


def threaded_pairs(int threads, size_t size, uint64_t n):
    """Pairs per second of `threads` threads (thread t on device t % devices), n pairs each."""
    cdef double rate
    _ensure_init()
    cdef Allocator* a = _allocator()
    with nogil:
        rate = threaded_pairs_per_second(a[0], threads, size, n)
    return rate


def threaded_compute(int threads, uint64_t n):
    """Rounds per second of `threads` threads of busy integer work sharing nothing: how
    far this host lets threads scale at all (threaded_pairs' yardstick)."""
    cdef double rate
    with nogil:
        rate = threaded_compute_per_second(threads, n)
    return rate


def cached_blocks_pair(int device, size_t cached, uint64_t pairs, uint64_t seed=1):
    """CPU ns per malloc+free pair with `cached` free blocks in the cache."""
    cdef double ns
    _ensure_init()
    cdef Allocator* a = _allocator()
    with nogil:
        ns = cached_blocks_pair_checked(a[0], device, cached, pairs, seed)
    return ns
