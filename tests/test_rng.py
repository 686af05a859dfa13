"""The per-device RNG functions (API.md, pools_graphs_streams_api.md must-have 35):
get_rng_state/set_rng_state round trips per device, states validated as data, manual_seed,
manual_seed_all, seed, seed_all and initial_seed, and API.md's keyword names.
"""
import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.rng
from helpers import TorchDevice


def test_rng_state_round_trip_per_device():
    state0 = mtia.get_rng_state()
    assert isinstance(state0, np.ndarray) and state0.dtype == np.uint8 and state0.ndim == 1
    first = mtia.rng.generator(0).random(5)
    mtia.set_rng_state(state0)
    assert np.array_equal(mtia.rng.generator(0).random(5), first)

    state1 = mtia.get_rng_state("mtia:1")
    draws1 = mtia.rng.generator(1).integers(0, 1 << 30, size=7)
    mtia.rng.generator(0).random(3)  # devices are independent
    mtia.set_rng_state(state1, device=1)
    assert np.array_equal(mtia.rng.generator(1).integers(0, 1 << 30, size=7), draws1)
    assert np.array_equal(mtia.get_rng_state(TorchDevice("mtia:1")), mtia.get_rng_state(1))


def test_rng_state_is_data_and_is_validated():
    state = mtia.get_rng_state(0)
    with pytest.raises(ValueError):
        mtia.set_rng_state(state[:-1])
    with pytest.raises(TypeError):
        mtia.set_rng_state(state.astype(np.int64))
    with pytest.raises(TypeError):
        mtia.set_rng_state(b"\x80\x04not-a-state")
    assert np.array_equal(mtia.get_rng_state(0), state)  # unchanged by the failed calls


def test_manual_seed_seed_and_initial_seed():
    mtia.set_device(1)
    mtia.manual_seed(1234)
    assert mtia.initial_seed() == 1234
    a = mtia.rng.generator(1).random(4)
    mtia.manual_seed(1234)
    assert np.array_equal(mtia.rng.generator(1).random(4), a)
    mtia.manual_seed_all(99)
    assert mtia.initial_seed() == 99
    mtia.set_device(0)
    assert mtia.initial_seed() == 99
    assert np.array_equal(mtia.rng.generator(0).random(4), mtia.rng.generator(1).random(4))
    mtia.seed()
    first = mtia.initial_seed()
    mtia.seed_all()
    assert mtia.initial_seed() != first or mtia.initial_seed() != 99
    with pytest.raises(TypeError):
        mtia.manual_seed("7")


def test_rng_functions_take_the_api_md_keywords():
    # API.md: manual_seed(seed), manual_seed_all(seed), set_rng_state(state, device); torch.mtia's
    # new_state= keyword works too
    mtia.manual_seed(seed=5)
    assert mtia.initial_seed() == 5
    mtia.manual_seed_all(seed=6)
    assert mtia.initial_seed() == 6
    state = mtia.get_rng_state(device=0)
    draws = mtia.rng.generator(0).random(3)
    mtia.set_rng_state(state=state, device=0)
    assert np.array_equal(mtia.rng.generator(0).random(3), draws)
    mtia.set_rng_state(new_state=state, device="mtia:0")
    assert np.array_equal(mtia.rng.generator(0).random(3), draws)
    with pytest.raises(TypeError, match="got the state twice"):
        mtia.set_rng_state(state, new_state=state)
    with pytest.raises(TypeError, match="RNG state must be a uint8 array"):
        mtia.set_rng_state(None)
