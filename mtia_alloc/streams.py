"""Streams and events with torch.mtia's API over the emulated devices.

Streams run work asynchronously (one worker thread per stream, in order). A Python
kernel that raises does not kill its stream: the error is kept, as an asynchronous device
error is, and raised once (KernelError, with the kernel's traceback) by the first call that
observes the stream past that kernel: Stream.synchronize()/query(), synchronize() of its
device, Event.synchronize()/query() of an event recorded after it (see _kernel_errors).

Owns: Stream, Event, StreamContext, stream, current_stream, default_stream, set_stream.
Relies on: devices (_Device), _device_arg, _lazy_init, _capture (an event recorded or
waited on inside a graph capture joins streams to it), _kernel_errors, _C."""
import operator
import threading

from . import _C
from ._capture import capture_of_stream, note_event_record, note_event_wait
from ._device_arg import device_index
from ._kernel_errors import (KernelError, UnobservedKernelErrorWarning, pending, raise_kernel_errors,
                             raise_kernel_errors_upto)
from ._lazy_init import lazy_init
from .devices import _Device

__all__ = ["Stream", "Event", "StreamContext", "stream", "current_stream", "default_stream", "set_stream",
           "KernelError", "UnobservedKernelErrorWarning"]

DEVICE_TYPE_MTIA = 19  # PyTorch's DeviceType value for MTIA
# The emulator's stream priorities, as torch.cuda's: 0 is the least (the default), lower
# numbers are higher; four levels, 0 to -3, as c10/cuda keeps. Others map to the nearest.
LEAST_PRIORITY, GREATEST_PRIORITY = 0, -3
_UNSET = object()


