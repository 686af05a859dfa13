"""Segments and blocks: which pool a request goes to and the segment it gets (2 MiB small,
20 MiB mid-size large, rounded to 2 MiB above 10 MiB), when the remainder of a block is split
off, how freed neighbours merge back, and empty_cache() releasing only wholly free segments
(allocator_core.md §15.3-6, §15.10-11).

Tests measure deltas of memory_stats() and free what they allocate (conftest.py).
"""
import itertools

import pytest

import mtia_alloc as mtia
from helpers import DEVICES, MiB, block_of, delta, round_size, segment_of, stats


# ----------------------------------------------------------------------------- pools and new segments

@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
@pytest.mark.parametrize("size, pool, segment_size", [
    pytest.param(1, "small_pool", 2 * MiB, id="1B-small"),
    pytest.param(4096, "small_pool", 2 * MiB, id="4KiB-small"),
    pytest.param(MiB, "small_pool", 2 * MiB, id="1MiB-small"),
    pytest.param(MiB + 1, "large_pool", 20 * MiB, id="1MiB+1-large"),
])
def test_request_size_picks_the_pool_and_one_new_segment(blocks, device, size, pool, segment_size):
    """Spec must-have 3 (allocator_core.md §15.3)."""
    mtia.empty_cache()
    other = "large_pool" if pool == "small_pool" else "small_pool"
    before = stats(device)
    blocks.alloc(size, device)
    d = delta(before, stats(device))
    assert d[f"reserved_bytes.{pool}.current"] == segment_size
    assert d[f"segment.{pool}.current"] == 1
    assert d[f"reserved_bytes.{other}.current"] == 0
    assert d[f"segment.{other}.current"] == 0
    assert d["num_device_alloc"] == 1
    assert d[f"allocated_bytes.{pool}.current"] == round_size(size)


def test_next_small_request_is_carved_from_the_same_segment(blocks):
    """Spec must-have 3 (allocator_core.md §15.3)."""
    mtia.empty_cache()
    first = blocks.alloc(1000)
    before = stats()
    second = blocks.alloc(3000)
    d = delta(before, stats())
    assert d["num_device_alloc"] == 0
    assert d["segment.small_pool.current"] == 0
    assert second == first + 1024  # the allocated piece is the lower part of the free remainder


# ----------------------------------------------------------------------------- splitting

@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
@pytest.mark.parametrize("size", [5 * MiB, MiB + 1, 10 * MiB - 512],
                         ids=["5MiB", "1MiB+1", "10MiB-512"])
def test_mid_size_request_splits_a_20MiB_segment(blocks, device, size):
    """Spec must-have 4 (allocator_core.md §15.4)."""
    mtia.empty_cache()
    before = stats(device)
    ptr = blocks.alloc(size, device)
    d = delta(before, stats(device))
    rounded = round_size(size)
    assert d["allocated_bytes.all.current"] == rounded
    assert d["reserved_bytes.all.current"] == 20 * MiB
    assert d["segment.large_pool.current"] == 1
    assert d["inactive_split.large_pool.current"] == 1
    assert d["inactive_split_bytes.large_pool.current"] == 20 * MiB - rounded
    assert d["inactive_split_bytes.small_pool.current"] == 0
    seg = segment_of(ptr)
    assert seg["address"] == ptr
    assert [b["size"] for b in seg["blocks"]] == [rounded, 20 * MiB - rounded]


