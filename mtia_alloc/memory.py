"""The torch.mtia.memory / torch.cuda.memory namespace: the public module of memory.

It owns the allocation entry points (caching_allocator_alloc, caching_allocator_delete,
record_stream, attach_out_of_memory_observer) and re-exports, under their PyTorch names,
what lower modules own: statistics and limits (stats), pools (pools), raw allocators
(raw_allocators), memory history and snapshots (history), run-time allocator settings
and rounding (_alloc_conf), size formatting (_format) and the snapshot view (viz).
Relies on: the modules named above, streams (Stream), _C."""
from . import _C
from ._alloc_conf import round_size as _round_size
from ._alloc_conf import set_allocator_settings as _set_allocator_settings
from ._errors import OutOfMemoryError, as_integer
from ._format import format_size
from .history import (_dump_snapshot, _get_memory_metadata, _record_memory_history, _set_memory_metadata,
                      record_memory_history, snapshot)
from .history import snapshot as _snapshot
from .pools import MemPool, memory_snapshot, use_mem_pool
from .raw_allocators import PluggableAllocator, PythonAllocator, change_current_allocator
from .stats import (check_invariants, empty_cache, get_allocator_backend, get_per_process_memory_fraction,
                    max_memory_allocated, max_memory_cached, max_memory_reserved, mem_get_info, memory_allocated,
                    memory_cached, memory_reserved, memory_stats, memory_stats_as_nested_dict, memory_summary,
                    reset_accumulated_memory_stats, reset_max_memory_allocated, reset_max_memory_cached,
                    reset_peak_memory_stats, set_per_process_memory_fraction)
from .streams import Stream
from .viz.model import Snapshot

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
    "change_current_allocator", "check_invariants", "format_size", "Snapshot", "memory_cached",
    "max_memory_cached", "reset_max_memory_allocated", "reset_max_memory_cached", "get_allocator_backend",
]


def record_stream(ptr, stream):
    """Marks block `ptr` as used on `stream`: freeing it waits for the stream's work."""
    if not isinstance(stream, Stream):
        raise TypeError(f"record_stream expects an mtia_alloc.Stream, got {type(stream).__name__}")
    if as_integer(ptr) is None:
        raise TypeError(f"ptr must be an int, got {type(ptr).__name__}")
    ptr = as_integer(ptr)
    if ptr == 0:
        return
    d = _C.device_of(ptr) if 0 < ptr < (1 << 64) else -1
    if d < 0:
        raise RuntimeError(f"invalid device pointer: {ptr:#x}")
    if stream.device_index != d:
        raise ValueError(f"stream {stream!r} is on device {stream.device_index}, but block {ptr:#x} "
                         f"is on device {d}")
    _C.record_stream(ptr, d, stream.stream_id)
