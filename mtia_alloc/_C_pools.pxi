# _C_pools.pxi, part of _C.pyx (included; one extension module): private pools and
# allocation routing (MemPool, graph pools, use_mem_pool, captures).

def new_user_pool_id():
    _ensure_init()
    cdef MempoolId i = _allocator().new_user_pool_id()
    return (i.first, i.second)


def new_graph_pool_id():
    _ensure_init()
    cdef MempoolId i = _allocator().new_graph_pool_id()
    return (i.first, i.second)


def create_or_incref_pool(int device, tuple pool, raw=None):
    cdef shared_ptr[RawAllocator] r
    if raw is not None:
        r = _make_raw(raw)
    _allocator().device(device).create_or_incref_pool(make_pool_id(pool[0], pool[1]), r)


def release_pool(int device, tuple pool):
    _allocator().device(device).release_pool(make_pool_id(pool[0], pool[1]))


def pool_use_count(int device, tuple pool):
    return _allocator().device(device).pool_use_count(make_pool_id(pool[0], pool[1]))


def begin_allocate_to_pool(int device, tuple pool, int kind, uint64_t capture_id=0):
    _allocator().device(device).begin_allocate_to_pool(make_pool_id(pool[0], pool[1]), make_filter(kind, capture_id))


def end_allocate_to_pool(int device, tuple pool):
    _allocator().device(device).end_allocate_to_pool(make_pool_id(pool[0], pool[1]))


def set_use_on_oom(int device, tuple pool, cbool on):
    _allocator().device(device).set_use_on_oom(make_pool_id(pool[0], pool[1]), on)


def set_no_split(int device, tuple pool):
    _allocator().device(device).set_no_split(make_pool_id(pool[0], pool[1]))


def set_stream_capture(int device, int64_t sid, uint64_t capture_id):
    _allocator().device(device).set_stream_capture(sid, capture_id)
