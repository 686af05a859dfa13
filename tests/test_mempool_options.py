"""MemPool options: use_on_oom (a default-pool request that would fail falls back to a
cached block of a use_on_oom pool of the same stream; routed requests never fall back; deleted
pools are not used) and no_split (one block per segment, reused whole) (PyTorch's TestMemPool,
pools_graphs_streams_api.md §1.5, must-have 8).

Values are written by kernels (helpers.fill, fill_arange) and read back after a synchronize,
so the data a pool hands out is checked too.
"""
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import (NELEM_1MB, HostAllocator, KiB, MiB, fill, host, kLargeBuffer, kSmallBuffer, segment_of,
                     segments)
from mtia_alloc.memory import MemPool, use_mem_pool


def limit_device_memory(allowed, device=0):
    """A memory fraction under which exactly `allowed` more bytes of segments fit (all pools)."""
    total = mtia.get_device_properties(device)["total_memory"]
    reserved = mtia.memory_reserved(device)
    # A bit of slack against float rounding; every segment is >= 2 MiB, so it is never usable.
    mtia.set_per_process_memory_fraction((reserved + allowed + 512 * KiB) / total, device)


# ----------------------------------------------------------------------------- use_on_oom

def test_mempool_limited_memory_with_allocator(empty_device):
    host_alloc = HostAllocator()
    pool_do_not_use = MemPool(host_alloc.python_allocator())
    pool_use = MemPool(host_alloc.python_allocator(), use_on_oom=True)
    nelem = NELEM_1MB
    limit_device_memory(80 * MiB)  # the fraction caps the segments of every pool of the device
    # free: 80 MB | do_not_use [] | use [] | default []
    with use_mem_pool(pool_do_not_use):
        a = mtia.empty(40 * nelem)
    with use_mem_pool(pool_use):
        b = mtia.empty(40 * nelem)
    b_ptr = b.data_ptr()
    assert host_alloc.alloc_calls == 2
    # free: 0 | do_not_use [aaaa] | use [bbbb] | default []
    with pytest.raises(mtia.OutOfMemoryError):
        mtia.empty(40 * nelem)

    del a, b
    # free: 0 | do_not_use [____] | use [____] | default []
    before = mtia.memory_stats()
    c = mtia.empty(30 * nelem)  # served from pool_use's cached block instead of OOM
    assert c.data_ptr() == b_ptr
    assert segment_of(c.data_ptr())["segment_pool_id"] == pool_use.id  # the block stays pool_use's
    after = mtia.memory_stats()
    assert after["num_device_alloc"] == before["num_device_alloc"]  # no new segment for the fallback
    assert after["num_ooms"] == before["num_ooms"]
    fill(c, 5.0)
    assert (host(c) == 5.0).all()
    # free: 0 | do_not_use [____] | use [ccc_] | default []
    with pytest.raises(mtia.OutOfMemoryError):
        mtia.empty(30 * nelem)  # pool_do_not_use is not eligible, pool_use has 10 MB left

    del c  # back into pool_use, whatever context is active
    assert segments(pool_use.id)[0]["active_size"] == 0
    with use_mem_pool(pool_use):
        e = mtia.empty(20 * nelem)
    assert e.data_ptr() == b_ptr
    del e
    assert host_alloc.free_calls == 0
    pids = (pool_use.id, pool_do_not_use.id)
    del pool_use, pool_do_not_use  # their destructors empty them
    assert host_alloc.free_calls == 2 and not host_alloc.buffers
    assert all(segments(p) == [] for p in pids)


def test_mempool_routed_allocation_never_falls_back(empty_device):
    """§1.5: an allocation routed to a private pool does not use use_on_oom pools."""
    fallback = MemPool(use_on_oom=True)
    target = MemPool()
    limit_device_memory(40 * MiB)
    with use_mem_pool(fallback):
        x = mtia.empty(40 * NELEM_1MB)
    del x
    with use_mem_pool(target), pytest.raises(mtia.OutOfMemoryError):
        mtia.empty(20 * NELEM_1MB)
    y = mtia.empty(20 * NELEM_1MB)  # the default pool may fall back
    assert segment_of(y.data_ptr())["segment_pool_id"] == fallback.id
    del y, fallback, target


