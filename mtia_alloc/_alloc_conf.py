"""The allocator's settings at run time (MTIA_ALLOC_CONF, with PYTORCH_CUDA_ALLOC_CONF's
keys) and the one rounding function exposed in Python: the core's round_size under the
current settings.

Every key the core's parser accepts takes effect at run time: max_split_size_mb,
max_non_split_rounding_mb, roundup_power2_divisions, garbage_collection_threshold and
expandable_segments are read by the allocator at each allocation; per_process_memory_fraction
(which the core applies only when it creates a device) is applied here to every device;
backend takes only 'native'. release_lock_on_cudamalloc:True and
graph_capture_record_stream_reuse:True are refused (NotImplementedError): the emulated
allocator has neither behaviour, so accepting them would silently ignore them (False, their
default, is accepted). The same refusal applies to MTIA_ALLOC_CONF at initialisation.

Owns: set_allocator_settings (PyTorch's _set_allocator_settings), round_size.
Relies on: _lazy_init, _settings (conf_items, check_unsupported_conf: the refusal above),
_C (set_config, set_memory_fraction, round_size_: the core parses and rounds)."""
import operator
import threading

from . import _C
from ._lazy_init import lazy_init
from ._settings import check_unsupported_conf, conf_items

__all__ = ["set_allocator_settings", "round_size"]

_config_lock = threading.Lock()


def round_size(size):
    """The block size a request of `size` bytes gets under the current settings."""
    lazy_init()
    if isinstance(size, bool) or not hasattr(size, "__index__"):
        raise ValueError(f"size must be a positive int below 2**64, got {size!r}")
    size = operator.index(size)
    if not 0 < size < 1 << 64:
        raise ValueError(f"size must be a positive int below 2**64, got {size!r}")
    return _C.round_size_(size)


def set_allocator_settings(conf):
    """Parses an MTIA_ALLOC_CONF string at run time (PyTorch's _set_allocator_settings).
    Each key takes effect at once (per_process_memory_fraction on every device); keys the
    emulator does not implement are refused with NotImplementedError, leaving the settings
    unchanged."""
    if not isinstance(conf, str):
        raise TypeError(f"settings must be a str, got {type(conf).__name__}")
    check_unsupported_conf(conf, f"_set_allocator_settings({conf!r})")
    lazy_init()
    with _config_lock:
        _C.set_config(conf)  # validates the whole string (the core keeps the old settings on error)
        fractions = [v for k, v in conf_items(conf) if k == "per_process_memory_fraction"]
        if fractions:
            text = fractions[-1]  # the core parsed it (strtod): a number in [0, 1]
            try:
                fraction = float(text)
            except ValueError:
                fraction = float.fromhex(text)
            for d in range(_C.device_count()):
                _C.set_memory_fraction(fraction, d)
