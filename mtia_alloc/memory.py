"""Memory API (torch.cuda.memory / torch.mtia.memory shaped): allocation, statistics,
limits, empty_cache, memory pools, raw allocators, snapshots and memory history."""
import contextlib
import ctypes
import gc
import pickle
import sys
import threading
import warnings

from . import _C
from ._state import (OutOfMemoryError, _settings, check_device_arg, device_index, is_initialized, lazy_init,
                     refuse_copy)

caching_allocator_alloc = _C.caching_allocator_alloc
caching_allocator_delete = _C.caching_allocator_delete
attach_out_of_memory_observer = _C.attach_out_of_memory_observer

__all__ = [
    "caching_allocator_alloc", "caching_allocator_delete", "record_stream", "memory_stats",
    "memory_stats_as_nested_dict", "memory_allocated", "max_memory_allocated", "memory_reserved",
    "max_memory_reserved", "reset_peak_memory_stats", "reset_accumulated_memory_stats", "empty_cache",
    "set_per_process_memory_fraction", "get_per_process_memory_fraction", "memory_summary", "mem_get_info",
    "snapshot", "memory_snapshot", "record_memory_history", "attach_out_of_memory_observer",
    "OutOfMemoryError", "MemPool", "use_mem_pool", "PythonAllocator", "PluggableAllocator",
    "change_current_allocator", "check_invariants", "format_size", "Snapshot",
]


def record_stream(ptr, stream):
    """Marks block `ptr` as used on `stream`: freeing it waits for the stream's work."""
    from .streams import Stream
    if not isinstance(stream, Stream):
        raise TypeError(f"record_stream expects an mtia_alloc.Stream, got {type(stream).__name__}")
    if not isinstance(ptr, int) or isinstance(ptr, bool):
        raise TypeError(f"ptr must be an int, got {type(ptr).__name__}")
    if ptr == 0:
        return
    d = _C.device_of(ptr) if 0 < ptr < (1 << 64) else -1
    if d < 0:
        raise RuntimeError(f"invalid device pointer: {ptr:#x}")
    if stream.device_index != d:
        raise ValueError(f"stream {stream!r} is on device {stream.device_index}, but block {ptr:#x} "
                         f"is on device {d}")
    _C.record_stream(ptr, d, stream.stream_id)


# ------------------------------------------------------------------ statistics

def memory_stats_as_nested_dict(device=None):
    if not is_initialized():
        check_device_arg(device)
        return {}
    return _C.memory_stats_nested(device_index(device))


