"""The parser every `device` argument goes through (API.md: None, an int, 'mtia',
'mtia:N', or an object with .type == 'mtia' and .index such as a torch.device), and the
wiring of the binding's hooks: the core calls back into lazy_init and this parser, and
raises the façade's OutOfMemoryError.

Owns: device_index, check_device_arg; the one call of _C._configure_hooks.
Relies on: _lazy_init, _settings (the device count before initialisation), _errors."""
import operator

from . import _C
from ._errors import OutOfMemoryError
from ._lazy_init import is_initialized, lazy_init
from ._settings import NO_DEVICE_MESSAGE, configured_device_count

__all__ = ["device_index", "check_device_arg"]


def device_index(device, optional=True):
    """Index of a device argument: None/'mtia' (current), an integer (int, numpy integer,
    anything with __index__), 'mtia:N', or an object with .type == 'mtia' and .index (a
    torch.device). Raises ValueError otherwise."""
    lazy_init()
    return _parse_device(device, optional, _C.device_count(), _C.current_device)


def check_device_arg(device):
    """Validates a device argument as device_index does, without initialising (for the
    functions that answer 0 or {} before initialisation, as torch's do)."""
    if is_initialized():
        device_index(device)
    else:
        _parse_device(device, True, configured_device_count(), lambda: 0)


def _parse_device(device, optional, n, current):
    if n == 0:  # MTIA_EMULATOR_DEVICES=0: no device to name (checked before initialising)
        raise RuntimeError(NO_DEVICE_MESSAGE)
    if device is None:
        if not optional:
            raise ValueError("Expected a mtia device with a specified index or an integer, but got: None")
        return current()
    if isinstance(device, bool):
        raise ValueError(f"Expected a mtia device, but got: {device!r}")
    if isinstance(device, int):
        index = device
    elif isinstance(device, str):
        text = device.strip()
        if text == "mtia":
            return current()
        if not text.startswith("mtia:"):
            raise ValueError(f"Expected a mtia device, but got: {device!r}")
        try:
            index = int(text[5:])
        except ValueError:
            raise ValueError(f"Invalid device string {device!r}: expected 'mtia' or 'mtia:N'") from None
    elif hasattr(device, "type") and hasattr(device, "index"):
        if device.type != "mtia":
            raise ValueError(f"Expected a mtia device, but got: {device!r}")
        if device.index is None:
            return current()
        index = device.index
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise ValueError(f"Invalid device index {index!r}")
        index = operator.index(index)
    elif hasattr(device, "__index__"):  # a numpy integer, or any integer type
        try:
            index = operator.index(device)
        except TypeError:
            raise ValueError(f"Expected a mtia device, but got: {device!r}") from None
    else:
        raise ValueError(f"Expected a mtia device (None, int, 'mtia:N' or torch.device), but got: {device!r}")
    if not 0 <= index < n:
        raise ValueError(f"Invalid device index {index}: the valid range is [0, {n - 1}] ({n} devices)")
    return index


_C._configure_hooks(lazy_init, lambda d: device_index(d, optional=True), OutOfMemoryError)
