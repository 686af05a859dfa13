"""Graph capture: is_current_stream_capturing, which pool a capture allocates from (new,
shared, handle or MemPool; use counts), capture routing per stream and thread (other streams
joining, concurrent captures, use_mem_pool inside a capture, a thread allocating to a graph
pool), frees during a capture (deferred, stream uses dropped, no event polled), and misuse:
error messages, empty graphs, OOM during capture, released pools, abandoned captures, copies
(pools_graphs_streams_api.md §3, §5.3-5.4, must-haves 19-20).

Torch ops become kernels on numpy views of device memory (helpers.py: full, add, ...) that
refer to their operands by address only, as a CUDA graph's do; results are checked numerically
after replay.
"""
import gc
import threading
import warnings

import pytest

import mtia_alloc as mtia
import mtia_alloc._C as _C
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import (SLOW_BUSY_MS, MiB, add, add2, block_state, clone, fill, full, segment_of, segments, total,
                     use_count)
from mtia_alloc.memory import MemPool, use_mem_pool


# ----------------------------------------------------------------------------- capturing

def test_graph_is_current_stream_capturing(side_stream):
    g = mtia.MTIAGraph()
    assert not mtia.is_current_stream_capturing() and not side_stream.is_capturing()
    other_thread = []
    with mtia.stream(side_stream):
        g.capture_begin()
        assert mtia.is_current_stream_capturing() and side_stream.is_capturing()
        t = threading.Thread(target=lambda: other_thread.append(mtia.is_current_stream_capturing()))
        t.start()
        t.join()
        x = full(8, 1.0)
        g.capture_end()
        assert not mtia.is_current_stream_capturing()
    assert other_thread == [False]  # another thread's current stream is not capturing
    assert not side_stream.is_capturing()
    del x, g


def test_capture_pool_choice_and_use_count(side_stream):
    """Spec must-have 19 (pools_graphs_streams_api.md §6.19)."""
    pool = MemPool()
    handle = mtia.graph_pool_handle()
    graphs = []
    for arg, expect in (((), None), (((0, 0),), None), ((pool,), pool.id), ((handle,), handle)):
        g = mtia.MTIAGraph()
        with mtia.stream(side_stream):
            g.capture_begin(*arg)
            t = full(10, 1.0)
            g.capture_end()
        del t
        pid = g.pool()
        if expect is None:
            assert pid[0] > 0 and pid[1] == 0  # a new graph-minted pool
        else:
            assert pid == expect
        graphs.append(g)
    assert use_count(handle) == 1 and pool.use_count() == 2
    assert len({g.pool() for g in graphs}) == 4
    del g
    graphs.clear()
    assert use_count(handle) == 0 and pool.use_count() == 1
    del pool


def test_cuda_graph_allocator_propagates_stream(empty_device):
    n = 1_024_000  # 4 MB: large-pool segments
    x = full(n, 1.0)
    y = full(n, 2.0)
    existing_pools = {s["segment_pool_id"] for s in mtia.memory_snapshot()}
    g = mtia.MTIAGraph()
    s0, s1 = mtia.Stream(), mtia.Stream()
    s0.wait_stream(mtia.current_stream())
    with mtia.stream(s0):
        g.capture_begin()
        z = add2(x, y)
    with mtia.stream(s1):
        s1.wait_stream(s0)  # s1 joins the capture
        assert s1.is_capturing()
        w = add2(z, y)
    s0.wait_stream(s1)
    with mtia.stream(s0):
        g.capture_end()
    assert not s1.is_capturing()
    new = [s for s in mtia.memory_snapshot() if s["segment_pool_id"] not in existing_pools]
    assert len(new) == 2
    assert new[0]["segment_pool_id"] == new[1]["segment_pool_id"] == g.pool()
    assert {s["stream"] for s in new} == {s0.stream_id, s1.stream_id}  # one segment per stream
    g.replay()
    assert total(w) == n * 5.0
    del x, y, z, w, g


