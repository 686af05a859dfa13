"""Errors raised inside kernels, kept as an asynchronous device error is: a Python kernel
that raises does not kill its stream; its error is kept here (as text, so the kernel's
arguments are not kept alive) with the kernel's position in its stream (its task sequence
number), and raised once, with its traceback, by the first call that observes the stream
past that kernel: Stream.synchronize() or .query(), mtia_alloc.synchronize() of the device,
Event.synchronize() or .query() of an event recorded after the kernel, DeviceArray.numpy().
An event recorded before the kernel does not raise it. An error nobody observed is printed
as a warning (UnobservedKernelErrorWarning) when the interpreter exits.

Owns: KernelError, UnobservedKernelErrorWarning, the per-stream error registry
(`pending`, record_kernel_error, raise_kernel_errors, raise_kernel_errors_upto) and the
exit report.
Relies on: nothing of mtia_alloc (the stream workers, devices and streams call in)."""
import atexit
import os
import threading
import traceback
import warnings

__all__ = ["KernelError", "UnobservedKernelErrorWarning", "record_kernel_error", "raise_kernel_errors",
           "raise_kernel_errors_upto", "device_error_keys", "pending"]

# (device, stream_id) -> [(sequence number of the failed kernel, exception, formatted traceback)].
# Callers test `if pending:` before anything else: no error anywhere costs one dict test.
pending = {}
_lock = threading.Lock()


class KernelError(RuntimeError):
    """An exception raised inside a kernel, surfaced by the next call that observes the
    stream past that kernel (synchronize, query, an event recorded after it)."""


class UnobservedKernelErrorWarning(RuntimeWarning):
    """At exit: a kernel raised and no call ever observed its stream past it."""


def record_kernel_error(device, stream_id, seq, exc):
    """Keeps `exc`, raised by the kernel with sequence number `seq` on the stream."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    # Keep the text of the traceback, not its frames: they hold the kernel's arguments
    # (DeviceArrays), which would otherwise stay allocated until the error is observed.
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
    with _lock:
        pending.setdefault((device, stream_id), []).append((seq, exc, text))


def device_error_keys(device):
    """The (device, stream_id) keys holding errors of streams of `device`."""
    return [k for k in list(pending) if k[0] == device]


def _raise(errors):
    if errors:
        _, exc, tb = errors[0]
        more = f" (and {len(errors) - 1} more kernel errors)" if len(errors) > 1 else ""
        raise KernelError(f"a kernel raised {type(exc).__name__}: {exc}{more}\n\nKernel traceback:\n{tb}") from exc


def raise_kernel_errors(keys):
    """Raises (once) every error kept for the streams `keys`."""
    with _lock:
        errors = []
        for key in keys:
            errors.extend(pending.pop(key, ()))
    _raise(errors)


def raise_kernel_errors_upto(key, seq):
    """Raises (once) the errors of stream `key` whose kernels come at or before task `seq`."""
    with _lock:
        kept = pending.get(key)
        if not kept:
            return
        errors = [e for e in kept if e[0] <= seq]
        if not errors:
            return
        later = [e for e in kept if e[0] > seq]
        if later:
            pending[key] = later
        else:
            del pending[key]
    _raise(errors)


def _report_unobserved():
    """At exit (after the stream workers stopped): what was never observed, as a warning."""
    with _lock:
        left = sorted(pending.items())
        pending.clear()
    for (device, stream_id), errors in left:
        for seq, exc, tb in errors:
            # warn_explicit: no source line of this module under the message
            warnings.warn_explicit(f"a kernel on stream {stream_id} of mtia:{device} raised {type(exc).__name__}: "
                                   f"{exc}, and no synchronize() or query() observed it\n\nKernel traceback:\n{tb}",
                                   UnobservedKernelErrorWarning, "<mtia_alloc at exit>", 0)


def _forget_in_child():
    with _lock:  # a forked child has none of its parent's streams: their errors are not its own
        pending.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)

# Registered when the package is first imported, before mtia_alloc/__init__.py registers
# the workers' shutdown: exit handlers run last-in first-out, so this runs after it.
atexit.register(_report_unobserved)
