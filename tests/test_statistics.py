"""memory_stats() and what is derived from it: the 122 baseline keys, all == small + large,
current == allocated - freed, resetting peaks and accumulated counts, the memory_allocated()
family, the snapshot's segments adding up to the stats, and the stats staying consistent
under concurrent malloc/free (allocator_core.md §15.20-24, §15.29; PyTorch's
test_memory_allocation).

Tests measure deltas of memory_stats() and free what they allocate (conftest.py).
"""
import random
import threading

import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from helpers import (BASELINE_KEYS, DEVICES, KiB, MiB, POOLS, STAT_KEYS, assert_all_is_small_plus_large, delta,
                     stats)


# ----------------------------------------------------------------------------- stats

def _churn(blocks, device):
    """Some allocations in both pools, some freed, some kept live."""
    keep = [blocks.alloc(s, device) for s in (700, 300 * KiB, 3 * MiB, 12 * MiB + 512)]
    for s in (5000, 2 * MiB, 40 * MiB):
        blocks.free(blocks.alloc(s, device))
    return keep


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_stats_keys_and_consistency(blocks, device):
    """Spec must-have 20 (allocator_core.md §15.20)."""
    before = stats(device)
    _churn(blocks, device)
    after = stats(device)
    assert list(after) == sorted(after)  # every key, "dram" included
    keys = [k for k in after if k != "dram"]
    assert set(BASELINE_KEYS) <= set(keys)
    assert len(BASELINE_KEYS) == 122
    assert_all_is_small_plus_large(after)
    d = delta(before, after)
    for key in STAT_KEYS:
        if key.endswith(".current"):
            stem = key[: -len("current")]
            assert d[key] == d[stem + "allocated"] - d[stem + "freed"], key
    nested = mtia.memory_stats_as_nested_dict(device)
    assert nested["allocation"]["all"]["current"] == after["allocation.all.current"]
    assert nested["reserved_bytes"]["large_pool"]["peak"] == after["reserved_bytes.large_pool.peak"]
    assert nested["num_device_alloc"] == after["num_device_alloc"]


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_reset_peak_and_accumulated_stats(blocks, device):
    """Spec must-have 21 (allocator_core.md §15.21)."""
    _churn(blocks, device)
    mtia.reset_peak_memory_stats(device)
    s = stats(device)
    for key in STAT_KEYS:
        if key.endswith(".peak"):
            assert s[key] == s[key[: -len("peak")] + "current"], key

    blocks.free(blocks.alloc(64 * MiB, device))  # moves peaks and accumulated counts again
    other = [d for d in DEVICES if d != device]
    others_before = {d: stats(d) for d in other}
    before = stats(device)
    mtia.reset_accumulated_memory_stats(device)
    s = stats(device)
    for key in STAT_KEYS:
        if key.endswith((".allocated", ".freed")):
            assert s[key] == 0, key
        else:
            assert s[key] == before[key], key  # current and peak unchanged
    for key in ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc",
                "num_device_free"):
        assert s[key] == 0, key
    assert s["max_split_size"] == before["max_split_size"]
    for d in other:  # other devices are untouched
        assert stats(d) == others_before[d]


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_memory_helpers_match_stats(blocks, device):
    """Spec must-have 22 (allocator_core.md §15.22)."""
    _churn(blocks, device)
    s = stats(device)
    assert mtia.memory_allocated(device) == s["allocated_bytes.all.current"]
    assert mtia.max_memory_allocated(device) == s["allocated_bytes.all.peak"]
    assert mtia.memory_reserved(device) == s["reserved_bytes.all.current"]
    assert mtia.max_memory_reserved(device) == s["reserved_bytes.all.peak"]
    assert s["dram"] == {"allocated_bytes": s["allocated_bytes.all.current"],
                         "peak_bytes": s["allocated_bytes.all.peak"],
                         "reserved_bytes": s["reserved_bytes.all.current"],
                         "peak_reserved_bytes": s["reserved_bytes.all.peak"]}
    with mtia.device(device):  # device=None means the current device
        assert mtia.memory_allocated() == s["allocated_bytes.all.current"]
        assert mtia.memory_stats() == s


def test_memory_allocation(blocks):
    """PyTorch test_cuda.py: test_memory_allocation."""
    mtia.empty_cache()
    prev = mtia.memory_allocated()
    ptr = blocks.alloc(1)
    assert mtia.memory_allocated() > prev
    blocks.free(ptr)
    assert mtia.memory_allocated() == prev