def test_concurrent_captures_on_two_streams_use_their_own_pools():
    s1, s2 = mtia.Stream(), mtia.Stream()
    g1, g2 = mtia.MTIAGraph(), mtia.MTIAGraph()
    with mtia.stream(s1):
        g1.capture_begin()
        x = full(100, 1.0)
    with mtia.stream(s2):
        g2.capture_begin()
        y = full(100, 2.0)
    with mtia.stream(mtia.Stream()), pytest.raises(RuntimeError, match="already recording to mempool_id"):
        mtia.MTIAGraph().capture_begin(g1._pool)  # that pool is being captured into
    with mtia.stream(s1):
        x2 = add(x, 1)  # g1's capture is still routed to g1's pool
        g1.capture_end()
    with mtia.stream(s2):
        g2.capture_end()
    z = mtia.empty(100)  # the default stream is not capturing
    assert segment_of(x.data_ptr())["segment_pool_id"] == segment_of(x2.data_ptr())["segment_pool_id"] == g1.pool()
    assert segment_of(y.data_ptr())["segment_pool_id"] == g2.pool() != g1.pool()
    assert segment_of(z.data_ptr())["segment_pool_id"] == (0, 0)
    g2.replay()
    g1.replay()
    assert total(x2) == 200.0 and total(y) == 200.0
    del x, x2, y, z, g1, g2


def test_use_mem_pool_inside_a_capture(side_stream):
    """use_mem_pool entered during a capture wins for its thread (LIFO) and the graph keeps
    the pool referenced until it is reset."""
    pool = MemPool()
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        a = full(100, 1.0)
        with use_mem_pool(pool):
            assert pool.use_count() == 3  # MemPool + context + the capturing graph
            b = add(a, 1)
        c = add(b, 1)
        g.capture_end()
    assert pool.use_count() == 2
    assert segment_of(b.data_ptr())["segment_pool_id"] == pool.id
    assert segment_of(a.data_ptr())["segment_pool_id"] == segment_of(c.data_ptr())["segment_pool_id"] == g.pool()
    g.replay()
    assert total(c) == 300.0
    g.reset()
    assert pool.use_count() == 1
    del a, b, c, g, pool


LARGE_BUFFER = 20 * MiB


def test_allocate_in_thread_to_pool(empty_device):
    d = mtia.current_device()
    pool = mtia.graph_pool_handle()
    stream = mtia.Stream()
    graph = mtia.MTIAGraph()
    stream.wait_stream(mtia.current_stream())
    with mtia.graph(graph, pool=pool, stream=stream):
        out = full(20, 1.0)
    graph.replay()
    assert total(out) == 20.0
    del out
    assert len(segments(pool)) == 1
    errors = []

    def alloc_three():
        a = full(LARGE_BUFFER, 1, dtype="int8")
        b = full(LARGE_BUFFER, 2, dtype="int8")
        c = add2(a, b)
        mtia.current_stream().synchronize()
        assert c.numpy()[::4096].tolist() == [3] * (LARGE_BUFFER // 4096)

    def use_pool():
        try:
            _C.create_or_incref_pool(d, pool, None)
            _C.begin_allocate_to_pool(d, pool, _C.KIND_THREAD)  # this thread only
            try:
                for _ in range(10):
                    alloc_three()  # three allocations in the pool
            finally:
                _C.end_allocate_to_pool(d, pool)
                _C.release_pool(d, pool)
            alloc_three()  # three more, not in the pool
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def no_pool():
        try:
            for _ in range(10):
                a = full(LARGE_BUFFER, 1, dtype="int8")
                b = full(LARGE_BUFFER, 2, dtype="int8")
                del a, b
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=use_pool), threading.Thread(target=no_pool)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # the graph's segment + a, b and c: the other thread's allocations never landed in the pool
    assert len(segments(pool)) == 4
    assert use_count(pool) == 1  # the graph's reference only
    del graph
    mtia.synchronize()
    gc.collect()
    mtia.empty_cache()
    assert segments(pool) == []


def test_a_stream_joining_a_capture_as_it_ends_is_not_left_capturing():
    # Threads make their default stream wait on events recorded inside captures, while the
    # captures end. A join that raced the end used to leave the stream marked capturing for
    # good, so its later kernels were recorded into a dead graph instead of running.
    import sys
    side = mtia.Stream()
    last, stop = [None], threading.Event()

    def waiter():
        while not stop.is_set():
            e = last[0]
            if e is not None:
                mtia.default_stream().wait_event(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=waiter) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for _ in range(5000):
            g = mtia.MTIAGraph()
            with mtia.graph(g, stream=side):
                last[0] = side.record_event()
                mtia.emulator.launch(lambda: None)
            last[0] = None
            del g
            assert not mtia.default_stream().is_capturing()
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
    ran = []
    mtia.emulator.launch(ran.append, 1)
    mtia.synchronize()
    assert ran == [1]


# ----------------------------------------------------------------------------- frees during a capture

