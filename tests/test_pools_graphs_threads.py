"""A hypothesis state machine mixing memory pools, graph captures and a second thread:
random allocations (default pool or MemPools), frees from any context, record_stream frees,
pool deletions, captures (new, shared or handle pools), replays, resets, graph deletions,
empty_cache and bursts of work in another thread; the invariants, the values and the pool of
every live block are checked after every step, and everything is released at the end.
"""
import threading

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mtia_alloc as mtia
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import add, full, segment_of, segments, use_count
from mtia_alloc.memory import MemPool, use_mem_pool


class PoolsGraphsThreads(RuleBasedStateMachine):
    """Random sequences of allocations (default pool or MemPools), frees (from any context),
    record_stream frees, pool deletions, graph captures (new, shared or handle pools), replays,
    resets, graph deletions, empty_cache and bursts of work in a second thread. After every step:
    check_invariants(), live blocks do not overlap, each holds its value and lies in the pool it
    was routed to. At the end everything is released and the cache is back to empty."""

    side = None

    def __init__(self):
        super().__init__()
        if PoolsGraphsThreads.side is None:
            PoolsGraphsThreads.side = mtia.Stream()
        mtia.synchronize()
        mtia.empty_cache()
        self.base = mtia.memory_stats()
        self.pools = []  # MemPool objects
        self.dead_pool_ids = []
        self.live = {}  # ptr -> (DeviceArray, value, pool id)
        self.graphs = []  # [MTIAGraph, [(output, value)], pool id]
        self.orphans = []  # outputs of dropped graphs
        self.next_value = 1

    def value(self):
        self.next_value += 1
        return float(self.next_value % 1000)

    def add_live(self, arr, value, pid):
        self.live[arr.data_ptr()] = (arr, value, pid)

    # --- allocations and frees
    @rule(size=st.sampled_from([4, 100, 1000, 60_000, 300_000, 800_000]), where=st.integers(-1, 2))
    def alloc(self, size, where):
        v = self.value()
        if where >= 0 and self.pools:
            pool = self.pools[where % len(self.pools)]
            with use_mem_pool(pool):
                arr = full(size, v)
            self.add_live(arr, v, pool.id)
        else:
            self.add_live(full(size, v), v, (0, 0))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), inside=st.integers(-1, 2))
    def free(self, data, inside):
        ptr = data.draw(st.sampled_from(sorted(self.live)), label="ptr")
        if inside >= 0 and self.pools:
            with use_mem_pool(self.pools[inside % len(self.pools)]):  # frees go to the block's own pool
                del self.live[ptr]
        else:
            del self.live[ptr]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def record_stream_then_free(self, data):
        ptr = data.draw(st.sampled_from(sorted(self.live)), label="ptr")
        arr = self.live.pop(ptr)[0]
        mtia.emulator.sleep(1, stream=self.side)
        arr.record_stream(self.side)
        del arr

    @rule()
    def empty_cache(self):
        mtia.empty_cache()

    # --- pools
    @precondition(lambda self: len(self.pools) < 3)
    @rule(use_on_oom=st.booleans(), no_split=st.booleans())
    def new_pool(self, use_on_oom, no_split):
        self.pools.append(MemPool(use_on_oom=use_on_oom, no_split=no_split))

    @precondition(lambda self: self.pools)
    @rule(data=st.data())
    def delete_pool(self, data):
        i = data.draw(st.integers(0, len(self.pools) - 1), label="pool")
        pool = self.pools.pop(i)
        self.dead_pool_ids.append(pool.id)
        del pool  # its live blocks stay valid

    # --- graphs
    @precondition(lambda self: len(self.graphs) < 4)
    @rule(share=st.sampled_from(["new", "graph", "handle"]), data=st.data(),
          sizes=st.lists(st.sampled_from([16, 1000, 70_000, 400_000]), min_size=1, max_size=4),
          keep_graph=st.booleans())
    def capture(self, share, data, sizes, keep_graph):
        args = ()
        if share == "graph" and self.graphs:
            # draw an index, not the entry: hypothesis keeps drawn values until the example ends
            args = (self.graphs[data.draw(st.integers(0, len(self.graphs) - 1), label="share with")][2],)
        elif share == "handle":
            args = (mtia.graph_pool_handle(),)
        g = mtia.MTIAGraph(keep_graph=keep_graph)
        outputs = []
        self.side.wait_stream(mtia.current_stream())
        with mtia.stream(self.side):
            g.capture_begin(*args)
            for n in sizes:
                v = self.value()
                inp = full(n, v)
                tmp = add(inp, 1)
                del inp  # freed during the capture
                out = add(tmp, 2)
                del tmp
                outputs.append((out, v + 3))
            g.capture_end()
        mtia.current_stream().wait_stream(self.side)
        self.graphs.append([g, outputs, g.pool()])
        self.replay_and_check(len(self.graphs) - 1)

    def replay_and_check(self, i):
        g, outputs, _ = self.graphs[i]
        g.replay()
        mtia.synchronize()
        for out, v in outputs:  # checked right after its own replay (shared pools overlap)
            assert (out.numpy() == v).all()

    @precondition(lambda self: self.graphs)
    @rule(data=st.data())
    def replay(self, data):
        self.replay_and_check(data.draw(st.integers(0, len(self.graphs) - 1), label="graph"))

    @precondition(lambda self: self.graphs)
    @rule(data=st.data(), reset_first=st.booleans(), keep_outputs=st.booleans())
    def drop_graph(self, data, reset_first, keep_outputs):
        i = data.draw(st.integers(0, len(self.graphs) - 1), label="graph")
        g, outputs, pid = self.graphs.pop(i)
        if reset_first:
            g.reset()
        if keep_outputs:  # outputs outlive their graph (their values are not checked any more)
            self.orphans.extend(out for out, _ in outputs)
        self.dead_pool_ids.append(pid)
        del g, outputs

    # --- a second thread
    @rule(n=st.integers(1, 6), pool_index=st.integers(-1, 2), capture_meanwhile=st.booleans())
    def threaded_burst(self, n, pool_index, capture_meanwhile):
        pool = self.pools[pool_index % len(self.pools)] if pool_index >= 0 and self.pools else None
        values = [self.value() for _ in range(n)]
        made, errors = [], []
        started, main_done = threading.Event(), threading.Event()

        def work():
            started.set()
            for v in values:
                made.append((full(1000 * int(v % 7 + 1), v), v))
                mtia.empty(512)  # allocated and freed at once
            main_done.wait(10)  # stay inside the context until the main thread has allocated

        def worker():
            try:
                if pool is None:
                    work()
                else:
                    with use_mem_pool(pool):
                        work()
            except BaseException as e:  # pragma: no cover
                errors.append(e)
            finally:
                started.set()

        t = threading.Thread(target=worker)
        t.start()
        started.wait(10)
        # meanwhile the main thread captures on its side stream, and allocates in the default pool
        g = None
        try:
            if capture_meanwhile and len(self.graphs) < 4:
                g = mtia.MTIAGraph()
                with mtia.stream(self.side):
                    g.capture_begin()
                    v = self.value()
                    out = add(full(100, v), 3)
                    g.capture_end()
            main = full(2000, 9.0)
        finally:
            main_done.set()
        t.join()
        assert not errors, errors
        pid = pool.id if pool is not None else (0, 0)
        for arr, value in made:
            assert segment_of(arr.data_ptr())["segment_pool_id"] == pid
            self.add_live(arr, value, pid)
        self.add_live(main, 9.0, (0, 0))
        if g is not None:
            assert segment_of(out.data_ptr())["segment_pool_id"] == g.pool()
            self.graphs.append([g, [(out, v + 3)], g.pool()])
            self.replay_and_check(len(self.graphs) - 1)

    # --- checks
    @invariant()
    def consistent(self):
        mtia.memory.check_invariants()
        mtia.synchronize()
        spans = sorted((p, p + arr.nbytes) for p, (arr, _, _) in self.live.items())
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, "two live blocks overlap"
        for p, (arr, v, pid) in self.live.items():
            assert (arr.numpy() == v).all(), f"block {p:#x} lost its value"
            assert segment_of(p)["segment_pool_id"] == pid
        for pool in self.pools:
            assert pool.use_count() == 1
        assert not mtia.is_current_stream_capturing()

    def teardown(self):
        self.live.clear()
        self.graphs.clear()
        self.orphans.clear()
        pool_ids = [p.id for p in self.pools] + self.dead_pool_ids
        self.pools.clear()  # no gc.collect(): reference counting alone must release everything
        mtia.synchronize()
        mtia.empty_cache()
        mtia.memory.check_invariants()
        for pid in pool_ids:
            assert segments(pid) == [], f"pool {pid} kept segments after everything was released"
            assert use_count(pid) == 0
        after = mtia.memory_stats()
        for key in ("segment.all.current", "reserved_bytes.all.current", "allocated_bytes.all.current",
                    "active.all.current", "requested_bytes.all.current"):
            assert after[key] == self.base[key], key


PoolsGraphsThreads.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=20,
    deadline=None,
    database=None,
    derandomize=True,  # deterministic: the same sequences on every run
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolsGraphsThreads = PoolsGraphsThreads.TestCase
