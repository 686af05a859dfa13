"""Cost of observability (issue 5, item 7), with pytest-benchmark:

    python -m pytest bench/test_bench_history.py -s -p no:cacheprovider

* snapshot() of 100k live blocks (and the Snapshot view over it);
* ns per caching_allocator_alloc + caching_allocator_delete pair from Python with history off,
  and on with stacks="python" for each context level, at a fixed Python stack depth.

Each test prints its figure (ns per pair, ms per snapshot) and stores it in extra_info."""
import sys

import pytest

import mtia_alloc as mtia
from mtia_alloc.memory import Snapshot

from bench_helpers import DEPTH, at_depth

N_BLOCKS = 100_000
PAIRS = 20_000


def _pairs(n):
    alloc, free = mtia.caching_allocator_alloc, mtia.caching_allocator_delete
    for _ in range(n):
        free(alloc(512))


@pytest.fixture
def no_history():
    mtia.record_memory_history(None)
    mtia.empty_cache()
    yield
    mtia.record_memory_history(None)
    mtia.empty_cache()


def _times(benchmark):
    """The timing statistics, or None under --benchmark-disable (each body then runs once,
    as a smoke test, and there is nothing to report)."""
    return benchmark.stats.stats if benchmark.stats is not None else None


def test_snapshot_of_100k_blocks(benchmark, no_history):
    ptrs = [mtia.caching_allocator_alloc(512) for _ in range(N_BLOCKS)]
    try:
        snap = benchmark.pedantic(mtia.snapshot, rounds=5, iterations=1, warmup_rounds=1)
        n = sum(len(s["blocks"]) for s in snap["segments"])
        assert n >= N_BLOCKS
        benchmark.extra_info.update(blocks=n, segments=len(snap["segments"]))
        if t := _times(benchmark):
            print(f"\nsnapshot() of {n} blocks in {len(snap['segments'])} segments: "
                  f"min {t.min * 1e3:.1f} ms, mean {t.mean * 1e3:.1f} ms")
    finally:
        for p in ptrs:
            mtia.caching_allocator_delete(p)


def test_snapshot_view_of_100k_blocks(benchmark, no_history):
    ptrs = [mtia.caching_allocator_alloc(512) for _ in range(N_BLOCKS)]
    try:
        raw = mtia.snapshot()

        def view():
            s = Snapshot(raw)
            repr(s)
            return s.fragmentation()

        benchmark.pedantic(view, rounds=3, iterations=1)
        if t := _times(benchmark):
            print(f"\nSnapshot(raw) + repr + fragmentation() over {N_BLOCKS} blocks: "
                  f"mean {t.mean * 1e3:.1f} ms")
    finally:
        for p in ptrs:
            mtia.caching_allocator_delete(p)


@pytest.mark.parametrize("mode", ["off", "on-context-None", "on-context-state", "on-context-alloc",
                                  "on-context-all"])
def test_alloc_free_pair_ns(benchmark, no_history, mode):
    if mode != "off":
        context = mode.rsplit("-", 1)[1]
        mtia.record_memory_history(enabled="all", context=None if context == "None" else context,
                                   stacks="python", max_entries=100_000)
    _pairs(1000)  # warm the cache: one small segment, then pure reuse
    benchmark.pedantic(at_depth, args=(DEPTH, _pairs, PAIRS), rounds=5, iterations=1, warmup_rounds=1)
    t = _times(benchmark)
    if t is None:
        return
    ns = t.min / PAIRS * 1e9
    frames = 0
    if mode != "off":
        trace = mtia.snapshot()["device_traces"][0]
        frames = max((len(e.get("frames", ())) for e in trace), default=0)
    benchmark.extra_info.update(ns_per_pair=round(ns, 1), stack_frames=frames, python_depth=len_stack())
    print(f"\nalloc+free pair, history {mode}: {ns:,.0f} ns/pair (best of 5 x {PAIRS}; "
          f"{frames} frames captured per stack)")


def len_stack():
    f, n = sys._getframe(), 0
    while f is not None:
        n, f = n + 1, f.f_back
    return n + DEPTH