def test_graph_record_stream(empty_device):
    """Capture never queries events: blocks waiting on cross-stream events (freed before the
    capture) and blocks freed during it with recorded streams are reclaimed only after it."""
    potential_problem = mtia.empty(3)
    a = full(3, 0.0)
    s0, s1, s2 = mtia.Stream(), mtia.Stream(), mtia.Stream()
    g = mtia.MTIAGraph()
    mtia.synchronize()
    with mtia.stream(s0):
        potential_problem.record_stream(s0)
        mtia.emulator.sleep(50)
        fill(potential_problem, 1.0)
    pp_ptr = potential_problem.data_ptr()
    del potential_problem
    assert block_state(pp_ptr) == "active_pending_free"
    s0.synchronize()  # its event has completed, but only process_events would notice

    with mtia.stream(s1):
        g.capture_begin()
        # if malloc processed events during capture, potential_problem's block would be freed here
        b = clone(a)
        assert block_state(pp_ptr) == "active_pending_free"
        # record_stream on a block during capture
        s2.wait_stream(s1)
        with mtia.stream(s2):
            fill(b, 1.0)
            b.record_stream(s2)
            b_ptr = b.data_ptr()
            del b  # deferred: no event is recorded or queried during the capture
        assert block_state(b_ptr) == "active_pending_free"
        assert block_state(pp_ptr) == "active_pending_free"
        s1.wait_stream(s2)
        g.capture_end()
    mtia.synchronize()

    # a dummy allocation processes potential_problem's event and b's deferred free
    c = mtia.empty(3)
    assert c.data_ptr() == pp_ptr or block_state(pp_ptr) == "inactive"
    assert block_state(b_ptr) == "inactive"
    g.replay()
    mtia.synchronize()
    del a, c, g


def test_stream_uses_recorded_during_capture_are_dropped(empty_device, blocks):
    """Spec must-have 20 (pools_graphs_streams_api.md §6.20)."""
    # §3.1 (deferred blocks, step 1), §6.20: uses recorded during capture are dropped, earlier ones kept
    cap, s2, s3 = mtia.Stream(), mtia.Stream(), mtia.Stream()
    during, before = blocks.alloc(3 * MiB, stream=cap), blocks.alloc(3 * MiB, stream=cap)
    mtia.record_stream(before, s3)  # a pre-capture use: kept
    g = mtia.MTIAGraph()
    with mtia.stream(cap):
        g.capture_begin()
        s2.wait_stream(cap)
        mtia.record_stream(during, s2)  # a use recorded during the capture: dropped
        mtia.emulator.launch(lambda: None, stream=s2)
        blocks.free(during)
        blocks.free(before)
        assert block_state(during) == block_state(before) == "active_pending_free"  # deferred
        cap.wait_stream(s2)
        g.capture_end()
    mtia.emulator.sleep(SLOW_BUSY_MS, stream=s2)  # both streams are busy when the deferred frees run
    mtia.emulator.sleep(SLOW_BUSY_MS, stream=s3)
    blocks.free(blocks.alloc(512))  # processes the deferred frees
    assert block_state(during) == "inactive"
    assert block_state(before) == "active_pending_free"
    s3.synchronize()
    blocks.free(blocks.alloc(512))
    assert block_state(before) == "inactive"
    mtia.synchronize()
    del g


def test_routing_defers_frees_with_stream_uses_and_polls_no_events(empty_device, blocks):
    """Spec must-have 20 (pools_graphs_streams_api.md §6.20)."""
    # §3.1: under a routing context malloc polls no event and a free with stream uses is deferred
    s2, s3 = mtia.Stream(), mtia.Stream()
    early, x = blocks.alloc(3 * MiB), blocks.alloc(3 * MiB)
    mtia.record_stream(early, s3)
    mtia.record_stream(x, s2)
    blocks.free(early)  # an event on the idle s3: complete, but not yet processed
    pool = MemPool()
    with use_mem_pool(pool):
        blocks.free(x)  # deferred: no event yet
        mtia.emulator.sleep(SLOW_BUSY_MS, stream=s2)  # s2 is busy from now on
        blocks.free(blocks.alloc(512))  # routed to the pool: no event is polled
        assert block_state(early) == block_state(x) == "active_pending_free"
    blocks.free(blocks.alloc(512))
    assert block_state(early) == "inactive"
    assert block_state(x) == "active_pending_free"  # its event was recorded behind the sleep
    s2.synchronize()
    blocks.free(blocks.alloc(512))
    assert block_state(x) == "inactive"
    del pool


# ----------------------------------------------------------------------------- misuse

