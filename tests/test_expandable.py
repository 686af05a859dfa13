"""Expandable segments (allocator_core.md §11, must-have 31): one reserved range per
stream and pool kind, pages mapped on demand (2 MiB small, 20 MiB large) and unmapped by
empty_cache; reserved bytes follow the mapped pages, the segment stats stay 0."""
import random

import numpy as np
import pytest

import mtia_alloc as mtia
from helpers import MiB, stats
from mtia_alloc.memory import _set_allocator_settings, check_invariants


@pytest.fixture(autouse=True)
def expandable():
    mtia.init()
    mtia.empty_cache()
    _set_allocator_settings("expandable_segments:True")
    yield
    mtia.empty_cache()
    _set_allocator_settings("expandable_segments:False")  # "" would keep it (PyTorch semantics)


def test_growing_allocations_map_pages_into_one_segment():
    # §11, §15.31: 20 MiB pages mapped on demand at the lowest fitting address; maps are not segments
    before = stats()
    ptrs, mapped, maps = [], [], []
    for n in (3, 5, 7, 11, 13):
        ptrs.append(mtia.caching_allocator_alloc(n * MiB, device=0))
        s = stats()
        mapped.append(s["reserved_bytes.large_pool.current"] - before["reserved_bytes.large_pool.current"])
        maps.append(s["num_device_alloc"] - before["num_device_alloc"])
    assert mapped == [20 * MiB, 20 * MiB, 20 * MiB, 40 * MiB, 40 * MiB]
    assert maps == [1, 1, 1, 2, 2]
    after = stats()
    keys = [f"segment.{p}.{m}" for p in ("all", "small_pool", "large_pool") for m in ("current", "allocated")]
    for key in keys + ["oversize_segments.current", "oversize_segments.allocated"]:
        assert after[key] == before[key], key  # map/unmap never count as segments
    assert [p - ptrs[0] for p in ptrs] == [0, 3 * MiB, 8 * MiB, 15 * MiB, 26 * MiB]  # packed in order
    segs = [s for s in mtia.memory_snapshot() if s["is_expandable"] and s["device"] == 0]
    assert len(segs) == 1 and segs[0]["segment_type"] == "large"  # one contiguous mapped range
    assert segs[0]["total_size"] == 40 * MiB and len(segs[0]["blocks"]) == 6  # 5 blocks + a 1 MiB tail
    for p in ptrs:
        mtia.caching_allocator_delete(p)
    check_invariants()
    freed_before = stats()["num_device_free"]
    mtia.empty_cache()
    assert stats()["reserved_bytes.large_pool.current"] == before["reserved_bytes.large_pool.current"]
    assert stats()["num_device_free"] - freed_before == 1  # the whole free range in one unmap
    assert not [s for s in mtia.memory_snapshot() if s["is_expandable"]]


def test_small_pool_pages_are_2mib_and_requests_split_at_512_bytes():
    before = stats()
    ptrs = [mtia.caching_allocator_alloc(300 * 1024, device=0) for _ in range(10)]  # 3 MB in all
    grew = stats()["reserved_bytes.small_pool.current"] - before["reserved_bytes.small_pool.current"]
    assert grew == 4 * MiB  # two 2 MiB pages, not one 2 MiB segment per overflow
    assert stats()["num_device_alloc"] - before["num_device_alloc"] == 2  # one map per page
    for p in ptrs:
        mtia.caching_allocator_delete(p)
    mtia.empty_cache()
    assert stats()["reserved_bytes.small_pool.current"] == before["reserved_bytes.small_pool.current"]


def test_each_stream_gets_its_own_range():
    s = mtia.Stream(0)
    a = mtia.caching_allocator_alloc(5 * MiB, device=0)
    b = mtia.caching_allocator_alloc(5 * MiB, device=0, stream=s)
    segs = [x for x in mtia.memory_snapshot() if x["is_expandable"] and x["device"] == 0]
    assert sorted(x["stream"] for x in segs) == sorted([0, s.stream_id])
    mtia.caching_allocator_delete(a)
    mtia.caching_allocator_delete(b)


def test_history_records_segment_map_and_unmap():
    mtia.record_memory_history(max_entries=1000)
    try:
        p = mtia.caching_allocator_alloc(25 * MiB, device=0)
        mtia.caching_allocator_delete(p)
        mtia.empty_cache()
        actions = [e["action"] for e in mtia.snapshot()["device_traces"][0]]
    finally:
        mtia.record_memory_history(None)
    assert "segment_map" in actions and "segment_unmap" in actions
    assert "segment_alloc" not in actions[actions.index("segment_map"):]


def test_unmap_keeps_partly_used_pages_and_data_survives():
    a = mtia.empty(30 * MiB // 4, dtype="float32", device=0)   # spans two 20 MiB pages
    b = mtia.empty(5 * MiB // 4, dtype="float32", device=0)
    mtia.emulator.fill_(b, 7.0)
    mtia.synchronize(0)
    del a
    mtia.empty_cache()  # frees only whole free pages; b's page stays mapped
    check_invariants()
    assert (b.numpy() == 7.0).all()
    del b


def test_pool_with_custom_allocator_never_uses_expandable_segments():
    arena = np.zeros(64 * MiB, dtype=np.uint8)
    state = {"next": 0}

    def alloc(size, device, stream):
        off = state["next"]
        state["next"] += size
        return arena.ctypes.data + off if state["next"] <= arena.nbytes else 0

    pool = mtia.MemPool(allocator=mtia.memory.PythonAllocator(alloc, lambda *a: None))
    with mtia.use_mem_pool(pool):
        p = mtia.caching_allocator_alloc(3 * MiB)
    segs = pool.snapshot()
    assert len(segs) == 1 and not segs[0]["is_expandable"] and segs[0]["total_size"] == 20 * MiB
    mtia.caching_allocator_delete(p)
    del pool


def test_switching_off_leaves_expandable_blocks_unused():
    p = mtia.caching_allocator_alloc(5 * MiB, device=0)
    mtia.caching_allocator_delete(p)  # a free expandable block stays cached
    _set_allocator_settings("expandable_segments:False")
    q = mtia.caching_allocator_alloc(5 * MiB, device=0)
    seg = next(s for s in mtia.memory_snapshot() if any(b["address"] == q for b in s["blocks"]))
    assert not seg["is_expandable"]
    mtia.caching_allocator_delete(q)
    check_invariants()


def test_oom_when_pages_do_not_fit_and_state_intact():
    total = mtia.mem_get_info(0)[1]
    with pytest.raises(mtia.OutOfMemoryError):
        mtia.caching_allocator_alloc(total + 40 * MiB, device=0)
    check_invariants()


def test_random_sequences_keep_invariants():
    rng = random.Random(5)
    s = mtia.Stream(0)
    live = []
    for step in range(1500):
        if live and rng.random() < 0.45:
            mtia.caching_allocator_delete(live.pop(rng.randrange(len(live))))
        else:
            size = rng.choice([rng.randrange(1, 4096), rng.randrange(1, 2 * MiB), rng.randrange(1, 40 * MiB)])
            live.append(mtia.caching_allocator_alloc(size, device=0, stream=s if rng.random() < 0.3 else None))
        if step % 100 == 0:
            check_invariants()
            if rng.random() < 0.3:
                mtia.empty_cache()
    for p in live:
        mtia.caching_allocator_delete(p)
    check_invariants()
    mtia.empty_cache()
    assert not [x for x in mtia.memory_snapshot() if x["is_expandable"]]
