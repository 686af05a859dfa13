"""Which cached block serves a request: the same address again after a free, never a block
cached for another stream, best fit by size, and a lookup whose cost does not grow with the
number of cached blocks (allocator_core.md §15.7-9, §15.29).

Tests measure deltas of memory_stats() and free what they allocate (conftest.py).
"""
import time

import pytest

import mtia_alloc as mtia
from helpers import DEVICES, MiB, delta, segment_of, stats


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
@pytest.mark.parametrize("size", [1000, 5 * MiB, 12 * MiB, 64 * MiB],
                         ids=["1000B", "5MiB", "12MiB", "64MiB"])
def test_free_then_malloc_same_size_reuses_the_address(blocks, device, size):
    """Spec must-have 7 (allocator_core.md §15.7)."""
    mtia.empty_cache()
    ptr = blocks.alloc(size, device)
    blocks.free(ptr)
    before = stats(device)
    again = blocks.alloc(size, device)
    d = delta(before, stats(device))
    assert again == ptr
    assert d["num_device_alloc"] == 0
    assert d["reserved_bytes.all.current"] == 0


@pytest.mark.parametrize("size", [1000, 5 * MiB, 12 * MiB], ids=["1000B", "5MiB", "12MiB"])
def test_cached_block_of_one_stream_never_serves_another(blocks, side_streams, size):
    """Spec must-have 8 (allocator_core.md §15.8)."""
    side = side_streams[0]
    mtia.empty_cache()
    ptr = blocks.alloc(size)
    blocks.free(ptr)  # cached on the default stream
    before = stats()
    other = blocks.alloc(size, 0, side)
    d = delta(before, stats())
    assert d["num_device_alloc"] == 1  # a new segment, not the cached block
    seg_default, seg_side = segment_of(ptr), segment_of(other)
    assert seg_side["address"] != seg_default["address"]
    assert seg_side["stream"] != seg_default["stream"]
    blocks.free(other)
    # Each stream gets its own cached block back.
    assert blocks.alloc(size) == ptr
    assert blocks.alloc(size, 0, side) == other


def test_best_fit_takes_the_smallest_cached_block_that_fits(blocks):
    """Spec must-have 9 (allocator_core.md §15.9)."""
    mtia.empty_cache()
    # One 20 MiB segment tiled as  a:4 | keep1:2 | c:8 | keep2:6  (MiB).
    a = blocks.alloc(4 * MiB)
    keep1 = blocks.alloc(2 * MiB)
    c = blocks.alloc(8 * MiB)
    keep2 = blocks.alloc(6 * MiB)
    assert (keep1, c, keep2) == (a + 4 * MiB, a + 6 * MiB, a + 14 * MiB)
    blocks.free(a)
    blocks.free(c)  # free, unreleasable pieces of 4 and 8 MiB between live neighbours
    before = stats()
    assert before["inactive_split.large_pool.current"] >= 2

    three = blocks.alloc(3 * MiB)
    d = delta(before, stats())
    assert three == a  # the 4 MiB block, not the 8 MiB one
    assert d["allocated_bytes.large_pool.current"] == 4 * MiB  # 1 MiB remainder: not split
    assert d["inactive_split.large_pool.current"] == -1
    assert d["num_device_alloc"] == 0

    five = blocks.alloc(5 * MiB)
    d = delta(before, stats())
    assert five == c  # the 8 MiB block, split: 3 MiB remainder > 1 MiB
    assert d["allocated_bytes.large_pool.current"] == 9 * MiB
    assert d["inactive_split_bytes.large_pool.current"] == -9 * MiB
    assert d["num_device_alloc"] == 0


def _cost_per_pair(stream, size=1024, pairs=2000, repeats=5):
    """Best-of-`repeats` seconds per alloc/free pair of `size` bytes on `stream`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(pairs):
            mtia.caching_allocator_delete(mtia.caching_allocator_alloc(size, 0, stream))
        best = min(best, time.perf_counter() - start)
    return best / pairs


def _fragmented_cost(stream, n_free):
    """Leave n_free cached 512-byte blocks that cannot merge, then time 1 KiB pairs."""
    live = []
    try:
        for _ in range(2 * n_free):
            live.append(mtia.caching_allocator_alloc(512, 0, stream))
        holes, live = live[::2], live[1::2]
        for ptr in holes:
            mtia.caching_allocator_delete(ptr)
        return _cost_per_pair(stream)
    finally:
        for ptr in live:
            mtia.caching_allocator_delete(ptr)
        mtia.empty_cache()


def test_malloc_free_cost_does_not_grow_linearly_with_cached_blocks(side_streams):
    """Spec must-have 29 (allocator_core.md §15.29)."""
    stream = side_streams[0]
    mtia.empty_cache()
    few = _fragmented_cost(stream, 100)
    many = _fragmented_cost(stream, 10_000)
    # O(log n) (or O(1)) lookups: 100x more cached blocks costs far less than 100x the time.
    assert many < 4 * few, (few, many)
