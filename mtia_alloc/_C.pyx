# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""_C: the thin binding over the C++ core (src_cpp/). Forwarding and type conversion
only; argument policy lives in the Python façade. The hot calls
(caching_allocator_alloc/delete) resolve the current device and stream here, in C."""
import sys

cimport cython

from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libcpp cimport bool as cbool
from libcpp.memory cimport shared_ptr
from libcpp.string cimport string
from libcpp.utility cimport pair
from libcpp.vector cimport vector

from mtia_alloc._C cimport *


cdef extern from "replay.h" namespace "mtia":
    cdef cppclass ReplayEvent:
        uint64_t size
        unsigned int slot
        unsigned int stream
    cdef cppclass ReplayResult:
        uint64_t events, total_ns, cpu_ns
        int64_t peak_requested, peak_allocated, peak_reserved
        int64_t num_device_alloc, num_device_free, num_alloc_retries, num_ooms
        int64_t first_failure
        uint64_t skipped, leftover_freed
        vector[unsigned int] alloc_latency_ns, free_latency_ns
    ReplayResult replay_trace(Allocator& a, int device, const vector[ReplayEvent]& events, unsigned int slots,
                              const vector[int64_t]& streams, cbool latency, size_t prefix) except + nogil
    pair[uint64_t, uint64_t] native_pair_loop(Allocator& a, int device, size_t size, uint64_t n) except + nogil
    pair[uint64_t, uint64_t] glibc_pair_loop(size_t size, uint64_t n) nogil
    uint64_t threaded_pair_loop(Allocator& a, int threads, size_t size, uint64_t n) except + nogil
    uint64_t threaded_compute_loop(int threads, uint64_t n) except + nogil
    double cached_blocks_pair_ns(Allocator& a, int device, size_t cached, uint64_t pairs, uint64_t seed) except + nogil


cdef extern from "_binding.h" namespace "mtia_binding":
    void raise_py_error()
    void set_oom_error_type(object t)
    void install_gil_hooks(unsigned long main_ident)
    void park_other_threads_at_exit()
    int tls_current_device "mtia_binding::current_device"()
    void tls_set_current_device "mtia_binding::set_current_device"(int d)
    int64_t tls_current_stream "mtia_binding::current_stream"(int d)
    void tls_set_current_stream "mtia_binding::set_current_stream"(int d, int64_t s)
    Task make_py_task(object fn)
    Task make_copy_task(uintptr_t dst, uintptr_t src, size_t n)
    Task make_fill_task(uintptr_t dst, size_t n, const char* pattern, size_t k)
    Task make_sleep_task(int64_t ns)
    Task keep_alive(Task inner, object keep)
    shared_ptr[RawAllocator] make_py_raw_allocator(object a, object f)
    shared_ptr[RawAllocator] make_c_raw_allocator(uintptr_t a, uintptr_t f)
    FramesPtr capture_frames()
    void set_package_prefix(const string& p)
    int frame_line(const Frame& f)
    PyObject* frame_code(const Frame& f)
    uintptr_t frames_key(const FramesPtr& f)
    AllocationFilter make_filter(int kind, uint64_t capture_id)
    MempoolId make_pool_id(uint64_t a, uint64_t b)


cdef extern from *:
    """
    static uintptr_t mtia_malloc(mtia::Allocator* a, int d, size_t n, int64_t s, mtia::FramesPtr f) {
      return a->malloc(d, n, s, std::move(f));
    }
    """
    uintptr_t mtia_malloc(Allocator* a, int d, size_t n, int64_t s, FramesPtr f) except +raise_py_error


cdef Allocator* _alloc = NULL
cdef int _ndev = 0
cdef int _record_level = 0        # RecordContext while history is on, else 0
cdef object _lazy_init = None     # the façade's init, called on first use
cdef object _device_parser = None  # the façade's device-argument parser
cdef object _oom_error = None
cdef list _oom_observers = []

import threading as _threading
install_gil_hooks(_threading.main_thread().ident)
set_package_prefix((__file__.rsplit("/", 1)[0] + "/").encode())

KIND_ALL = 0
KIND_THREAD = 1
KIND_CAPTURE = 2


def _configure_hooks(lazy_init, device_parser, oom_error):
    """Installs the façade's lazy-init function, device parser and OutOfMemoryError."""
    global _lazy_init, _device_parser, _oom_error
    _lazy_init = lazy_init
    _device_parser = device_parser
    _oom_error = oom_error
    set_oom_error_type(oom_error)


