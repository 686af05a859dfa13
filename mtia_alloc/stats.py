"""Memory statistics and limits of the live allocator, as torch.cuda.memory: the counters
(memory_stats and its shortcuts), resetting them, the memory_summary table, mem_get_info,
the per-process memory fraction, empty_cache, and check_invariants (the recount the
tests run after random operation sequences).

Before initialisation the statistics are empty (0 or {}), as torch's, after checking the
device argument.
Also torch.cuda's deprecated aliases (reset_max_memory_allocated, reset_max_memory_cached,
memory_cached, max_memory_cached: FutureWarning with torch's text, in mtia's names) and
get_allocator_backend.
Owns: the functions above. Relies on: _lazy_init, _device_arg, _format (summary_table),
_settings (which raw allocator is installed), _C."""
import warnings

from . import _C
from ._device_arg import check_device_arg, device_index
from ._format import summary_table
from ._lazy_init import is_initialized
from ._settings import settings

__all__ = ["memory_stats", "memory_stats_as_nested_dict", "memory_allocated", "max_memory_allocated",
           "memory_reserved", "max_memory_reserved", "reset_peak_memory_stats", "reset_accumulated_memory_stats",
           "empty_cache", "mem_get_info", "set_per_process_memory_fraction", "get_per_process_memory_fraction",
           "memory_summary", "check_invariants", "reset_max_memory_allocated", "reset_max_memory_cached",
           "memory_cached", "max_memory_cached", "get_allocator_backend"]


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


def memory_cached(device=None):
    """Deprecated; see memory_reserved."""
    warnings.warn("torch.mtia.memory_cached has been renamed to torch.mtia.memory_reserved", FutureWarning,
                  stacklevel=2)
    return memory_reserved(device=device)


def max_memory_cached(device=None):
    """Deprecated; see max_memory_reserved."""
    warnings.warn("torch.mtia.max_memory_cached has been renamed to torch.mtia.max_memory_reserved", FutureWarning,
                  stacklevel=2)
    return max_memory_reserved(device=device)


def reset_max_memory_allocated(device=None):
    """Deprecated: resets every peak statistic (reset_peak_memory_stats), as torch's."""
    warnings.warn("torch.mtia.reset_max_memory_allocated now calls torch.mtia.reset_peak_memory_stats, "
                  "which resets /all/ peak memory stats.", FutureWarning, stacklevel=2)
    return reset_peak_memory_stats(device=device)


def reset_max_memory_cached(device=None):
    """Deprecated: resets every peak statistic (reset_peak_memory_stats), as torch's."""
    warnings.warn("torch.mtia.reset_max_memory_cached now calls torch.mtia.reset_peak_memory_stats, "
                  "which resets /all/ peak memory stats.", FutureWarning, stacklevel=2)
    return reset_peak_memory_stats(device=device)


def get_allocator_backend():
    """The allocator backend, as torch.cuda.get_allocator_backend(): "native" (the caching
    allocator over the emulated device), or "pluggable" (the name torch's
    CUDAPluggableAllocator reports) once change_current_allocator() put a PythonAllocator or
    PluggableAllocator under the default pools. Does not initialise."""
    return "native" if settings["raw_allocator"] is None else "pluggable"


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
    return summary_table(stats, d, abbreviated)
