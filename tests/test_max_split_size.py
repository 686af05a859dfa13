"""max_split_size_mb: which cached blocks normal and oversize requests may take, oversize
blocks never split, the oversize_* stats and the max_split_size stat, and the release of cached
oversize blocks in the malloc ladder, before the full flush and never while a split segment's
other block is live (allocator_core.md §15.14, §15.16, §4.1 step 4d, §4.5).

Tests measure deltas of memory_stats() and free what they allocate (conftest.py).
"""
import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from helpers import DEVICES, MiB, delta, segment_of, stats


@pytest.mark.parametrize("cached_mb, request_mb, reused", [
    pytest.param(120, 50, False, id="normal-request-skips-oversize-block"),
    pytest.param(100, 50, False, id="normal-request-skips-block-equal-to-M"),
    pytest.param(80, 50, True, id="normal-request-splits-block-below-M"),
    pytest.param(210, 200, True, id="oversize-request-takes-block-10MiB-larger"),
    pytest.param(218, 200, True, id="oversize-request-takes-block-18MiB-larger"),
    pytest.param(220, 200, False, id="oversize-request-skips-block-20MiB-larger"),
])
def test_max_split_size_reuse_rules(blocks, cached_mb, request_mb, reused):
    """Spec must-have 14 (allocator_core.md §15.14)."""
    mtia.memory._set_allocator_settings("max_split_size_mb:100")
    mtia.empty_cache()
    cached = blocks.alloc(cached_mb * MiB)
    blocks.free(cached)
    before = stats()
    ptr = blocks.alloc(request_mb * MiB)
    d = delta(before, stats())
    if not reused:
        assert ptr != cached
        assert d["num_device_alloc"] == 1
        assert d["reserved_bytes.all.current"] == request_mb * MiB
        return
    assert ptr == cached
    assert d["num_device_alloc"] == 0
    if request_mb >= 100:  # an oversize allocation is never split
        assert d["allocated_bytes.all.current"] == cached_mb * MiB
        assert d["inactive_split.all.current"] == 0
        assert len(segment_of(ptr)["blocks"]) == 1
    else:
        assert d["allocated_bytes.all.current"] == request_mb * MiB
        assert d["inactive_split.large_pool.current"] == 1
        assert d["inactive_split_bytes.large_pool.current"] == (cached_mb - request_mb) * MiB


def test_oversize_allocation_and_segment_stats(blocks):
    """Spec must-have 14 (allocator_core.md §15.14)."""
    mtia.memory._set_allocator_settings("max_split_size_mb:100")
    mtia.empty_cache()
    before = stats()
    blocks.alloc(50 * MiB)
    d = delta(before, stats())
    assert d["oversize_allocations.current"] == 0
    assert d["oversize_segments.current"] == 0

    big = blocks.alloc(150 * MiB)
    d = delta(before, stats())
    assert d["oversize_allocations.current"] == 1
    assert d["oversize_allocations.allocated"] == 1
    assert d["oversize_segments.current"] == 1
    blocks.free(big)
    d = delta(before, stats())
    assert d["oversize_allocations.current"] == 0
    assert d["oversize_allocations.freed"] == 1
    assert d["oversize_segments.current"] == 1  # still cached
    mtia.empty_cache()
    d = delta(before, stats())
    assert d["oversize_segments.current"] == 0
    assert d["oversize_segments.freed"] == 1


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_max_split_size_stat_is_minus_one_by_default(device):
    """Spec must-have 16 (allocator_core.md §15.16)."""
    assert stats(device)["max_split_size"] == -1


def test_oversize_cached_blocks_are_released_before_the_full_flush(blocks):
    # §4.1 step 4d, §4.5: a cached oversize block is released before the full flush (no retry, no sync)
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    mtia.memory._set_allocator_settings("max_split_size_mb:100")
    mtia.set_per_process_memory_fraction(280 * MiB / total, 0)
    blocks.alloc(5 * MiB)                            # a 20 MiB segment that stays
    blocks.free(blocks.alloc(150 * MiB))             # a cached oversize block
    before = stats()
    blocks.alloc(125 * MiB)                          # 150 >= 125 + 20: no reuse; 20 + 150 + 126 > 280
    d = delta(before, stats())
    assert (d["num_device_free"], d["num_device_alloc"]) == (1, 1)
    assert (d["num_alloc_retries"], d["num_sync_all_streams"], d["num_ooms"]) == (0, 0, 0)
    assert stats()["reserved_bytes.all.current"] == (20 + 126) * MiB


def test_lowering_max_split_size_at_run_time_never_releases_a_split_segment(blocks, side_streams):
    # A 40 MiB remainder of a split 90 MiB segment becomes "oversize" when max_split_size_mb
    # drops to 40 at run time. The oversize release (§4.5) must not give that segment back
    # to the device while its other block is live: the request fails with OOM instead, and
    # no address is handed out twice.
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    mtia.set_per_process_memory_fraction(128 * MiB / total, 0)
    blocks.free(blocks.alloc(90 * MiB))
    a = blocks.alloc(50 * MiB)                       # [a 50 | free 40] in the 90 MiB segment
    blocks.alloc(36 * MiB, 0, side_streams[0])       # another stream's segment: 126 of 128 MiB reserved
    mtia.memory._set_allocator_settings("max_split_size_mb:40")
    before = stats()
    with pytest.raises(mtia.OutOfMemoryError):
        blocks.alloc(3 * MiB)                        # may not take the oversize remainder; no room
    d = delta(before, stats())
    assert (d["num_device_free"], d["num_device_alloc"]) == (0, 0)
    assert stats()["reserved_bytes.all.current"] == 126 * MiB
    mtia.memory.check_invariants()
    blocks.free(a)                                   # the segment is whole again and can go
    blocks.alloc(3 * MiB)
    mtia.memory.check_invariants()