def init(int device_count, size_t memory_per_device, str conf, raw=None, size_t runtime_reserved=0):
    """Creates the devices and allocators (once). `raw` = None, ("python", alloc_fn,
    free_fn) or ("c", alloc_addr, free_addr) for the memory under the default pools;
    `runtime_reserved` bytes of each device go to its runtime context. The allocator is
    published only once it is complete: the allocation entry points skip initialisation
    as soon as they see it, from any thread."""
    global _alloc, _ndev
    if _alloc != NULL:
        raise RuntimeError("mtia_alloc is already initialized")
    cdef shared_ptr[RawAllocator] r
    if raw is not None:
        r = _make_raw(raw)
    cdef string c = conf.encode()
    cdef Allocator* a = new Allocator(device_count, memory_per_device, c, r)
    try:
        for d in range(device_count):
            a.emulator().device(d).memory().reserve_for_runtime(runtime_reserved)
    except BaseException:
        del a
        raise
    _ndev = device_count
    _alloc = a


cdef shared_ptr[RawAllocator] _make_raw(raw) except *:
    kind = raw[0]
    if kind == "python":
        return make_py_raw_allocator(raw[1], raw[2])
    if kind == "c":
        return make_c_raw_allocator(<uintptr_t>raw[1], <uintptr_t>raw[2])
    raise ValueError(f"unknown raw allocator kind {kind!r}")


def is_initialized():
    return _alloc != NULL


def shutdown():
    """Stops every stream worker (queued work is dropped). Called at interpreter exit."""
    if _alloc != NULL:
        with nogil:
            _alloc.shutdown()


def parse_memory_size(str text, str what):
    return c_parse_memory_size(text.encode(), what.encode())


cdef inline void _ensure_init() except *:
    if _alloc == NULL:
        _lazy_init()


def device_count():
    _ensure_init()
    return _ndev


cdef inline int _device(object device) except -1:
    """Index of a device argument (None = current)."""
    cdef int d
    if device is None:
        return tls_current_device()
    if type(device) is int:
        try:
            d = device
        except OverflowError:  # beyond a C int: the parser's ValueError names the valid range
            return _device_parser(device)
        if 0 <= d < _ndev:
            return d
    return _device_parser(device)


cdef inline int64_t _stream_of(object stream, int d) except? -1:
    if stream is None:
        return tls_current_stream(d)
    sid = getattr(stream, "stream_id", None)
    if sid is None or getattr(stream, "device_index", None) != d:
        if sid is None:
            raise TypeError(f"stream must be an mtia_alloc.Stream, got {type(stream).__name__}")
        raise ValueError(f"stream {stream!r} is on device {stream.device_index}, not on device {d}")
    _alloc.emulator().stream(d, sid)  # validates the id
    return sid


cdef inline FramesPtr _capture_frames():
    """The caller's Python stack, innermost first, without mtia_alloc's own frames on top
    (captured in C as code objects + offsets; symbolised when a snapshot is taken)."""
    return capture_frames()


cdef inline size_t _size_arg(object size) except? 0:
    if type(size) is not int:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int, got {type(size).__name__}")
        size = int(size)
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    if size >= (1 << 64):
        raise _oom_error("MTIA out of memory. Tried to allocate more than 1EB memory.")
    return size


def caching_allocator_alloc(size, device=None, stream=None):
    """Allocates `size` bytes on the device's stream; returns the address (0 for size 0)."""
    cdef size_t n
    cdef int d
    cdef int64_t s
    if _alloc == NULL:
        _lazy_init()
    n = _size_arg(size)
    if n == 0:
        return 0
    if device is None and stream is not None:
        device = getattr(stream, "device_index", None)
    d = _device(device)
    s = _stream_of(stream, d)
    return _malloc(n, d, s)


