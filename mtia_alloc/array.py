"""DeviceArray: an array-like object on emulated device memory. Its block returns to the
cache when the last reference dies; kernels that use it hold a reference until they run.

Owns: DeviceArray, empty (the binding's fast path, with _empty_general behind it).
Relies on: memory (record_stream), _kernels (the copy kernel of __copy__; in_kernel),
_kernel_errors (numpy() raises what the stream's kernels raised), streams,
devices (_Device), _errors, _lazy_init (a forked child does not wait), _C (ArrayBase owns the block)."""
import numpy as np

from . import _C
from ._errors import OutOfMemoryError, as_integer
from ._kernel_errors import pending, raise_kernel_errors
from ._kernels import in_kernel, submit
from ._lazy_init import is_initialized
from .devices import _Device
from .memory import record_stream
from .streams import Stream

__all__ = ["DeviceArray", "empty"]


class _HostView:
    """Exposes device memory to numpy (__array_interface__) and keeps the array alive."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, owner):
        self.owner = owner
        self.__array_interface__ = {"data": (owner._ptr, False), "shape": owner.shape,
                                    "typestr": owner.dtype.str, "version": 3}
        if owner.dtype.fields is not None:  # structured: typestr alone would give plain bytes
            self.__array_interface__["descr"] = owner.dtype.descr


class DeviceArray(_C.ArrayBase):
    """An array on emulated device memory. The block is owned by the C base class
    (_C.ArrayBase), which returns it to the cache when the last reference dies."""

    __slots__ = ()

    @property
    def device(self):
        return _Device(self._device)

    @property
    def stream(self):
        return Stream._handle(self._device, self._stream_id)

    @property
    def size(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    def numpy(self):
        """A zero-copy numpy view (the emulated device memory is host memory). As torch's
        .cpu(), it first waits for the work queued on the array's stream (so a view taken
        after a queued fill_ shows the fill) and raises, once, the KernelError of a kernel
        of that stream that failed. Work queued on other streams is not waited for: order
        it with events or wait_stream first. Inside a kernel it does not wait (the kernel
        runs in its stream's order; waiting on its own stream would wait for itself), nor in
        a forked child (its parent's stream workers do not run there)."""
        if self._ptr == 0:
            return np.empty(self.shape, dtype=self.dtype)
        if not in_kernel() and is_initialized():
            _C.stream_synchronize(self._device, self._stream_id)
            if pending:
                raise_kernel_errors([(self._device, self._stream_id)])
        return np.asarray(_HostView(self))

    def record_stream(self, stream):
        if self._ptr:
            record_stream(self._ptr, stream)

    def __dlpack__(self, stream=None, **kwargs):
        """Exports a host (kDLCPU) view. The consumer reads it at once, with no stream to
        order on, so the work already queued on the array's stream is waited for first."""
        return self.numpy().__dlpack__(**kwargs)  # numpy() waits for the array's stream

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU: the emulated device's memory is host-addressable

    def __copy__(self):
        """A new array, on its own block, holding a copy of this one's data (queued on this
        array's stream), as copy.copy does for a numpy array: two arrays never share a block."""
        stream = self.stream
        out = _empty_general(self.shape, self.dtype, self._device, stream)
        if self.nbytes:
            submit(stream, ("copy", out, self))  # emulator.copy_ without its checks: same size, same stream
        return out

    def __deepcopy__(self, memo):
        out = memo[id(self)] = self.__copy__()
        return out

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle a DeviceArray: it owns a block of device memory; "
                        "pickle a host copy instead (array.numpy().copy())")

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def __repr__(self):
        return (f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device='mtia:{self._device}', "
                f"stream={self._stream_id}, nbytes={self.nbytes}, ptr={self._ptr:#x})")


def _shape_arg(shape):
    if type(shape) is int and shape >= 0:  # the common case, checked first
        return (shape,)
    if isinstance(shape, bool):
        raise TypeError("shape must be an int or a tuple of ints, got bool")
    if as_integer(shape) is not None:
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, got {type(shape).__name__}") from None
    out = []
    for s in shape:
        n = as_integer(s)  # int, numpy integer, anything with __index__ (not bool)
        if n is None:
            raise TypeError(f"shape entries must be ints, got {s!r}")
        if n < 0:
            raise ValueError(f"shape entries must be non-negative, got {shape}")
        out.append(n)
    return tuple(out)


_MAX_NBYTES = 1 << 63


def _empty_general(shape, dtype="float32", device=None, stream=None):
    """mtia_alloc.empty beyond its fast path (in _C): any shape, any dtype argument."""
    if dtype is None:
        dtype = "float32"  # np.dtype(None) would be float64
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(f"invalid dtype {dtype!r}: {e}") from None
    if dt.hasobject or dt.itemsize == 0:
        raise TypeError(f"invalid dtype {dtype!r}: device arrays hold plain numeric data")
    if isinstance(dtype, str):
        _C.cache_dtype(dtype, dt)  # the next empty() with this name takes the fast path
    shape = _shape_arg(shape)
    nbytes = dt.itemsize
    for s in shape:
        nbytes *= s
    if nbytes >= _MAX_NBYTES:  # would overflow the byte count (a C ssize_t) of the array
        raise OutOfMemoryError(f"MTIA out of memory. Tried to allocate more than 1EB memory "
                               f"(an array of shape {shape} and dtype {dt} needs {nbytes} bytes).")
    if not nbytes and any(s >= _MAX_NBYTES for s in shape):
        raise ValueError(f"shape entries must be less than 2**63, got {shape}")
    return _C.alloc_array(DeviceArray, shape, dt, dt.itemsize, device, stream)


_C.configure_empty(DeviceArray, _empty_general)
empty = _C.empty