@pytest.mark.parametrize("size, reserved, split_bytes", [
    pytest.param(12 * MiB, 12 * MiB, 0, id="12MiB-exact-segment"),
    pytest.param(12 * MiB + MiB // 2, 14 * MiB, MiB + MiB // 2, id="12.5MiB-in-14MiB-splits"),
    pytest.param(10 * MiB, 10 * MiB, 0, id="10MiB-own-segment"),
    pytest.param(64 * MiB + 512, 66 * MiB, 2 * MiB - 512, id="64MiB+512-in-66MiB-splits"),
])
def test_large_request_segment_is_rounded_to_2MiB(blocks, size, reserved, split_bytes):
    """Spec must-have 5 (allocator_core.md §15.5)."""
    mtia.empty_cache()
    before = stats()
    blocks.alloc(size)
    d = delta(before, stats())
    assert d["reserved_bytes.large_pool.current"] == reserved
    assert d["segment.large_pool.current"] == 1
    assert d["allocated_bytes.large_pool.current"] == size
    assert d["inactive_split.large_pool.current"] == (1 if split_bytes else 0)
    assert d["inactive_split_bytes.large_pool.current"] == split_bytes


@pytest.mark.parametrize("size, block_size", [
    pytest.param(11 * MiB, 12 * MiB, id="11MiB-remainder-exactly-1MiB"),
    pytest.param(11 * MiB + 512, 12 * MiB, id="11MiB+512"),
    pytest.param(13 * MiB, 14 * MiB, id="13MiB"),
    pytest.param(19 * MiB + MiB // 2, 20 * MiB, id="19.5MiB"),
])
def test_large_remainder_of_at_most_1MiB_is_not_split(blocks, size, block_size):
    """Spec must-have 6 (allocator_core.md §15.6)."""
    mtia.empty_cache()
    before = stats()
    ptr = blocks.alloc(size)
    d = delta(before, stats())
    assert d["allocated_bytes.large_pool.current"] == block_size  # the slack counts too
    assert d["requested_bytes.large_pool.current"] == size
    assert d["inactive_split.large_pool.current"] == 0
    blk = block_of(ptr)
    assert blk["size"] == block_size
    assert blk["requested_size"] == size
    assert len(segment_of(ptr)["blocks"]) == 1


# ----------------------------------------------------------------------------- merging and empty_cache

def _merged_layout(pieces):
    """Merge runs of free pieces: [(size, is_free), ...] -> the segment's expected blocks."""
    out = []
    for size, is_free in pieces:
        if is_free and out and out[-1][1]:
            out[-1] = (out[-1][0] + size, True)
        else:
            out.append((size, is_free))
    return out


@pytest.mark.parametrize("order", list(itertools.permutations("abc")), ids="".join)
def test_freeing_neighbours_merges_them(blocks, order):
    """Spec must-have 10 (allocator_core.md §15.10)."""
    mtia.empty_cache()
    before = stats()
    # One 20 MiB segment:  a:4 | b:4 | c:4 | tail:8 (free)  (MiB).
    ptrs = {name: blocks.alloc(4 * MiB) for name in "abc"}
    assert ptrs["b"] == ptrs["a"] + 4 * MiB and ptrs["c"] == ptrs["a"] + 8 * MiB
    free = {"a": False, "b": False, "c": False}
    for name in order:
        blocks.free(ptrs[name])
        free[name] = True
        layout = _merged_layout([(4 * MiB, free["a"]), (4 * MiB, free["b"]),
                                 (4 * MiB, free["c"]), (8 * MiB, True)])
        seg = segment_of(ptrs["a"])
        assert [(b["size"], b["state"] == "inactive") for b in seg["blocks"]] == layout
        d = delta(before, stats())
        split = len(layout) > 1
        assert d["inactive_split.large_pool.current"] == (
            sum(is_free for _, is_free in layout) if split else 0)
        assert d["inactive_split_bytes.large_pool.current"] == (
            sum(size for size, is_free in layout if is_free) if split else 0)
    seg = segment_of(ptrs["a"])
    assert [(b["size"], b["state"]) for b in seg["blocks"]] == [(20 * MiB, "inactive")]
    assert delta(before, stats())["reserved_bytes.all.current"] == 20 * MiB


def test_empty_cache_releases_only_fully_free_segments(blocks, side_streams):
    """Spec must-have 11 (allocator_core.md §15.11)."""
    mtia.empty_cache()
    kept_small = blocks.alloc(1000)  # its 2 MiB segment must stay
    kept_large = blocks.alloc(5 * MiB)  # its 20 MiB segment (15 MiB free) must stay
    blocks.free(blocks.alloc(64 * MiB))  # a wholly free 64 MiB segment
    blocks.free(blocks.alloc(1000, 0, side_streams[0]))  # a wholly free 2 MiB segment
    before = stats()
    mtia.empty_cache()
    d = delta(before, stats())
    assert d["reserved_bytes.all.current"] == -66 * MiB
    assert d["reserved_bytes.large_pool.current"] == -64 * MiB
    assert d["segment.all.current"] == -2
    assert d["segment.all.freed"] == 2
    assert d["num_device_free"] == 2
    assert d["num_sync_all_streams"] == 1
    assert d["allocated_bytes.all.current"] == 0
    assert d["inactive_split_bytes.all.current"] == 0
    assert segment_of(kept_large)["total_size"] == 20 * MiB
    assert segment_of(kept_small)["total_size"] == 2 * MiB

    before = stats()
    blocks.free(kept_small)
    blocks.free(kept_large)
    mtia.empty_cache()
    d = delta(before, stats())
    assert d["reserved_bytes.all.current"] == -22 * MiB
    assert d["num_device_free"] == 2
    assert d["inactive_split.all.current"] == -2  # both free tails merged back, then released
