"""Streams (API.md §2, pools_graphs_streams_api.md §4, must-haves 30-31): ids, equality,
hash and repr, handles rebuilt from ids, priorities, current and default streams per device,
set_stream, and the stream context managers with their restore rules (both devices' streams
and the current device, after exceptions too); PyTorch's test_get_device_module,
test_stream_basic, test_stream_context, test_stream_context_different_device
(test_cpp_extensions_mtia_backend.py) and test_streams (test_cuda.py).

Every test restores the current device and streams (conftest.py).
"""
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
from helpers import MTIA_DEVICE_TYPE, TorchDevice, state_unchanged


# ----------------------------------------------------------------------------- identity

def test_get_device_module():
    """PyTorch test_get_device_module: the current stream's device_type is
    int(torch._C._autograd.DeviceType.MTIA), which is 19 (checked against torch 2.13)."""
    default_stream = mtia.current_stream(TorchDevice("mtia:0"))
    assert default_stream.device_type == MTIA_DEVICE_TYPE
    assert mtia.Stream(device=TorchDevice("mtia:1")).device_type == MTIA_DEVICE_TYPE


def test_stream_rebuilt_from_positional_ids():
    # torch.Stream(stream_id, device_index, device_type), as test_generic_stream_event rebuilds one
    s = mtia.Stream(1)
    t = mtia.Stream(s.stream_id, s.device_index, s.device_type)
    assert t == s and hash(t) == hash(s)
    two = mtia.Stream(1, -1)  # two positionals are (device, priority), as torch.mtia.Stream
    assert (two.device_index, two.priority) == (1, -1) and two != s
    with pytest.raises(ValueError, match="device_type must be 19"):
        mtia.Stream(s.stream_id, s.device_index, 1)
    with pytest.raises(ValueError, match="unknown stream"):
        mtia.Stream(1 << 40, 0, 19)


def test_stream_ids_equality_hash_and_repr():
    default0, default1 = mtia.default_stream(0), mtia.default_stream(1)
    assert default0.stream_id == default1.stream_id == 0
    assert default0 != default1  # same id, other device
    made = [mtia.Stream(device=d) for d in (0, 1, 0, 1)]
    ids = [s.stream_id for s in made]
    assert all(i > 0 for i in ids) and len(set(ids)) == 4  # unique across devices
    s = made[1]
    assert (s.device_index, s.device_type) == (1, MTIA_DEVICE_TYPE)
    assert s.device.type == "mtia" and s.device.index == 1
    handle = mtia.Stream(stream_id=s.stream_id, device_index=1, device_type=MTIA_DEVICE_TYPE)
    assert handle == s and hash(handle) == hash(s) and handle is not s
    assert len({s, handle, made[0]}) == 2
    assert s != made[3] and s != None  # noqa: E711
    assert mtia.Stream(stream_id=0, device_index=0, device_type=MTIA_DEVICE_TYPE) == default0
    assert repr(s) == f"torch.Stream device_type=mtia, device_index=1, stream_id={s.stream_id}"
    with pytest.raises(ValueError):
        mtia.Stream(stream_id=10 ** 9, device_index=0, device_type=MTIA_DEVICE_TYPE)
    with pytest.raises(ValueError):
        mtia.Stream(stream_id=s.stream_id, device_index=1, device_type=1)  # CUDA's type


def test_out_of_range_priority_maps_to_the_nearest_valid_one():
    """As torch.Stream: no error for a priority outside the range (it used to overflow a C int)."""
    least, greatest = mtia.Stream.priority_range()
    with state_unchanged():
        assert mtia.Stream(priority=1 << 40).priority == least
        assert mtia.Stream(priority=-(1 << 40)).priority == greatest


# ----------------------------------------------------------------------------- current and default streams

def _default_and_user_stream():
    """The checks test_stream_basic and test_streams share; returns both streams."""
    default_stream = mtia.current_stream()
    user_stream = mtia.Stream()
    assert mtia.current_stream() == default_stream
    assert default_stream != user_stream
    assert default_stream.stream_id == 0
    assert user_stream.stream_id != 0
    with mtia.stream(user_stream):
        assert mtia.current_stream() == user_stream
    assert user_stream.query()
    return default_stream, user_stream


def test_stream_basic():
    """PyTorch test_cpp_extensions_mtia_backend.py: test_stream_basic."""
    default_stream, _ = _default_and_user_stream()
    default_stream.synchronize()
    assert default_stream.query()


def test_streams():
    """PyTorch test_cuda.py: test_streams (cuda_stream -> stream_id)."""
    default_stream, _ = _default_and_user_stream()
    emulator.sleep(50, stream=default_stream)
    default_stream.synchronize()
    assert default_stream.query()


