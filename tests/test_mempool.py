"""Memory pools: MemPool, use_mem_pool, graph_pool_handle, use_on_oom, no_split and raw
allocators (PythonAllocator, PluggableAllocator, change_current_allocator).

PyTorch's TestMemPool tests (spec/pools_graphs_streams_api.md §5.4) re-expressed on the
emulated device, followed by one test per must-have of §6 items 1-14 not already covered.
Instead of torch tensors the tests use `mtia.empty` DeviceArrays; values are written by
`emulator.launch` kernels that compute on numpy views of the device memory, and read back
through `DeviceArray.numpy()` after a synchronize, so the data a pool hands out is checked too.

PyTorch's dummy C allocator (which sets called_dummy_alloc = 123 / called_dummy_free = 321)
becomes `HostAllocator`, a PythonAllocator handing out 512-byte-aligned numpy host buffers
(the emulated device memory is host memory) and counting its calls. PluggableAllocator is
tested with a tiny C library compiled at test time (skipped without a C compiler).

Every test frees what it creates; conftest.py restores fractions and empties the cache.
"""
import ctypes
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import weakref
from collections import defaultdict

import numpy as np
import pytest

import mtia_alloc as mtia
from conftest import view
import mtia_alloc._C as _C
import mtia_alloc.emulator
import mtia_alloc.memory
from mtia_alloc.memory import MemPool, PluggableAllocator, PythonAllocator, use_mem_pool

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
kSmallBuffer = 2 * MiB
kLargeBuffer = 20 * MiB
NELEM_1MB = MiB // 4  # float32 elements in 1 MiB


# ----------------------------------------------------------------------------- helpers



def k_fill(t, value, stream=None):
    """Kernel: every element of t = value."""
    ptr, n, dt = t.data_ptr(), t.size, t.dtype
    mtia.emulator.launch(lambda: view(ptr, n, dt).fill(value), stream=stream)


def k_arange(t, start=0, stream=None):
    """Kernel: t = start, start + 1, ..."""
    ptr, n, dt = t.data_ptr(), t.size, t.dtype
    mtia.emulator.launch(lambda: np.copyto(view(ptr, n, dt), np.arange(start, start + n, dtype=dt)),
                         stream=stream)


def k_add(a, b, stream=None):
    """Allocates out on the current stream and queues out = a + b."""
    out = mtia.empty(a.shape, a.dtype)
    pa, pb, po, n, dt = a.data_ptr(), b.data_ptr(), out.data_ptr(), a.size, a.dtype
    mtia.emulator.launch(lambda: np.add(view(pa, n, dt), view(pb, n, dt), out=view(po, n, dt)), stream=stream)
    return out


def host(t):
    """t's contents after all queued work on the current device is done."""
    mtia.synchronize()
    return t.numpy().copy()


class HostAllocator:
    """alloc_fn/free_fn of a PythonAllocator: 512-aligned numpy host buffers, calls counted."""

    def __init__(self):
        self.buffers = {}  # ptr -> (numpy buffer, size)
        self.alloc_calls = 0
        self.free_calls = 0
        self.lock = threading.Lock()

    def alloc(self, size, device, stream):
        buf = np.empty(size + 512, dtype=np.uint8)
        ptr = (buf.ctypes.data + 511) & ~511
        with self.lock:
            self.buffers[ptr] = (buf, size)
            self.alloc_calls += 1
        return ptr

    def free(self, ptr, size, device, stream):
        with self.lock:
            _, expected = self.buffers.pop(ptr)
            self.free_calls += 1
        assert size == expected, (size, expected)

    def owns(self, ptr):
        return any(p <= ptr < p + size for p, (_, size) in self.buffers.items())

    def python_allocator(self):
        return PythonAllocator(self.alloc, self.free)


def segments(pool_id=None, device=None):
    """Segments of one pool (all pools if None) on `device` (all devices if None)."""
    segs = mtia.memory_snapshot(pool_id) if pool_id is not None else mtia.memory_snapshot()
    return [s for s in segs if device is None or s["device"] == device]


def segment_of(ptr):
    for s in mtia.memory_snapshot():
        if s["address"] <= ptr < s["address"] + s["total_size"]:
            return s
    raise AssertionError(f"no segment holds {ptr:#x}")


def use_count(pool_id, device=0):
    return _C.pool_use_count(device, pool_id)


@pytest.fixture
def empty_device():
    """Device 0 holds no segment at the start (needed by tests that count segments)."""
    gc.collect()
    mtia.synchronize()
    mtia.empty_cache()
    left = segments(device=0)
    assert not left, f"device 0 still holds segments from an earlier test: {left}"
    yield 0
    mtia.synchronize()
    mtia.memory.check_invariants()


