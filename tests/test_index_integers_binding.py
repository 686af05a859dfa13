"""The binding's size, pointer, device and stream-id arguments take any __index__ integer
(numpy's included) as the façade does; bools and non-integers are still refused (issue 19,
item 13, binding part)."""
import numpy as np
import pytest

import mtia_alloc as mtia


class Index:
    def __init__(self, v):
        self.v = v

    def __index__(self):
        return self.v


@pytest.mark.parametrize("size", [np.int64(4096), np.uint32(4096), np.int8(100), Index(4096)])
def test_caching_allocator_alloc_takes_index_integers(size):
    p = mtia.caching_allocator_alloc(size)
    assert p and mtia.memory_allocated() >= int(size)
    mtia.caching_allocator_delete(p)


def test_caching_allocator_alloc_size_zero_and_negative_index_integers():
    assert mtia.caching_allocator_alloc(np.int64(0)) == 0
    with pytest.raises(ValueError, match="non-negative"):
        mtia.caching_allocator_alloc(np.int64(-1))


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), 4096.0, np.float64(4096), "4096", None])
def test_caching_allocator_alloc_refuses_bools_and_non_integers(bad):
    with pytest.raises(TypeError):
        mtia.caching_allocator_alloc(bad)


def test_caching_allocator_delete_takes_index_integer_pointers():
    for conv in (np.uint64, np.int64, Index):
        p = mtia.caching_allocator_alloc(4096)
        mtia.caching_allocator_delete(conv(p))
    mtia.caching_allocator_delete(np.uint64(0))
    with pytest.raises(TypeError):
        mtia.caching_allocator_delete(True)
    with pytest.raises(TypeError):
        mtia.caching_allocator_delete(float(1 << 40))
    mtia.memory.check_invariants()


def test_device_and_stream_arguments_take_index_integers():
    s = mtia.Stream()
    for device in (np.int64(0), np.uint8(0), Index(0)):
        p = mtia.caching_allocator_alloc(np.int32(512), device=device)
        mtia.caching_allocator_delete(p)
        p = mtia.caching_allocator_alloc(512, device=device, stream=s)
        mtia.caching_allocator_delete(p)
        a = mtia.empty(np.int64(8), "float32", device=device)
        assert a.device.index == 0
    with pytest.raises(ValueError):
        mtia.caching_allocator_alloc(512, device=True)


def test_a_stream_like_object_with_a_numpy_stream_id():
    s = mtia.Stream()

    class Like:
        stream_id = np.int64(s.stream_id)
        device_index = np.int64(0)

    p = mtia.caching_allocator_alloc(512, stream=Like())
    mtia.caching_allocator_delete(p)

    class BoolId:
        stream_id = True
        device_index = 0

    with pytest.raises(TypeError):
        mtia.caching_allocator_alloc(512, stream=BoolId())
