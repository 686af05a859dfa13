"""Process state of the façade: lazy initialisation (torch.mtia's _lazy_init semantics),
emulator settings taken from the environment or `emulator.configure()`, and the parser
every `device` argument goes through."""
import os
import threading
import traceback

from . import _C

_DEFAULT_DEVICES = 2
_DEFAULT_MEMORY = "16GiB"


class OutOfMemoryError(RuntimeError):
    """The device (or the memory fraction) cannot hold the request. Message as PyTorch's."""


class DeferredMtiaCallError(Exception):
    """A call queued before initialisation failed when initialisation ran it."""


def refuse_copy(self, protocol=None):
    """`__reduce_ex__` of objects that own a reference to allocator state (a pool, a graph):
    a copy would release it a second time when it dies. As for PyTorch's MemPool and
    CUDAGraph (pybind objects), copy, deepcopy and pickle raise TypeError."""
    raise TypeError(f"cannot pickle or copy '{type(self).__name__}' object: it owns allocator state; "
                    f"share the object itself")


_initialized = False
_in_bad_fork = False
_init_lock = threading.Lock()
_tls = threading.local()
_queued_calls = []  # (callable, traceback of the queueing site)
_settings = {"device_count": None, "memory_per_device": None, "runtime_reserved": None, "raw_allocator": None}


def _env_device_count():
    text = os.environ.get("MTIA_EMULATOR_DEVICES")
    if text is None or text.strip() == "":
        return _DEFAULT_DEVICES
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"MTIA_EMULATOR_DEVICES must be a whole number of devices, got {text!r}") from None
    if not 1 <= n <= 64:
        raise ValueError(f"MTIA_EMULATOR_DEVICES must be between 1 and 64, got {n}")
    return n


def configured_device_count():
    """The device count initialisation uses: emulator.configure's, else MTIA_EMULATOR_DEVICES."""
    return _settings["device_count"] or _env_device_count()


_MIN_MEMORY = 1 << 20
_MAX_MEMORY = 64 << 40


def default_runtime_reserved(memory):
    """1/256 of a device (64 MiB of 16 GiB) in whole pages: what its runtime keeps."""
    return memory // 256 // 4096 * 4096


def parse_memory(value, what="memory_per_device"):
    """Bytes from an int or a string such as '512MiB' or '16GiB' (whole pages, 1 MiB to
    64 TiB). Errors name `what` (the argument or environment variable)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int number of bytes or a string like '16GiB', got bool")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, str):
        nbytes = _C.parse_memory_size(value, what)
    else:
        raise TypeError(f"{what} must be an int number of bytes or a string like '16GiB', "
                        f"got {type(value).__name__}")
    if nbytes < _MIN_MEMORY:
        raise ValueError(f"{what} must be at least 1 MiB, got {value!r} ({nbytes} bytes)")
    if nbytes > _MAX_MEMORY:
        raise ValueError(f"{what} must be at most 64 TiB, got {value!r} ({nbytes} bytes)")
    return nbytes


def _after_fork_in_child():
    global _in_bad_fork
    if _initialized:
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
        memory = _settings["memory_per_device"]
        if memory is None:
            memory = parse_memory(os.environ.get("MTIA_EMULATOR_MEMORY", _DEFAULT_MEMORY) or _DEFAULT_MEMORY,
                                  "MTIA_EMULATOR_MEMORY")
        conf = os.environ.get("MTIA_ALLOC_CONF", "")
        reserve = _settings["runtime_reserved"]
        reserve = default_runtime_reserved(memory) if reserve is None else reserve
        if reserve >= memory:
            raise ValueError(f"emulator.configure(runtime_reserved={reserve}) must be less than the device "
                             f"memory ({memory} bytes)")
        if not _C.is_initialized():
            try:
                # with what a real device's runtime context takes (emulator.configure)
                _C.init(count, memory, conf, _settings["raw_allocator"], reserve)
            except (RuntimeError, ValueError) as e:
                # The emulated devices are made first (their size and count were checked
                # above; what can still fail is reserving their address space), then the
                # allocator settings are parsed: name the input that was at fault.
                if "address space" in str(e) or not conf:
                    source = ("emulator.configure()" if _settings["device_count"] or _settings["memory_per_device"]
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


def device_index(device, optional=True):
    """Index of a device argument: None/'mtia' (current), int, 'mtia:N', or an object with
    .type == 'mtia' and .index (a torch.device). Raises ValueError otherwise."""
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
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"Invalid device index {index!r}")
    else:
        raise ValueError(f"Expected a mtia device (None, int, 'mtia:N' or torch.device), but got: {device!r}")
    if not 0 <= index < n:
        raise ValueError(f"Invalid device index {index}: the valid range is [0, {n - 1}] ({n} devices)")
    return index


_C._configure_hooks(lazy_init, lambda d: device_index(d, optional=True), OutOfMemoryError)
