"""Errors raised inside kernels: a Python kernel that raises does not kill its stream; its
error is kept here (as text, so the kernel's arguments are not kept alive) and raised, with
its traceback, by the next synchronize() of that stream or of its device.

Owns: KernelError, the per-stream error registry (record_kernel_error, raise_kernel_errors).
Relies on: nothing of mtia_alloc (the stream workers, devices and streams call in)."""
import threading
import traceback

__all__ = ["KernelError", "record_kernel_error", "raise_kernel_errors", "device_error_keys"]

_kernel_errors = {}  # (device, stream_id) -> [(exception, formatted traceback)]
_kernel_errors_lock = threading.Lock()


class KernelError(RuntimeError):
    """An exception raised inside a kernel, surfaced at synchronize()."""


def record_kernel_error(device, stream_id, exc):
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    # Keep the text of the traceback, not its frames: they hold the kernel's arguments
    # (DeviceArrays), which would otherwise stay allocated until the next synchronize().
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
    with _kernel_errors_lock:
        _kernel_errors.setdefault((device, stream_id), []).append((exc, text))


def device_error_keys(device):
    """The (device, stream_id) keys holding errors of streams of `device`."""
    return [k for k in list(_kernel_errors) if k[0] == device]


def raise_kernel_errors(keys):
    with _kernel_errors_lock:
        errors = []
        for key in keys:
            errors.extend(_kernel_errors.pop(key, []))
    if errors:
        exc, tb = errors[0]
        more = f" (and {len(errors) - 1} more kernel errors)" if len(errors) > 1 else ""
        raise KernelError(f"a kernel raised {type(exc).__name__}: {exc}{more}\n\nKernel traceback:\n{tb}") from exc