def _int_arg(value, what):
    """An int from any integer object (int, numpy integer, anything with __index__; not bool)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


class Stream:
    """An emulated stream (torch.Stream semantics). Stream(device=None, priority=0) makes a
    new one (device and priority positional or by keyword, as torch.cuda.Stream(device,
    priority); a priority outside priority_range() maps to the nearest valid one);
    Stream(stream_id=..., device_index=..., device_type=...), or the same three
    positionally as torch.Stream takes them, is a handle to an existing one.

    Streams are not picklable (a stream exists only in the process that made it): pass its
    (stream_id, device_index, device_type) and rebuild the handle. copy.copy and
    copy.deepcopy give the stream itself (a handle: copies would be equal anyway)."""

    __slots__ = ("stream_id", "device_index", "device_type", "priority")

    def __init__(self, device=None, *positional, priority=_UNSET, stream_id=None, device_index=None,
                 device_type=None):
        if len(positional) == 2:  # Stream(stream_id, device_index, device_type)
            if stream_id is not None or device_index is not None or device_type is not None \
                    or priority is not _UNSET:
                raise TypeError("Stream() takes (device=None, priority=0) or (stream_id, device_index, "
                                "device_type) positionally, not a mix")
            stream_id, device = device, None
            device_index, device_type = positional
            if stream_id is None:
                raise TypeError("stream_id must be an int, got NoneType")
        elif len(positional) == 1:  # Stream(device, priority), as torch.cuda.Stream
            if priority is not _UNSET:
                raise TypeError("Stream() got multiple values for argument 'priority'")
            priority = positional[0]
        elif positional:
            raise TypeError(f"Stream() takes at most 3 positional arguments ({len(positional) + 1} given)")
        if priority is _UNSET:
            priority = 0
        lazy_init()
        if stream_id is not None:
            d = _device_index_of(device_index if device_index is not None else device)
            if device_type is not None and device_type != DEVICE_TYPE_MTIA:
                raise ValueError(f"device_type must be {DEVICE_TYPE_MTIA} (MTIA), got {device_type!r}")
            stream_id = _int_arg(stream_id, "stream_id")
            if not -(1 << 63) <= stream_id < (1 << 63):  # no stream has an id beyond int64
                raise ValueError(f"unknown stream {stream_id} on device {d}")
            _C.stream_query(d, stream_id)  # raises ValueError for an unknown stream
            self.stream_id = stream_id
            self.device_index = d
        else:
            priority = _int_arg(priority, "priority")
            # As torch.cuda.Stream: a priority outside the valid range maps to the nearest valid one.
            priority = min(max(priority, GREATEST_PRIORITY), LEAST_PRIORITY)
            self.device_index = _device_index_of(device)
            self.stream_id = _C.new_stream(self.device_index, priority)
        self.device_type = DEVICE_TYPE_MTIA
        self.priority = priority

    @staticmethod
    def priority_range():
        """(least, greatest) priority, as torch.cuda.Stream.priority_range(): (0, -3); lower
        numbers are higher priorities."""
        return LEAST_PRIORITY, GREATEST_PRIORITY

    @classmethod
    def _handle(cls, device, stream_id):
        s = cls.__new__(cls)
        s.stream_id, s.device_index, s.device_type, s.priority = stream_id, device, DEVICE_TYPE_MTIA, 0
        return s

    @property
    def device(self):
        return _Device(self.device_index)

    def query(self):
        """True if all work queued on the stream has completed. Raises (once) the KernelError
        of a kernel of this stream that has failed."""
        done = _C.stream_query(self.device_index, self.stream_id)
        if pending:
            raise_kernel_errors([(self.device_index, self.stream_id)])
        return done

    def synchronize(self):
        _C.stream_synchronize(self.device_index, self.stream_id)
        if pending:
            raise_kernel_errors([(self.device_index, self.stream_id)])

    def wait_event(self, event):
        if not isinstance(event, Event):
            raise TypeError(f"wait_event expects an Event, got {type(event).__name__}")
        event.wait(self)

    def wait_stream(self, stream):
        if not isinstance(stream, Stream):
            raise TypeError(f"wait_stream expects a Stream, got {type(stream).__name__}")
        self.wait_event(stream.record_event())

    def record_event(self, event=None):
        if event is None:
            event = Event(self.device_index)
        elif not isinstance(event, Event):
            raise TypeError(f"record_event expects an Event or None, got {type(event).__name__}")
        event.record(self)
        return event

    def is_capturing(self):
        return capture_of_stream(self.device_index, self.stream_id) is not None

    def __eq__(self, other):
        if not isinstance(other, Stream):
            return False
        return (self.stream_id, self.device_index, self.device_type) == (
            other.stream_id, other.device_index, other.device_type)

    def __hash__(self):
        return hash((self.stream_id, self.device_index, self.device_type))

    def __repr__(self):
        return f"torch.Stream device_type=mtia, device_index={self.device_index}, stream_id={self.stream_id}"

    def __reduce_ex__(self, protocol):
        raise TypeError("Stream objects cannot be pickled: a stream exists only in the process that created it "
                        "(send its stream_id, device_index and device_type and rebuild it with Stream(stream_id=..., "
                        "device_index=..., device_type=...) in this process)")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __enter__(self):
        ctx = StreamContext(self)
        stack = getattr(_ctx_tls, "stack", None)
        if stack is None:
            stack = _ctx_tls.stack = []
        stack.append(ctx)
        ctx.__enter__()
        return self

    def __exit__(self, *exc):
        _ctx_tls.stack.pop().__exit__(*exc)
        return False


_ctx_tls = threading.local()


def _device_index_of(device):
    return device_index(device, optional=True)


class Event:
    """An emulated event: Event(device=None, *, enable_timing=False, blocking=False, interprocess=False).

    query() and synchronize() raise (once) the KernelError of a kernel that failed on the
    event's stream before the event was recorded; not pickled or copied (as torch's)."""

    _next_id = 1
    _id_lock = threading.Lock()

    def __init__(self, device=None, *, enable_timing=False, blocking=False, interprocess=False):
        lazy_init()
        self._device = _device_index_of(device)
        self._handle = _C.EventHandle(bool(enable_timing), self._device)
        self.enable_timing = bool(enable_timing)
        self.event_id = 0
        self._stream_key = None  # (device, stream_id) it was last recorded on
        self._seq = 0  # the stream's task count when it was recorded: the kernels it follows

    @property
    def device(self):
        return _Device(self._device)

    def record(self, stream=None):
        if stream is None:
            stream = current_stream(self._device if self.event_id else None)
        if not isinstance(stream, Stream):
            raise TypeError(f"record expects a Stream, got {type(stream).__name__}")
        if self.event_id and stream.device_index != self._device:
            raise ValueError(f"Event device index {self._device} does not match recording stream's device "
                             f"index {stream.device_index}")
        self._device = stream.device_index
        note_event_record(self, stream)
        # The tasks queued before the event (with a timing event's marker): it follows them.
        self._seq = self._handle.record(stream.device_index, stream.stream_id)
        self._stream_key = (stream.device_index, stream.stream_id)
        if not self.event_id:
            with Event._id_lock:
                self.event_id = Event._next_id
                Event._next_id += 1

    def wait(self, stream=None):
        if stream is None:
            stream = current_stream()
        elif not isinstance(stream, Stream):
            raise TypeError(f"wait expects a Stream, got {type(stream).__name__}")
        note_event_wait(self, stream)
        self._handle.wait(stream.device_index, stream.stream_id)

    def _raise_errors_before(self):
        key = self._stream_key
        if key is not None:
            raise_kernel_errors_upto(key, self._seq)

    def query(self):
        done = self._handle.query()
        if pending:
            self._raise_errors_before()
        return done

    def synchronize(self):
        self._handle.synchronize()
        if pending:
            self._raise_errors_before()

    def elapsed_time(self, end_event):
        """Milliseconds from this event to `end_event`. As torch: both must be timing events,
        recorded and complete (it does not wait: RuntimeError if one is still pending)."""
        if not isinstance(end_event, Event):
            raise TypeError(f"elapsed_time expects an Event, got {type(end_event).__name__}")
        if not (self.enable_timing and end_event.enable_timing):
            raise ValueError("Both events must be created with argument 'enable_timing=True'")
        if not (self._handle.recorded and end_event._handle.recorded):
            raise ValueError("Both events must be recorded before calculating elapsed time")
        if not (self._handle.query() and end_event._handle.query()):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return self._handle.elapsed_ms(end_event._handle)

    def __reduce_ex__(self, protocol):
        raise TypeError("Event objects cannot be pickled")

    def __repr__(self):
        return (f"torch.Event device_type=mtia, device_index={self._device}, "
                f"event_flag={int(self.enable_timing)}, event_id={self.event_id}")


def current_stream(device=None):
    d = _device_index_of(device)
    return Stream._handle(d, _C.current_stream_id(d))


def default_stream(device=None):
    return Stream._handle(_device_index_of(device), 0)


def set_stream(stream):
    """Makes `stream` current on its device and makes its device current (None: no-op)."""
    if stream is None:
        return
    if not isinstance(stream, Stream):
        raise TypeError(f"set_stream expects a Stream, got {type(stream).__name__}")
    _C.set_current_device(stream.device_index)
    _C.set_current_stream_id(stream.device_index, stream.stream_id)


class StreamContext:
    """Makes a stream current; on exit restores both devices' streams and the device."""

    def __init__(self, stream):
        if stream is not None and not isinstance(stream, Stream):
            raise TypeError(f"stream expects an mtia_alloc.Stream or None, got {type(stream).__name__}")
        self.stream = stream
        lazy_init()
        self.idx = _C.current_device()
        self.src_prev_stream = None
        self.dst_prev_stream = None

    def __enter__(self):
        cur = self.stream
        if cur is None or self.idx == -1:
            return
        self.src_prev_stream = current_stream(None)
        if self.src_prev_stream.device_index != cur.device_index:
            self.dst_prev_stream = current_stream(cur.device_index)
        set_stream(cur)

    def __exit__(self, *exc):
        cur = self.stream
        if cur is None or self.idx == -1:
            return
        if self.dst_prev_stream is not None:
            set_stream(self.dst_prev_stream)
        set_stream(self.src_prev_stream)


def stream(stream):
    return StreamContext(stream)


def _set_stream_by_id(stream_id, device_index, device_type):
    set_stream(Stream(stream_id=stream_id, device_index=device_index, device_type=device_type))