def test_graph_errors(side_stream):
    g = mtia.MTIAGraph()
    with pytest.raises(RuntimeError, match="Called MTIAGraph::pool\\(\\) without a preceding successful capture."):
        g.pool()
    with pytest.raises(RuntimeError, match="Called MTIAGraph::replay without a preceding successful capture."):
        g.replay()
    with pytest.raises(RuntimeError, match="capture_end\\(\\) must have been called before calling instantiate"):
        g.instantiate()
    with pytest.raises(RuntimeError, match="without a preceding capture_begin"):
        g.capture_end()

    with mtia.stream(side_stream):
        g.capture_begin()
        x = full(4, 1.0)
        with pytest.raises(RuntimeError, match="Called MTIAGraph::pool\\(\\) without a preceding successful"):
            g.pool()  # not before the capture has ended
        with pytest.raises(RuntimeError, match="already owns a captured graph"):
            g.capture_begin()
        # a second capture on a stream that is already capturing
        g_inner = mtia.MTIAGraph()
        with pytest.raises(RuntimeError, match="already capturing"):
            g_inner.capture_begin()
        # capture_end on another stream
        with mtia.stream(mtia.Stream()):
            with pytest.raises(RuntimeError, match="^Capture must end on the same stream it began on.$"):
                g.capture_end()
        assert mtia.is_current_stream_capturing()  # still capturing after the refused end
        g.capture_end()
    with pytest.raises(RuntimeError, match="already owns a captured graph"):
        g.capture_begin()  # only after reset()
    with pytest.raises(RuntimeError, match="instantiate\\(\\) is intended to be called by the user only when "
                                           "keep_graph=true"):
        g.instantiate()  # keep_graph=False: capture_end already instantiated
    g.replay()
    assert total(x) == 4.0
    with pytest.raises(TypeError):
        mtia.MTIAGraph().capture_begin([0, 1])
    with mtia.stream(side_stream), pytest.raises(ValueError, match="at most one"):
        mtia.MTIAGraph().capture_begin((1, 2))
    assert not mtia.is_current_stream_capturing()
    del x, g, g_inner


def test_capture_end_from_another_device_stream_is_refused(side_stream):
    if mtia.device_count() < 2:
        pytest.skip("needs two devices")
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        with mtia.device(1), pytest.raises(RuntimeError, match="Capture must end on the same stream"):
            g.capture_end()
        x = full(4, 1.0)
        g.capture_end()
    g.replay()
    assert total(x) == 4.0
    del x, g


def test_empty_capture_warns(side_stream):
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        with pytest.warns(UserWarning, match="Graph is empty"):
            g.capture_end()
    g.replay()  # replaying an empty graph does nothing
    g2 = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g2.capture_begin()
        full(4, 1.0)  # work on the capture stream: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g2.capture_end()
    del g, g2


def test_graph_capture_oom(side_stream, empty_device):
    limit = mtia.get_device_properties()["total_memory"]
    mtia.set_per_process_memory_fraction(64 * MiB / limit)
    g = mtia.MTIAGraph()
    outer = mtia.current_stream()
    with pytest.raises(mtia.OutOfMemoryError, match="out of memory"):
        with mtia.graph(g, stream=side_stream):
            full(1000, 1.0)
            mtia.empty(100 * MiB)
    assert mtia.current_stream() == outer and not mtia.is_current_stream_capturing()
    pid = g.pool()  # the capture was ended
    del g
    assert use_count(pid) == 0
    x = mtia.empty(1000)  # the allocator stays usable
    del x


def test_capture_into_a_released_pool_is_refused(side_stream):
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        out = full(10, 1.0)
        g.capture_end()
    pid = g.pool()
    g.reset()  # freeable now; out keeps its segment, so the pool still exists
    g2 = mtia.MTIAGraph()
    with mtia.stream(side_stream), pytest.raises(RuntimeError, match="released"):
        g2.capture_begin(pid)
    assert not mtia.is_current_stream_capturing()
    del out, g, g2


def test_graph_abandoned_mid_capture_is_cleaned_up(side_stream):
    g = mtia.MTIAGraph()
    with mtia.stream(side_stream):
        g.capture_begin()
        t = full(10, 1.0)
        pid = g._pool
        g.reset()  # abandons the capture: routing ends, the pool reference is released
        assert not mtia.is_current_stream_capturing()
        u = mtia.empty(10)
    assert segment_of(u.data_ptr())["segment_pool_id"] == (0, 0)
    assert use_count(pid) == 0
    del t, u
    mtia.empty_cache()
    assert segments(pid) == []
    mtia.memory.check_invariants()


def test_a_graph_cannot_be_copied_or_pickled():
    import copy
    import pickle
    g = mtia.MTIAGraph()
    for f in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot pickle or copy 'MTIAGraph'"):
            f(g)
