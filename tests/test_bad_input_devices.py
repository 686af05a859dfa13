"""Bad device arguments to every function that takes one: other device types, malformed
strings, indices out of range, floats, objects, bools and torch.device look-alikes, each
refused with a ValueError that names the problem (and the valid range) and changes nothing (a
bad-input matrix over ../shared/API.md; memory_stats and mem_get_info's other values are in
test_bad_input.py).

Each case names the call, the exception type and a message fragment, and must change nothing
(helpers.check_bad_call and state_unchanged); the cases get the `resources` fixture.
"""
import re

import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
import mtia_alloc.memory
from helpers import DEVICES, TorchDevice, state_unchanged
from mtia_alloc.memory import use_mem_pool

RANGE = re.escape(f"the valid range is [0, {len(DEVICES) - 1}]")


def _use_pool_on(r, d):
    with use_mem_pool(r.pool, device=d):
        pass  # pragma: no cover


DEVICE_CALLS = {
    "set_device": lambda r, d: mtia.set_device(d),
    "device": lambda r, d: mtia.device(d),
    "synchronize": lambda r, d: mtia.synchronize(d),
    "current_stream": lambda r, d: mtia.current_stream(d),
    "default_stream": lambda r, d: mtia.default_stream(d),
    "Stream": lambda r, d: mtia.Stream(device=d),
    "Stream-handle": lambda r, d: mtia.Stream(stream_id=0, device_index=d),
    "Event": lambda r, d: mtia.Event(device=d),
    "get_device_properties": lambda r, d: mtia.get_device_properties(d),
    "get_device_capability": lambda r, d: mtia.get_device_capability(d),
    "empty": lambda r, d: mtia.empty(4, device=d),
    "get_per_process_memory_fraction": lambda r, d: mtia.get_per_process_memory_fraction(d),
    "memory_summary": lambda r, d: mtia.memory_summary(d),
    "memory_stats_as_nested_dict": lambda r, d: mtia.memory_stats_as_nested_dict(d),
    "memory_reserved": lambda r, d: mtia.memory_reserved(d),
    "reset_peak_memory_stats": lambda r, d: mtia.reset_peak_memory_stats(d),
    "reset_accumulated_memory_stats": lambda r, d: mtia.reset_accumulated_memory_stats(d),
    "get_rng_state": lambda r, d: mtia.get_rng_state(d),
    "set_rng_state": lambda r, d: mtia.set_rng_state(r.rng_state, d),
    "use_mem_pool": _use_pool_on,
    "fail_device_allocations": lambda r, d: emulator.fail_device_allocations(None, device=d),
    "check_invariants": lambda r, d: mtia.memory.check_invariants(d),
}

BAD_DEVICE_VALUES = [
    ("cuda:0", "cuda-0", r"Expected a mtia device, but got: 'cuda:0'"),
    ("mtia:x", "mtia-x", r"Invalid device string 'mtia:x'"),
    ("mtia:-1", "mtia-neg1", rf"Invalid device index -1: {RANGE}"),
    ("mtia:99", "mtia-99", rf"Invalid device index 99: {RANGE}"),
    (1.5, "float", r"Expected a mtia device .*but got: 1\.5"),
    (object(), "object", r"Expected a mtia device .*but got: <object object"),
]

DEVICE_CASES = [
    pytest.param(DEVICE_CALLS[name], value, message, id=f"{name}-{vid}")
    for name in DEVICE_CALLS for value, vid, message in BAD_DEVICE_VALUES
] + [
    # memory_stats and mem_get_info with the values tests/test_bad_input.py does not try
    pytest.param(lambda r, d: mtia.memory_stats(d), "mtia:x", r"Invalid device string 'mtia:x'",
                 id="memory_stats-mtia-x"),
    pytest.param(lambda r, d: mtia.memory_stats(d), "mtia:-1", rf"Invalid device index -1: {RANGE}",
                 id="memory_stats-mtia-neg1"),
    pytest.param(lambda r, d: mtia.mem_get_info(d), "mtia:x", r"Invalid device string 'mtia:x'",
                 id="mem_get_info-mtia-x"),
    pytest.param(lambda r, d: mtia.mem_get_info(d), "mtia:-1", rf"Invalid device index -1: {RANGE}",
                 id="mem_get_info-mtia-neg1"),
    # torch.device look-alikes and bools
    pytest.param(lambda r, d: mtia.set_device(d), TorchDevice("cuda", 0), r"Expected a mtia device, but got: device",
                 id="set_device-device-like-cuda"),
    pytest.param(lambda r, d: mtia.current_stream(d), TorchDevice("mtia", 99), rf"Invalid device index 99: {RANGE}",
                 id="current_stream-device-like-mtia-99"),
    pytest.param(lambda r, d: mtia.empty(4, device=d), TorchDevice("mtia", "1"), r"Invalid device index '1'",
                 id="empty-device-like-str-index"),
    pytest.param(lambda r, d: mtia.set_device(d), True, r"Expected a mtia device, but got: True",
                 id="set_device-bool"),
    pytest.param(lambda r, d: mtia.Event(device=d), " cuda ", r"Expected a mtia device, but got: ' cuda '",
                 id="Event-padded-cuda"),
]


@pytest.mark.parametrize("call, device, message", DEVICE_CASES)
def test_bad_device_argument(resources, call, device, message):
    with state_unchanged(), pytest.raises(ValueError, match=message):
        call(resources, device)
