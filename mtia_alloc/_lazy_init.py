"""Lazy initialisation with torch.mtia's _lazy_init semantics: the emulated devices and
their allocators are created once, on first use, thread-safely; calls queued before that
(seeding, set_rng_state) run at initialisation; a forked child may not initialise again.

Owns: is_initialized, lazy_init, lazy_call and the initialisation state.
Relies on: _settings (what to create), _errors (DeferredMtiaCallError), _C.init."""
import os
import threading
import traceback

from . import _C
from ._errors import DeferredMtiaCallError
from ._settings import (DEFAULT_MEMORY, NO_DEVICE_MESSAGE, check_unsupported_conf, configured_device_count,
                        default_runtime_reserved, parse_memory, settings)

__all__ = ["is_initialized", "lazy_init", "lazy_call"]

_initialized = False
_in_bad_fork = False
_init_lock = threading.Lock()
_tls = threading.local()
_queued_calls = []  # (callable, traceback of the queueing site)


def _after_fork_in_child():
    """A forked child has only the forking thread and a copy of its parent's memory: the
    stream workers are gone and a device lock (or _init_lock) may be held by a thread that
    no longer exists. After initialisation the binding forgets the parent's allocator
    (_C.after_fork_in_child), so that every device and allocator call comes back here and
    raises the bad-fork error, as PyTorch's first device call in such a child does."""
    global _in_bad_fork, _init_lock
    _init_lock = threading.Lock()
    if _C.after_fork_in_child() or _initialized:
        _in_bad_fork = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def is_initialized():
    return _initialized and not _in_bad_fork


def lazy_init():
    """Initialises the emulated devices and allocators once; thread-safe and idempotent."""
    global _initialized
    if is_initialized() or getattr(_tls, "is_initializing", False):
        return
    with _init_lock:
        if is_initialized():
            return
        if _in_bad_fork:
            raise RuntimeError(
                "Cannot re-initialize MTIA in forked subprocess. To use MTIA with multiprocessing, "
                "you must use the 'spawn' start method")
        count = configured_device_count()
        if count == 0:
            raise RuntimeError(NO_DEVICE_MESSAGE)
        memory = settings["memory_per_device"]
        if memory is None:
            memory = parse_memory(os.environ.get("MTIA_EMULATOR_MEMORY", DEFAULT_MEMORY) or DEFAULT_MEMORY,
                                  "MTIA_EMULATOR_MEMORY")
        conf = os.environ.get("MTIA_ALLOC_CONF", "")
        check_unsupported_conf(conf, f"MTIA_ALLOC_CONF={conf!r}")
        reserve = settings["runtime_reserved"]
        reserve = default_runtime_reserved(memory) if reserve is None else reserve
        if reserve >= memory:
            raise ValueError(f"emulator.configure(runtime_reserved={reserve}) must be less than the device "
                             f"memory ({memory} bytes)")
        if not _C.is_initialized():
            try:
                # with what a real device's runtime context takes (emulator.configure)
                _C.init(count, memory, conf, settings["raw_allocator"], reserve)
            except (RuntimeError, ValueError) as e:
                # The emulated devices are made first (their size and count were checked
                # above; what can still fail is reserving their address space), then the
                # allocator settings are parsed: name the input that was at fault.
                if "address space" in str(e) or not conf:
                    source = ("emulator.configure()" if settings["device_count"] or settings["memory_per_device"]
                              else "MTIA_EMULATOR_DEVICES/MTIA_EMULATOR_MEMORY")
                    raise type(e)(f"cannot create {count} emulated devices of {memory} bytes each "
                                  f"({source}): {e}") from None
                raise type(e)(f"MTIA_ALLOC_CONF={conf!r}: {e}") from None
        _tls.is_initializing = True
        try:
            for call, origin in _queued_calls:
                try:
                    call()
                except Exception as e:
                    raise DeferredMtiaCallError(
                        f"MTIA call failed lazily at initialization with error: {e}\n\n"
                        f"MTIA call was originally invoked at:\n\n{''.join(origin)}") from e
        finally:
            _queued_calls.clear()
            _tls.is_initializing = False
        _initialized = True


def lazy_call(fn):
    """Runs fn now if initialised, else at initialisation."""
    if is_initialized() or getattr(_tls, "is_initializing", False):
        fn()
        return
    with _init_lock:  # initialisation runs the queue under this lock: nothing is lost
        if not is_initialized():
            _queued_calls.append((fn, traceback.format_stack()))
            return
    fn()
