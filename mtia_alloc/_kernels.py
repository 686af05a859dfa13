"""Kernel submission: a kernel description goes to its stream's worker, or into the graph
capturing that stream. emulator.launch/sleep/copy_/fill_, DeviceArray.__copy__ and
MTIAGraph.replay all submit through here.

A kernel is a tuple: ("python", fn, args), ("sleep", ms), ("copy", dst, src) or
("fill", dst, pattern bytes); dst/src are DeviceArrays (or, in a captured graph,
references that keep their address and size only).

Owns: submit, stream_arg (which stream a kernel goes to), run_kernel, in_kernel (true on
a stream worker while it runs a Python kernel).
Relies on: streams (Stream, current_stream), _capture (record_if_capturing),
_kernel_errors (a Python kernel's exception is kept, with its place in the stream, for the
calls that observe the stream), _C (launch_*, stream_progress)."""
import threading

from . import _C
from ._capture import record_if_capturing
from ._kernel_errors import record_kernel_error
from .streams import Stream, current_stream

__all__ = ["submit", "stream_arg", "run_kernel", "in_kernel"]

_worker = threading.local()  # .running: a Python kernel runs on this thread


def in_kernel():
    """True inside a Python kernel (on a stream's worker thread)."""
    return getattr(_worker, "running", False)


def stream_arg(stream, device=None):
    """The stream a kernel goes to: `stream`, else the current stream of `device` (the
    device of the arrays a native kernel writes; the current device if None)."""
    if stream is None:
        return current_stream(device)
    if not isinstance(stream, Stream):
        raise TypeError(f"stream must be an mtia_alloc.Stream or None, got {type(stream).__name__}")
    return stream


def _enqueue_python(stream, fn, args):
    d, sid = stream.device_index, stream.stream_id

    def kernel():
        _worker.running = True
        try:
            fn(*args)
        except BaseException as e:  # surfaces at the next call that observes the stream
            # The worker runs tasks in order and publishes each one's number when it
            # ends: this kernel's number is one past the last completed.
            record_kernel_error(d, sid, _C.stream_progress(d, sid)[1] + 1, e)
        finally:
            _worker.running = False

    _C.launch_python(d, sid, kernel)


def run_kernel(stream, kernel):
    """Queues a recorded kernel description on `stream` (used by launch and graph replay)."""
    kind = kernel[0]
    if kind == "python":
        _enqueue_python(stream, kernel[1], kernel[2])
    elif kind == "sleep":
        _C.launch_sleep(stream.device_index, stream.stream_id, kernel[1])
    elif kind == "copy":
        dst, src = kernel[1], kernel[2]
        _C.launch_copy(stream.device_index, stream.stream_id, dst.data_ptr(), src.data_ptr(), dst.nbytes, (dst, src))
    elif kind == "fill":
        dst, pattern = kernel[1], kernel[2]
        _C.launch_fill(stream.device_index, stream.stream_id, dst.data_ptr(), dst.nbytes, pattern, dst)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")


def submit(stream, kernel):
    """Records `kernel` into the capture running on `stream`, or else queues it there."""
    if not record_if_capturing(stream.device_index, stream.stream_id, kernel):
        run_kernel(stream, kernel)