cdef uintptr_t _malloc(size_t n, int d, int64_t s) except? 0:
    """The allocation itself: stack capture (history on), then the core; OOM observers
    run (outside the allocator lock) before the OutOfMemoryError propagates."""
    cdef FramesPtr frames
    if _record_level:
        frames = _capture_frames()
    try:
        return mtia_malloc(_alloc, d, n, s, frames)
    except BaseException as e:
        if isinstance(e, _oom_error):
            _notify_oom(e)
        raise


cdef _notify_oom(e):
    info = getattr(e, "_oom_info", None)
    if info is None or not info[4]:
        return
    for observer in list(_oom_observers):
        observer(info[0], info[1], info[2], info[3])


def attach_out_of_memory_observer(fn):
    """fn(device, alloc_size, device_total_or_allowed, device_free) runs on every OOM,
    outside the allocator lock, before the OutOfMemoryError is raised."""
    if not callable(fn):
        raise TypeError(f"the OOM observer must be callable, got {type(fn).__name__}")
    _oom_observers.append(fn)


def caching_allocator_delete(ptr):
    """Frees a block; unknown pointers raise RuntimeError("invalid device pointer: ...")."""
    cdef FramesPtr frames
    if type(ptr) is not int:
        if isinstance(ptr, bool) or not isinstance(ptr, int):
            raise TypeError(f"ptr must be an int, got {type(ptr).__name__}")
    if ptr == 0:
        return
    if ptr < 0 or ptr >= (1 << 64) or _alloc == NULL:
        raise RuntimeError(f"invalid device pointer: {ptr:#x}" if ptr >= 0 else f"invalid device pointer: {ptr}")
    if _record_level >= 3:
        frames = _capture_frames()
    try:
        _alloc.free(<uintptr_t>ptr, frames)
    except ValueError as e:
        raise RuntimeError(str(e)) from None


def device_of(uintptr_t ptr):
    """The device owning allocated block `ptr`, or -1."""
    if _alloc == NULL:
        return -1
    return _alloc.device_of(ptr)


def record_stream(uintptr_t ptr, int device, int64_t stream_id):
    _alloc.device(device).record_stream(ptr, stream_id)


def block_size(uintptr_t ptr):
    cdef int d = device_of(ptr)
    return 0 if d < 0 else _alloc.device(d).block_size(ptr)


# ------------------------------------------------------------------ stats and limits

cdef dict _stat(Stat& s):
    return {"current": s.current, "peak": s.peak, "allocated": s.allocated, "freed": s.freed}


cdef dict _stat_array(StatArray& a):
    return {"all": _stat(a[0]), "small_pool": _stat(a[1]), "large_pool": _stat(a[2])}


def memory_stats_nested(int device):
    cdef DeviceStats st = _alloc.device(device).stats()
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
    cdef pair[size_t, size_t] p = _alloc.device(device).largest_free_blocks()
    return p.first, p.second


def reset_peak_memory_stats(int device):
    _alloc.device(device).reset_peak_stats()


def reset_accumulated_memory_stats(int device):
    _alloc.device(device).reset_accumulated_stats()


def empty_cache(pool=None):
    cdef MempoolId pid = make_pool_id(0, 0)
    cdef FramesPtr frames
    if _alloc == NULL:
        return
    if pool is not None:
        pid = make_pool_id(pool[0], pool[1])
    if _record_level >= 3:  # context "all": segment frees carry this call's stack
        frames = _capture_frames()
    with nogil:
        _alloc.empty_cache(pid, frames)


def empty_cache_device(int device, pool):
    cdef MempoolId pid = make_pool_id(pool[0], pool[1])
    cdef FramesPtr frames
    if _record_level >= 3:
        frames = _capture_frames()
    with nogil:
        _alloc.device(device).empty_cache(pid, frames)