def limit_device_memory(allowed, device=0):
    """A memory fraction under which exactly `allowed` more bytes of segments fit (all pools)."""
    total = mtia.get_device_properties(device)["total_memory"]
    reserved = mtia.memory_reserved(device)
    # A bit of slack against float rounding; every segment is >= 2 MiB, so it is never usable.
    mtia.set_per_process_memory_fraction((reserved + allowed + 512 * KiB) / total, device)


# ----------------------------------------------------------------------------- TestMemPool

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
            k_fill(t, 1.0)
            g.capture_end()
        del t
        graphs.append(g)
    (m1, z1), (m2, z2) = graphs[0].pool(), graphs[1].pool()
    assert z1 == z2 == 0 and 0 < m1 < m2
    assert mtia.graph_pool_handle() == (0, h2[1] + 1)
    assert pool.use_count() == 1
    del graphs, g, pool


def test_mh01_both_id_counters_start_at_1_in_a_fresh_process():
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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True,
                       cwd=root, env=dict(os.environ, PYTHONPATH=root), timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_mempool_with_allocator(empty_device):
    d = empty_device
    assert MemPool().allocator is None  # no allocator by default
    host_alloc = HostAllocator()
    allocator = host_alloc.python_allocator()
    pool = MemPool(allocator)
    assert pool.allocator is allocator
    assert pool.use_count() == 1  # the MemPool object's reference
    assert (host_alloc.alloc_calls, host_alloc.free_calls) == (0, 0)

    with use_mem_pool(pool):
        out_0 = mtia.empty(NELEM_1MB)
        k_arange(out_0)
        assert pool.use_count() == 2  # + the use_mem_pool context
    assert pool.use_count() == 1
    assert host_alloc.alloc_calls == 1  # the pool's segment came from the custom allocator
    assert host_alloc.owns(out_0.data_ptr())
    np.testing.assert_array_equal(host(out_0), np.arange(NELEM_1MB, dtype=np.float32))

    out_non_pool = mtia.empty(NELEM_1MB)  # the default pool: not from the custom allocator
    assert host_alloc.alloc_calls == 1 and not host_alloc.owns(out_non_pool.data_ptr())
    with use_mem_pool(pool):
        # 1 MiB was packed into a 2 MiB small segment
        assert len(pool.snapshot()) == 1
        out_1 = mtia.empty(NELEM_1MB)
        assert len(pool.snapshot()) == 1  # a second 1 MiB fits in the same segment
        out_2 = mtia.empty(NELEM_1MB)
        assert len(pool.snapshot()) == 2  # a third needs a new 2 MiB segment
    assert len(pool.snapshot()) == 2
    assert host_alloc.alloc_calls == 2
    assert all(s["segment_pool_id"] == pool.id and s["total_size"] == kSmallBuffer for s in pool.snapshot())
    k_fill(out_1, 7.0)
    k_fill(out_2, 8.0)
    assert (host(out_1) == 7).all() and (host(out_2) == 8).all()
    assert (host(out_0) == np.arange(NELEM_1MB)).all()  # out_1 did not overwrite out_0
    assert host_alloc.free_calls == 0

    del out_0, out_1, out_2
    del pool  # the destructor empties the (now freeable) pool through the custom free
    assert host_alloc.free_calls == 2 and not host_alloc.buffers
    assert len(segments(device=d)) == 1  # only out_non_pool's default segment is left
    del out_non_pool


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
            k_arange(x)
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


def test_tensor_delete_after_allocator_delete(empty_device):
    host_alloc = HostAllocator()
    freed = []

    def counting(free_fn):
        return lambda *args: (freed.append(args[0]), free_fn(*args))

    allocator = PythonAllocator(host_alloc.alloc, counting(host_alloc.free))
    alive = weakref.ref(host_alloc)
    pool = MemPool(allocator)
    with use_mem_pool(pool):
        x = mtia.empty((1024, 1024))
        k_fill(x, 3.0)
    pid = pool.id
    del pool
    del allocator, host_alloc  # the Python objects go; the pool keeps the raw allocator
    gc.collect()
    assert alive() is not None, "the pool must keep its allocator alive while it holds segments"
    assert freed == []
    assert (host(x) == 3.0).all()  # the memory is still valid

    del x
    assert freed == []
    mtia.empty_cache()
    assert len(freed) == 1
    assert segments(pid) == []
    gc.collect()
    assert alive() is None, "the raw allocator should be released with the pool's last segment"


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
    k_fill(c, 5.0)
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


def test_mh08_use_on_oom_fallback_only_takes_a_block_of_the_same_stream(empty_device):
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
    k_fill(kept[pid], 1.5)
    assert (host(kept[pid]) == 1.5).all()
    del kept[pid]
    # the dead pool's segment is fully free now: the OOM retry releases it and succeeds
    z = mtia.empty(15 * NELEM_1MB)
    assert segment_of(z.data_ptr())["segment_pool_id"] == (0, 0)
    assert segments(pid) == []
    assert len(segments(control_id)) == 1
    del z, kept


