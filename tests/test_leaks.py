"""Nothing leaked (issue 7 item 5): once every array has died, every pool has been deleted
and every graph reset, empty_cache() leaves 0 bytes reserved and allocated, no segment in the
snapshot, and each emulated device reports 0 bytes in use.

Each scenario runs in a fresh interpreter (the state of the test session does not matter,
and a leak cannot hide behind memory other tests hold). tests/conftest.py checks the same
after the whole suite."""
import os
import textwrap

import pytest

from helpers import run_code

TESTS = os.path.dirname(os.path.abspath(__file__))

PRELUDE = textwrap.dedent("""
    import gc, sys
    import numpy as np
    import mtia_alloc as mtia
    import mtia_alloc._C as _C
    from mtia_alloc.memory import MemPool, PythonAllocator, use_mem_pool, check_invariants

    def assert_nothing_held():
        gc.collect()
        for d in range(mtia.device_count()):
            mtia.synchronize(d)
        gc.collect()
        mtia.empty_cache()
        for d in range(mtia.device_count()):
            free, total = _C.mem_get_info(d)
            held = (mtia.memory_allocated(d), mtia.memory_reserved(d), total - free - mtia.emulator.runtime_reserved(d))
            assert held == (0, 0, 0), f"device {d}: allocated, reserved, device bytes used = {held}"
            check_invariants(d)
        assert mtia.memory_snapshot() == [], mtia.memory_snapshot()
""") + f"""
sys.path.insert(0, {TESTS!r})
from helpers import HostAllocator  # alloc_fn/free_fn of a PythonAllocator over numpy host buffers
"""


def run(body, **env):
    """Runs PRELUDE + body in a fresh interpreter with no inherited MTIA_* variables."""
    proc = run_code(PRELUDE + textwrap.dedent(body) + "\nprint('DONE')\n", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "DONE" in proc.stdout, proc.stdout + proc.stderr
    assert "Fatal" not in proc.stderr and "Segmentation" not in proc.stderr, proc.stderr
    return proc


SCENARIOS = {
    "arrays-on-two-devices-and-side-streams": """
        arrays = []
        for d in range(2):
            s = mtia.Stream(device=d)
            for n in (1, 1000, 300_000, 3_000_000):      # small and large pools
                a = mtia.empty(n, device=d, stream=s)
                mtia.emulator.fill_(a, 1.0, stream=s)
                arrays.append(a)
            b = mtia.empty(5000, device=d)
            b.record_stream(s)                            # freed only after s's work
            mtia.emulator.sleep(20, stream=s)
            arrays.append(b)
        ptrs = [mtia.caching_allocator_alloc(n, d) for d in range(2) for n in (512, 4 << 20)]
        del arrays, a, b
        for p in ptrs:
            mtia.caching_allocator_delete(p)
        assert_nothing_held()
    """,
    "mem-pools-deleted-before-their-arrays": """
        host = HostAllocator()
        pools = [MemPool(), MemPool(allocator=PythonAllocator(host.alloc, host.free)), MemPool(no_split=True)]
        kept = []
        for pool in pools:
            with use_mem_pool(pool):
                kept += [mtia.empty(100), mtia.empty(3_000_000)]
        with use_mem_pool(pools[0], device=1):
            kept.append(mtia.empty(100, device=1))
        del pools, pool                    # the arrays outlive their pools
        gc.collect()
        del kept                           # blocks go back to the dead pools
        assert_nothing_held()
        assert host.buffers == {}, host.buffers
    """,
    "graphs-reset-before-their-outputs-die": """
        s = mtia.Stream()
        shared = mtia.graph_pool_handle()
        graphs, outputs = [], []
        for pool in (None, shared, shared):
            g = mtia.MTIAGraph()
            with mtia.graph(g, pool=pool, stream=s):
                tmp = mtia.empty(1000)
                mtia.emulator.fill_(tmp, 1.0)
                src = mtia.empty(3_000_000)
                out = mtia.empty(3_000_000)
                mtia.emulator.copy_(out, src)
                del tmp, src               # freed during capture: back to the graph pool
            outputs.append(out)
            graphs.append(g)
        for g in graphs:
            g.replay()
        mtia.synchronize()
        for g in graphs:
            g.reset()                      # the outputs keep their segments
        del out
        outputs.clear()                    # blocks return to the released pools
        assert_nothing_held()
    """,
    "graphs-deleted-without-reset-and-pools-retained-in-capture": """
        s = mtia.Stream()
        pool = MemPool()
        g = mtia.MTIAGraph(keep_graph=True)
        with mtia.stream(s):
            g.capture_begin()
            a = mtia.empty(1000)
            with use_mem_pool(pool):       # the graph retains this pool
                b = mtia.empty(2000)
            g.capture_end()
        g.instantiate()
        g.replay()
        mtia.synchronize()
        del pool, a, b
        del g                              # the destructor resets
        assert_nothing_held()
    """,
    "after-ooms-injected-faults-and-history": """
        mtia.record_memory_history(max_entries=1000)
        for d in range(2):
            try:
                mtia.empty(1 << 40, device=d)           # larger than the device
            except mtia.OutOfMemoryError:
                pass
        mtia.emulator.fail_device_allocations(2, every=3)
        kept = []
        for i in range(12):
            try:
                kept.append(mtia.empty(5_000_000 + i))
            except mtia.OutOfMemoryError:
                pass
        mtia.emulator.fail_device_allocations(None)
        assert kept
        mtia.set_per_process_memory_fraction(0.001, 1)
        try:
            mtia.empty(100_000_000, device=1)
        except mtia.OutOfMemoryError:
            pass
        mtia.set_per_process_memory_fraction(1.0, 1)
        del kept
        mtia.record_memory_history(None)
        assert_nothing_held()
    """,
    "python-allocator-under-the-default-pools": """
        host = HostAllocator()
        mtia.memory.change_current_allocator(PythonAllocator(host.alloc, host.free))
        arrays = [mtia.empty(n, device=d) for d in range(2) for n in (10, 500_000, 4_000_000)]
        del arrays
        assert_nothing_held()
        assert host.buffers == {}, host.buffers
    """,
}


@pytest.mark.parametrize("body", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_nothing_held_after_everything_died(body):
    run(body)
