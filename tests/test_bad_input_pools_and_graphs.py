"""Bad input to memory pools, raw allocators and graphs: MemPool allocators, use_mem_pool
arguments and nesting one pool twice, PythonAllocator/PluggableAllocator arguments,
change_current_allocator after init, and graph misuse with pools_graphs_streams_api.md §3.1's
messages (ending without a begin, replay/pool/instantiate before a capture, capturing twice or
inside a capture, ending on another stream or device, bad pool ids, the graph() context
manager's arguments) (a bad-input matrix over ../shared/API.md).

Each case names the call, the exception type and a message fragment, and must change nothing
(helpers.check_bad_call and state_unchanged); the cases get the `resources` fixture.
"""
import contextlib
import ctypes.util
import warnings

import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from helpers import check_bad_call, other_device
from mtia_alloc.memory import MemPool, PluggableAllocator, PythonAllocator, use_mem_pool


def _nested_use_of_one_pool(r):
    with use_mem_pool(r.pool):
        try:
            with use_mem_pool(r.pool):
                pass  # pragma: no cover
        finally:
            assert r.pool.use_count() == 2  # the outer context's reference only


@contextlib.contextmanager
def _capturing(stream):
    """A capture on `stream` for the duration of the block; the graph is reset after."""
    g = mtia.MTIAGraph()
    with mtia.stream(stream):
        g.capture_begin()
        try:
            yield g
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the graph is empty
                g.capture_end()
            g.reset()


def _capture_inside_capture(r):
    with _capturing(r.side0):
        mtia.MTIAGraph().capture_begin()


def _capture_begin_twice(r):
    with _capturing(r.side0) as g:
        g.capture_begin()


def _capture_end_on_other_stream(r):
    with _capturing(r.side0) as g:
        with mtia.stream(mtia.default_stream(0)):
            g.capture_end()


def _capture_end_on_other_device(r):
    d = other_device()
    with _capturing(r.side0) as g:
        with mtia.device(d):
            g.capture_end()


def _pool_of_uncaptured_during_capture(r):
    with _capturing(r.side0) as g:
        g.pool()


def _capture_begin_with(pool):
    def call(r):
        with mtia.stream(r.side0):
            mtia.MTIAGraph().capture_begin(pool)
    return call


def _libc():
    return ctypes.util.find_library("c") or "libc.so.6"


def _dummy_allocator():
    return PythonAllocator(lambda size, device, stream: 0, lambda ptr, size, device, stream: None)


