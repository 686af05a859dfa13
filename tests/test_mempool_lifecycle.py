"""MemPool lifecycle: pool ids (two counters, unique across threads), use counts (objects,
use_mem_pool contexts, captures), bare graph_pool_handle()s, when a pool's memory goes back
(only once the pool is freeable and a segment wholly free; empty_cache() during routing or a
capture), a freeable pool never revived, and pools refusing copies (PyTorch's TestMemPool,
pools_graphs_streams_api.md §5.4, must-haves 1, 3, 10, 13).

Values are written by kernels (helpers.fill, fill_arange) and read back after a synchronize,
so the data a pool hands out is checked too.
"""
import textwrap
import threading

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc._C as _C
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import (NELEM_1MB, HostAllocator, fill, fill_arange, host, kSmallBuffer, run_code, segment_of,
                     segments, use_count)
from mtia_alloc.memory import MemPool, use_mem_pool


# ----------------------------------------------------------------------------- ids and use counts

def test_mempool_id():
    h1 = mtia.graph_pool_handle()
    pool = MemPool()
    h2 = mtia.graph_pool_handle()
    for pid in (h1, pool.id, h2):
        assert isinstance(pid, tuple) and len(pid) == 2 and all(type(x) is int for x in pid)
    # user-created ids are (0, n) from one counter shared by MemPool() and graph_pool_handle()
    assert h1[0] == pool.id[0] == h2[0] == 0
    assert 0 < h1[1] < pool.id[1] < h2[1]
    assert pool.id[1] == h1[1] + 1 and h2[1] == pool.id[1] + 1
    # graph-minted ids are (m, 0) from a second counter; they do not advance the first one
    s = mtia.Stream()
    graphs = []
    for _ in range(2):
        g = mtia.MTIAGraph()
        with mtia.stream(s):
            g.capture_begin()
            t = mtia.empty(16)
            fill(t, 1.0)
            g.capture_end()
        del t
        graphs.append(g)
    (m1, z1), (m2, z2) = graphs[0].pool(), graphs[1].pool()
    assert z1 == z2 == 0 and 0 < m1 < m2
    assert mtia.graph_pool_handle() == (0, h2[1] + 1)
    assert pool.use_count() == 1
    del graphs, g, pool


