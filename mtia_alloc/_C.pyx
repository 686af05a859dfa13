# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""_C: the thin binding over the C++ core (src_cpp/). Forwarding and type conversion
only; argument policy lives in the Python façade, state in the core. The hot calls
(caching_allocator_alloc/delete) resolve the current device and stream here, in C.

One extension module in several files: this one (set-up, allocation and free) includes
_C_stats.pxi, _C_history.pxi, _C_streams.pxi, _C_pools.pxi, _C_bench.pxi and
_C_arrays.pxi. The core's declarations are in _core/*.pxd (one per src_cpp header),
the binding's C++ half's in _binding.pxd (_binding.h)."""
import sys

cimport cython

from cpython.number cimport PyIndex_Check, PyNumber_Index
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libcpp cimport bool as cbool
from libcpp.memory cimport shared_ptr
from libcpp.string cimport string
from libcpp.utility cimport pair
from libcpp.vector cimport vector

from mtia_alloc._binding cimport *
from mtia_alloc._core.allocator cimport Allocator
from mtia_alloc._core.bench_loops cimport (cached_blocks_pair_checked, glibc_pair_ns, native_pair_ns,
                                           threaded_compute_per_second, threaded_pairs_per_second)
from mtia_alloc._core.config cimport AllocatorConfig
from mtia_alloc._core.emulated_device cimport DeviceMemory, EmulatedDevice, c_parse_memory_size
from mtia_alloc._core.frames cimport Frame, Frames, FramesPtr
from mtia_alloc._core.history cimport RecordContext, TraceEntry, set_user_metadata, trace_action_name, user_metadata
from mtia_alloc._core.raw_allocator cimport RawAllocator
from mtia_alloc._core.replay cimport ReplayEvent, ReplayResult, replay_checked
from mtia_alloc._core.segment_info cimport SegmentInfo
from mtia_alloc._core.size_policy cimport format_size, round_size
from mtia_alloc._core.stats cimport DeviceStats, Stat, StatArray
from mtia_alloc._core.stream cimport Event, Stream, stream_wait_mark
from mtia_alloc._core.types cimport MempoolId


cdef Allocator* _alloc = NULL     # NULL: not initialised, or forgotten in a forked child
cdef int _ndev = 0
cdef bint _forgotten = False      # a forked child's: the parent's allocator was forgotten
cdef object _lazy_init = None     # the façade's init, called on first use
cdef object _device_parser = None  # the façade's device-argument parser
cdef object _oom_error = None

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


def after_fork_in_child():
    """In a forked child (the façade's at-fork handler): forgets the parent's allocator,
    if there was one, and says whether there was. The child has only the forking thread
    and a copy of the parent's memory: the stream workers are gone and a device lock may
    be held by a thread that no longer exists, so the copy is never used (nor freed, nor
    shut down at exit). _alloc reads NULL again, so every entry point, the fast paths
    included, falls into lazy initialisation, which raises PyTorch's bad-fork error; the
    arrays inherited from the parent free nothing when they die."""
    global _alloc, _ndev, _forgotten
    reset_gil_hooks_after_fork()
    if _alloc == NULL:
        return False
    _alloc = NULL
    _ndev = 0
    _forgotten = True
    return True


def shutdown():
    """Stops every stream worker (queued work is dropped). Called at interpreter exit."""
    if _alloc != NULL:
        with nogil:
            _alloc.stop_history_stream()  # the streamed history's file is complete
            _alloc.shutdown()


def parse_memory_size(str text, str what):
    return c_parse_memory_size(text.encode(), what.encode())


cdef inline void _ensure_init() except *:
    if _alloc == NULL:
        _lazy_init()


cdef Allocator* _allocator() except NULL:
    """The allocator, initialised on first use, for the entry points that do not check
    _alloc themselves. In a forked child lazy initialisation raises (after_fork_in_child)."""
    if _alloc == NULL:
        _lazy_init()
        if _alloc == NULL:
            raise RuntimeError("mtia_alloc is not initialized")
    return _alloc


cdef object _index_arg(object value, str what):
    """`value` as an int: any integer type (numpy's, anything with __index__) but bool."""
    if isinstance(value, bool) or not PyIndex_Check(value):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return PyNumber_Index(value)


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
    if type(sid) is not int:
        sid = _index_arg(sid, "stream_id")
    _alloc.emulator().stream(d, sid)  # validates the id
    return sid


cdef inline FramesPtr _capture_frames() noexcept:
    """The caller's Python stack, innermost first, without mtia_alloc's own frames on top
    (captured in C as code objects + offsets; symbolised when a snapshot is taken)."""
    return capture_frames()


cdef inline int _record_level() noexcept:
    """The core's history level (RecordContext: 0 off, 1 state, 2 alloc, 3 all). _alloc is set."""
    return <int>_alloc.record_level()


cdef inline size_t _size_arg(object size) except? 0:
    if type(size) is not int:
        size = _index_arg(size, "size")
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
    return _malloc(n, d, s, False)


cdef uintptr_t _malloc(size_t n, int d, int64_t s, bint array_owned) except? 0:
    """The allocation itself: stack capture (history on), then the core; OOM observers
    run (outside the allocator lock) before the OutOfMemoryError propagates. An
    array_owned block (a DeviceArray's) is freed only by its array's death."""
    cdef FramesPtr frames
    if _record_level():
        frames = _capture_frames()
    try:
        return allocator_malloc(_alloc, d, n, s, frames, array_owned)
    except BaseException as e:
        if isinstance(e, _oom_error):
            _notify_oom(e)
        raise


cdef _notify_oom(e):
    info = getattr(e, "_oom_info", None)
    if info is None or not info[4]:
        return
    notify_oom_observers(info[0], info[1], info[2], info[3])


def attach_out_of_memory_observer(fn):
    """fn(device, alloc_size, device_total_or_allowed, device_free) runs on every OOM,
    outside the allocator lock, before the OutOfMemoryError is raised. The observers are
    kept by the core (oom_observers.h), for the life of the process."""
    if not callable(fn):
        raise TypeError(f"the OOM observer must be callable, got {type(fn).__name__}")
    add_oom_observer(fn)


def caching_allocator_delete(ptr):
    """Frees a block; unknown pointers raise RuntimeError("invalid device pointer: ..."),
    and so does the block of a live DeviceArray (freed when the array dies)."""
    cdef FramesPtr frames
    if type(ptr) is not int:
        ptr = _index_arg(ptr, "ptr")
    if ptr == 0:
        return
    if ptr < 0 or ptr >= (1 << 64) or _alloc == NULL:
        if _forgotten:
            _lazy_init()  # raises the bad-fork error
        raise RuntimeError(f"invalid device pointer: {ptr:#x}" if ptr >= 0 else f"invalid device pointer: {ptr}")
    if _record_level() >= 3:
        frames = _capture_frames()
    try:
        _alloc.free(<uintptr_t>ptr, frames, False)
    except ValueError as e:
        raise RuntimeError(str(e)) from None


def device_of(uintptr_t ptr):
    """The device owning allocated block `ptr`, or -1."""
    if _alloc == NULL:
        if _forgotten:
            _lazy_init()  # raises the bad-fork error
        return -1
    return _alloc.device_of(ptr)


def record_stream(uintptr_t ptr, int device, int64_t stream_id):
    _allocator().device(device).record_stream(ptr, stream_id)


def block_size(uintptr_t ptr):
    cdef int d = device_of(ptr)
    return 0 if d < 0 else _alloc.device(d).block_size(ptr)


include "_C_stats.pxi"
include "_C_history.pxi"
include "_C_streams.pxi"
include "_C_pools.pxi"
include "_C_bench.pxi"
include "_C_arrays.pxi"
include "_capi.pxi"  # the C function table the PyTorch backend calls (mtia_alloc/torch)
