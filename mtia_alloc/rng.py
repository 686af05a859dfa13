"""Per-device random generators (torch.mtia's RNG functions): each device has a numpy
PCG64 generator; its state is exchanged as a numpy uint8 array. Seeding before
initialisation is queued until init, as torch.mtia does.

The state array has a fixed layout (little endian): the 128-bit PCG64 state, the 128-bit
increment, then two uint32 words (has_uint32, uinteger) -- 40 bytes, like the fixed-size
ByteTensor torch.cuda.get_rng_state() returns. It is plain data: set_rng_state() never
unpickles anything it is given.

Owns: the generators and the RNG functions of API.md §1. Relies on: _lazy_init
(lazy_call queues seeding until init), _device_arg, _errors (as_integer), _C."""
import random
import threading

import numpy as np

from . import _C
from ._device_arg import device_index
from ._errors import as_integer
from ._lazy_init import lazy_call, lazy_init

_DEFAULT_SEED = 67280421310721  # torch's default_generator seed
_STATE_BYTES = 40

_generators = {}   # device -> np.random.Generator
_initial_seeds = {}
_lock = threading.Lock()


def _gen(d):
    g = _generators.get(d)
    if g is None:
        with _lock:
            g = _generators.get(d)
            if g is None:
                seed_value = _initial_seeds.setdefault(d, _DEFAULT_SEED)
                g = _generators[d] = np.random.Generator(np.random.PCG64(seed_value))
    return g


def _reseed(d, s):
    with _lock:
        _initial_seeds[d] = s
        _generators[d] = np.random.Generator(np.random.PCG64(s))


def generator(device=None):
    """The numpy Generator of a device (kernels may draw from it)."""
    return _gen(device_index(device))


def _encode(state):
    st = state["state"]
    out = (st["state"].to_bytes(16, "little") + st["inc"].to_bytes(16, "little")
           + int(state["has_uint32"]).to_bytes(4, "little") + int(state["uinteger"]).to_bytes(4, "little"))
    return np.frombuffer(out, dtype=np.uint8).copy()


def _decode(new_state):
    """The PCG64 state dict of a get_rng_state() array; ValueError/TypeError otherwise."""
    if isinstance(new_state, (str, bytes, bytearray)) or not hasattr(new_state, "__len__"):
        raise TypeError(f"RNG state must be a uint8 array from get_rng_state(), got {type(new_state).__name__}")
    arr = np.asarray(new_state)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise TypeError(f"RNG state must be a 1-d uint8 array from get_rng_state(), got {arr.dtype} "
                        f"with shape {arr.shape}")
    if arr.size != _STATE_BYTES:
        raise ValueError(f"RNG state must have {_STATE_BYTES} bytes, got {arr.size}")
    raw = arr.tobytes()
    has_uint32 = int.from_bytes(raw[32:36], "little")
    if has_uint32 not in (0, 1):
        raise ValueError("not an RNG state from get_rng_state(): bad has_uint32 field")
    return {"bit_generator": "PCG64",
            "state": {"state": int.from_bytes(raw[0:16], "little"), "inc": int.from_bytes(raw[16:32], "little")},
            "has_uint32": has_uint32, "uinteger": int.from_bytes(raw[36:40], "little")}


def get_rng_state(device="mtia"):
    """The generator state of a device as a 40-byte numpy uint8 array (initialises)."""
    lazy_init()
    return _encode(_gen(device_index(device)).bit_generator.state)


def set_rng_state(state=None, device="mtia", *, new_state=None):
    """Sets a device's generator state; validated now, applied at initialisation if
    mtia_alloc is not initialised yet. `new_state=` (torch.mtia's keyword) works too."""
    if state is not None and new_state is not None:
        raise TypeError("set_rng_state() got the state twice (state and new_state)")
    state = _decode(state if new_state is None else new_state)  # a copy: later changes do not matter

    def apply():
        _gen(device_index(device)).bit_generator.state = state

    lazy_call(apply)


def get_rng_state_all():
    lazy_init()
    return [get_rng_state(d) for d in range(_C.device_count())]


def set_rng_state_all(new_states):
    for d, state in enumerate(new_states):
        set_rng_state(state, d)


def _check_seed(seed):
    if as_integer(seed) is None:
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return as_integer(seed) & ((1 << 64) - 1)


def manual_seed(seed):
    """Seeds the current device's generator (at initialisation if not yet initialised)."""
    s = _check_seed(seed)
    lazy_call(lambda: _reseed(_C.current_device(), s))


def manual_seed_all(seed):
    """Seeds every device's generator (at initialisation if not yet initialised)."""
    s = _check_seed(seed)

    def apply():
        for d in range(_C.device_count()):
            _reseed(d, s)

    lazy_call(apply)


def seed():
    manual_seed(random.getrandbits(63))


def seed_all():
    manual_seed_all(random.getrandbits(63))


def initial_seed():
    lazy_init()
    d = _C.current_device()
    _gen(d)
    return _initial_seeds[d]
