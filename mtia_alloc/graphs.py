"""Graph capture and replay (torch.mtia.MTIAGraph, graph, graph_pool_handle).

During a capture, kernels launched on the capturing stream, and on streams that joined it
by waiting on an event recorded on it, are recorded instead of run, and their allocations
come from the graph's private pool. replay() queues the recorded kernels, in order, on the
current stream; it changes no allocator state."""
import itertools
import sys
import threading
import warnings

from . import _C
from ._state import lazy_init, refuse_copy

__all__ = ["MTIAGraph", "graph", "graph_pool_handle", "is_current_stream_capturing"]

_lock = threading.Lock()
_capture_ids = itertools.count(1)
_stream_capture = {}  # (device, stream_id) -> MTIAGraph capturing there


def _capture_of_stream(device, stream_id):
    return _stream_capture.get((device, stream_id))


def _record_if_capturing(device, stream_id, kernel):
    """Records `kernel` into the capture running on the stream and returns True, or returns
    False (no capture: the caller runs it). Under the lock, so a kernel that another thread
    launches while the capture ends is either in the graph or run, never lost."""
    if not _stream_capture:  # no capture anywhere: the common case takes no lock
        return False
    with _lock:
        g = _stream_capture.get((device, stream_id))
        if g is None:
            return False
        g._record_kernel(kernel)
        return True


def _note_event_record(event, stream):
    event._capture = _stream_capture.get((stream.device_index, stream.stream_id))


def _note_event_wait(event, stream):
    """A stream waiting on an event recorded inside a capture joins that capture, if the
    capture still runs (checked under the lock: one ending meanwhile must not get a stream
    back that it will never release)."""
    g = getattr(event, "_capture", None)
    if g is None:
        return
    key = (stream.device_index, stream.stream_id)
    with _lock:
        if g._joinable and key not in _stream_capture:
            _stream_capture[key] = g
            g._streams.append(key)
            _C.set_stream_capture(key[0], key[1], g._capture_id)


def _retain_pool_in_capture(device, pool_id):
    """use_mem_pool entered while the current stream captures: the graph keeps the pool."""
    g = _stream_capture.get((device, _C.current_stream_id(device)))
    if g is not None:
        _C.create_or_incref_pool(device, pool_id, None)
        g._retained.append(pool_id)


def graph_pool_handle():
    """A new user pool id (0, n); the pool itself is created by its first use."""
    return _C.new_user_pool_id()


def is_current_stream_capturing():
    lazy_init()
    d = _C.current_device()
    return (d, _C.current_stream_id(d)) in _stream_capture


def _pool_arg(pool):
    from .memory import _pool_id_of
    if pool is None:
        return (0, 0)
    pool = _pool_id_of(pool)
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
        self._joinable = False  # other streams may join the capture (written under _lock)
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
        from .streams import current_stream
        if self._capture_ended or self._capturing:
            raise RuntimeError("This MTIAGraph instance already owns a captured graph. To capture a new graph, "
                               "create a new instance.")
        pool = _pool_arg(pool)
        stream = current_stream()
        key = (stream.device_index, stream.stream_id)
        with _lock:
            if key in _stream_capture:
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
            _stream_capture[key] = self
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
        with _lock:
            self._joinable = False
            for key in self._streams:
                if _stream_capture.get(key) is self:
                    del _stream_capture[key]
                    _C.set_stream_capture(key[0], key[1], 0)
            self._streams = []
        _C.end_allocate_to_pool(self._device, self._pool)
        self._capturing = False

    def capture_end(self):
        from .streams import current_stream
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
        from .emulator import _submit
        from .streams import current_stream
        if not self._capture_ended:
            raise RuntimeError("Called MTIAGraph::replay without a preceding successful capture.")
        if not self._instantiated:
            self._do_instantiate()
        stream = current_stream()
        for kernel in self._executable:
            _submit(stream, kernel)

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
        from .streams import current_stream, stream as stream_ctx
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
        from .memory import empty_cache
        from .streams import synchronize
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