def set_memory_fraction(double fraction, int device):
    _alloc.device(device).set_memory_fraction(fraction)


def get_memory_fraction(int device):
    return _alloc.device(device).memory_fraction()


def mem_get_info(int device):
    cdef DeviceMemory* m = &_alloc.emulator().device(device).memory()
    return m.capacity() - m.used(), m.capacity()


def device_memory_counters(int device):
    cdef DeviceMemory* m = &_alloc.emulator().device(device).memory()
    return {"used": m.used(), "capacity": m.capacity(), "malloc_calls": m.malloc_calls(),
            "free_calls": m.free_calls(), "runtime_reserved": m.runtime_reserved()}


def fail_device_allocations(int device, int64_t after_n, int64_t every):
    _alloc.emulator().device(device).memory().fail_allocations(after_n, every)


def check_invariants(int device):
    return _alloc.device(device).check_invariants().decode()


def set_config(str conf):
    _alloc.set_config(conf.encode())


def round_size_(size_t size):
    return round_size(size, _alloc.config())


def format_size_(uint64_t size):
    return format_size(size).decode()


def allocator_settings():
    cdef const AllocatorConfig* c = &_alloc.config()
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


# ------------------------------------------------------------------ snapshot and history

cdef dict _code_names = {}  # code object -> (filename, name)


cdef object _frames_list(const FramesPtr& f, dict cache):
    """Snapshot form of a captured stack; identical stacks share one list."""
    cdef const Frames* fs
    cdef size_t i
    if f.get() == NULL:
        return []
    key = frames_key(f)
    out = cache.get(key)
    if out is not None:
        return out
    fs = f.get()
    out = []
    for i in range(fs.size()):
        code = <object>frame_code(fs[0][i])
        names = _code_names.get(code)
        if names is None:
            names = _code_names[code] = (code.co_filename, code.co_name)
        out.append({"filename": names[0], "line": frame_line(fs[0][i]), "name": names[1]})
    cache[key] = out
    return out


def snapshot_segments(pool=None):
    """Segment dicts of every device (one pool's if `pool` is given), address-sorted per device."""
    cdef vector[SegmentInfo] segs
    cdef MempoolId pid = make_pool_id(0, 0)
    cdef cbool all_pools = pool is None
    cdef dict cache = {}
    out = []
    if _alloc == NULL:
        return out
    if pool is not None:
        pid = make_pool_id(pool[0], pool[1])
    for d in range(_ndev):
        segs = _alloc.device(d).snapshot(pid, all_pools)
        for s in segs:
            blocks = [{"address": b.address, "size": b.size, "requested_size": b.requested_size,
                       "state": b.state.decode(), "frames": _frames_list(b.frames, cache)} for b in s.blocks]
            out.append({
                "device": s.device, "address": s.address, "total_size": s.total_size,
                "allocated_size": s.allocated_size, "active_size": s.active_size,
                "requested_size": s.requested_size, "stream": s.stream,
                "segment_type": "small" if s.is_small else "large",
                "segment_pool_id": (s.pool.first, s.pool.second), "is_expandable": s.is_expandable,
                "frames": _frames_list(s.frames, cache), "blocks": blocks,
            })
    return out


def device_trace(int device):
    cdef vector[TraceEntry] entries = _alloc.device(device).trace()
    cdef dict cache = {}
    out = []
    for e in entries:
        action = trace_action_name(e.action).decode()
        entry = {"action": action}
        entry["device_free" if action == "oom" else "addr"] = e.addr
        entry["size"] = e.size
        entry["stream"] = e.stream
        entry["time_us"] = e.time_us
        entry["compile_context"] = "N/A"
        entry["user_metadata"] = e.user_metadata.decode()
        entry["pool_id"] = (e.pool.first, e.pool.second)
        if e.frames.get() != NULL:
            entry["frames"] = _frames_list(e.frames, cache)
        out.append(entry)
    return out


