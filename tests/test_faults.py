"""Faults survived (issue 7): device-allocation failures injected at every point of a
replayed trace and of a graph capture surface as OutOfMemoryError, leave the allocator
consistent, and the same workload succeeds once the fault is lifted. A Python raw
allocator that fails mid-life behaves the same; kernel errors never wedge a stream."""
import pytest

import mtia_alloc as mtia
from mtia_alloc.tools.bench_suite import random_trace
from mtia_alloc.emulator import fail_device_allocations

TRACE = random_trace(num=150, max_size=24 << 20, max_live=256 << 20, seed=7)


def replay_python(trace, device=0):
    """Replays through the public API; returns (ooms, first failing event index)."""
    live, ooms, first = {}, 0, None
    try:
        for i, (size, slot) in enumerate(zip(trace.sizes.tolist(), trace.slots.tolist())):
            if size:
                try:
                    live[slot] = mtia.caching_allocator_alloc(size, device=device)
                except mtia.OutOfMemoryError:
                    ooms += 1
                    first = i if first is None else first
            elif slot in live:
                mtia.caching_allocator_delete(live.pop(slot))
    finally:
        for p in live.values():
            mtia.caching_allocator_delete(p)
    return ooms, first


def clean_device_allocs():
    mtia.empty_cache()
    before = mtia.memory_stats(0)["num_device_alloc"]
    assert replay_python(TRACE) == (0, None)
    return mtia.memory_stats(0)["num_device_alloc"] - before


@pytest.fixture(autouse=True)
def lift_faults():
    mtia.init()
    yield
    fail_device_allocations(None, device=0)


def test_trace_survives_a_failure_at_every_device_allocation():
    n = clean_device_allocs()
    assert n >= 5
    injected = survived = 0
    for k in range(n):
        for every in (0, 1):  # one failure (the flush-and-retry may recover), or all from k on
            mtia.empty_cache()
            fail_device_allocations(after_n=k, every=every, device=0)
            ooms, first = replay_python(TRACE)
            fail_device_allocations(None, device=0)
            injected += 1
            if every == 1:
                assert ooms >= 1 and first is not None
            mtia.memory.check_invariants()
            assert mtia.memory_allocated(0) == 0
            assert replay_python(TRACE) == (0, None)  # the fault lifted, the workload runs
            survived += 1
    assert survived == injected == 2 * n


def test_oom_error_is_the_injected_failure_and_stats_stay_consistent():
    mtia.empty_cache()
    before = mtia.memory_stats(0)
    fail_device_allocations(after_n=0, every=1, device=0)
    with pytest.raises(mtia.OutOfMemoryError, match="Tried to allocate 20.00 MiB"):
        mtia.caching_allocator_alloc(5 << 20, device=0)
    after = mtia.memory_stats(0)
    assert after["num_ooms"] == before["num_ooms"] + 1
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
    mtia.memory.check_invariants()


def test_graph_capture_survives_injected_failures():
    s = mtia.Stream()
    for k in range(3):
        g = mtia.MTIAGraph()
        fail_device_allocations(after_n=k, every=1, device=0)
        keep = []
        with pytest.raises(mtia.OutOfMemoryError):
            with mtia.graph(g, stream=s):
                for _ in range(4):
                    keep.append(mtia.empty(3_000_000, dtype="float32"))  # 12 MB: a segment of its own each
        fail_device_allocations(None, device=0)
        keep.clear()
        g.reset()
        mtia.empty_cache()
        mtia.memory.check_invariants()
        assert not mtia.is_current_stream_capturing()
        g2 = mtia.MTIAGraph()
        with mtia.graph(g2, stream=s):
            a = mtia.empty(1000)
            mtia.emulator.fill_(a, 3.0)
        g2.replay()  # on the current (default) stream
        mtia.synchronize()
        assert float(a.numpy().sum()) == 3000.0
        del a
        g2.reset()
        mtia.empty_cache()


def test_python_raw_allocator_failing_mid_life():
    import numpy as np
    arena = np.zeros(64 << 20, dtype=np.uint8)
    base = arena.ctypes.data
    state = {"next": 0, "fail": False, "live": 0}

    def alloc(size, device, stream):
        if state["fail"]:
            raise MemoryError("arena unavailable")
        off = state["next"]
        if off + size > arena.nbytes:
            return 0
        state["next"] += size
        state["live"] += 1
        return base + off

    def free(ptr, size, device, stream):
        state["live"] -= 1

    pool = mtia.MemPool(allocator=mtia.memory.PythonAllocator(alloc, free))
    with mtia.use_mem_pool(pool):
        a = mtia.caching_allocator_alloc(4096)
        state["fail"] = True
        with pytest.raises(mtia.OutOfMemoryError) as exc:
            mtia.caching_allocator_alloc(8 << 20)
        assert isinstance(exc.value.__cause__, MemoryError)
        b = mtia.caching_allocator_alloc(4096)  # cached: no raw allocation needed
        state["fail"] = False
        c = mtia.caching_allocator_alloc(8 << 20)  # recovers
    for p in (a, b, c):
        mtia.caching_allocator_delete(p)
    mtia.memory.check_invariants()
    del pool
    mtia.empty_cache()
    assert state["live"] == 0


def test_kernel_errors_never_wedge_the_stream():
    s = mtia.Stream()
    out = []
    for i in range(20):
        mtia.emulator.launch(lambda: 1 / 0, stream=s)
        mtia.emulator.launch(out.append, i, stream=s)
        with pytest.raises(Exception, match="ZeroDivisionError"):
            s.synchronize()
    s.synchronize()
    assert out == list(range(20))
