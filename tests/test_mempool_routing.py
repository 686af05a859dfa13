"""Routing allocations to memory pools with use_mem_pool: nested contexts (the innermost
wins, the same pool twice is refused), only the calling thread and the pool's device routed, a
block freed back to its own pool whatever context is active, default allocations never taking a
private pool's free blocks, per-stream segments inside a pool, and snapshots reporting pool ids
(PyTorch's TestMemPool, pools_graphs_streams_api.md §5.4, must-haves 4, 6, 7, 14, 15).

Values are written by kernels (helpers.fill, fill_arange) and read back after a synchronize,
so the data a pool hands out is checked too.
"""
import gc
import threading
from collections import defaultdict

import pytest

import mtia_alloc as mtia
import mtia_alloc._C as _C
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import NELEM_1MB, MiB, fill, kSmallBuffer, segment_of, segments
from mtia_alloc.memory import MemPool, PythonAllocator, use_mem_pool


# ----------------------------------------------------------------------------- contexts

def test_nested_mempool(empty_device):
    pool1, pool2, pool3 = MemPool(), MemPool(), MemPool()
    data = []
    nelem = 20 * NELEM_1MB  # 20 MB: every allocation is a segment of its own

    def allocate_data(value):
        x = mtia.empty(nelem)
        fill(x, value)
        data.append((x, value))

    with use_mem_pool(pool1):
        allocate_data(1)
        with use_mem_pool(pool2):
            allocate_data(2)
            with use_mem_pool(pool3):
                allocate_data(3)  # the innermost pool wins
            allocate_data(2)  # the outer pool applies again after the inner exit
        allocate_data(1)
    allocate_data(0)
    counts = {p.id: len(p.snapshot()) for p in (pool1, pool2, pool3)}
    assert counts == {pool1.id: 2, pool2.id: 2, pool3.id: 1}
    pool_of = {1: pool1.id, 2: pool2.id, 3: pool3.id, 0: (0, 0)}
    mtia.synchronize()
    for x, value in data:
        assert segment_of(x.data_ptr())["segment_pool_id"] == pool_of[value]
        assert (x.numpy() == value).all()
    for p in (pool1, pool2, pool3):
        assert p.use_count() == 1
    del data, x, pool1, pool2, pool3


def test_use_mem_pool_reentering_the_same_pool_raises(empty_device):
    pool, other = MemPool(), MemPool()
    with use_mem_pool(pool):
        with pytest.raises(RuntimeError, match="already recording to mempool_id"):
            with use_mem_pool(pool):
                pass  # pragma: no cover
        assert pool.use_count() == 2  # the failed entry gave its reference back
        x = mtia.empty(100)  # the outer context still routes
        with use_mem_pool(other):
            with pytest.raises(RuntimeError, match="already recording to mempool_id"):
                with use_mem_pool(pool):
                    pass  # pragma: no cover
            y = mtia.empty(100)
        # a concurrent entry from another thread is refused as well
        errors = []

        def enter():
            try:
                with use_mem_pool(pool):
                    pass  # pragma: no cover
            except RuntimeError as e:
                errors.append(str(e))

        t = threading.Thread(target=enter)
        t.start()
        t.join()
        assert len(errors) == 1 and "already recording to mempool_id" in errors[0]
    assert pool.use_count() == 1 and other.use_count() == 1
    assert segment_of(x.data_ptr())["segment_pool_id"] == pool.id
    assert segment_of(y.data_ptr())["segment_pool_id"] == other.id
    with use_mem_pool(pool):  # usable again after the context ended
        z = mtia.empty(100)
    assert segment_of(z.data_ptr())["segment_pool_id"] == pool.id
    del x, y, z, pool, other


def test_nested_use_of_one_pool_leaves_the_outer_context_working():
    pool = MemPool()
    with use_mem_pool(pool):
        with pytest.raises(RuntimeError, match="already recording"):
            with use_mem_pool(pool):
                pass  # pragma: no cover
        a = mtia.empty(100)  # still routed to the pool
        assert pool.use_count() == 2
    assert pool.use_count() == 1
    assert [s["segment_pool_id"] for s in mtia.memory_snapshot(pool.id)] == [pool.id]
    del a, pool
    gc.collect()
    mtia.empty_cache()
    mtia.memory.check_invariants()


def test_use_mem_pool_rejects_other_objects():
    with pytest.raises(TypeError):
        with use_mem_pool((0, 1)):
            pass  # pragma: no cover
    with pytest.raises(TypeError):
        MemPool(allocator=object())
    with pytest.raises(TypeError):
        PythonAllocator(1, 2)


# ----------------------------------------------------------------------------- threads and devices