def set_history(cbool enabled, int context, size_t max_entries, cbool clear):
    """context: 0 never, 1 state, 2 alloc, 3 all (stacks kept)."""
    global _record_level
    for d in range(_ndev):
        _alloc.device(d).set_history(enabled, <RecordContext>context, max_entries, clear)
    _record_level = context if enabled else 0


def set_memory_metadata(str text):
    """This thread's string for the user_metadata of the trace entries it records."""
    user_metadata().assign(text.encode())


def get_memory_metadata():
    return user_metadata().decode()


def record_level():
    return _record_level


# ------------------------------------------------------------------ devices, streams, events

def current_device():
    return tls_current_device()


def set_current_device(int d):
    tls_set_current_device(d)


def current_stream_id(int d):
    return tls_current_stream(d)


def set_current_stream_id(int d, int64_t s):
    tls_set_current_stream(d, s)


def new_stream(int device, int priority):
    return _alloc.emulator().new_stream(device, priority).id()


cdef inline Stream* _s(int device, int64_t sid) except NULL:
    return _alloc.emulator().stream(device, sid)


def stream_query(int device, int64_t sid):
    return _s(device, sid).query()


def stream_synchronize(int device, int64_t sid):
    cdef Stream* s = _s(device, sid)
    with nogil:
        s.synchronize()


def stream_progress(int device, int64_t sid):
    """(enqueued, completed) task counts."""
    cdef Stream* s = _s(device, sid)
    return s.enqueued(), s.completed()


def device_synchronize(int device):
    cdef EmulatedDevice* dev = &_alloc.emulator().device(device)
    with nogil:
        dev.synchronize()


def launch_python(int device, int64_t sid, fn):
    """Queues fn() on the stream; returns the task's sequence number."""
    cdef Stream* s = _s(device, sid)
    return s.enqueue(make_py_task(fn))


def launch_sleep(int device, int64_t sid, double ms):
    cdef Stream* s = _s(device, sid)
    return s.enqueue(make_sleep_task(<int64_t>(ms * 1e6)))


def launch_copy(int device, int64_t sid, uintptr_t dst, uintptr_t src, size_t n, keep):
    """Queues a native memmove; `keep` (the arrays) stays alive until it has run."""
    cdef Stream* s = _s(device, sid)
    return s.enqueue(keep_alive(make_copy_task(dst, src, n), keep))


def launch_fill(int device, int64_t sid, uintptr_t dst, size_t n, bytes pattern, keep):
    """Queues a native fill of n bytes with a repeated element pattern."""
    cdef Stream* s = _s(device, sid)
    return s.enqueue(keep_alive(make_fill_task(dst, n, pattern, len(pattern)), keep))


cdef class EventHandle:
    """An emulated event (the core's mtia::Event)."""
    cdef Event* ev
    cdef readonly int device

    def __cinit__(self, cbool enable_timing, int device):
        self.ev = new Event(enable_timing)
        self.device = device

    def __dealloc__(self):
        del self.ev

    def record(self, int device, int64_t sid):
        self.ev.record(_s(device, sid))

    def query(self):
        return self.ev.query()

    def synchronize(self):
        with nogil:
            self.ev.synchronize()

    def wait(self, int device, int64_t sid):
        stream_wait_mark(_s(device, sid), self.ev.mark())

    @property
    def recorded(self):
        return self.ev.recorded()

    @property
    def timing(self):
        return self.ev.timing()

    def elapsed_ms(self, EventHandle end):
        cdef double ms
        with nogil:
            ms = self.ev.elapsed_ms(end.ev[0])
        return ms


# ------------------------------------------------------------------ pools and routing

def new_user_pool_id():
    _ensure_init()
    cdef MempoolId i = _alloc.new_user_pool_id()
    return (i.first, i.second)


def new_graph_pool_id():
    _ensure_init()
    cdef MempoolId i = _alloc.new_graph_pool_id()
    return (i.first, i.second)


def create_or_incref_pool(int device, tuple pool, raw=None):
    cdef shared_ptr[RawAllocator] r
    if raw is not None:
        r = _make_raw(raw)
    _alloc.device(device).create_or_incref_pool(make_pool_id(pool[0], pool[1]), r)


