"""The registry of graph captures: which MTIAGraph captures on which stream. Streams (event
record/wait, is_capturing), kernel submission and use_mem_pool consult it; graphs.py adds
and removes entries. It lives below all of them so that none has to import graphs.py.

The registry holds graph objects and touches only their capture fields (_joinable,
_streams, _retained, _capture_id, _record_kernel), by duck typing.

Owns: `lock` and `stream_capture` ((device, stream_id) -> graph), the notes streams take
(note_event_record, note_event_wait), record_if_capturing, retain_pool_in_capture,
is_current_stream_capturing.
Relies on: _C (the core's per-stream capture ids and pool references), _lazy_init."""
import threading

from . import _C
from ._lazy_init import lazy_init

__all__ = ["is_current_stream_capturing"]

lock = threading.Lock()
stream_capture = {}  # (device, stream_id) -> MTIAGraph capturing there; written under `lock`


def capture_of_stream(device, stream_id):
    return stream_capture.get((device, stream_id))


def record_if_capturing(device, stream_id, kernel):
    """Records `kernel` into the capture running on the stream and returns True, or returns
    False (no capture: the caller runs it). Under the lock, so a kernel that another thread
    launches while the capture ends is either in the graph or run, never lost."""
    if not stream_capture:  # no capture anywhere: the common case takes no lock
        return False
    with lock:
        g = stream_capture.get((device, stream_id))
        if g is None:
            return False
        g._record_kernel(kernel)
        return True


def note_event_record(event, stream):
    event._capture = stream_capture.get((stream.device_index, stream.stream_id))


def note_event_wait(event, stream):
    """A stream waiting on an event recorded inside a capture joins that capture, if the
    capture still runs (checked under the lock: one ending meanwhile must not get a stream
    back that it will never release)."""
    g = getattr(event, "_capture", None)
    if g is None:
        return
    key = (stream.device_index, stream.stream_id)
    with lock:
        if g._joinable and key not in stream_capture:
            stream_capture[key] = g
            g._streams.append(key)
            _C.set_stream_capture(key[0], key[1], g._capture_id)


def retain_pool_in_capture(device, pool_id):
    """use_mem_pool entered while the current stream captures: the graph keeps the pool."""
    g = stream_capture.get((device, _C.current_stream_id(device)))
    if g is not None:
        _C.create_or_incref_pool(device, pool_id, None)
        g._retained.append(pool_id)


def is_current_stream_capturing():
    lazy_init()
    d = _C.current_device()
    return (d, _C.current_stream_id(d)) in stream_capture
