"""The emulated devices (API.md §1, pools_graphs_streams_api.md §4, must-haves 30 and 35):
device_count, is_available, set_device and the device context manager with its restore
rules, synchronize() of a device, and device capability, properties and bf16.

Every test restores the current device and streams (conftest.py).
"""
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
import mtia_alloc.memory
from helpers import BUSY_MS, TorchDevice


def test_set_device_none_keeps_the_current_device():
    mtia.set_device(1)
    mtia.set_device(None)
    assert mtia.current_device() == 1
    mtia.set_device(0)


def test_device_count_and_is_available():
    assert mtia.is_available()
    assert mtia.device_count() == 2
    mtia.init()  # idempotent
    assert mtia.is_initialized()


def test_device_context():
    """PyTorch test_cpp_extensions_mtia_backend.py: test_device_context."""
    device_0 = TorchDevice("mtia:0")
    device_1 = TorchDevice("mtia:1")
    with mtia.device(device_0):
        assert mtia.current_device() == device_0.index
    with mtia.device(device_1):
        assert mtia.current_device() == device_1.index


@pytest.mark.parametrize("arg", [1, "mtia:1", TorchDevice("mtia:1")], ids=["int", "str", "device-object"])
def test_device_context_restores_the_previous_device(arg):
    mtia.set_device(0)
    with mtia.device(arg) as ctx:
        assert isinstance(ctx, mtia.device)
        assert mtia.current_device() == 1
        with mtia.device(0):
            assert mtia.current_device() == 0
        assert mtia.current_device() == 1
    assert mtia.current_device() == 0


def test_device_context_restores_on_exception_and_propagates_it():
    mtia.set_device(0)
    with pytest.raises(KeyError, match="inside"):
        with mtia.device(1):
            raise KeyError("inside")
    assert mtia.current_device() == 0


@pytest.mark.parametrize("arg", [-1, None, "mtia", TorchDevice("mtia")], ids=["negative", "None", "mtia", "no-index"])
def test_device_context_without_an_index_changes_nothing(arg):
    mtia.set_device(1)
    with mtia.device(arg):
        assert mtia.current_device() == 1
    assert mtia.current_device() == 1


def test_set_device():
    mtia.set_device(1)
    assert mtia.current_device() == 1
    mtia.set_device(-1)  # negative indices are ignored
    assert mtia.current_device() == 1
    mtia.set_device("mtia:0")
    assert mtia.current_device() == 0
    mtia.set_device(TorchDevice("mtia:1"))
    assert mtia.current_device() == 1
    for bad in (2, "mtia:7", "cuda:0", TorchDevice("cuda:0"), 1.0):
        with pytest.raises(ValueError):
            mtia.set_device(bad)
    assert mtia.current_device() == 1


def test_synchronize_waits_for_every_stream_of_the_device():
    a, b = mtia.Stream(device=1), mtia.Stream(device=1)
    other = mtia.Stream(device=0)
    emulator.sleep(BUSY_MS, stream=a)
    emulator.sleep(BUSY_MS, stream=b)
    emulator.sleep(BUSY_MS, stream=mtia.default_stream(1))
    assert not a.query() and not b.query()
    mtia.synchronize(1)
    assert a.query() and b.query() and mtia.default_stream(1).query()
    emulator.sleep(BUSY_MS, stream=other)
    mtia.synchronize("mtia:1")  # another device's work is not waited for
    assert not other.query()
    with mtia.device(0):
        mtia.synchronize()  # the current device
    assert other.query()


def test_get_device_capability_properties_and_bf16():
    cap = mtia.get_device_capability()
    assert isinstance(cap, tuple) and len(cap) == 2 and all(isinstance(x, int) for x in cap)
    assert mtia.get_device_capability(1) == cap
    for d in (None, 0, 1, "mtia:1", TorchDevice("mtia:0")):
        props = mtia.get_device_properties(d)
        assert isinstance(props, dict)
        assert isinstance(props["name"], str) and props["name"]
        assert props["total_memory"] == mtia.memory.mem_get_info(d)[1] > 0
    assert mtia.is_bf16_supported() is True
    assert mtia.is_bf16_supported(including_emulation=False) is True
    with pytest.raises(ValueError):
        mtia.get_device_properties(5)
