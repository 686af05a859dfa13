"""Bad inputs to the memory API raise clear exceptions and change nothing.

Each case checks the exception type and message, that the state is exactly the same before and
after (helpers.state_unchanged: memory_stats() of every device, the device bytes in use, the
settings, current device and streams, fractions, RNG states and history level), and that
mtia_alloc.memory.check_invariants() still passes. Covered: bad sizes, unknown/interior/double-freed
pointers, bad device arguments, bad memory fractions, bad arguments of the benchmark loops, and
the null cases that are no-ops (delete(0), alloc(0), record_stream(0, s)). The bad-input matrix
over the rest of the API is in test_bad_input_*.py.
"""
import re

import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from helpers import DEVICES, state_unchanged, stats


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("size, exc, message", [
    pytest.param(-1, ValueError, None, id="negative"),
    pytest.param(-(1 << 40), ValueError, None, id="very-negative"),
    pytest.param(1.5, TypeError, None, id="float"),
    pytest.param(4096.0, TypeError, None, id="integral-float"),
    pytest.param("4096", TypeError, None, id="str"),
    pytest.param(None, TypeError, None, id="None"),
    pytest.param(1 << 60, mtia.OutOfMemoryError, "more than 1EB", id="1EiB"),
    pytest.param((1 << 62) + 12345, mtia.OutOfMemoryError, "more than 1EB", id="4EiB"),
])
def test_bad_size(size, exc, message):
    with state_unchanged(), pytest.raises(exc) as info:
        mtia.caching_allocator_alloc(size)
    assert str(info.value)
    if message:
        assert message in str(info.value)


@pytest.mark.parametrize("size", [1 << 64, (1 << 64) + 512, 1 << 100], ids=["2^64", "2^64+512", "2^100"])
def test_size_beyond_64_bits(size):
    with state_unchanged(), pytest.raises((ValueError, mtia.OutOfMemoryError)) as info:
        mtia.caching_allocator_alloc(size)
    assert str(info.value)


def test_alloc_zero_returns_null_and_changes_nothing():
    with state_unchanged():
        assert mtia.caching_allocator_alloc(0) == 0
        for d in DEVICES:
            assert mtia.caching_allocator_alloc(0, d) == 0


# ----------------------------------------------------------------------------- pointers

def test_delete_null_is_a_noop():
    with state_unchanged():
        mtia.caching_allocator_delete(0)


def test_record_stream_on_null_is_a_noop():
    with state_unchanged():
        mtia.record_stream(0, mtia.current_stream(0))


def test_delete_unknown_pointer():
    with state_unchanged(), pytest.raises(RuntimeError, match="invalid device pointer"):
        mtia.caching_allocator_delete(0x7F00_DEAD_0000)


@pytest.mark.parametrize("size", [4096, 5 << 20], ids=["small-block", "large-block"])
def test_delete_interior_pointer(blocks, size):
    ptr = blocks.alloc(size)
    with state_unchanged(), pytest.raises(RuntimeError, match="invalid device pointer"):
        mtia.caching_allocator_delete(ptr + 512)
    blocks.free(ptr)  # the real block is still live and frees normally


@pytest.mark.parametrize("size", [4096, 5 << 20], ids=["small-block", "large-block"])
def test_double_free(blocks, size):
    ptr = blocks.alloc(size)
    blocks.free(ptr)
    with state_unchanged(), pytest.raises(RuntimeError, match="invalid device pointer"):
        mtia.caching_allocator_delete(ptr)


def test_null_zero_unknown_and_huge_requests():
    """Spec must-have 30 (allocator_core.md §15.30)."""
    before = stats()
    mtia.caching_allocator_delete(0)  # free(nullptr) is a no-op
    assert mtia.caching_allocator_alloc(0) == 0  # allocate(0) is a null pointer...
    assert stats() == before  # ...and neither changes any stat
    with pytest.raises(RuntimeError, match="invalid device pointer"):
        mtia.caching_allocator_delete(0x7F00_DEAD_0000)
    with pytest.raises(mtia.OutOfMemoryError, match="Tried to allocate more than 1EB memory"):
        mtia.caching_allocator_alloc(1 << 60)
    assert stats() == before


# ----------------------------------------------------------------------------- devices