def test_current_and_default_stream_follow_the_current_device():
    mtia.set_device(1)
    assert mtia.current_stream() == mtia.default_stream() == mtia.default_stream(1)
    s = mtia.Stream()
    assert s.device_index == 1
    mtia.set_stream(s)
    assert mtia.current_stream() == s == mtia.current_stream("mtia:1")
    assert mtia.current_stream(0) == mtia.default_stream(0)


def test_set_stream_switches_the_device():
    s1 = mtia.Stream(device=1)
    mtia.set_device(0)
    mtia.set_stream(None)  # no-op
    assert mtia.current_device() == 0
    mtia.set_stream(s1)
    assert mtia.current_device() == 1
    assert mtia.current_stream() == s1
    assert mtia.current_stream(0) == mtia.default_stream(0)
    with pytest.raises(TypeError):
        mtia.set_stream("not a stream")


# ----------------------------------------------------------------------------- stream contexts

def test_stream_context():
    """PyTorch test_cpp_extensions_mtia_backend.py: test_stream_context."""
    mtia_stream_0 = mtia.Stream(device="mtia:0")
    mtia_stream_1 = mtia.Stream(device="mtia:0")
    with mtia.stream(mtia_stream_0):
        current_stream = mtia.current_stream()
        assert current_stream == mtia_stream_0, f"current_stream {current_stream} should be {mtia_stream_0}"
    with mtia.stream(mtia_stream_1):
        current_stream = mtia.current_stream()
        assert current_stream == mtia_stream_1, f"current_stream {current_stream} should be {mtia_stream_1}"


def test_stream_context_different_device():
    """PyTorch test_cpp_extensions_mtia_backend.py: test_stream_context_different_device."""
    device_0 = TorchDevice("mtia:0")
    device_1 = TorchDevice("mtia:1")
    mtia_stream_0 = mtia.Stream(device=device_0)
    mtia_stream_1 = mtia.Stream(device=device_1)
    orig_current_device = mtia.current_device()
    with mtia.stream(mtia_stream_0):
        current_stream = mtia.current_stream()
        assert mtia.current_device() == device_0.index
        assert current_stream == mtia_stream_0, f"current_stream {current_stream} should be {mtia_stream_0}"
    assert mtia.current_device() == orig_current_device
    with mtia.stream(mtia_stream_1):
        current_stream = mtia.current_stream()
        assert mtia.current_device() == device_1.index
        assert current_stream == mtia_stream_1, f"current_stream {current_stream} should be {mtia_stream_1}"
    assert mtia.current_device() == orig_current_device


def test_stream_context_restores_both_devices_streams_and_the_device():
    """spec §4.5 / must-have 30."""
    x0, y1, z1 = mtia.Stream(device=0), mtia.Stream(device=1), mtia.Stream(device=1)
    mtia.set_stream(y1)
    mtia.set_stream(x0)  # current device 0, current streams: x0 on 0, y1 on 1
    with mtia.stream(z1):
        assert mtia.current_device() == 1
        assert mtia.current_stream() == z1
        assert mtia.current_stream(0) == x0
    assert mtia.current_device() == 0
    assert mtia.current_stream(0) == x0
    assert mtia.current_stream(1) == y1
    # The same after an exception, which propagates.
    with pytest.raises(RuntimeError, match="raised inside"):
        with mtia.StreamContext(z1):
            mtia.set_stream(mtia.Stream(device=0))  # mess with both devices inside
            raise RuntimeError("raised inside")
    assert mtia.current_device() == 0
    assert mtia.current_stream(0) == x0
    assert mtia.current_stream(1) == y1


def test_stream_context_with_none_is_a_no_op():
    s = mtia.Stream(device=1)
    mtia.set_stream(s)
    mtia.set_device(0)
    with mtia.stream(None):
        assert mtia.current_device() == 0
        assert mtia.current_stream() == mtia.default_stream(0)
    assert mtia.current_device() == 0
    assert mtia.current_stream(1) == s


def test_nested_stream_contexts_and_stream_as_context_manager():
    a, b, c = mtia.Stream(device=0), mtia.Stream(device=1), mtia.Stream(device=0)
    with a:
        assert mtia.current_stream() == a
        with b:
            assert mtia.current_device() == 1 and mtia.current_stream() == b
            with mtia.stream(c):
                assert mtia.current_device() == 0 and mtia.current_stream() == c
                assert mtia.current_stream(1) == b
            assert mtia.current_device() == 1 and mtia.current_stream() == b
        assert mtia.current_device() == 0 and mtia.current_stream() == a
        with a:  # re-entering the same stream nests too
            assert mtia.current_stream() == a
        assert mtia.current_stream() == a
    assert mtia.current_stream() == mtia.default_stream(0)
    assert mtia.current_stream(1) == mtia.default_stream(1)
