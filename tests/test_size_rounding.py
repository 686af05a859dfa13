"""Request sizes: rounding to 512 bytes, roundup_power2_divisions (a single value and the
per-interval list), the rounded size counted in allocated_bytes, and format_size, the size
text of OOM messages and memory_summary() (allocator_core.md §15.1, §15.2, §15.19).
"""
import itertools

import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from helpers import GiB, MiB, delta, fmt, round_size, stats


# ----------------------------------------------------------------------------- 512-byte rounding

@pytest.mark.parametrize("size, expected", [
    (1, 512), (511, 512), (512, 512), (513, 1024), (1000, 1024), (1024, 1024),
    (MiB, MiB), (MiB + 1, MiB + 512), (12_345_678, 12_345_856),
], ids=lambda v: str(v))
def test_round_size_default(size, expected):
    """Spec must-have 1 (allocator_core.md §15.1)."""
    assert round_size(size) == expected


def test_every_rounded_size_is_a_multiple_of_512():
    """Spec must-have 1 (allocator_core.md §15.1)."""
    sizes = itertools.chain(range(1, 5000, 7),
                            (2 ** k + j for k in range(10, 36) for j in (-1, 0, 1)))
    for n in sizes:
        r = round_size(n)
        assert r % 512 == 0 and n <= r < n + 512, (n, r)


@pytest.mark.parametrize("size", [1, 513, 5000, 3 * MiB + 1], ids=str)
def test_allocated_bytes_count_the_rounded_size(blocks, size):
    """Spec must-have 1 (allocator_core.md §15.1)."""
    before = stats()
    blocks.alloc(size)
    d = delta(before, stats())
    assert d["allocated_bytes.all.current"] == round_size(size)
    assert d["requested_bytes.all.current"] == size


# ----------------------------------------------------------------------------- power-2 divisions

DIV4 = "roundup_power2_divisions:4"
DIV_LIST = "roundup_power2_divisions:[256:1,512:2,1024:4,>:8]"


@pytest.mark.parametrize("conf, size, expected", [
    pytest.param(DIV4, 1200, 1536, id="div4-1200-not-above-2048-uses-512-rounding"),
    pytest.param(DIV4, 2048, 2048, id="div4-2048-boundary"),
    pytest.param(DIV4, 4097, 5120, id="div4-4097"),
    pytest.param(DIV4, MiB + 1, MiB + MiB // 4, id="div4-1MiB+1"),
    pytest.param(DIV4, 2 * MiB, 2 * MiB, id="div4-power-of-two-unchanged"),
    pytest.param(DIV_LIST, 1200, 1536, id="list-first-entry-fills-lower-intervals"),
    pytest.param(DIV_LIST, 300 * MiB + 1, 300 * MiB + 512, id="list-256MiB-interval-div1"),
    pytest.param(DIV_LIST, 600 * MiB + 1, 768 * MiB, id="list-512MiB-interval-div2"),
    pytest.param(DIV_LIST, 1536 * MiB + 1, 1792 * MiB, id="list-1GiB-interval-div4"),
    pytest.param(DIV_LIST, 3 * GiB + 1, 3 * GiB + 256 * MiB, id="list-greater-than-div8"),
])
def test_roundup_power2_divisions_rounding(conf, size, expected):
    """Spec must-have 2 (allocator_core.md §15.2)."""
    mtia.memory._set_allocator_settings(conf)
    assert round_size(size) == expected


def test_allocation_uses_power2_rounding(blocks):
    """Spec must-have 2 (allocator_core.md §15.2)."""
    mtia.memory._set_allocator_settings(DIV4)
    before = stats()
    blocks.alloc(MiB + 1)
    d = delta(before, stats())
    assert d["allocated_bytes.large_pool.current"] == MiB + MiB // 4
    assert d["requested_bytes.large_pool.current"] == MiB + 1


# ----------------------------------------------------------------------------- format_size

@pytest.mark.parametrize("n, text", [
    (0, "0 bytes"), (1024, "1024 bytes"), (1025, "1.00 KiB"), (1536, "1.50 KiB"),
    (MiB, "1024.00 KiB"), (MiB + 1, "1.00 MiB"), (2 * MiB, "2.00 MiB"), (GiB, "1024.00 MiB"),
    (3 << 30, "3.00 GiB"), (800_000_000 * GiB, "800000000.00 GiB"),
], ids=lambda v: str(v))
def test_format_size(n, text):
    """Spec must-have 19 (allocator_core.md §15.19)."""
    assert fmt(n) == text
