"""The allocator's settings at run time (MTIA_ALLOC_CONF, with PYTORCH_CUDA_ALLOC_CONF's
keys) and the one rounding function exposed in Python: the core's round_size under the
current settings.

Owns: set_allocator_settings (PyTorch's _set_allocator_settings), round_size.
Relies on: _lazy_init, _C (set_config, round_size_: the core parses and rounds)."""
import threading

from . import _C
from ._lazy_init import lazy_init

__all__ = ["set_allocator_settings", "round_size"]

_config_lock = threading.Lock()


def round_size(size):
    """The block size a request of `size` bytes gets under the current settings."""
    lazy_init()
    if not isinstance(size, int) or not 0 < size < 1 << 64:
        raise ValueError(f"size must be a positive int below 2**64, got {size!r}")
    return _C.round_size_(size)


def set_allocator_settings(conf):
    """Parses an MTIA_ALLOC_CONF string at run time (PyTorch's _set_allocator_settings)."""
    if not isinstance(conf, str):
        raise TypeError(f"settings must be a str, got {type(conf).__name__}")
    lazy_init()
    with _config_lock:
        _C.set_config(conf)