CASES = [
    # ------------------------------------------------------------ pools and raw allocators
    pytest.param(lambda r: MemPool(allocator=3), TypeError,
                 r"allocator must be None, a PythonAllocator or a PluggableAllocator", id="MemPool-allocator-int"),
    pytest.param(lambda r: MemPool(allocator=lambda size, device, stream: 0), TypeError,
                 r"allocator must be None, a PythonAllocator or a PluggableAllocator", id="MemPool-allocator-function"),
    pytest.param(lambda r: use_mem_pool(None).__enter__(), TypeError, r"use_mem_pool expects a MemPool, got NoneType",
                 id="use_mem_pool-None"),
    pytest.param(lambda r: use_mem_pool(r.pool.id).__enter__(), TypeError, r"use_mem_pool expects a MemPool, got tuple",
                 id="use_mem_pool-pool-id"),
    pytest.param(_nested_use_of_one_pool, RuntimeError, r"^beginAllocateToPool: already recording to mempool_id$",
                 id="use_mem_pool-same-pool-nested"),
    pytest.param(lambda r: PythonAllocator("malloc", print), TypeError, r"PythonAllocator needs two callables",
                 id="PythonAllocator-alloc-not-callable"),
    pytest.param(lambda r: PythonAllocator(print, None), TypeError, r"PythonAllocator needs two callables",
                 id="PythonAllocator-free-None"),
    pytest.param(lambda r: PluggableAllocator("/nonexistent/liballoc.so", "alloc", "free"), RuntimeError,
                 r"cannot load allocator library '/nonexistent/liballoc.so'", id="PluggableAllocator-missing-so"),
    pytest.param(lambda r: PluggableAllocator(_libc(), "no_such_alloc_fn", "free"), RuntimeError,
                 r"lacks a symbol: .*no_such_alloc_fn", id="PluggableAllocator-missing-alloc-symbol"),
    pytest.param(lambda r: PluggableAllocator(_libc(), "malloc", "no_such_free_fn"), RuntimeError,
                 r"lacks a symbol: .*no_such_free_fn", id="PluggableAllocator-missing-free-symbol"),
    pytest.param(lambda r: mtia.memory.change_current_allocator(_dummy_allocator()), RuntimeError,
                 r"change_current_allocator must be called before mtia_alloc is initialized",
                 id="change_current_allocator-after-init"),
    pytest.param(lambda r: mtia.memory.change_current_allocator(object()), TypeError,
                 r"allocator must be a PythonAllocator or a PluggableAllocator", id="change_current_allocator-object"),
    # ------------------------------------------------------------ graphs (spec §3.1 messages)
    pytest.param(lambda r: mtia.MTIAGraph().capture_end(), RuntimeError,
                 r"capture_end\(\) called without a preceding capture_begin\(\)", id="graph-end-without-begin"),
    pytest.param(lambda r: mtia.MTIAGraph().replay(), RuntimeError,
                 r"^Called MTIAGraph::replay without a preceding successful capture\.$",
                 id="graph-replay-before-capture"),
    pytest.param(lambda r: mtia.MTIAGraph().pool(), RuntimeError,
                 r"^Called MTIAGraph::pool\(\) without a preceding successful capture\.$",
                 id="graph-pool-before-capture"),
    pytest.param(_pool_of_uncaptured_during_capture, RuntimeError,
                 r"^Called MTIAGraph::pool\(\) without a preceding successful capture\.$",
                 id="graph-pool-during-capture"),
    pytest.param(lambda r: mtia.MTIAGraph().instantiate(), RuntimeError,
                 r"^capture_end\(\) must have been called before calling instantiate$",
                 id="graph-instantiate-before-capture"),
    pytest.param(lambda r: r.captured.instantiate(), RuntimeError,
                 r"^instantiate\(\) is intended to be called by the user only when keep_graph=true$",
                 id="graph-instantiate-twice-without-keep_graph"),
    pytest.param(lambda r: r.captured.capture_begin(), RuntimeError,
                 r"^This MTIAGraph instance already owns a captured graph\. To capture a new graph, create a new "
                 r"instance\.$", id="graph-capture-again-without-reset"),
    pytest.param(_capture_begin_twice, RuntimeError, r"already owns a captured graph",
                 id="graph-capture-begin-twice-during-capture"),
    pytest.param(_capture_inside_capture, RuntimeError, r"already capturing", id="graph-capture-inside-capture"),
    pytest.param(_capture_end_on_other_stream, RuntimeError, r"^Capture must end on the same stream it began on\.$",
                 id="graph-end-on-other-stream"),
    pytest.param(_capture_end_on_other_device, RuntimeError, r"^Capture must end on the same stream it began on\.$",
                 id="graph-end-on-other-device"),
    pytest.param(_capture_begin_with((3, 4)), ValueError, r"invalid pool id \(3, 4\): at most one of its two halves",
                 id="graph-pool-id-both-halves"),
    pytest.param(_capture_begin_with([0, 1]), TypeError, r"expected a MemPool or a \(int, int\) pool id",
                 id="graph-pool-id-list"),
    pytest.param(_capture_begin_with((0, -1)), TypeError, r"expected a MemPool or a \(int, int\) pool id",
                 id="graph-pool-id-negative"),
    pytest.param(lambda r: mtia.graph(object()), TypeError, r"graph expects an MTIAGraph, got object",
                 id="graph-ctx-not-a-graph"),
    pytest.param(lambda r: mtia.graph(mtia.MTIAGraph(), pool=(5, 6)), ValueError, r"at most one of its two halves",
                 id="graph-ctx-bad-pool"),
    pytest.param(lambda r: mtia.graph(mtia.MTIAGraph(), stream=0), TypeError,
                 r"stream expects an mtia_alloc.Stream or None, got int", id="graph-ctx-stream-int"),
]


@pytest.mark.parametrize("call, exc, message", CASES)
def test_bad_pool_or_graph_call(resources, call, exc, message):
    check_bad_call(resources, call, exc, message)
