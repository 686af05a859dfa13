"""Emulator settings: what initialisation will create (device count, memory per device, the
runtime's reserve, the raw allocator under the default pools), from `emulator.configure()`,
`memory.change_current_allocator()` or the environment (MTIA_EMULATOR_DEVICES,
MTIA_EMULATOR_MEMORY), and the one parser of memory sizes ('512MiB', '16GiB').

Owns: the `settings` table (written before initialisation only), parse_memory,
conf_items (the top-level key:value pairs of an MTIA_ALLOC_CONF string),
check_unsupported_conf (refuses the keys the core parses but the emulator does not do),
NO_DEVICE_MESSAGE (what every device call raises when MTIA_EMULATOR_DEVICES=0).
Relies on: _errors (as_integer), _C.parse_memory_size (the core parses size strings; Python never does)."""
import os

from . import _C
from ._errors import as_integer

DEFAULT_DEVICES = 2
NO_DEVICE_MESSAGE = ("No MTIA devices are available (MTIA_EMULATOR_DEVICES=0): set MTIA_EMULATOR_DEVICES "
                     "to 1..64, or call mtia_alloc.emulator.configure(device_count=N) before the first device call")
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
    if not 0 <= n <= 64:  # 0: no device (is_available() is False), as a machine without one
        raise ValueError(f"MTIA_EMULATOR_DEVICES must be between 1 and 64, got {n} (or 0: no device)")
    return n


def configured_device_count():
    """The device count initialisation uses: emulator.configure's, else MTIA_EMULATOR_DEVICES
    (0 is possible: then there is no device to initialise)."""
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
    if as_integer(value) is not None:
        nbytes = as_integer(value)
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


# Keys the core's parser accepts but the emulated allocator does not implement: their True
# is refused (NotImplementedError), never silently ignored; False (the default) is accepted.
UNSUPPORTED_CONF = {
    "release_lock_on_cudamalloc": "the emulated device allocation always runs under the allocator's lock",
    "graph_capture_record_stream_reuse": "a block freed during a graph capture after record_stream is kept "
                                         "until the capture ends, as without the option",
}


def conf_items(conf):
    """The top-level (key, value) pairs of a settings string, white space dropped; a
    bracketed value ('[256:2,>:4]') comes back whole. Lenient: the core's parser is the
    one that reports malformed strings."""
    text = "".join(conf.split())
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    items = []
    for part in parts:
        key, sep, value = part.partition(":")
        if sep:
            items.append((key, value))
    return items


def check_unsupported_conf(conf, source):
    """Raises NotImplementedError for a key of `conf` set to True that the emulator lacks."""
    for key, value in conf_items(conf):
        if key in UNSUPPORTED_CONF and value == "True":
            raise NotImplementedError(f"{source}: {key}:True is not supported by mtia_alloc "
                                      f"({UNSUPPORTED_CONF[key]}); only {key}:False is accepted")