def test_mempool_no_split(empty_device):
    requests = [512 * KiB, 256 * KiB, 100 * KiB, 3 * MiB, 5 * MiB]
    counts = {}
    for no_split in (False, True):
        pool = MemPool(no_split=no_split)
        with use_mem_pool(pool):
            live = [mtia.empty(n, dtype="uint8") for n in requests]
        for i, t in enumerate(live):
            k_fill(t, i + 1)
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


def test_nested_mempool(empty_device):
    pool1, pool2, pool3 = MemPool(), MemPool(), MemPool()
    data = []
    nelem = 20 * NELEM_1MB  # 20 MB: every allocation is a segment of its own

    def allocate_data(value):
        x = mtia.empty(nelem)
        k_fill(x, value)
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


def test_use_mem_pool_rejects_other_objects():
    with pytest.raises(TypeError):
        with use_mem_pool((0, 1)):
            pass  # pragma: no cover
    with pytest.raises(TypeError):
        MemPool(allocator=object())
    with pytest.raises(TypeError):
        PythonAllocator(1, 2)


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
        k_fill(x, 2.0)
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


# ----------------------------------------------------------------------------- must-haves

def test_mh03_use_count_tracks_objects_contexts_and_captures():
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
        k_fill(x, 1.0)
        g1.capture_end()
        assert pool.use_count() == 2  # held until reset
        g2.capture_begin(pool.id)
        k_fill(x, 2.0)
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


def test_mh04_only_the_calling_threads_allocations_are_routed():
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


def test_mh04_use_mem_pool_routes_only_its_device():
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


def test_mh06_block_returns_to_its_own_pool(empty_device):
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


def test_mh07_default_allocations_never_use_private_free_blocks(empty_device):
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


def test_mh10_pool_memory_returns_only_when_freeable_and_fully_free(empty_device):
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
    k_fill(keep, 4.0)
    assert (host(keep) == 4.0).all()
    del keep
    assert len(segments(pid)) == 1  # freeing only caches the block
    mtia.empty_cache()
    assert segments(pid) == []
    assert use_count(pid) == 0


def test_mh10_pool_object_disappears_once_its_last_segment_is_freed(empty_device):
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


def test_mh13_empty_cache_during_routing_keeps_default_blocks_but_frees_dead_pools(empty_device):
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


def test_mh13_empty_cache_during_a_capture_releases_nothing_and_syncs_nothing(empty_device):
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


def test_mh14_snapshot_reports_segment_pool_ids(empty_device):
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


def test_mh15_segments_are_per_stream_inside_a_pool(empty_device):
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


# ----------------------------------------------------------------------------- raw allocators

def test_raw_allocator_failure_is_out_of_memory_with_state_intact(empty_device):
    calls = []

    def failing(size, device, stream):
        calls.append(size)
        raise MemoryError("no memory in this allocator")

    raising = MemPool(PythonAllocator(failing, lambda *a: None))
    zero = MemPool(PythonAllocator(lambda size, device, stream: 0, lambda *a: None))
    before = mtia.memory_stats()
    for pool in (raising, zero):
        with use_mem_pool(pool), pytest.raises(mtia.OutOfMemoryError, match="Tried to allocate"):
            mtia.empty(1000)
        assert pool.snapshot() == []
    after = mtia.memory_stats()
    assert calls == [kSmallBuffer]
    assert after["num_ooms"] == before["num_ooms"] + 2
    for key in ("segment.all.current", "reserved_bytes.all.current", "allocated_bytes.all.current"):
        assert after[key] == before[key]
    mtia.memory.check_invariants()
    # both pools stay usable for cached blocks and die cleanly
    del raising, zero


C_ALLOCATOR = r"""
#include <stdlib.h>
#include <sys/types.h>
int alloc_calls = 0, free_calls = 0;
long long live_bytes = 0;
void* my_alloc(ssize_t size, int device, void* stream) {
  void* p = NULL;
  if (posix_memalign(&p, 512, (size_t)size)) return NULL;
  alloc_calls++;
  live_bytes += size;
  return p;
}
void my_free(void* ptr, ssize_t size, int device, void* stream) {
  free_calls++;
  live_bytes -= size;
  free(ptr);
}
"""