def release_pool(int device, tuple pool):
    _alloc.device(device).release_pool(make_pool_id(pool[0], pool[1]))


def pool_use_count(int device, tuple pool):
    return _alloc.device(device).pool_use_count(make_pool_id(pool[0], pool[1]))


def begin_allocate_to_pool(int device, tuple pool, int kind, uint64_t capture_id=0):
    _alloc.device(device).begin_allocate_to_pool(make_pool_id(pool[0], pool[1]), make_filter(kind, capture_id))


def end_allocate_to_pool(int device, tuple pool):
    _alloc.device(device).end_allocate_to_pool(make_pool_id(pool[0], pool[1]))


def set_use_on_oom(int device, tuple pool, cbool on):
    _alloc.device(device).set_use_on_oom(make_pool_id(pool[0], pool[1]), on)


def set_no_split(int device, tuple pool):
    _alloc.device(device).set_no_split(make_pool_id(pool[0], pool[1]))


def set_stream_capture(int device, int64_t sid, uint64_t capture_id):
    _alloc.device(device).set_stream_capture(sid, capture_id)


# ------------------------------------------------------------------ benchmarks

cdef int _bench_device(int device) except -1:
    """The allocator is set up and `device` is one of its devices (the loops below run
    without the GIL and trust their arguments)."""
    _ensure_init()
    if not 0 <= device < _ndev:
        raise ValueError(f"device must be in [0, {_ndev}), got {device}")
    return device


def replay(int device, const uint64_t[:] sizes, const unsigned int[:] slots, const unsigned int[:] streams,
           unsigned int nslots, list stream_ids, cbool latency=False, size_t prefix=0):
    """Replays a parsed trace natively (size 0 = free). The first `prefix` events run
    untimed, before the stats reset (replay.h). Returns a dict of figures."""
    cdef vector[ReplayEvent] ev
    cdef ReplayEvent e
    cdef vector[int64_t] sids
    cdef ReplayResult r
    cdef Py_ssize_t i, n = sizes.shape[0]
    ev.reserve(n)
    for i in range(n):
        e.size = sizes[i]
        e.slot = slots[i]
        e.stream = streams[i]
        ev.push_back(e)
    cdef Py_ssize_t nstreams = len(stream_ids)
    _bench_device(device)
    for i in range(n):
        if slots[i] >= nslots or streams[i] >= nstreams:
            raise ValueError(f"event {i}: slot {slots[i]} or stream index {streams[i]} out of range")
    for s in stream_ids:
        _alloc.emulator().stream(device, s)  # validates the id
        sids.push_back(s)
    with nogil:
        r = replay_trace(_alloc[0], device, ev, nslots, sids, latency, prefix)
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
    cdef pair[uint64_t, uint64_t] r
    _bench_device(device)
    if n == 0:
        raise ValueError("n must be positive")
    with nogil:
        r = native_pair_loop(_alloc[0], device, size, n)
    return r.first / n, r.second / n


def glibc_pair(size_t size, uint64_t n):
    cdef pair[uint64_t, uint64_t] r
    if n == 0:
        raise ValueError("n must be positive")
    with nogil:
        r = glibc_pair_loop(size, n)
    return r.first / n, r.second / n


def threaded_pairs(int threads, size_t size, uint64_t n):
    """Pairs per second of `threads` threads (thread t on device t % devices), n pairs each."""
    cdef uint64_t wall
    _ensure_init()
    if threads < 1 or n == 0:
        raise ValueError("threads and n must be positive")
    with nogil:
        wall = threaded_pair_loop(_alloc[0], threads, size, n)
    return threads * n / (wall / 1e9)


def threaded_compute(int threads, uint64_t n):
    """Rounds per second of `threads` threads of busy integer work sharing nothing: how
    far this host lets threads scale at all (threaded_pairs' yardstick)."""
    cdef uint64_t wall
    if threads < 1 or n == 0:
        raise ValueError("threads and n must be positive")
    with nogil:
        wall = threaded_compute_loop(threads, n)
    return threads * n / (wall / 1e9)


