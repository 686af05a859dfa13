"""Graph replay and the lifetime of graph pools: replays compute the captured work again
(numerically checked), successive graphs sharing a pool or not (and the order in which shared
graphs may replay), memory stats before and after capture and after the graph is gone,
keep_graph and instantiate, replay changing no allocator state, replays inside a capture,
reset and re-capture, the graph() context manager, and what reset, destruction and
empty_cache() give back (pools_graphs_streams_api.md §3, §5.3, must-haves 23, 25-26).

Torch ops become kernels on numpy views of device memory (helpers.py: full, add, ...) that
refer to their operands by address only, as a CUDA graph's do; results are checked numerically
after replay.
"""
import gc

import pytest

import mtia_alloc as mtia
import mtia_alloc._C as _C
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import (DEVICES, MiB, add, add2, block_state, clone, counter_kernel, full, kLargeBuffer,
                     kMinLargeAlloc, kRoundLarge, kSmallBuffer, kSmallSize, segments, total, use_count)
from mtia_alloc.memory import MemPool


# ----------------------------------------------------------------------------- replay

def test_graph_capture_simple(side_stream, empty_device):
    ran = []
    with mtia.stream(side_stream):
        a = full(1000, 1.0)
        mtia.synchronize()
        g = mtia.MTIAGraph()
        g.capture_begin()
        b = a
        for _ in range(10):
            b = add(b, 1)
        counter_kernel(ran, "g")
        g.capture_end()
    mtia.current_stream().wait_stream(side_stream)
    mtia.synchronize()
    assert ran == []  # recorded, not run
    g.replay()
    assert total(b) == 11000.0
    assert ran == ["g"]
    g.replay()
    g.replay()
    assert total(b) == 11000.0 and ran == ["g"] * 3
    del a, b, g


def test_graph_capture_reset_recapture(side_stream, empty_device):
    with mtia.stream(side_stream):
        a = full(1000, 1.0)
        g = mtia.MTIAGraph()
        mtia.empty_cache()
        g.capture_begin()
        b = a
        for _ in range(10):
            b = add(b, 1)
        g.capture_end()
    mtia.current_stream().wait_stream(side_stream)
    first_pool = g.pool()
    g.replay()
    assert total(b) == 11000.0

    g.reset()
    assert use_count(first_pool) == 0  # the reference is released, nothing freed yet
    assert len(segments(first_pool)) == 1
    with pytest.raises(RuntimeError, match="pool\\(\\) without a preceding successful capture"):
        g.pool()
    with pytest.raises(RuntimeError, match="replay without a preceding successful capture"):
        g.replay()

    with mtia.stream(side_stream):
        g.capture_begin()
        for _ in range(10):
            b = add(b, 2)
        g.capture_end()
    mtia.current_stream().wait_stream(side_stream)
    assert g.pool() != first_pool
    g.replay()
    assert total(b) == 31000.0
    g.reset()
    del a, b, g
    mtia.empty_cache()
    assert segments(first_pool) == []


def test_keep_graph_instantiate_and_replay(side_stream):
    state = []
    g = mtia.MTIAGraph(keep_graph=True)
    with mtia.stream(side_stream):
        g.capture_begin()
        counter_kernel(state, 1)
        g.capture_end()
    mtia.synchronize()
    assert state == []
    g.instantiate()
    g.replay()
    mtia.synchronize()
    assert len(state) == 1
    g.instantiate()  # keep_graph: may be instantiated again
    g.replay()
    g.replay()
    mtia.synchronize()
    assert len(state) == 3
    g.reset()
    with pytest.raises(RuntimeError, match="replay without a preceding successful capture"):
        g.replay()
    with mtia.stream(side_stream):
        g.capture_begin()
        counter_kernel(state, 2)
        g.capture_end()
    g.replay()  # the first replay instantiates
    mtia.synchronize()
    assert state == [1, 1, 1, 2]
    del g


def test_replay_changes_no_allocator_state(side_stream, empty_device):
    a = full(1000, 2.0)
    g = mtia.MTIAGraph()
    side_stream.wait_stream(mtia.current_stream())
    with mtia.stream(side_stream):
        g.capture_begin()
        b = add(a, 1)
        tmp = add(b, 1)
        c = add2(tmp, b)
        del tmp
        big = mtia.empty(3 * MiB)
        del big
        g.capture_end()
    mtia.synchronize()
    before_stats, before_segments = mtia.memory_stats(), mtia.memory_snapshot()
    for _ in range(3):
        g.replay()
        with mtia.stream(side_stream):
            g.replay()  # on any stream
    mtia.synchronize()
    assert mtia.memory_stats() == before_stats
    assert mtia.memory_snapshot() == before_segments
    assert total(c) == 1000 * 7.0
    del a, b, c, g


