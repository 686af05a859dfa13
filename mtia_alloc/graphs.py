"""Graph capture and replay (torch.mtia.MTIAGraph, graph, graph_pool_handle).

During a capture, kernels launched on the capturing stream, and on streams that joined it
by waiting on an event recorded on it, are recorded instead of run, and their allocations
come from the graph's private pool. replay() queues the recorded kernels, in order, on the
current stream; it changes no allocator state.

Owns: MTIAGraph, graph, graph_pool_handle (is_current_stream_capturing is re-exported
from _capture, which keeps the registry of running captures).
Relies on: _capture (the registry: streams and kernel submission consult it there, so
nothing below imports this module), _kernels (replay), streams, devices (synchronize),
pools (pool ids), stats (empty_cache), _lazy_init, _errors, _C."""
import itertools
import sys
import warnings

from . import _C
from ._capture import is_current_stream_capturing, stream_capture
from ._capture import lock as capture_lock
from ._errors import refuse_copy
from ._kernels import submit
from ._lazy_init import lazy_init
from .devices import synchronize
from .pools import pool_id_of
from .stats import empty_cache
from .streams import current_stream
from .streams import stream as stream_ctx

__all__ = ["MTIAGraph", "graph", "graph_pool_handle", "is_current_stream_capturing"]

_capture_ids = itertools.count(1)


def graph_pool_handle():
    """A new user pool id (0, n); the pool itself is created by its first use."""
    return _C.new_user_pool_id()


def _pool_arg(pool):
    if pool is None:
        return (0, 0)
    pool = pool_id_of(pool)
    if pool[0] and pool[1]:
        raise ValueError(f"invalid pool id {pool}: at most one of its two halves may be non-zero "
                         "(user pools are (0, n), graph pools (n, 0))")
    return pool


class _DeviceRef:
    """What a recorded native kernel keeps of a DeviceArray: its address and size. A
    captured graph, like a CUDA graph, does not keep the arrays it uses alive; their
    memory stays reserved in the graph's pool (or is the caller's to keep alive)."""

    __slots__ = ("_ptr", "nbytes")

    def __init__(self, array):
        self._ptr, self.nbytes = array.data_ptr(), array.nbytes

    def data_ptr(self):
        return self._ptr


def _detach_kernel(kernel):
    """A native copy/fill kernel that refers to its arrays by address only."""
    if kernel[0] == "copy":
        return ("copy", _DeviceRef(kernel[1]), _DeviceRef(kernel[2]))
    if kernel[0] == "fill":
        return ("fill", _DeviceRef(kernel[1]), kernel[2])
    return kernel