def test_mempool_ctx_multithread(empty_device):
    nelem = MiB
    trigger_alloc = threading.Event()
    done_allocation = threading.Event()
    snapshots, errors = [], []

    def main_thread_fn():
        try:
            pool = MemPool()
            out1 = mtia.empty(nelem, dtype="int8")
            with use_mem_pool(pool):
                out = mtia.empty(nelem, dtype="int8")
                del out
                trigger_alloc.set()
                done_allocation.wait(10)
            del out1, pool
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def side_thread_fn():
        try:
            trigger_alloc.wait(10)
            out = mtia.empty(nelem, dtype="int8")  # not routed: another thread's context
            snapshots.append(segments(device=0))
            del out
        except BaseException as e:  # pragma: no cover
            errors.append(e)
        finally:
            done_allocation.set()

    threads = [threading.Thread(target=main_thread_fn), threading.Thread(target=side_thread_fn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    trigger_alloc.set()
    done_allocation.set()
    assert not any(t.is_alive() for t in threads), "threads did not finish"
    assert not errors, errors
    assert len(snapshots) == 1
    assert len(snapshots[0]) == 2, "expected 2 segments: the default pool's and the custom pool's"
    active = defaultdict(int)
    for s in snapshots[0]:
        active[s["segment_pool_id"]] += s["active_size"]
    for k, v in active.items():
        if k == (0, 0):
            assert v == kSmallBuffer, "expected 2 MiB active in the default pool"
        else:
            assert v == 0, "expected nothing active in the custom pool"


def test_only_the_calling_threads_allocations_are_routed():
    """Spec must-have 4 (pools_graphs_streams_api.md §6.4)."""
    pool = MemPool()
    inside, outside = threading.Event(), threading.Event()
    ptrs = {}

    def routed():
        with use_mem_pool(pool):
            ptrs["routed"] = mtia.empty(64)
            inside.set()
            outside.wait(10)

    t = threading.Thread(target=routed)
    t.start()
    inside.wait(10)
    ptrs["main"] = mtia.empty(64)  # the main thread is not inside the context
    outside.set()
    t.join()
    assert segment_of(ptrs["routed"].data_ptr())["segment_pool_id"] == pool.id
    assert segment_of(ptrs["main"].data_ptr())["segment_pool_id"] == (0, 0)
    del ptrs, pool


def test_use_mem_pool_routes_only_its_device():
    """Spec must-have 4 (pools_graphs_streams_api.md §6.4)."""
    if mtia.device_count() < 2:
        pytest.skip("needs two devices")
    with mtia.device(1):
        pool = MemPool()  # belongs to device 1
    with use_mem_pool(pool, device=1):
        on1 = mtia.empty(64, device=1)
        on0 = mtia.empty(64, device=0)
    assert on1.device.index == 1 and on0.device.index == 0
    assert segment_of(on1.data_ptr())["segment_pool_id"] == pool.id
    assert segment_of(on0.data_ptr())["segment_pool_id"] == (0, 0)
    assert _C.pool_use_count(1, pool.id) == 1
    del on1, on0, pool


# ----------------------------------------------------------------------------- blocks and segments

def test_block_returns_to_its_own_pool(empty_device):
    """Spec must-have 6 (pools_graphs_streams_api.md §6.6)."""
    p, q = MemPool(), MemPool()
    with use_mem_pool(p):
        x = mtia.empty(NELEM_1MB)
    y = mtia.empty(NELEM_1MB)
    x_ptr, y_ptr = x.data_ptr(), y.data_ptr()
    with use_mem_pool(q):
        del x  # freed while q is active: goes back to p
        del y  # a default-pool block goes back to the default pool
        z = mtia.empty(NELEM_1MB)  # q gets a new segment: p's free block is not q's
    assert segment_of(x_ptr)["segment_pool_id"] == p.id and segment_of(x_ptr)["active_size"] == 0
    assert segment_of(y_ptr)["segment_pool_id"] == (0, 0) and segment_of(y_ptr)["active_size"] == 0
    assert segment_of(z.data_ptr())["segment_pool_id"] == q.id
    with use_mem_pool(p):
        again = mtia.empty(NELEM_1MB)
    assert again.data_ptr() == x_ptr
    del z, again, p, q


def test_default_allocations_never_use_private_free_blocks(empty_device):
    """Spec must-have 7 (pools_graphs_streams_api.md §6.7)."""
    pool = MemPool()
    with use_mem_pool(pool):
        x = mtia.empty(NELEM_1MB)
    x_ptr = x.data_ptr()
    del x
    before = mtia.memory_stats()["segment.all.current"]
    y = mtia.empty(NELEM_1MB)
    assert y.data_ptr() != x_ptr
    assert segment_of(y.data_ptr())["segment_pool_id"] == (0, 0)
    assert mtia.memory_stats()["segment.all.current"] == before + 1
    del y, pool


def test_segments_are_per_stream_inside_a_pool(empty_device):
    """Spec must-have 15 (pools_graphs_streams_api.md §6.15)."""
    pool = MemPool()
    s1, s2 = mtia.Stream(), mtia.Stream()
    with use_mem_pool(pool):
        x = mtia.empty(1000, stream=s1)
        x_ptr = x.data_ptr()
        del x
        y = mtia.empty(1000, stream=s2)  # s1's cached block is not reused on s2
        z = mtia.empty(1000, stream=s1)
    segs = pool.snapshot()
    assert sorted(s["stream"] for s in segs) == sorted([s1.stream_id, s2.stream_id])
    assert y.data_ptr() != x_ptr and z.data_ptr() == x_ptr
    del y, z, pool


def test_snapshot_reports_segment_pool_ids(empty_device):
    """Spec must-have 14 (pools_graphs_streams_api.md §6.14)."""
    p1, p2 = MemPool(), MemPool()
    with use_mem_pool(p1):
        a = mtia.empty(10)
    with use_mem_pool(p2):
        b = mtia.empty(10)
        c = mtia.empty(5 * NELEM_1MB)
    e = mtia.empty(10)
    assert [s["segment_pool_id"] for s in p1.snapshot()] == [p1.id]
    assert sorted(s["segment_type"] for s in p2.snapshot()) == ["large", "small"]
    assert all(s["segment_pool_id"] == p2.id for s in p2.snapshot())
    assert mtia.memory_snapshot(p2) == p2.snapshot()  # a MemPool is accepted as the id too
    default = mtia.memory_snapshot((0, 0))  # (0, 0) means every pool
    assert {s["segment_pool_id"] for s in default if s["device"] == 0} == {(0, 0), p1.id, p2.id}
    del a, b, c, e, p1, p2