def test_replay_inside_a_capture_is_recorded(side_stream):
    inner, outer = mtia.MTIAGraph(), mtia.MTIAGraph()
    log = []
    with mtia.stream(side_stream):
        inner.capture_begin()
        counter_kernel(log, "inner")
        inner.capture_end()
        outer.capture_begin()
        counter_kernel(log, "before")
        inner.replay()  # a graph launched inside a capture becomes part of it
        counter_kernel(log, "after")
        outer.capture_end()
    mtia.synchronize()
    assert log == []
    outer.replay()
    mtia.synchronize()
    assert log == ["before", "inner", "after"]
    del inner, outer


def test_native_kernels_do_not_keep_captured_arrays_alive(side_stream):
    """copy_/fill_ recorded in a graph refer to memory by address, like a CUDA graph: an array
    freed during the capture returns its block to the pool at once."""
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        tmp = mtia.empty(1000)
        mtia.emulator.fill_(tmp, 4.0)
        out = mtia.empty(1000)
        mtia.emulator.copy_(out, tmp)
        tmp_ptr = tmp.data_ptr()
        del tmp
        assert block_state(tmp_ptr) == "inactive"
        again = mtia.empty(1000)  # reuses tmp's block within the same capture
        assert again.data_ptr() == tmp_ptr
        mtia.emulator.fill_(again, 1.0)
        g.capture_end()
    g.replay()
    assert total(out) == 4000.0 and total(again) == 1000.0
    del out, again, g


def test_graph_context_manager(monkeypatch, empty_device):
    """Spec must-have 25 (pools_graphs_streams_api.md §6.25)."""
    monkeypatch.setattr(mtia.graph, "default_capture_stream", None)
    s = mtia.Stream()
    busy = mtia.Stream()
    with mtia.stream(s):
        first = mtia.graph(mtia.MTIAGraph())  # the default capture stream is the current stream
    assert mtia.graph.default_capture_stream == s
    second = mtia.graph(mtia.MTIAGraph())
    assert second.capture_stream == s  # shared by later instances
    explicit = mtia.Stream()
    assert mtia.graph(mtia.MTIAGraph(), stream=explicit).capture_stream == explicit

    cached = mtia.empty(1000)
    del cached  # a cached default-pool segment: enter empties the cache
    assert segments(device=0)
    mtia.emulator.sleep(30, stream=busy)  # enter synchronizes the device
    outer = mtia.current_stream()
    g = first.mtia_graph
    with first:
        assert busy.query()
        assert not segments(device=0)
        assert mtia.current_stream() == s and mtia.is_current_stream_capturing()
        x = full(10, 3.0)
    assert mtia.current_stream() == outer and not mtia.is_current_stream_capturing()
    assert g.pool()[1] == 0  # no pool given: (0, 0), a new graph pool
    g.replay()
    assert total(x) == 30.0

    # pool= takes a MemPool or an id; the default stream may be the capture stream (MTIA)
    pool = MemPool()
    g2 = mtia.MTIAGraph()
    with mtia.graph(g2, pool=pool, stream=mtia.default_stream()):
        assert mtia.current_stream() == mtia.default_stream()
        y = full(10, 4.0)
    assert g2.pool() == pool.id
    g2.replay()
    assert total(y) == 40.0

    # an exception in the body propagates after the capture was ended and the stream restored
    g3 = mtia.MTIAGraph()
    with pytest.raises(KeyError):
        with mtia.graph(g3, stream=s):
            z = full(10, 1.0)
            raise KeyError("body")
    assert mtia.current_stream() == outer and not mtia.is_current_stream_capturing()
    g3.pool()  # the capture did end
    # a capture_begin that fails leaves the stream unchanged
    g4 = mtia.MTIAGraph()
    with pytest.raises(ValueError):
        with mtia.graph(g4, pool=(1, 1), stream=s):
            pass  # pragma: no cover
    assert mtia.current_stream() == outer and not mtia.is_current_stream_capturing()
    del x, y, z, g, g2, g3, g4, first, second, pool


# ----------------------------------------------------------------------------- successive graphs, shared pools