def memory_stats(device=None):
    """Flattened, key-sorted statistics as torch.cuda.memory_stats(), plus "dram" (the
    torch.mtia format), largest_free_block_bytes.{all,small_pool,large_pool} (the largest
    cached free block) and fragmentation.{all,small_pool,large_pool} (inactive_split_bytes
    / reserved_bytes: the share of reserved memory stuck in free pieces of split segments)."""
    if not is_initialized():
        check_device_arg(device)
        return {}
    d = device_index(device)
    nested = _C.memory_stats_nested(d)
    small, large = _C.largest_free_blocks(d)
    nested["largest_free_block_bytes"] = {"all": max(small, large), "small_pool": small, "large_pool": large}
    nested["fragmentation"] = {
        kind: (nested["inactive_split_bytes"][kind]["current"] / nested["reserved_bytes"][kind]["current"]
               if nested["reserved_bytes"][kind]["current"] else 0.0)
        for kind in ("all", "small_pool", "large_pool")}
    flat = {}

    def flatten(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                flatten(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = obj

    flatten("", nested)
    flat["dram"] = {
        "allocated_bytes": flat["allocated_bytes.all.current"],
        "peak_bytes": flat["allocated_bytes.all.peak"],
        "reserved_bytes": flat["reserved_bytes.all.current"],
        "peak_reserved_bytes": flat["reserved_bytes.all.peak"],
    }
    return dict(sorted(flat.items()))  # every key sorted, "dram" too


def _stat(device, name, field):
    if not is_initialized():
        check_device_arg(device)
        return 0
    return _C.memory_stats_nested(device_index(device))[name]["all"][field]


def memory_allocated(device=None):
    return _stat(device, "allocated_bytes", "current")


def max_memory_allocated(device=None):
    return _stat(device, "allocated_bytes", "peak")


def memory_reserved(device=None):
    return _stat(device, "reserved_bytes", "current")


def max_memory_reserved(device=None):
    return _stat(device, "reserved_bytes", "peak")


def reset_peak_memory_stats(device=None):
    if is_initialized():
        _C.reset_peak_memory_stats(device_index(device))
    else:
        check_device_arg(device)


def reset_accumulated_memory_stats(device=None):
    if is_initialized():
        _C.reset_accumulated_memory_stats(device_index(device))
    else:
        check_device_arg(device)


def empty_cache():
    """Returns every fully free cached segment to the device (all devices)."""
    _C.empty_cache()


def mem_get_info(device=None):
    """(free, total) bytes of the emulated device."""
    return _C.mem_get_info(device_index(device))


def set_per_process_memory_fraction(fraction, device=None):
    """Caps the bytes this process may reserve on the device at fraction * capacity."""
    if not isinstance(fraction, float):
        raise TypeError("Invalid type for fraction argument, must be `float`")
    if not 0 <= fraction <= 1:  # also rejects NaN
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
    _C.set_memory_fraction(fraction, device_index(device))


def get_per_process_memory_fraction(device=None):
    return _C.get_memory_fraction(device_index(device))


def format_size(size):
    """PyTorch's format_size: '1024 bytes', '1.00 KiB', '2.00 MiB', '3.00 GiB'."""
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    if size >= 1 << 64:  # beyond the native uint64: the same format, in Python
        return f"{size / (1 << 30):.2f} GiB"
    return _C.format_size_(size)


def _round_size(size):
    """The block size a request of `size` bytes gets under the current settings."""
    lazy_init()
    if not isinstance(size, int) or not 0 < size < 1 << 64:
        raise ValueError(f"size must be a positive int below 2**64, got {size!r}")
    return _C.round_size_(size)


_config_lock = threading.Lock()


def _set_allocator_settings(conf):
    """Parses an MTIA_ALLOC_CONF string at run time (PyTorch's _set_allocator_settings)."""
    if not isinstance(conf, str):
        raise TypeError(f"settings must be a str, got {type(conf).__name__}")
    lazy_init()
    with _config_lock:
        _C.set_config(conf)


def check_invariants(device=None):
    """Recounts every block and segment and compares with the stats; raises RuntimeError
    naming each broken invariant."""
    if not is_initialized():
        return
    devices = range(_C.device_count()) if device is None else [device_index(device)]
    problems = [p for p in (_C.check_invariants(d) for d in devices) if p]
    if problems:
        raise RuntimeError("allocator invariants broken: " + " | ".join(problems))


def memory_summary(device=None, abbreviated=False):
    """The torch.cuda.memory_summary table, with MTIA wording."""
    d = device_index(device)
    stats = memory_stats(d)
    return _summary_table(stats, d, abbreviated)


def _summary_table(stats, device, abbreviated=False):
    def fmt_size(sz, pref_sz):
        prefixes = ["B  ", "KiB", "MiB", "GiB", "TiB", "PiB"]
        prefix = prefixes[0]
        for new_prefix in prefixes[1:]:
            if pref_sz < 768 * 1024:
                break
            prefix = new_prefix
            sz //= 1024
            pref_sz /= 1024
        return f"{sz:6d} {prefix}"

    def fmt_count(cnt, pref_cnt):
        prefixes = [" ", "K", "M"]
        prefix = prefixes[0]
        for new_prefix in prefixes[1:]:
            if pref_cnt < 750 * 1000:
                break
            prefix = new_prefix
            cnt //= 1000
            pref_cnt /= 1000
        return f"{cnt:7d} {prefix} "

    metrics = [
        ("allocated_bytes", "Allocated memory", fmt_size),
        ("active_bytes", "Active memory", fmt_size),
        ("requested_bytes", "Requested memory", fmt_size),
        ("reserved_bytes", "Device reserved memory", fmt_size),
        ("inactive_split_bytes", "Non-releasable memory", fmt_size),
        ("allocation", "Allocations", fmt_count),
        ("active", "Active allocs", fmt_count),
        ("segment", "Device reserved segments", fmt_count),
        ("inactive_split", "Non-releasable allocs", fmt_count),
    ]
    # PyTorch's layout, with the metric column widened from 21 to 24 for "Device reserved memory"
    width = 78
    lines = ["=" * width, f" {'':16} PyTorch MTIA memory summary, device ID {device:<20d} ", "-" * width,
             f"  {'':9} MTIA OOMs: {stats.get('num_ooms', 0):<12d} | {'':6} "
             f"device alloc retries: {stats.get('num_alloc_retries', 0):<9d}  ",
             "=" * width, "        Metric            | Cur Usage  | Peak Usage | Tot Alloc  | Tot Freed  "]
    for key, name, fmt in metrics:
        lines.append("-" * width)
        subs = [("all", name)]
        if not abbreviated:
            subs += [("large_pool", "      from large pool"), ("small_pool", "      from small pool")]
        ref = None
        for sub, sub_name in subs:
            vals = [stats.get(f"{key}.{sub}.{f}", 0) for f in ("current", "peak", "allocated", "freed")]
            ref = ref or vals
            cells = " | ".join(fmt(v, r) for v, r in zip(vals, ref))
            lines.append(f" {sub_name:<24} | {cells} ")
    for key, name in (("oversize_allocations", "Oversize allocations"), ("oversize_segments", "Oversize Device segments")):
        lines.append("-" * width)
        vals = [stats.get(f"{key}.{f}", 0) for f in ("current", "peak", "allocated", "freed")]
        lines.append(f" {name:<24} | " + " | ".join(fmt_count(v, v) for v in vals) + " ")
    lines.append("=" * width)
    return "|" + "|\n|".join(lines) + "|\n"


# ------------------------------------------------------------------ raw allocators and pools

_loaded_libraries = []  # shared objects stay loaded: pools may use them until exit


class PythonAllocator:
    """Raw device memory from two Python callables: alloc_fn(size, device, stream) -> int
    address (0 or an exception = out of memory) and free_fn(ptr, size, device, stream).

    free_fn runs when the cache gives a segment back (empty_cache, an OOM retry), under the
    allocator's lock, and only while the streams that may still use the range are idle
    (the allocator waits for them first, as cudaFree synchronizes the device). It must not
    wait for kernels itself: a kernel that allocates would wait for the lock."""

    def __init__(self, alloc_fn, free_fn):
        if not callable(alloc_fn) or not callable(free_fn):
            raise TypeError("PythonAllocator needs two callables: alloc_fn(size, device, stream) and "
                            "free_fn(ptr, size, device, stream)")
        self.alloc_fn, self.free_fn = alloc_fn, free_fn

    def _raw_spec(self):
        return ("python", self.alloc_fn, self.free_fn)


class PluggableAllocator:
    """Raw device memory from a shared library's C functions with CUDAPluggableAllocator's
    signatures: void* alloc(ssize_t size, int device, void* stream) and
    void free(void* ptr, ssize_t size, int device, void* stream)."""

    def __init__(self, path_to_so, alloc_fn_name, free_fn_name):
        try:
            lib = ctypes.CDLL(str(path_to_so))
        except OSError as e:
            raise RuntimeError(f"cannot load allocator library {path_to_so!r}: {e}") from None
        try:
            alloc = getattr(lib, alloc_fn_name)
            free = getattr(lib, free_fn_name)
        except AttributeError as e:
            raise RuntimeError(f"allocator library {path_to_so!r} lacks a symbol: {e}") from None
        _loaded_libraries.append(lib)
        self._lib = lib
        self._alloc_addr = ctypes.cast(alloc, ctypes.c_void_p).value
        self._free_addr = ctypes.cast(free, ctypes.c_void_p).value

    def _raw_spec(self):
        return ("c", self._alloc_addr, self._free_addr)


def change_current_allocator(allocator):
    """Puts a raw allocator under the default pools. Only before initialisation."""
    if not isinstance(allocator, (PythonAllocator, PluggableAllocator)):
        raise TypeError("allocator must be a PythonAllocator or a PluggableAllocator")
    if is_initialized():
        raise RuntimeError("change_current_allocator must be called before mtia_alloc is initialized "
                           "(before the first allocation)")
    _settings["raw_allocator"] = allocator._raw_spec()


def _pool_id_of(pool):
    if isinstance(pool, MemPool):
        return pool.id
    if (isinstance(pool, tuple) and len(pool) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                           and 0 <= x < (1 << 64) for x in pool)):
        return pool
    raise TypeError(f"expected a MemPool or a (int, int) pool id, got {pool!r}")


class MemPool:
    """A private memory pool: MemPool(allocator=None, use_on_oom=False, no_split=False)."""

    __reduce_ex__ = refuse_copy  # it holds one reference to the pool

    def __init__(self, allocator=None, use_on_oom=False, no_split=False):
        if allocator is not None and not isinstance(allocator, (PythonAllocator, PluggableAllocator)):
            raise TypeError("allocator must be None, a PythonAllocator or a PluggableAllocator")
        lazy_init()
        self._device = _C.current_device()
        self._id = _C.new_user_pool_id()
        self._allocator = allocator
        _C.create_or_incref_pool(self._device, self._id, allocator._raw_spec() if allocator else None)
        self._alive = True
        if use_on_oom:
            _C.set_use_on_oom(self._device, self._id, True)
        if no_split:
            _C.set_no_split(self._device, self._id)

    @property
    def id(self):
        return self._id

    @property
    def allocator(self):
        return self._allocator

    def use_count(self):
        return _C.pool_use_count(self._device, self._id)

    def snapshot(self):
        return memory_snapshot(self._id)

    def __del__(self):
        if not getattr(self, "_alive", False) or sys.is_finalizing():
            return
        self._alive = False
        try:
            _C.set_use_on_oom(self._device, self._id, False)
            _C.release_pool(self._device, self._id)
            _C.empty_cache_device(self._device, self._id)
        except Exception:  # never raise from a destructor
            pass

    def __repr__(self):
        return f"MemPool(id={self._id}, device={self._device}, use_count={self.use_count()})"


@contextlib.contextmanager
def use_mem_pool(pool, device=None):
    """Routes this thread's allocations on `device` to `pool` inside the block."""
    if not isinstance(pool, MemPool):
        raise TypeError(f"use_mem_pool expects a MemPool, got {type(pool).__name__}")
    d = device_index(device)
    _C.create_or_incref_pool(d, pool.id, None)
    try:
        _C.begin_allocate_to_pool(d, pool.id, _C.KIND_THREAD)
    except BaseException:
        _C.release_pool(d, pool.id)
        raise
    from .graphs import _retain_pool_in_capture
    try:
        _retain_pool_in_capture(d, pool.id)
        yield
    finally:
        _C.end_allocate_to_pool(d, pool.id)
        _C.release_pool(d, pool.id)


# ------------------------------------------------------------------ snapshots and history

def memory_snapshot(mempool_id=None, include_traces=True):
    """The segment list of snapshot() (one pool's segments when mempool_id is given).
    include_traces is accepted for PyTorch compatibility; the list never holds traces."""
    if mempool_id is not None:
        mempool_id = _pool_id_of(mempool_id)
        if mempool_id == (0, 0):
            mempool_id = None
    if not is_initialized():
        return []
    with _gc_paused():
        return _C.snapshot_segments(mempool_id)


@contextlib.contextmanager
def _gc_paused():
    """Building 100k small dicts would trigger the cyclic GC many times over (it doubles the
    time of a big snapshot); none of them can be garbage, so pause it meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def snapshot(device=None):
    """PyTorch's snapshot dict: segments (all devices, address-sorted per device),
    device_traces (index = device), allocator_settings, external_annotations. `device` is
    accepted and ignored, as in torch.cuda.memory._snapshot. Wrap it in
    mtia_alloc.memory.Snapshot for a REPL view."""
    if not is_initialized():
        return {"segments": [], "device_traces": [], "allocator_settings": {}, "external_annotations": []}
    with _gc_paused():
        # As PyTorch: the traces are read first, so the "snapshot" entry this snapshot
        # records shows up in the next one.
        traces = [_C.device_trace(d) for d in range(_C.device_count())]
        segments = _C.snapshot_segments(None)
    return {
        "segments": segments,
        "device_traces": traces,
        "allocator_settings": _C.allocator_settings(),
        "external_annotations": [],
    }


_CONTEXTS = {None: 0, "state": 1, "alloc": 2, "all": 3}


def record_memory_history(enabled="all", context="all", stacks="python", max_entries=sys.maxsize, device=None,
                          clear_history=False, **legacy):
    """Records alloc/free history for snapshots: enabled None/'state'/'all', context
    None/'state'/'alloc'/'all', stacks 'python'/'all', max_entries = ring buffer size
    (the signature of torch.cuda.memory._record_memory_history). torch.mtia's positional
    form record_memory_history(enabled, stacks, max_entries) is understood too.

    As torch.mtia.record_memory_history, it does nothing before the device is initialised
    (it warns here, as that is easy to trip over): call mtia_alloc.init() first, or use
    mtia_alloc.memory._record_memory_history, which initialises the device as torch.cuda's
    does. Applies to every device (`device` is ignored, as in PyTorch). enabled=None stops
    recording and clears the history; clear_history=True clears it when (re)enabling.
    The legacy form record_memory_history(True/False, record_context=True,
    trace_alloc_max_entries=1, trace_alloc_record_context=False) is understood too."""
    apply = _history_setter(enabled, context, stacks, max_entries, clear_history, legacy)
    if not is_initialized():
        warnings.warn("record_memory_history() before the device is initialised is ignored, as in torch.mtia; "
                      "call mtia_alloc.init() first (or use mtia_alloc.memory._record_memory_history, which "
                      "initialises the device as torch.cuda's does)", stacklevel=2)
        return
    apply()


def _record_memory_history(enabled="all", context="all", stacks="python", max_entries=sys.maxsize, device=None,
                           clear_history=False, **legacy):
    """torch.cuda.memory._record_memory_history: as record_memory_history, but it initialises
    the device first (as torch.cuda's does), so it may be the first call of a program. The
    legacy form (enabled: bool, record_context, trace_alloc_max_entries, ...) works too."""
    apply = _history_setter(enabled, context, stacks, max_entries, clear_history, legacy)
    lazy_init()
    apply()


def _history_setter(enabled, context, stacks, max_entries, clear_history, legacy):
    """Validates record_memory_history's arguments; returns the call that applies them."""
    if isinstance(enabled, bool):
        return _legacy_history_setter(enabled, context, stacks, max_entries, legacy)
    if legacy:
        raise TypeError(f"record_memory_history() got unexpected keyword arguments {sorted(legacy)}")
    int_stacks = isinstance(stacks, int) and not isinstance(stacks, bool)
    if context in ("python", "cpp") or (int_stacks and max_entries == sys.maxsize):
        # torch.mtia's positional order (enabled, stacks, max_entries=0): in torch.cuda's
        # order a context is never "python"/"cpp" and stacks never an int.
        context, stacks, max_entries = "all", context, stacks if int_stacks else 0
    if enabled not in (None, "state", "all"):
        raise ValueError("expected state to be 'state', 'all', or None")
    if context not in _CONTEXTS:
        raise ValueError("expected context to be 'state', 'alloc', 'all', or None")
    if stacks not in ("python", "all", "cpp"):
        raise ValueError("expected stacks to be 'python', or 'all'")
    if not isinstance(max_entries, int) or isinstance(max_entries, bool):
        raise TypeError(f"max_entries must be an int, got {type(max_entries).__name__}")
    if max_entries < 0:  # PyTorch's binding takes a size_t
        raise ValueError(f"max_entries must be non-negative, got {max_entries}")
    entries = 1 if enabled == "state" else max(1, min(max_entries, 1 << 62))  # 0 means one, as in PyTorch
    level = _CONTEXTS[context] if enabled is not None else 0
    clear = bool(clear_history)
    return lambda: _C.set_history(enabled is not None, level, entries, clear)


def _legacy_history_setter(enabled, context, stacks, max_entries, legacy):
    """The legacy signature (enabled: bool, record_context=True, trace_alloc_max_entries=1,
    trace_alloc_record_context=False, device=None, record_context_cpp=False), whose
    positional arguments arrive in the new form's slots; a slot still at its new-form
    default means the legacy default."""
    record_context = legacy.pop("record_context", True if context == "all" else context)
    max_entries_ = legacy.pop("trace_alloc_max_entries", 1 if stacks == "python" else stacks)
    alloc_context = legacy.pop("trace_alloc_record_context", False if max_entries == sys.maxsize else max_entries)
    legacy.pop("record_context_cpp", None)
    if legacy:
        raise TypeError(f"record_memory_history() got unexpected keyword arguments {sorted(legacy)}")
    if not isinstance(max_entries_, int):
        raise TypeError(f"trace_alloc_max_entries must be an int, got {type(max_entries_).__name__}")
    if not enabled:
        return _history_setter(None, "all", "python", sys.maxsize, False, {})
    context = "alloc" if alloc_context else ("state" if record_context else None)
    return _history_setter("all", context, "python", max(1, max_entries_), False, {})


def _set_memory_metadata(metadata):
    """Stamps `metadata` on every trace entry this thread records (PyTorch's
    torch.cuda.memory._set_memory_metadata)."""
    if not isinstance(metadata, str):
        raise TypeError(f"metadata must be a str, got {type(metadata).__name__}")
    _C.set_memory_metadata(metadata)


def _get_memory_metadata():
    return _C.get_memory_metadata()


def _dump_snapshot(filename="dump_snapshot.pickle"):
    """Writes snapshot() as a pickle (protocol 4: the memory_viz web page refuses 5)."""
    with open(filename, "wb") as f:
        pickle.dump(snapshot(), f, protocol=4)


_snapshot = snapshot

from .snapshot import Snapshot  # noqa: E402  (the REPL view; imports nothing back at load time)
