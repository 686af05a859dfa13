"""The emulated backend: device configuration, kernels on streams, fault injection.

Kernels run asynchronously on their stream's worker, in launch order. During a graph
capture, kernels launched on a capturing stream are recorded by the graph instead.

Owns: configure, runtime_reserved, launch, sleep, copy_, fill_, fail_device_allocations.
Relies on: _kernels (submission), array (DeviceArray), _settings (what configure sets),
_lazy_init, _device_arg, _errors (as_integer), _C."""
import numbers

import numpy as np

from . import _C
from ._device_arg import device_index
from ._errors import as_integer
from ._kernels import stream_arg, submit
from ._lazy_init import is_initialized
from ._settings import parse_memory, parse_size, settings
from .array import DeviceArray

__all__ = ["configure", "runtime_reserved", "launch", "sleep", "copy_", "fill_", "fail_device_allocations"]


def configure(device_count=None, memory_per_device=None, runtime_reserved=None):
    """Sets the emulated devices before initialisation: device_count (1..64),
    memory_per_device (bytes, or a string such as '512MiB'; overrides the environment
    variables MTIA_EMULATOR_DEVICES and MTIA_EMULATOR_MEMORY) and runtime_reserved: the
    bytes of each device its runtime keeps for itself, as a real device's context does, so
    that mem_get_info() starts with free < total (default: 1/256 of the device; 0 gives
    the allocator every byte, as `replay` does to match PyTorch's fake-runtime peer)."""
    if is_initialized() or _C.is_initialized():
        raise RuntimeError("emulator.configure() must be called before mtia_alloc is initialized")
    if device_count is not None:
        if as_integer(device_count) is None:
            raise TypeError(f"device_count must be an int, got {type(device_count).__name__}")
        device_count = as_integer(device_count)
        if not 1 <= device_count <= 64:
            raise ValueError(f"device_count must be between 1 and 64, got {device_count}")
    memory = parse_memory(memory_per_device) if memory_per_device is not None else None
    if runtime_reserved is not None:
        if not isinstance(runtime_reserved, str):
            if as_integer(runtime_reserved) is None:
                raise TypeError(f"runtime_reserved must be an int number of bytes or a string like '64MiB', "
                                f"got {type(runtime_reserved).__name__}")
            runtime_reserved = as_integer(runtime_reserved)
        reserved = (parse_size(runtime_reserved, "runtime_reserved")
                    if isinstance(runtime_reserved, str) else runtime_reserved)
        if reserved < 0:
            raise ValueError(f"runtime_reserved must be >= 0, got {runtime_reserved!r}")
        if memory is not None and reserved >= memory:
            raise ValueError(f"runtime_reserved ({reserved} bytes) must be less than memory_per_device "
                             f"({memory} bytes)")
        settings["runtime_reserved"] = reserved
    if device_count is not None:
        settings["device_count"] = device_count
    if memory is not None:
        settings["memory_per_device"] = memory


def runtime_reserved(device=None):
    """Bytes of the device its emulated runtime keeps (counted as used by mem_get_info)."""
    return _C.device_memory_counters(device_index(device))["runtime_reserved"]


def launch(fn, *args, stream=None):
    """Queues fn(*args) as a kernel on `stream` (the current stream if None); returns at once."""
    if not callable(fn):
        raise TypeError(f"launch expects a callable, got {type(fn).__name__}")
    submit(stream_arg(stream), ("python", fn, args))


def sleep(ms, stream=None):
    """Queues a kernel that keeps the stream busy for `ms` milliseconds."""
    if isinstance(ms, bool) or not isinstance(ms, numbers.Real):  # int, float, numpy numbers
        raise TypeError(f"ms must be a number, got {type(ms).__name__}")
    if not 0 <= ms <= 3_600_000:
        raise ValueError(f"ms must be between 0 and 3600000, got {ms}")
    submit(stream_arg(stream), ("sleep", float(ms)))


def copy_(dst, src, stream=None):
    """Queues a native copy of src's bytes into dst (same number of bytes), on `stream` or
    else on the current stream of dst's device."""
    if not isinstance(dst, DeviceArray) or not isinstance(src, DeviceArray):
        raise TypeError("copy_ expects two DeviceArrays")
    if dst.nbytes != src.nbytes:
        raise ValueError(f"copy_ needs arrays of equal size, got {dst.nbytes} and {src.nbytes} bytes")
    submit(stream_arg(stream, dst._device), ("copy", dst, src))


def fill_(dst, value, stream=None):
    """Queues a native fill of every element of dst with `value` (cast to dst.dtype), on
    `stream` or else on the current stream of dst's device."""
    if not isinstance(dst, DeviceArray):
        raise TypeError("fill_ expects a DeviceArray")
    if value is None:  # numpy would make it NaN for floats
        raise TypeError(f"cannot fill a {dst.dtype} array with None")
    try:
        element = np.array(value, dtype=dst.dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"cannot fill a {dst.dtype} array with {value!r}: {e}") from None
    if element.ndim != 0:  # a sequence would be repeated as a pattern, and skipped if too long
        raise TypeError(f"fill_ value must be a scalar (one element of {dst.dtype}), got {value!r}")
    pattern = element.tobytes()
    submit(stream_arg(stream, dst._device), ("fill", dst, pattern))


def fail_device_allocations(after_n=None, every=0, device=None):
    """Fault injection: after `after_n` more successful device allocations the next one
    fails as out of memory; then every `every`-th one fails (0 = only once).
    after_n=None turns injection off."""
    d = device_index(device)
    if after_n is None:
        _C.fail_device_allocations(d, -1, 0)
        return
    values = []
    for name, v in (("after_n", after_n), ("every", every)):
        n = as_integer(v)
        if n is None or not 0 <= n < 1 << 63:
            raise ValueError(f"{name} must be a non-negative int below 2**63, got {v!r}")
        values.append(n)
    _C.fail_device_allocations(d, *values)