def test_graph_two_successive(side_stream, empty_device):
    size = 1000
    s = side_stream
    reserved_no_sharing = None

    def func_with_temps(t, val):
        x = add(clone(t), val)
        y = add(clone(t), val)
        return add2(x, y)

    for share_mem in ("Don't share", "via pool()", "via graph_pool_handle()"):
        g0, g1 = mtia.MTIAGraph(), mtia.MTIAGraph()
        a = full(size, 1.0)
        s.wait_stream(mtia.current_stream())
        with mtia.stream(s):
            g0_args = (mtia.graph_pool_handle(),) if share_mem == "via graph_pool_handle()" else ()
            g0.capture_begin(*g0_args)
            b = clone(a)
            for _ in range(5):
                b = func_with_temps(b, 1)
            g0.capture_end()

            g1_args = (g0.pool(),) if share_mem == "via pool()" else g0_args
            g1.capture_begin(*g1_args)
            for _ in range(5):
                b = func_with_temps(b, 1)
            g1.capture_end()
        mtia.current_stream().wait_stream(s)

        # mixes unrelated eager work with replays
        c = clone(a)
        for _ in range(2):
            c = func_with_temps(c, 3)
        g0.replay()
        for _ in range(2):
            c = func_with_temps(c, 3)
        g1.replay()
        for _ in range(2):
            c = func_with_temps(c, 3)

        assert total(b) == size * 3070, share_mem
        assert total(c) == size * 442, share_mem
        assert (g0.pool() == g1.pool()) == (share_mem != "Don't share")

        reserved = mtia.memory_stats()["reserved_bytes.all.current"]
        if share_mem == "Don't share":
            reserved_no_sharing = reserved
        else:
            # sharing a pool reserves only the combined high-water mark: one 2 MiB segment less
            assert reserved_no_sharing - reserved == kSmallBuffer, share_mem

        del a, b, c, g0, g1
        mtia.synchronize()
        mtia.empty_cache()
        assert segments(device=0) == []


@pytest.mark.parametrize("share_mem", ["Don't share", "via pool()", "via graph_pool_handle()"])
def test_graph_three_successive(side_stream, empty_device, share_mem):
    size = 1000
    s = side_stream
    a = full(size, 1.0)
    g0, g1, g2 = mtia.MTIAGraph(), mtia.MTIAGraph(), mtia.MTIAGraph()
    s.wait_stream(mtia.current_stream())
    with mtia.stream(s):
        g0_args = (mtia.graph_pool_handle(),) if share_mem == "via graph_pool_handle()" else ()
        g0.capture_begin(*g0_args)
        b = clone(a)
        c = add(b, 1)
        d = add(b, 2)
        g0.capture_end()

        args = (g0.pool(),) if share_mem == "via pool()" else g0_args
        g1.capture_begin(*args)
        e = add(c, 3)
        c_ptr = c.data_ptr()
        del c  # freed during capture: back to the pool at once
        g1.capture_end()

        g2.capture_begin(*args)
        f = add(d, 4)
        g2.capture_end()
    mtia.current_stream().wait_stream(s)
    shared = share_mem != "Don't share"
    assert (f.data_ptr() == c_ptr) == shared  # g2 reuses c's memory only in a shared pool

    # replaying in capture order is valid
    g0.replay()
    g1.replay()
    g2.replay()
    assert total(e) == size * 5
    assert total(f) == size * 7

    # replaying as g0, g2, g1 is valid only if they do not share a pool
    g0.replay()
    g2.replay()
    g1.replay()
    if shared:
        assert total(e) == size * 10  # e = f + 3: g2 overwrote c's memory
    else:
        assert total(e) == size * 5
    assert total(f) == size * 7
    del a, b, d, e, f, g0, g1, g2
    mtia.synchronize()
    mtia.empty_cache()


# ----------------------------------------------------------------------------- memory of graph pools