def test_use_on_oom_fallback_only_takes_a_block_of_the_same_stream(empty_device):
    """Spec must-have 8 (pools_graphs_streams_api.md §6.8)."""
    # §1.5 step 2, §6.8: the fallback only takes a block cached for the request's stream
    pool = MemPool(use_on_oom=True)
    s1 = mtia.Stream()
    limit_device_memory(40 * MiB)
    with use_mem_pool(pool):
        x = mtia.empty(40 * NELEM_1MB, stream=s1)
    x_ptr = x.data_ptr()
    del x  # cached in the use_on_oom pool, on stream s1
    before = mtia.memory_stats()
    with pytest.raises(mtia.OutOfMemoryError):
        mtia.empty(20 * NELEM_1MB)  # the default stream: s1's cached block is not eligible
    assert mtia.memory_stats()["num_ooms"] == before["num_ooms"] + 1
    y = mtia.empty(20 * NELEM_1MB, stream=s1)  # the same stream: served by the fallback
    assert y.data_ptr() == x_ptr and segment_of(x_ptr)["segment_pool_id"] == pool.id
    assert mtia.memory_stats()["num_device_alloc"] == before["num_device_alloc"]
    del y, pool


def test_deleted_mempool_not_used_on_oom(empty_device):
    pool = MemPool(use_on_oom=True)
    control = MemPool(use_on_oom=True)
    limit_device_memory(60 * MiB)
    kept = {}
    for p in (pool, control):
        with use_mem_pool(p):
            big = mtia.empty(30 * NELEM_1MB)
            del big
            # x sits at the start of the 30 MB segment; the 20 MB after it stay cached
            kept[p.id] = mtia.empty(10 * NELEM_1MB)
    del p
    pid, control_id = pool.id, control.id
    del pool  # freeable, but its segment holds a live block: nothing is freed, no fallback any more
    assert len(segments(pid)) == 1
    # 60 MB allowed and reserved: only the live control pool can serve a default request
    y = mtia.empty(15 * NELEM_1MB)
    assert segment_of(y.data_ptr())["segment_pool_id"] == control_id
    del y
    del control  # both pools are dead now, each holding a segment with a live block
    with pytest.raises(mtia.OutOfMemoryError):
        mtia.empty(15 * NELEM_1MB)  # must not be served from a deleted pool's cached block
    mtia.memory.check_invariants()
    fill(kept[pid], 1.5)
    assert (host(kept[pid]) == 1.5).all()
    del kept[pid]
    # the dead pool's segment is fully free now: the OOM retry releases it and succeeds
    z = mtia.empty(15 * NELEM_1MB)
    assert segment_of(z.data_ptr())["segment_pool_id"] == (0, 0)
    assert segments(pid) == []
    assert len(segments(control_id)) == 1
    del z, kept


# ----------------------------------------------------------------------------- no_split

def test_mempool_no_split(empty_device):
    requests = [512 * KiB, 256 * KiB, 100 * KiB, 3 * MiB, 5 * MiB]
    counts = {}
    for no_split in (False, True):
        pool = MemPool(no_split=no_split)
        with use_mem_pool(pool):
            live = [mtia.empty(n, dtype="uint8") for n in requests]
        for i, t in enumerate(live):
            fill(t, i + 1)
        for i, t in enumerate(live):
            assert (host(t) == i + 1).all()
        segs = pool.snapshot()
        counts[no_split] = (len(segs), sum(len(s["blocks"]) for s in segs))
        if no_split:
            for s in segs:
                assert len(s["blocks"]) == 1, "a no_split pool has exactly one block per segment"
                assert s["blocks"][0]["state"] == "active_allocated"
            assert len(segs) == len(requests)
            # each block is a whole segment: 2 MiB small segments, 20 MiB large ones
            assert sorted(s["total_size"] for s in segs) == [kSmallBuffer] * 3 + [kLargeBuffer] * 2
        del live
        if no_split:
            # freed blocks are whole segments again and are reused whole
            with use_mem_pool(pool):
                again = mtia.empty(1000, dtype="uint8")
            assert len(pool.snapshot()) == len(requests)
            assert mtia.memory_stats()["inactive_split.all.current"] == 0
            del again
        del pool
    (seg_n, blk_n), (seg_ns, blk_ns) = counts[False], counts[True]
    assert seg_ns > seg_n and blk_ns < blk_n
    assert (seg_n, blk_n) == (2, 7)  # one small and one large segment, each with a free tail