def cached_blocks_pair(int device, size_t cached, uint64_t pairs, uint64_t seed=1):
    """CPU ns per malloc+free pair with `cached` free blocks in the cache."""
    cdef double ns
    _bench_device(device)
    if pairs == 0:
        raise ValueError("pairs must be positive")
    with nogil:
        ns = cached_blocks_pair_ns(_alloc[0], device, cached, pairs, seed)
    return ns


# ------------------------------------------------------------------ arrays

cdef bint _shut_down = False


def _mark_shut_down():
    """From here on dying arrays no longer free their blocks (the interpreter is exiting),
    and threads other than the main one that take the GIL back inside the allocator first
    give finalization a chance to begin, and park if it does (see _binding.h)."""
    global _shut_down
    _shut_down = True
    park_other_threads_at_exit()


@cython.auto_pickle(False)  # a pickled or copied _ptr would free the block twice
cdef class ArrayBase:
    """Owns one allocated block and gives it back to the cache when the object dies.
    mtia_alloc.DeviceArray subclasses it with the array API. The fields are read-only
    from Python: the native kernels and the host view trust them."""
    cdef readonly uintptr_t _ptr
    cdef readonly object shape
    cdef readonly object dtype
    cdef readonly Py_ssize_t nbytes
    cdef readonly int _device
    cdef readonly int64_t _stream_id
    cdef object __weakref__

    def data_ptr(self):
        return self._ptr

    def __dealloc__(self):
        cdef FramesPtr frames
        if self._ptr == 0 or _alloc == NULL or _shut_down:
            return
        if _record_level >= 3:
            frames = _capture_frames()
        try:
            _alloc.free(self._ptr, frames)
        except Exception:
            pass  # cannot happen for a block this object owns; never raise from a destructor
        self._ptr = 0


def alloc_array(cls, tuple shape, dtype, Py_ssize_t itemsize, device=None, stream=None):
    """A new `cls` (an ArrayBase subclass) holding itemsize * prod(shape) bytes."""
    cdef Py_ssize_t n
    cdef ArrayBase a
    cdef int d
    cdef int64_t s
    total = itemsize  # Python ints: no silent overflow
    for dim in shape:
        total *= dim
    if total >= (1 << 60):
        raise _oom_error(f"MTIA out of memory. Tried to allocate more than 1EB memory (an array of shape "
                         f"{shape} needs {total} bytes).")
    n = total
    if _alloc == NULL:
        _lazy_init()
    if device is None and stream is not None:
        device = getattr(stream, "device_index", None)
    d = _device(device)
    s = _stream_of(stream, d)
    a = ArrayBase.__new__(cls)  # cls subclasses ArrayBase: a direct tp_new call, no lookup
    a.shape = shape
    a.dtype = dtype
    a.nbytes = n
    a._device = d
    a._stream_id = s
    if n:
        a._ptr = _malloc(n, d, s)
    return a


# mtia_alloc.empty: its common case (an int length and a dtype name seen before) runs here
# in C; everything else goes to the Python implementation in array.py, which also fills
# the dtype cache. configure_empty() wires the two together at import.
cdef object _empty_cls = None
cdef dict _empty_dtypes = {}  # dtype name -> (numpy dtype, itemsize)
cdef object _empty_general = None


def configure_empty(cls, general):
    global _empty_cls, _empty_general
    _empty_cls = cls
    _empty_general = general


def cache_dtype(str name, dtype):
    _empty_dtypes[name] = (dtype, dtype.itemsize)


def empty(shape, dtype="float32", device=None, stream=None):
    """An uninitialised DeviceArray allocated through the caching allocator on `stream`."""
    cdef object entry
    if type(shape) is int and type(dtype) is str and shape >= 0:
        entry = _empty_dtypes.get(dtype)
        if entry is not None:
            return alloc_array(_empty_cls, (shape,), entry[0], entry[1], device, stream)
    return _empty_general(shape, dtype, device, stream)
include "_capi.pxi"