_ELEM = 4
_STATS_CASES = (
    # numel, delta segments, delta reserved, reserved after del g, pool
    (512 // _ELEM, 1, kSmallBuffer, kSmallBuffer, "small_pool"),
    (kSmallSize // _ELEM, 2, 2 * kSmallBuffer, kSmallBuffer, "small_pool"),
    ((kSmallSize + 512) // _ELEM, 1, kLargeBuffer, kLargeBuffer, "large_pool"),
    ((kMinLargeAlloc - 512) // _ELEM, 2, 2 * kLargeBuffer, kLargeBuffer, "large_pool"),
    ((kMinLargeAlloc + 512) // _ELEM, 3,
     3 * (kRoundLarge * ((kMinLargeAlloc + 512 + kRoundLarge - 1) // kRoundLarge)),
     kRoundLarge * ((kMinLargeAlloc + 512 + kRoundLarge - 1) // kRoundLarge), "large_pool"),
)


@pytest.mark.parametrize("numel,delta_segments,delta_bytes,delta_bytes_post_del_g,pool", _STATS_CASES)
def test_graph_memory_stats_and_use_result_after_destroy_graph(
        side_stream, empty_device, numel, delta_segments, delta_bytes, delta_bytes_post_del_g, pool):
    # no RNG seed/offset holders here: only b is active after the capture
    delta_active_blocks, delta_active_bytes = 1, numel * _ELEM
    stats_to_check = ("segment.", "reserved_bytes.", "active.", "active_bytes.")
    s = side_stream
    g = mtia.MTIAGraph()
    s.wait_stream(mtia.current_stream())
    with mtia.stream(s):
        # the input is made on the capture stream, outside the capture: the default pool
        a = full(numel, 1.0)
        mtia.synchronize()
        precapture_stats = mtia.memory_stats()
        g.capture_begin()
        b = clone(a)
        for _ in range(5):
            b = add(clone(b), 1)
        g.capture_end()
    mtia.current_stream().wait_stream(s)
    gc.collect()
    postcapture_stats = mtia.memory_stats()

    expecteds = (delta_segments, delta_bytes, delta_active_blocks, delta_active_bytes)
    # checks replay and stats before and after an empty_cache (a live graph pool is kept)
    for i in range(2):
        for stat, expected in zip(stats_to_check, expecteds):
            key = stat + pool + ".current"
            current = postcapture_stats[key] - precapture_stats[key]
            assert current == expected, f"pre to post capture delta of {key} = {current}, expected {expected}"
        g.replay()
        assert total(b) == 6 * numel
        if i == 0:
            mtia.empty_cache()
            postcapture_stats = mtia.memory_stats()

    del g
    gc.collect()
    mtia.empty_cache()
    postdel_stats = mtia.memory_stats()
    assert total(b) == 6 * numel  # the graph's output is still usable after the graph is gone
    # b is the only live block left of the graph's private pool
    expecteds = (1, delta_bytes_post_del_g, 1, numel * _ELEM)
    for stat, expected in zip(stats_to_check, expecteds):
        key = stat + pool + ".current"
        current = postdel_stats[key] - precapture_stats[key]
        assert current == expected, f"pre capture to post graph delete delta of {key} = {current}, expected {expected}"
    del a, b
    mtia.synchronize()
    mtia.empty_cache()
    assert segments(device=0) == []


def test_reset_frees_nothing_but_lets_empty_cache_free(side_stream, empty_device):
    """Spec must-have 23 (pools_graphs_streams_api.md §6.23)."""
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        out = full(1000, 5.0)
        big = mtia.empty(5 * MiB)  # a temporary in its own large segment
        del big
        g.capture_end()
    g.replay()
    pid = g.pool()
    reserved = mtia.memory_reserved()
    g.reset()
    assert mtia.memory_reserved() == reserved  # reset frees no memory by itself
    assert use_count(pid) == 0
    mtia.empty_cache()  # the fully free large segment goes, out's segment stays
    assert [s["total_size"] for s in segments(pid)] == [kSmallBuffer]
    assert total(out) == 5000.0  # still valid
    del out
    mtia.empty_cache()
    assert segments(pid) == []
    del g


def test_graph_is_destroyed_with_its_python_object(side_stream):
    """Spec must-have 26 (pools_graphs_streams_api.md §6.26)."""
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        t = full(10, 1.0)
        g.capture_end()
    pid = g.pool()
    assert use_count(pid) == 1
    del g
    assert use_count(pid) == 0
    del t
    mtia.empty_cache()
    assert segments(pid) == []


def test_free_of_a_graph_pool_block_after_reset(side_stream):
    mtia.synchronize()
    mtia.empty_cache()
    base = {d: _C.mem_get_info(d) for d in DEVICES}
    allocated, reserved = mtia.memory_allocated(0), mtia.memory_reserved(0)
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        out = mtia.empty(1000)
        mtia.emulator.fill_(out, 1.0)
        g.capture_end()
    pool = g.pool()
    g.replay()
    mtia.synchronize()
    g.reset()  # the pool is released; `out` still holds its block
    with pytest.raises(RuntimeError, match="pool\\(\\) without a preceding successful capture"):
        g.pool()
    assert mtia.memory_allocated(0) > allocated
    segment = [s for s in mtia.memory_snapshot() if s["segment_pool_id"] == pool]
    assert len(segment) == 1
    del out  # must work: the block returns to its (released) pool
    assert mtia.memory_allocated(0) == allocated
    mtia.memory.check_invariants()
    mtia.empty_cache()  # ...and empty_cache returns the segment
    assert mtia.memory_reserved(0) == reserved
    assert [s for s in mtia.memory_snapshot() if s["segment_pool_id"] == pool] == []
    assert {d: _C.mem_get_info(d) for d in DEVICES} == base
    mtia.memory.check_invariants()