def _names_valid_range(message, n):
    """True if the message mentions 0 and the last valid index (or the count)."""
    return (re.search(r"(?<!\d)0(?!\d)", message) is not None
            and re.search(rf"(?<!\d)({n - 1}|{n})(?!\d)", message) is not None)


BAD_DEVICES = [
    pytest.param("cuda:0", False, id="cuda-string"),
    pytest.param("mtia:7", True, id="mtia-7-out-of-range"),
    pytest.param(7, True, id="int-7-out-of-range"),
    pytest.param(-5, True, id="negative-int"),
    pytest.param(2**63, True, id="int-2**63-beyond-a-C-long"),
    pytest.param(2**64, True, id="int-2**64"),
    pytest.param(2.5, False, id="float"),
    pytest.param(object(), False, id="object"),
]

CALLS = {
    "caching_allocator_alloc": lambda d: mtia.caching_allocator_alloc(4096, d),
    "memory_stats": lambda d: mtia.memory_stats(d),
    "memory_allocated": lambda d: mtia.memory_allocated(d),
    "set_per_process_memory_fraction": lambda d: mtia.set_per_process_memory_fraction(0.5, d),
    "mem_get_info": lambda d: mtia.mem_get_info(d),
    "empty": lambda d: mtia.empty(4, "float32", d),
}


@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
@pytest.mark.parametrize("device, out_of_range", BAD_DEVICES)
def test_bad_device(call, device, out_of_range):
    with state_unchanged(), pytest.raises(ValueError) as info:
        CALLS[call](device)
    message = str(info.value)
    assert message
    if out_of_range:
        assert _names_valid_range(message, mtia.device_count()), message
    for d in DEVICES:
        assert mtia.get_per_process_memory_fraction(d) == 1.0


def test_counts_and_sizes_beyond_64_bits_get_value_errors_or_a_format():
    with state_unchanged():
        for after_n, every in [(2**63, 0), (1, 2**64)]:
            with pytest.raises(ValueError, match="below 2\\*\\*63"):
                mtia.emulator.fail_device_allocations(after_n, every)
        with pytest.raises(ValueError, match="below 2\\*\\*64"):
            mtia.memory._round_size(2**64)
    assert mtia.memory.format_size(2**64) == "17179869184.00 GiB" == mtia.memory.format_size(2**64 - 1)


# ----------------------------------------------------------------------------- fractions

@pytest.mark.parametrize("fraction, exc, message", [
    pytest.param(1, TypeError, "Invalid type", id="int-1"),
    pytest.param(0, TypeError, "Invalid type", id="int-0"),
    pytest.param("0.5", TypeError, "Invalid type", id="str"),
    pytest.param(1.5, ValueError, "Invalid fraction value", id="1.5"),
    pytest.param(-0.1, ValueError, "Invalid fraction value", id="negative"),
])
def test_bad_fraction(fraction, exc, message):
    with state_unchanged(), pytest.raises(exc, match=message):
        mtia.set_per_process_memory_fraction(fraction, 0)
    assert mtia.get_per_process_memory_fraction(0) == 1.0


# ----------------------------------------------------------------------------- benchmark loops

def test_benchmark_loops_reject_bad_arguments_before_running():
    """The native loops run without the GIL and trust their arguments: the binding checks them."""
    import numpy as np
    from mtia_alloc import _C

    bad_calls = [
        lambda: _C.native_pair(mtia.device_count(), 4096, 10),
        lambda: _C.native_pair(0, 4096, 0),
        lambda: _C.glibc_pair(4096, 0),
        lambda: _C.threaded_pairs(0, 4096, 10),
        lambda: _C.threaded_compute(0, 10),
        lambda: _C.threaded_compute(2, 0),
        lambda: _C.cached_blocks_pair(-1, 10, 10),
        lambda: _C.replay(0, np.array([512], np.uint64), np.array([3], np.uintc), np.array([0], np.uintc), 1, [0]),
        lambda: _C.replay(0, np.array([512], np.uint64), np.array([0], np.uintc), np.array([1], np.uintc), 1, [0]),
    ]
    for call in bad_calls:
        with state_unchanged(), pytest.raises(ValueError):
            call()
    with state_unchanged(), pytest.raises(ValueError, match="unknown stream 12345"):
        _C.replay(0, np.array([512], np.uint64), np.array([0], np.uintc), np.array([0], np.uintc), 1, [12345])
