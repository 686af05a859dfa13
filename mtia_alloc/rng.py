"""Per-device random generators (torch.mtia's RNG functions): each device has a numpy
PCG64 generator; its state is exchanged as a numpy uint8 array. Seeding before
initialisation is queued until init, as torch.mtia does."""
import pickle
import random

import numpy as np

from . import _C
from ._state import device_index, is_initialized, lazy_call, lazy_init

_generators = {}   # device -> np.random.Generator
_initial_seeds = {}


def _gen(d):
    g = _generators.get(d)
    if g is None:
        seed_value = _initial_seeds.setdefault(d, 67280421310721)
        g = _generators[d] = np.random.Generator(np.random.PCG64(seed_value))
    return g


def generator(device=None):
    """The numpy Generator of a device (kernels may draw from it)."""
    return _gen(device_index(device))


def get_rng_state(device="mtia"):
    lazy_init()
    d = device_index(device)
    state = pickle.dumps(_gen(d).bit_generator.state, protocol=4)
    return np.frombuffer(state, dtype=np.uint8).copy()


def set_rng_state(new_state, device="mtia"):
    state = np.asarray(new_state, dtype=np.uint8).copy()

    def apply():
        d = device_index(device)
        try:
            st = pickle.loads(state.tobytes())
            _gen(d).bit_generator.state = st
        except Exception as e:
            raise ValueError(f"not an RNG state from get_rng_state(): {e}") from None

    lazy_call(apply)


def _check_seed(seed_value):
    if isinstance(seed_value, bool) or not isinstance(seed_value, int):
        raise TypeError(f"seed must be an int, got {type(seed_value).__name__}")
    return seed_value & ((1 << 64) - 1)


def manual_seed(seed_value):
    s = _check_seed(seed_value)

    def apply():
        d = _C.current_device()
        _initial_seeds[d] = s
        _generators[d] = np.random.Generator(np.random.PCG64(s))

    lazy_call(apply)


def manual_seed_all(seed_value):
    s = _check_seed(seed_value)

    def apply():
        for d in range(_C.device_count()):
            _initial_seeds[d] = s
            _generators[d] = np.random.Generator(np.random.PCG64(s))

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