def test_both_pool_id_counters_start_at_1_in_a_fresh_process():
    """Spec must-have 1 (pools_graphs_streams_api.md §6.1)."""
    # §1.1, §6.1: user ids (0, n) and graph ids (m, 0) come from two counters that start at 1
    script = textwrap.dedent("""
        import mtia_alloc as mtia
        h = mtia.graph_pool_handle()
        p = mtia.MemPool()
        graphs = [mtia.MTIAGraph(), mtia.MTIAGraph()]
        with mtia.stream(mtia.Stream()):
            for g in graphs:
                g.capture_begin()
                mtia.emulator.launch(lambda: None)
                g.capture_end()
        ids = [h, p.id, mtia.graph_pool_handle(), graphs[0].pool(), graphs[1].pool()]
        assert ids == [(0, 1), (0, 2), (0, 3), (1, 0), (2, 0)], ids
        print("ok")
    """)
    r = run_code(script, "-W", "error", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_mempool_multithread():
    per_thread = 25
    results = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def create_mempools(out):
        barrier.wait()
        for i in range(per_thread):
            if i % 2:
                out.append(mtia.graph_pool_handle())
            else:
                pool = MemPool()
                out.append(pool.id)
                del pool

    threads = [threading.Thread(target=create_mempools, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [pid for r in results for pid in r]
    assert len(ids) == 4 * per_thread
    assert len(set(ids)) == len(ids), "pool ids collided across threads"
    assert all(pid[0] == 0 for pid in ids)
    for r in results:
        assert [pid[1] for pid in r] == sorted(pid[1] for pid in r)  # increasing within a thread


def test_use_count_tracks_objects_contexts_and_captures():
    """Spec must-have 3 (pools_graphs_streams_api.md §6.3)."""
    pool = MemPool()
    assert pool.use_count() == 1
    with use_mem_pool(pool):
        assert pool.use_count() == 2
    assert pool.use_count() == 1
    s = mtia.Stream()
    g1, g2 = mtia.MTIAGraph(), mtia.MTIAGraph()
    with mtia.stream(s):
        g1.capture_begin(pool)  # a MemPool is accepted as the pool argument
        assert pool.use_count() == 2
        x = mtia.empty(64)
        fill(x, 1.0)
        g1.capture_end()
        assert pool.use_count() == 2  # held until reset
        g2.capture_begin(pool.id)
        fill(x, 2.0)
        g2.capture_end()
    assert pool.use_count() == 3 and g1.pool() == g2.pool() == pool.id
    assert segment_of(x.data_ptr())["segment_pool_id"] == pool.id
    g1.replay()
    assert (host(x) == 1.0).all()
    g2.replay()
    assert (host(x) == 2.0).all()
    g1.reset()
    assert pool.use_count() == 2
    del g2  # destroyed with its Python object
    assert pool.use_count() == 1
    del x, pool, g1


def test_graph_pool_handle_creates_no_pool(empty_device):
    h = mtia.graph_pool_handle()
    assert h[0] == 0 and h[1] > 0
    assert use_count(h) == 0  # no private pool exists for a bare handle
    assert segments(h) == []
    mtia.memory.check_invariants()
    s = mtia.Stream()
    g = mtia.MTIAGraph()
    with mtia.stream(s):
        g.capture_begin(h)  # the first use creates the pool
        assert use_count(h) == 1
        x = mtia.empty(100)
        fill(x, 2.0)
        g.capture_end()
    assert use_count(h) == 1 and g.pool() == h
    assert segment_of(x.data_ptr())["segment_pool_id"] == h
    g.replay()
    assert (host(x) == 2.0).all()
    g.reset()
    assert use_count(h) == 0
    del x
    mtia.empty_cache()
    assert segments(h) == []
    del g


def test_a_pool_cannot_be_copied_or_pickled():
    # A copy's death would release the original's reference (as a pybind MemPool, it raises).
    import copy
    import pickle
    pool = mtia.MemPool()
    for f in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot pickle or copy 'MemPool'"):
            f(pool)
    assert pool.use_count() == 1
    with mtia.use_mem_pool(pool):
        x = mtia.empty(1024)
    del x


# ----------------------------------------------------------------------------- giving memory back

def test_mempool_empty_cache(empty_device):
    d = empty_device
    pool = MemPool()
    x = mtia.empty((1024, 1024))
    with use_mem_pool(pool):
        y = mtia.empty((1024, 1024))
    pid = pool.id
    x_ptr = x.data_ptr()
    assert segment_of(x_ptr)["segment_pool_id"] == (0, 0)
    assert segment_of(y.data_ptr())["segment_pool_id"] == pid
    del y
    del x
    del pool  # empties only that pool
    segs = segments(device=d)
    assert len(segs) > 0, "deleting a pool must not empty the default pool"
    assert all(s["segment_pool_id"] == (0, 0) for s in segs)
    assert segment_of(x_ptr)["active_size"] == 0
    assert segments(pid) == []


def test_mempool_empty_cache_inactive(empty_device):
    host_alloc = HostAllocator()

    def f():
        pool = MemPool(host_alloc.python_allocator())
        with use_mem_pool(pool):
            x = mtia.empty(1024 * 1024 * 2, dtype="int64")
            fill_arange(x)
        # the pool dies when f returns, x (allocated from it) stays alive
        return x, pool.id

    x, pid = f()
    assert host_alloc.alloc_calls == 1 and host_alloc.free_calls == 0
    assert len(segments(pid)) == 1  # the pool's segment survives the MemPool object
    assert use_count(pid) == 0
    np.testing.assert_array_equal(host(x), np.arange(1024 * 1024 * 2))
    mtia.empty_cache()  # x is live: its segment stays
    assert host_alloc.free_calls == 0

    del x
    assert host_alloc.free_calls == 0  # freeing the block only returns it to the pool
    assert len(segments(pid)) == 1 and segments(pid)[0]["active_size"] == 0
    mtia.empty_cache()
    assert host_alloc.free_calls == 1 and not host_alloc.buffers
    assert segments(pid) == []


def test_mempool_emptycache_multithread(empty_device):
    num_threads = 4
    pools = [MemPool() for _ in range(num_threads)]
    errors = []
    barrier = threading.Barrier(num_threads)

    def my_function(pool):
        try:
            with use_mem_pool(pool):
                x = mtia.empty(4)
                barrier.wait()
                del x
                mtia.empty_cache()  # must not release the live pool's segment
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=my_function, args=(p,)) for p in pools]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for p in pools:
        s = p.snapshot()
        assert len(s) == 1, "expected each pool to keep its single segment"
        assert s[0]["active_size"] == 0
    del pools


def test_pool_memory_returns_only_when_freeable_and_fully_free(empty_device):
    """Spec must-have 10 (pools_graphs_streams_api.md §6.10)."""
    pool = MemPool()
    with use_mem_pool(pool):
        keep = mtia.empty(NELEM_1MB)
        tmp = mtia.empty(20 * NELEM_1MB)
    del tmp
    pid = pool.id
    mtia.empty_cache()  # the pool is live: nothing of it is released
    assert len(segments(pid)) == 2
    del pool  # freeable now: its fully free segment goes, the one holding `keep` stays
    assert len(segments(pid)) == 1 and segments(pid)[0]["active_size"] == kSmallBuffer // 2
    fill(keep, 4.0)
    assert (host(keep) == 4.0).all()
    del keep
    assert len(segments(pid)) == 1  # freeing only caches the block
    mtia.empty_cache()
    assert segments(pid) == []
    assert use_count(pid) == 0


def test_pool_object_disappears_once_its_last_segment_is_freed(empty_device):
    """Spec must-have 10 (pools_graphs_streams_api.md §6.10)."""
    # §2.3, §6.10: a freeable pool cannot be revived, and is erased with its last segment
    pool = MemPool()
    pid = pool.id
    with use_mem_pool(pool):
        x = mtia.empty(NELEM_1MB)
    del pool  # freeable; x keeps its segment, so the pool object stays
    with pytest.raises(RuntimeError, match="was released and cannot be used again"):
        _C.create_or_incref_pool(0, pid, None)
    del x
    with pytest.raises(RuntimeError, match="was released"):  # a cached segment still holds it
        _C.create_or_incref_pool(0, pid, None)
    mtia.empty_cache()
    assert segments(pid) == []
    _C.create_or_incref_pool(0, pid, None)  # no pool left under this id: a new one
    assert use_count(pid) == 1
    _C.release_pool(0, pid)


def test_empty_cache_during_routing_keeps_default_blocks_but_frees_dead_pools(empty_device):
    """Spec must-have 13 (pools_graphs_streams_api.md §6.13)."""
    dead = MemPool()
    with use_mem_pool(dead):
        x = mtia.empty(NELEM_1MB)
    dead_id = dead.id
    del dead  # x keeps its segment
    del x  # now fully free, in a freeable pool
    d = mtia.empty(NELEM_1MB)
    d_ptr = d.data_ptr()
    del d  # a cached default-pool segment
    live = MemPool()
    with use_mem_pool(live):
        before = mtia.memory_stats()["num_sync_all_streams"]
        mtia.empty_cache()
        assert mtia.memory_stats()["num_sync_all_streams"] == before  # no event sync while routing
        assert segments(dead_id) == []  # freeable private pools are still released
        assert segment_of(d_ptr)["segment_pool_id"] == (0, 0)  # the default pool is untouched
    mtia.empty_cache()
    assert not segments(device=0)
    del live


def test_empty_cache_during_a_capture_releases_nothing_and_syncs_nothing(empty_device):
    """Spec must-have 13 (pools_graphs_streams_api.md §6.13)."""
    # §2.3, §6.13: empty_cache() during a capture frees no default block and syncs nothing (dead pools go)
    dead = MemPool()
    with use_mem_pool(dead):
        x = mtia.empty(NELEM_1MB)
    dead_id = dead.id
    del dead, x  # a fully free segment in a freeable pool
    d = mtia.empty(5 * NELEM_1MB)
    d_ptr = d.data_ptr()
    del d  # a cached default-pool segment
    side, other = mtia.Stream(), mtia.Stream()
    pend = mtia.empty(3 * NELEM_1MB, stream=other)
    pend_ptr = pend.data_ptr()
    mtia.emulator.sleep(50, stream=side)
    pend.record_stream(side)
    del pend  # pending on side's event
    side.synchronize()  # the event is complete; only a sync or process_events would notice
    g = mtia.MTIAGraph()
    with mtia.stream(mtia.Stream()):
        g.capture_begin()
        mtia.emulator.launch(lambda: None)
        before = mtia.memory_stats()
        mtia.empty_cache()
        after = mtia.memory_stats()
        g.capture_end()
    assert after["reserved_bytes.all.current"] - before["reserved_bytes.all.current"] == -kSmallBuffer
    assert after["num_sync_all_streams"] == before["num_sync_all_streams"]
    assert after["active.all.current"] == before["active.all.current"]
    assert segments(dead_id) == []
    assert segment_of(d_ptr)["segment_pool_id"] == (0, 0)
    pending = [b for b in segment_of(pend_ptr)["blocks"] if b["address"] == pend_ptr]
    assert [b["state"] for b in pending] == ["active_pending_free"]
    del g
    mtia.empty_cache()  # no capture now: the default pool's segments go
    assert not segments(device=0)