@pytest.fixture(scope="module")
def c_allocator_lib(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("pluggable")
    src, so = d / "alloc.c", d / "liballoc.so"
    src.write_text(C_ALLOCATOR)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(so), str(src)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot compile the test allocator: {r.stderr}")
    return so


def test_pluggable_allocator(empty_device, c_allocator_lib):
    lib = ctypes.CDLL(str(c_allocator_lib))
    counter = lambda name: ctypes.c_int.in_dll(lib, name).value  # noqa: E731
    start_alloc, start_free = counter("alloc_calls"), counter("free_calls")
    allocator = PluggableAllocator(c_allocator_lib, "my_alloc", "my_free")
    pool = MemPool(allocator)
    assert pool.allocator is allocator
    with use_mem_pool(pool):
        x = mtia.empty(NELEM_1MB)
        y = mtia.empty(6 * NELEM_1MB)
    k_arange(x)
    k_fill(y, 9.0)
    assert (host(x) == np.arange(NELEM_1MB)).all() and (host(y) == 9.0).all()
    assert counter("alloc_calls") - start_alloc == 2
    assert ctypes.c_longlong.in_dll(lib, "live_bytes").value == kSmallBuffer + kLargeBuffer
    del x, y
    assert counter("free_calls") == start_free
    del pool, allocator
    assert counter("free_calls") - start_free == 2
    assert ctypes.c_longlong.in_dll(lib, "live_bytes").value == 0


def test_pluggable_allocator_errors(tmp_path, c_allocator_lib):
    with pytest.raises(RuntimeError, match="cannot load"):
        PluggableAllocator(tmp_path / "missing.so", "my_alloc", "my_free")
    with pytest.raises(RuntimeError, match="lacks a symbol"):
        PluggableAllocator(c_allocator_lib, "my_alloc", "no_such_free")


def test_change_current_allocator_only_before_init():
    mtia.init()
    with pytest.raises(RuntimeError, match="before mtia_alloc is initialized"):
        mtia.memory.change_current_allocator(HostAllocator().python_allocator())
    with pytest.raises(TypeError):
        mtia.memory.change_current_allocator(object())


def test_change_current_allocator_puts_it_under_the_default_pools():
    """In a fresh interpreter (the allocator must be set before initialisation)."""
    script = textwrap.dedent("""
        import numpy as np
        import mtia_alloc as mtia, mtia_alloc.memory as mm
        bufs, calls = {}, []
        def alloc(size, device, stream):
            b = np.empty(size + 512, np.uint8)
            p = (b.ctypes.data + 511) & ~511
            bufs[p] = b
            calls.append(("alloc", size, device))
            return p
        def free(ptr, size, device, stream):
            del bufs[ptr]
            calls.append(("free", size, device))
        mm.change_current_allocator(mm.PythonAllocator(alloc, free))
        x = mtia.empty(1000)
        x.numpy()[:] = 3
        assert any(p <= x.data_ptr() < p + 2 ** 21 for p in bufs), "not from the custom allocator"
        pool = mm.MemPool()  # a pool without its own allocator uses the device's: the custom one
        with mm.use_mem_pool(pool):
            y = mtia.empty(1000)
        del x, y, pool
        mtia.empty_cache()
        assert not bufs, bufs
        print(calls)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(mtia.__file__)))]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    calls = eval(r.stdout.strip().splitlines()[-1])
    assert calls == [("alloc", kSmallBuffer, 0), ("alloc", kSmallBuffer, 0),
                     ("free", kSmallBuffer, 0), ("free", kSmallBuffer, 0)]


def test_python_allocator_that_frees_device_memory_does_not_deadlock():
    """Regression: a PythonAllocator's alloc_fn runs while the device allocator's lock is
    held. If it makes a DeviceArray of that device die (here by gc.collect(), which any
    allocation in alloc_fn may also trigger implicitly), the free re-enters the allocator on
    the same thread; with a non-recursive device lock that deadlocked. Run in a child process
    with a timeout so that a regression cannot hang the suite."""
    script = textwrap.dedent("""
        import gc
        import numpy as np
        import mtia_alloc as mtia, mtia_alloc.memory as mm
        bufs = {}
        def alloc(size, device, stream):
            gc.collect()
            b = np.empty(size, np.uint8)
            bufs[b.ctypes.data] = b
            return b.ctypes.data
        def free(ptr, size, device, stream):
            del bufs[ptr]
        pool = mm.MemPool(mm.PythonAllocator(alloc, free))
        gc.disable()
        class Cycle: pass
        c = Cycle(); c.me = c; c.arr = mtia.empty(100)  # a DeviceArray only a cycle keeps alive
        del c
        with mm.use_mem_pool(pool):
            x = mtia.empty(1000)
        print("done")
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(mtia.__file__)))
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=4, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: DeviceAllocator::alloc_block calls the Python raw allocator with the "
                     "device lock held, and a DeviceArray freed inside it waits for that lock "
                     "(src_cpp/device_allocator.cpp, mtia_alloc/_binding.h PyRawAllocator)")
    assert r.returncode == 0 and "done" in r.stdout, r.stderr


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
