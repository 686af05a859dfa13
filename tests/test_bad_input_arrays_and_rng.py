"""Bad input to array allocation and the RNG: empty() dtypes (object, unknown, void, struct
with objects), shapes (negative, float, str, None, products beyond 1 EB or wrapping to 0 in 64
bits), streams of another device, caching_allocator_alloc/delete arguments, and malformed RNG
states and seeds (a bad-input matrix over ../shared/API.md).

Each case names the call, the exception type and a message fragment, and must change nothing
(helpers.check_bad_call and state_unchanged); the cases get the `resources` fixture.
"""
import numpy as np
import pytest

import mtia_alloc as mtia
from helpers import check_bad_call, other_device


def _alloc_on_stream_of_other_device(r):
    mtia.caching_allocator_alloc(4096, other_device(), r.side0)


def _empty_on_stream_of_other_device(r):
    mtia.empty(4, device=other_device(), stream=r.side0)


BAD_STATE = np.full(40, 7, np.uint8)  # has_uint32 field = 0x07070707


CASES = [
    # ------------------------------------------------------------ empty(): dtypes and shapes
    pytest.param(lambda r: mtia.empty(4, dtype=object), TypeError, r"invalid dtype .*plain numeric data",
                 id="empty-dtype-object"),
    pytest.param(lambda r: mtia.empty(4, dtype="float1024"), TypeError, r"invalid dtype 'float1024'",
                 id="empty-dtype-float1024"),
    pytest.param(lambda r: mtia.empty(4, dtype="V0"), TypeError, r"invalid dtype 'V0'", id="empty-dtype-void0"),
    pytest.param(lambda r: mtia.empty(4, dtype=[("a", "O"), ("b", "f4")]), TypeError,
                 r"plain numeric data", id="empty-dtype-struct-with-object"),
    pytest.param(lambda r: mtia.empty(4, dtype=[("a", "i4", -1)]), TypeError, r"invalid dtype",
                 id="empty-dtype-negative-subarray"),
    pytest.param(lambda r: mtia.empty(4, dtype=3), TypeError, r"invalid dtype 3", id="empty-dtype-int"),
    pytest.param(lambda r: mtia.empty(-4), ValueError, r"shape entries must be non-negative",
                 id="empty-shape-negative"),
    pytest.param(lambda r: mtia.empty((3, -1)), ValueError, r"shape entries must be non-negative, got \(3, -1\)",
                 id="empty-shape-negative-entry"),
    pytest.param(lambda r: mtia.empty(4.0), TypeError, r"shape must be an int or a tuple of ints, got float",
                 id="empty-shape-float"),
    pytest.param(lambda r: mtia.empty((2, 2.5)), TypeError, r"shape entries must be ints, got 2\.5",
                 id="empty-shape-float-entry"),
    pytest.param(lambda r: mtia.empty("4"), TypeError, r"shape entries must be ints, got '4'",
                 id="empty-shape-str"),
    pytest.param(lambda r: mtia.empty(None), TypeError, r"shape must be an int or a tuple of ints, got NoneType",
                 id="empty-shape-None"),
    pytest.param(lambda r: mtia.empty((1 << 40, 1 << 40)), mtia.OutOfMemoryError,
                 r"more than 1EB memory \(an array of shape \(1099511627776, 1099511627776\)",
                 id="empty-shape-product-2^82-bytes"),
    pytest.param(lambda r: mtia.empty((1 << 62, 4)), mtia.OutOfMemoryError, r"more than 1EB memory",
                 id="empty-shape-product-wraps-to-0-in-64-bits"),
    pytest.param(lambda r: mtia.empty(1 << 61, "float32"), mtia.OutOfMemoryError, r"more than 1EB memory",
                 id="empty-nbytes-2^63"),
    pytest.param(lambda r: mtia.empty(1 << 70), mtia.OutOfMemoryError, r"more than 1EB memory",
                 id="empty-shape-int-2^70"),
    pytest.param(lambda r: mtia.empty((0, 1 << 70)), ValueError, r"shape entries must be less than 2\*\*63",
                 id="empty-shape-zero-times-2^70"),
    pytest.param(lambda r: mtia.empty(4, stream=0), TypeError, r"stream must be an mtia_alloc.Stream, got int",
                 id="empty-stream-int"),
    pytest.param(_empty_on_stream_of_other_device, ValueError, r"is on device 0, not on device 1",
                 id="empty-stream-of-another-device"),
    pytest.param(_alloc_on_stream_of_other_device, ValueError, r"is on device 0, not on device 1",
                 id="alloc-stream-of-another-device"),
    pytest.param(lambda r: mtia.caching_allocator_alloc(4096, stream="s"), TypeError,
                 r"stream must be an mtia_alloc.Stream, got str", id="alloc-stream-str"),
    pytest.param(lambda r: mtia.caching_allocator_delete("0x10"), TypeError, r"ptr must be an int, got str",
                 id="delete-str"),
    pytest.param(lambda r: mtia.caching_allocator_delete(-4096), RuntimeError, r"invalid device pointer: -4096",
                 id="delete-negative"),
    pytest.param(lambda r: mtia.caching_allocator_delete(1 << 70), RuntimeError, r"invalid device pointer: 0x4",
                 id="delete-beyond-64-bits"),
    # ------------------------------------------------------------ RNG
    pytest.param(lambda r: mtia.set_rng_state(b"\x00" * 40), TypeError, r"RNG state must be a uint8 array",
                 id="set_rng_state-bytes"),
    pytest.param(lambda r: mtia.set_rng_state("garbage"), TypeError, r"RNG state must be a uint8 array",
                 id="set_rng_state-str"),
    pytest.param(lambda r: mtia.set_rng_state(None), TypeError, r"RNG state must be a uint8 array",
                 id="set_rng_state-None"),
    pytest.param(lambda r: mtia.set_rng_state(np.zeros(3, np.uint8)), ValueError,
                 r"RNG state must have 40 bytes, got 3",
                 id="set_rng_state-short"),
    pytest.param(lambda r: mtia.set_rng_state(np.zeros(40, np.float32)), TypeError, r"got float32 with shape \(40,\)",
                 id="set_rng_state-float32"),
    pytest.param(lambda r: mtia.set_rng_state(np.zeros((5, 8), np.uint8)), TypeError, r"1-d uint8 array",
                 id="set_rng_state-2d"),
    pytest.param(lambda r: mtia.set_rng_state(BAD_STATE), ValueError, r"bad has_uint32 field",
                 id="set_rng_state-corrupt"),
    pytest.param(lambda r: mtia.set_rng_state_all([r.rng_state, b"x"]), TypeError, r"RNG state must be a uint8 array",
                 id="set_rng_state_all-garbage"),
    pytest.param(lambda r: mtia.manual_seed(1.5), TypeError, r"seed must be an int, got float", id="manual_seed-float"),
    pytest.param(lambda r: mtia.manual_seed("42"), TypeError, r"seed must be an int, got str", id="manual_seed-str"),
    pytest.param(lambda r: mtia.manual_seed(True), TypeError, r"seed must be an int, got bool", id="manual_seed-bool"),
    pytest.param(lambda r: mtia.manual_seed_all(None), TypeError, r"seed must be an int, got NoneType",
                 id="manual_seed_all-None"),
]


@pytest.mark.parametrize("call, exc, message", CASES)
def test_bad_array_or_rng_call(resources, call, exc, message):
    check_bad_call(resources, call, exc, message)
