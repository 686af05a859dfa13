"""The device API of torch.mtia over the emulated devices: availability, count, the
thread-local current device, synchronize, capability and properties.

Owns: is_available, init, device_count, current_device, set_device, device (context
manager), synchronize, get_device_capability, get_device_properties, is_bf16_supported,
and _Device (the torch.device look-alike that .device attributes return).
Relies on: _lazy_init, _device_arg, _settings (the count before initialisation),
_kernel_errors (synchronize raises what kernels raised), _errors (as_integer), _C."""
import warnings

from . import _C
from ._device_arg import device_index
from ._errors import as_integer
from ._kernel_errors import device_error_keys, pending, raise_kernel_errors
from ._lazy_init import is_initialized, lazy_init
from ._settings import configured_device_count

__all__ = ["is_available", "init", "device_count", "current_device", "set_device", "device", "synchronize",
           "get_device_capability", "get_device_properties", "is_bf16_supported"]


def is_available():
    """True if there is at least one emulated device (MTIA_EMULATOR_DEVICES=0 gives none).
    Does not initialise and, as torch's, never raises: a malformed MTIA_EMULATOR_DEVICES
    gives False with a warning naming the fault."""
    try:
        return device_count() > 0
    except ValueError as e:
        warnings.warn(f"MTIA is not available: {e}", stacklevel=2)
        return False


def init():
    lazy_init()


def device_count():
    """Number of emulated devices. Like torch.mtia's, it does not initialise: before
    initialisation it is the count initialisation will use (emulator.configure or
    MTIA_EMULATOR_DEVICES), so configure() may still follow."""
    if is_initialized():
        return _C.device_count()
    return configured_device_count()


def current_device():
    lazy_init()
    return _C.current_device()


def set_device(device):
    """Makes `device` current for this thread; negative indices are ignored, and None (as
    every device argument in API.md) means the current device, so it changes nothing."""
    index = as_integer(device)
    if index is not None and index < 0:
        return
    _C.set_current_device(device_index(device))


class device:
    """Context manager that makes a device current and restores the previous one."""

    def __init__(self, device):
        index = as_integer(device)
        if index is not None and index < 0:
            self.idx = -1
        else:
            self.idx = device_index(device, optional=True)
        self.prev_idx = -1

    def __enter__(self):
        if self.idx >= 0:
            self.prev_idx = _C.current_device()
            _C.set_current_device(self.idx)
        return self

    def __exit__(self, *exc):
        if self.idx >= 0:
            _C.set_current_device(self.prev_idx)
        return False


def synchronize(device=None):
    """Waits for all work on every stream of the device; raises kernel errors."""
    d = device_index(device)
    _C.device_synchronize(d)
    if pending:
        raise_kernel_errors(device_error_keys(d))


class _Device:
    """A minimal torch.device look-alike: .type and .index."""

    __slots__ = ("type", "index")

    def __init__(self, index):
        self.type, self.index = "mtia", index

    def __eq__(self, other):
        return getattr(other, "type", None) == self.type and getattr(other, "index", None) == self.index

    def __hash__(self):
        return hash((self.type, self.index))

    def __repr__(self):
        return f"device(type='mtia', index={self.index})"

    def __str__(self):
        return f"mtia:{self.index}"


def get_device_capability(device=None):
    device_index(device)
    return (1, 0)


def get_device_properties(device=None):
    d = device_index(device)
    free, total = _C.mem_get_info(d)
    return {"name": "MTIA emulator", "total_memory": total, "index": d, "major": 1, "minor": 0,
            "multi_processor_count": 1}


def is_bf16_supported(including_emulation=True):
    return True
