"""Emulator settings: what initialisation will create (device count, memory per device, the
runtime's reserve, the raw allocator under the default pools), from `emulator.configure()`,
`memory.change_current_allocator()` or the environment (MTIA_EMULATOR_DEVICES,
MTIA_EMULATOR_MEMORY), and the one parser of memory sizes ('512MiB', '16GiB').

Owns: the `settings` table (written before initialisation only), parse_memory.
Relies on: _C.parse_memory_size (the core parses size strings; Python never does)."""
import os

from . import _C

DEFAULT_DEVICES = 2
DEFAULT_MEMORY = "16GiB"
MIN_MEMORY = 1 << 20
MAX_MEMORY = 64 << 40

# Filled by emulator.configure() and memory.change_current_allocator(); None = default.
settings = {"device_count": None, "memory_per_device": None, "runtime_reserved": None, "raw_allocator": None}


def _env_device_count():
    text = os.environ.get("MTIA_EMULATOR_DEVICES")
    if text is None or text.strip() == "":
        return DEFAULT_DEVICES
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"MTIA_EMULATOR_DEVICES must be a whole number of devices, got {text!r}") from None
    if not 1 <= n <= 64:
        raise ValueError(f"MTIA_EMULATOR_DEVICES must be between 1 and 64, got {n}")
    return n


def configured_device_count():
    """The device count initialisation uses: emulator.configure's, else MTIA_EMULATOR_DEVICES."""
    return settings["device_count"] or _env_device_count()


def default_runtime_reserved(memory):
    """1/256 of a device (64 MiB of 16 GiB) in whole pages: what its runtime keeps."""
    return memory // 256 // 4096 * 4096


def parse_size(value, what):
    """Bytes from a string such as '512MiB' (the core's parser; errors name `what`)."""
    return _C.parse_memory_size(value, what)


def parse_memory(value, what="memory_per_device"):
    """Bytes from an int or a string such as '512MiB' or '16GiB' (whole pages, 1 MiB to
    64 TiB). Errors name `what` (the argument or environment variable)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int number of bytes or a string like '16GiB', got bool")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, str):
        nbytes = parse_size(value, what)
    else:
        raise TypeError(f"{what} must be an int number of bytes or a string like '16GiB', "
                        f"got {type(value).__name__}")
    if nbytes < MIN_MEMORY:
        raise ValueError(f"{what} must be at least 1 MiB, got {value!r} ({nbytes} bytes)")
    if nbytes > MAX_MEMORY:
        raise ValueError(f"{what} must be at most 64 TiB, got {value!r} ({nbytes} bytes)")
    return nbytes