# ----------------------------------------------------------------------------- snapshot

@pytest.fixture
def churned_state(blocks, side_streams):
    """Live, freed and split blocks in both pools, on two streams and every device."""
    mtia.empty_cache()
    for device in DEVICES:
        _churn(blocks, device)
        blocks.alloc(3 * MiB, device, side_streams[device])
        blocks.free(blocks.alloc(600, device, side_streams[device]))
    return blocks


def test_snapshot_segments_tile_and_add_up(churned_state):
    """Spec must-have 23 (allocator_core.md §15.23)."""
    segments = mtia.memory_snapshot()
    for device in DEVICES:
        mine = [s for s in segments if s["device"] == device]
        addresses = [s["address"] for s in mine]
        assert addresses == sorted(addresses)
        assert sum(s["total_size"] for s in mine) == stats(device)["reserved_bytes.all.current"]
    for seg in segments:
        blks = seg["blocks"]
        assert sum(b["size"] for b in blks) == seg["total_size"]
        address = seg["address"]
        for b in blks:
            assert b["address"] == address
            address += b["size"]
        active = [b for b in blks if b["state"] != "inactive"]
        assert seg["allocated_size"] == sum(b["size"] for b in blks
                                            if b["state"] == "active_allocated")
        assert seg["active_size"] == sum(b["size"] for b in active)
        assert seg["requested_size"] == sum(b["requested_size"] for b in active)
        assert seg["allocated_size"] <= seg["active_size"] <= seg["total_size"]


def test_snapshot_states_types_and_pool_ids(churned_state, side_streams):
    """Spec must-have 24 (allocator_core.md §15.24)."""
    segments = mtia.memory_snapshot()
    assert segments
    for seg in segments:
        assert seg["segment_type"] in ("small", "large")
        assert (seg["segment_type"] == "small") == (seg["total_size"] == 2 * MiB)
        assert seg["segment_pool_id"] == (0, 0)
        assert seg["is_expandable"] is False
        assert isinstance(seg["frames"], list)
        assert isinstance(seg["stream"], int)
        for b in seg["blocks"]:
            assert b["state"] in ("active_allocated", "active_pending_free", "inactive")
            assert isinstance(b["frames"], list)
    streams = {seg["stream"] for seg in segments if seg["device"] == 0}
    assert 0 in streams and len(streams) == 2  # default stream and the side stream


# ----------------------------------------------------------------------------- threads

def test_concurrent_malloc_free_keeps_stats_consistent():
    """Spec must-have 29 (allocator_core.md §15.29)."""
    n_threads, n_ops = 8, 300
    streams = [None] * (n_threads // 2) + [mtia.Stream(device=0) for _ in range(n_threads // 2)]
    live_ranges, lock, errors = {}, threading.Lock(), []
    before = stats(0)

    def worker(seed, stream):
        rng = random.Random(seed)
        mine = []
        try:
            for _ in range(n_ops):
                if mine and (len(mine) > 20 or rng.random() < 0.45):
                    ptr = mine.pop(rng.randrange(len(mine)))
                    with lock:
                        del live_ranges[ptr]
                    mtia.caching_allocator_delete(ptr)
                else:
                    size = rng.choice([rng.randint(1, 4096), rng.randint(1, MiB),
                                       rng.randint(1, 30 * MiB)])
                    ptr = mtia.caching_allocator_alloc(size, 0, stream)
                    mine.append(ptr)
                    with lock:  # no live block may overlap another one
                        for start, end in live_ranges.items():
                            assert ptr + size <= start or end <= ptr, "overlapping blocks"
                        live_ranges[ptr] = ptr + size
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            for ptr in mine:
                with lock:
                    live_ranges.pop(ptr, None)
                mtia.caching_allocator_delete(ptr)

    threads = [threading.Thread(target=worker, args=(i, streams[i])) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    mtia.memory.check_invariants(0)
    d = delta(before, stats(0))
    for key in ("allocation", "allocated_bytes", "active", "active_bytes", "requested_bytes"):
        for pool in POOLS:
            assert d[f"{key}.{pool}.current"] == 0, (key, pool)
    assert_all_is_small_plus_large(stats(0))
    for key in STAT_KEYS:
        if key.endswith(".current"):
            stem = key[: -len("current")]
            assert d[key] == d[stem + "allocated"] - d[stem + "freed"], key