class MTIAGraph:
    """A captured sequence of kernels: MTIAGraph(keep_graph=False)."""

    __reduce_ex__ = refuse_copy  # it holds one reference to its pool

    def __init__(self, keep_graph=False):
        lazy_init()
        self.keep_graph = bool(keep_graph)
        self._reset_state()

    def _reset_state(self):
        self._capturing = False
        self._joinable = False  # other streams may join the capture (written under capture_lock)
        self._capture_ended = False
        self._instantiated = False
        self._kernels = []
        self._executable = None
        self._pool = None
        self._retained = []
        self._streams = []
        self._device = None
        self._capture_stream = None
        self._capture_id = 0

    def capture_begin(self, pool=(0, 0)):
        if self._capture_ended or self._capturing:
            raise RuntimeError("This MTIAGraph instance already owns a captured graph. To capture a new graph, "
                               "create a new instance.")
        pool = _pool_arg(pool)
        stream = current_stream()
        key = (stream.device_index, stream.stream_id)
        with capture_lock:
            if key in stream_capture:
                raise RuntimeError("Cannot begin a capture on a stream that is already capturing")
            pool_id = pool if pool != (0, 0) else _C.new_graph_pool_id()
            capture_id = next(_capture_ids)
            d = stream.device_index
            _C.create_or_incref_pool(d, pool_id, None)
            try:
                _C.begin_allocate_to_pool(d, pool_id, _C.KIND_CAPTURE, capture_id)
            except BaseException:
                _C.release_pool(d, pool_id)
                raise
            _C.set_stream_capture(d, stream.stream_id, capture_id)
            stream_capture[key] = self
            self._joinable = True
        self._device, self._pool, self._capture_id = d, pool_id, capture_id
        self._capture_stream = stream
        self._streams = [key]
        self._capturing = True

    def _record_kernel(self, kernel):
        # Python kernels keep their arguments (the callable needs them); native kernels
        # keep addresses only, so arrays freed during the capture return to the pool at once.
        self._kernels.append(_detach_kernel(kernel))

    def _stop_capture(self):
        with capture_lock:
            self._joinable = False
            for key in self._streams:
                if stream_capture.get(key) is self:
                    del stream_capture[key]
                    _C.set_stream_capture(key[0], key[1], 0)
            self._streams = []
        _C.end_allocate_to_pool(self._device, self._pool)
        self._capturing = False

    def capture_end(self):
        if not self._capturing:
            raise RuntimeError("capture_end() called without a preceding capture_begin()")
        if current_stream(self._device) != self._capture_stream or _C.current_device() != self._device:
            raise RuntimeError("Capture must end on the same stream it began on.")
        self._stop_capture()
        self._capture_ended = True
        if not self._kernels:
            warnings.warn("The MTIA Graph is empty. This usually means that the graph was attempted to be "
                          "captured on wrong device or stream.", UserWarning, stacklevel=2)
        if not self.keep_graph:
            self._do_instantiate()

    def _do_instantiate(self):
        self._executable = tuple(self._kernels)
        self._instantiated = True
        if not self.keep_graph:
            self._kernels = []

    def instantiate(self):
        if not self._capture_ended:
            raise RuntimeError("capture_end() must have been called before calling instantiate")
        if self._instantiated and not self.keep_graph:
            raise RuntimeError("instantiate() is intended to be called by the user only when keep_graph=true")
        self._do_instantiate()

    def replay(self):
        """Queues the captured kernels, in order, on the current stream. If that stream is
        being captured, the replay is recorded into that capture (a graph launch inside a
        capture becomes part of the outer graph) instead of running now."""
        if not self._capture_ended:
            raise RuntimeError("Called MTIAGraph::replay without a preceding successful capture.")
        if not self._instantiated:
            self._do_instantiate()
        stream = current_stream()
        for kernel in self._executable:
            submit(stream, kernel)

    def reset(self):
        """Releases the graph's pool references and allows a new capture. Frees no memory
        by itself: a later empty_cache() returns the pool's fully free segments."""
        if self._pool is not None:
            if self._capturing:
                self._stop_capture()
            _C.release_pool(self._device, self._pool)
            for pid in self._retained:
                _C.release_pool(self._device, pid)
        self._reset_state()

    def pool(self):
        if not self._capture_ended or self._pool is None:
            raise RuntimeError("Called MTIAGraph::pool() without a preceding successful capture.")
        return self._pool

    def __del__(self):
        try:
            if getattr(self, "_pool", None) is not None and _C.is_initialized():
                self.reset()
        except Exception as e:  # a destructor warns instead of raising
            if not sys.is_finalizing():  # at exit the module's globals may be gone already
                warnings.warn(f"MTIAGraph reset failed during destruction: {e}")

    def __repr__(self):
        state = "capturing" if self._capturing else "captured" if self._capture_ended else "empty"
        return f"MTIAGraph({state}, pool={self._pool}, kernels={len(self._executable or self._kernels)})"


class graph:
    """Context manager that captures the block into `mtia_graph` (torch/mtia/mtia_graph.py)."""

    default_capture_stream = None

    def __init__(self, mtia_graph, pool=None, stream=None):
        if not isinstance(mtia_graph, MTIAGraph):
            raise TypeError(f"graph expects an MTIAGraph, got {type(mtia_graph).__name__}")
        pool = None if pool is None else _pool_arg(pool)  # checked now: __enter__ empties the cache
        if self.__class__.default_capture_stream is None:
            self.__class__.default_capture_stream = current_stream()
        self.pool = () if pool is None else (pool,)
        self.capture_stream = stream if stream is not None else self.__class__.default_capture_stream
        assert self.capture_stream is not None
        self.stream_ctx = stream_ctx(self.capture_stream)
        self.mtia_graph = mtia_graph

    def __enter__(self):
        synchronize()
        empty_cache()
        self.stream_ctx.__enter__()
        try:
            self.mtia_graph.capture_begin(*self.pool)
        except BaseException:
            self.stream_ctx.__exit__(None, None, None)  # a failed begin leaves the stream as it was
            raise

    def __exit__(self, *args):
        try:
            self.mtia_graph.capture_end()
        finally:
            self.stream_ctx.__exit__(*args)
