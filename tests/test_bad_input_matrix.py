"""A bad-input matrix over the whole public API (../shared/API.md), beyond tests/test_bad_input.py.

Every case names the call, the exception type and a message fragment. Afterwards the state
is exactly what it was: memory_stats() of every device, the device bytes in use, the allocator
settings, the current device and streams, the memory fractions, the RNG states and the history
level; and mtia_alloc.memory.check_invariants() passes.

Sections: device arguments of every function that takes one; streams and events; the emulator
(kernels, fault injection, configure); empty() dtypes and shapes; memory history and snapshots;
allocator settings strings not already in tests/test_config.py; pools and raw allocators; graph
misuse; record_stream; RNG. Then malformed environment values and pre-init configure() calls,
each in a fresh interpreter, and the behaviours that must work rather than raise: OOM
observers and Python raw allocators that raise, and the free of a graph-pool block after the
graph's reset.
"""
import contextlib
import ctypes.util
import gc
import os
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc._C as _C
import mtia_alloc.emulator as emulator
import mtia_alloc.memory
from mtia_alloc.memory import MemPool, PluggableAllocator, PythonAllocator, use_mem_pool

N = mtia.device_count()
DEVICES = list(range(N))
RANGE = re.escape(f"the valid range is [0, {N - 1}]")
OOM_COUNTERS = ("num_ooms", "num_alloc_retries", "num_sync_all_streams")


# ----------------------------------------------------------------------------- state

def _state(allow=()):
    stats = {}
    for d in DEVICES:
        s = mtia.memory_stats(d)
        stats[d] = {k: v for k, v in s.items() if k not in allow}
    return {
        "stats": stats,
        "device_bytes": [_C.mem_get_info(d) for d in DEVICES],
        "settings": _C.allocator_settings(),
        "device": mtia.current_device(),
        "streams": [mtia.current_stream(d).stream_id for d in DEVICES],
        "fractions": [mtia.get_per_process_memory_fraction(d) for d in DEVICES],
        "rng": [bytes(mtia.get_rng_state(d)) for d in DEVICES],
        "history": _C.record_level(),
        "capturing": mtia.is_current_stream_capturing(),
    }


@contextlib.contextmanager
def state_unchanged(allow=()):
    """The block leaves the state as it found it (stats keys in `allow` may change) and the
    invariants hold on every device."""
    before = _state(allow)
    yield
    after = _state(allow)
    for key in before:
        assert after[key] == before[key], key
    for d in DEVICES:
        mtia.memory.check_invariants(d)


# ----------------------------------------------------------------------------- resources

class Resources:
    """Objects the cases use, made once for the module (outside every state check)."""

    def __init__(self):
        self.side0 = mtia.Stream(device=0)
        self.side1 = mtia.Stream(device=1) if N > 1 else None
        self.a4 = mtia.empty(4)                 # float32, 16 bytes
        self.a8 = mtia.empty(8)                 # float32, 32 bytes
        self.u8 = mtia.empty(4, "uint8")
        self.ptr = mtia.caching_allocator_alloc(4096, 0)
        self.pool = MemPool()
        self.rng_state = mtia.get_rng_state(0)
        self.captured = mtia.MTIAGraph()        # keep_graph=False: instantiated by capture_end
        with mtia.stream(self.side0):
            self.captured.capture_begin()
            emulator.sleep(0)
            self.captured.capture_end()
        mtia.synchronize()

    def close(self):
        self.captured.reset()
        mtia.caching_allocator_delete(self.ptr)
        del self.a4, self.a8, self.u8, self.pool, self.captured


@pytest.fixture(scope="module")
def res():
    r = Resources()
    yield r
    r.close()
    gc.collect()
    mtia.empty_cache()


def other_device():
    if N < 2:
        pytest.skip("needs two devices")
    return 1


class DeviceLike:
    """A torch.device look-alike."""

    def __init__(self, type_, index):
        self.type, self.index = type_, index

    def __repr__(self):
        return f"device(type={self.type!r}, index={self.index})"


# ----------------------------------------------------------------------------- device arguments

def _use_pool_on(r, d):
    with use_mem_pool(r.pool, device=d):
        pass  # pragma: no cover


DEVICE_CALLS = {
    "set_device": lambda r, d: mtia.set_device(d),
    "device": lambda r, d: mtia.device(d),
    "synchronize": lambda r, d: mtia.synchronize(d),
    "current_stream": lambda r, d: mtia.current_stream(d),
    "default_stream": lambda r, d: mtia.default_stream(d),
    "Stream": lambda r, d: mtia.Stream(device=d),
    "Stream-handle": lambda r, d: mtia.Stream(stream_id=0, device_index=d),
    "Event": lambda r, d: mtia.Event(device=d),
    "get_device_properties": lambda r, d: mtia.get_device_properties(d),
    "get_device_capability": lambda r, d: mtia.get_device_capability(d),
    "empty": lambda r, d: mtia.empty(4, device=d),
    "get_per_process_memory_fraction": lambda r, d: mtia.get_per_process_memory_fraction(d),
    "memory_summary": lambda r, d: mtia.memory_summary(d),
    "memory_stats_as_nested_dict": lambda r, d: mtia.memory_stats_as_nested_dict(d),
    "memory_reserved": lambda r, d: mtia.memory_reserved(d),
    "reset_peak_memory_stats": lambda r, d: mtia.reset_peak_memory_stats(d),
    "reset_accumulated_memory_stats": lambda r, d: mtia.reset_accumulated_memory_stats(d),
    "get_rng_state": lambda r, d: mtia.get_rng_state(d),
    "set_rng_state": lambda r, d: mtia.set_rng_state(r.rng_state, d),
    "use_mem_pool": _use_pool_on,
    "fail_device_allocations": lambda r, d: emulator.fail_device_allocations(None, device=d),
    "check_invariants": lambda r, d: mtia.memory.check_invariants(d),
}

BAD_DEVICE_VALUES = [
    ("cuda:0", "cuda-0", r"Expected a mtia device, but got: 'cuda:0'"),
    ("mtia:x", "mtia-x", r"Invalid device string 'mtia:x'"),
    ("mtia:-1", "mtia-neg1", rf"Invalid device index -1: {RANGE}"),
    ("mtia:99", "mtia-99", rf"Invalid device index 99: {RANGE}"),
    (1.5, "float", r"Expected a mtia device .*but got: 1\.5"),
    (object(), "object", r"Expected a mtia device .*but got: <object object"),
]

DEVICE_CASES = [
    pytest.param(DEVICE_CALLS[name], value, message, id=f"{name}-{vid}")
    for name in DEVICE_CALLS for value, vid, message in BAD_DEVICE_VALUES
] + [
    # memory_stats and mem_get_info with the values tests/test_bad_input.py does not try
    pytest.param(lambda r, d: mtia.memory_stats(d), "mtia:x", r"Invalid device string 'mtia:x'",
                 id="memory_stats-mtia-x"),
    pytest.param(lambda r, d: mtia.memory_stats(d), "mtia:-1", rf"Invalid device index -1: {RANGE}",
                 id="memory_stats-mtia-neg1"),
    pytest.param(lambda r, d: mtia.mem_get_info(d), "mtia:x", r"Invalid device string 'mtia:x'",
                 id="mem_get_info-mtia-x"),
    pytest.param(lambda r, d: mtia.mem_get_info(d), "mtia:-1", rf"Invalid device index -1: {RANGE}",
                 id="mem_get_info-mtia-neg1"),
    # torch.device look-alikes and bools
    pytest.param(lambda r, d: mtia.set_device(d), DeviceLike("cuda", 0), r"Expected a mtia device, but got: device",
                 id="set_device-device-like-cuda"),
    pytest.param(lambda r, d: mtia.current_stream(d), DeviceLike("mtia", 99), rf"Invalid device index 99: {RANGE}",
                 id="current_stream-device-like-mtia-99"),
    pytest.param(lambda r, d: mtia.empty(4, device=d), DeviceLike("mtia", "1"), r"Invalid device index '1'",
                 id="empty-device-like-str-index"),
    pytest.param(lambda r, d: mtia.set_device(d), True, r"Expected a mtia device, but got: True",
                 id="set_device-bool"),
    pytest.param(lambda r, d: mtia.Event(device=d), " cuda ", r"Expected a mtia device, but got: ' cuda '",
                 id="Event-padded-cuda"),
]


@pytest.mark.parametrize("call, device, message", DEVICE_CASES)
def test_bad_device_argument(res, call, device, message):
    with state_unchanged(), pytest.raises(ValueError, match=message):
        call(res, device)


# ----------------------------------------------------------------------------- everything else

def _elapsed(start_timed, end_timed, record_start, record_end):
    start = mtia.Event(enable_timing=start_timed)
    end = mtia.Event(enable_timing=end_timed)
    if record_start:
        start.record()
    if record_end:
        end.record()
    start.synchronize()
    end.synchronize()
    return start.elapsed_time(end)


def _record_on_other_device(r):
    e = mtia.Event(device=0)
    e.record(mtia.current_stream(0))
    e.synchronize()
    e.record(mtia.current_stream(other_device()))


def _unknown_stream_on_other_device(r):
    return mtia.Stream(stream_id=r.side0.stream_id, device_index=other_device())


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


def _record_stream_other_device(r):
    mtia.record_stream(r.ptr, mtia.current_stream(other_device()))


def _alloc_on_stream_of_other_device(r):
    mtia.caching_allocator_alloc(4096, other_device(), r.side0)


def _empty_on_stream_of_other_device(r):
    mtia.empty(4, device=other_device(), stream=r.side0)


def _libc():
    return ctypes.util.find_library("c") or "libc.so.6"


def _dummy_allocator():
    return PythonAllocator(lambda size, device, stream: 0, lambda ptr, size, device, stream: None)


BAD_STATE = np.full(40, 7, np.uint8)  # has_uint32 field = 0x07070707

CASES = [
    # ------------------------------------------------------------ streams
    pytest.param(lambda r: mtia.Stream(stream_id=12345, device_index=0), ValueError,
                 r"unknown stream 12345 on device 0", id="Stream-unknown-id"),
    pytest.param(lambda r: mtia.Stream(stream_id=-3, device_index=0), ValueError,
                 r"unknown stream -3 on device 0", id="Stream-negative-id"),
    pytest.param(lambda r: mtia.Stream(stream_id=1 << 70, device_index=0), ValueError,
                 r"unknown stream 1180591620717411303424 on device 0", id="Stream-id-beyond-int64"),
    pytest.param(_unknown_stream_on_other_device, ValueError, r"unknown stream \d+ on device 1",
                 id="Stream-id-of-another-device"),
    pytest.param(lambda r: mtia.Stream(stream_id="0", device_index=0), TypeError,
                 r"stream_id must be an int, got str", id="Stream-id-str"),
    pytest.param(lambda r: mtia.Stream(stream_id=0.0, device_index=0), TypeError,
                 r"stream_id must be an int, got float", id="Stream-id-float"),
    pytest.param(lambda r: mtia.Stream(stream_id=True, device_index=0), TypeError,
                 r"stream_id must be an int, got bool", id="Stream-id-bool"),
    pytest.param(lambda r: mtia.Stream(stream_id=0, device_index=0, device_type=1), ValueError,
                 r"device_type must be 19 \(MTIA\), got 1", id="Stream-handle-cuda-device-type"),
    pytest.param(lambda r: mtia.Stream(priority="high"), TypeError, r"priority must be an int, got str",
                 id="Stream-priority-str"),
    pytest.param(lambda r: r.side0.wait_event(r.side0), TypeError, r"wait_event expects an Event, got Stream",
                 id="wait_event-stream"),
    pytest.param(lambda r: r.side0.wait_stream(mtia.Event()), TypeError, r"wait_stream expects a Stream, got Event",
                 id="wait_stream-event"),
    pytest.param(lambda r: r.side0.record_event("e"), TypeError, r"record_event expects an Event or None, got str",
                 id="record_event-str"),
    pytest.param(lambda r: mtia.set_stream(0), TypeError, r"set_stream expects a Stream, got int",
                 id="set_stream-int"),
    pytest.param(lambda r: mtia.set_stream(mtia.Event()), TypeError, r"set_stream expects a Stream, got Event",
                 id="set_stream-event"),
    pytest.param(lambda r: mtia.stream(0), TypeError, r"stream expects an mtia_alloc.Stream or None, got int",
                 id="stream-ctx-int"),
    pytest.param(lambda r: mtia.StreamContext("s"), TypeError,
                 r"stream expects an mtia_alloc.Stream or None, got str", id="StreamContext-str"),
    # ------------------------------------------------------------ events
    pytest.param(lambda r: _elapsed(False, True, True, True), ValueError,
                 r"^Both events must be created with argument 'enable_timing=True'$", id="elapsed-start-untimed"),
    pytest.param(lambda r: _elapsed(True, False, True, True), ValueError,
                 r"^Both events must be created with argument 'enable_timing=True'$", id="elapsed-end-untimed"),
    pytest.param(lambda r: _elapsed(True, True, False, True), ValueError,
                 r"^Both events must be recorded before calculating elapsed time$", id="elapsed-start-unrecorded"),
    pytest.param(lambda r: _elapsed(True, True, True, False), ValueError,
                 r"^Both events must be recorded before calculating elapsed time$", id="elapsed-end-unrecorded"),
    pytest.param(lambda r: mtia.Event(enable_timing=True).elapsed_time(1.0), TypeError,
                 r"elapsed_time expects an Event, got float", id="elapsed-non-event"),
    pytest.param(_record_on_other_device, ValueError,
                 r"^Event device index 0 does not match recording stream's device index 1$",
                 id="Event-record-other-device-after-first-record"),
    pytest.param(lambda r: mtia.Event().record(0), TypeError, r"record expects a Stream, got int",
                 id="Event-record-int"),
    pytest.param(lambda r: mtia.Event().wait("s"), TypeError, r"wait expects a Stream, got str",
                 id="Event-wait-str"),
    # ------------------------------------------------------------ emulator kernels
    pytest.param(lambda r: emulator.launch(42), TypeError, r"launch expects a callable, got int",
                 id="launch-non-callable"),
    pytest.param(lambda r: emulator.launch(print, stream=0), TypeError,
                 r"stream must be an mtia_alloc.Stream or None, got int", id="launch-stream-int"),
    pytest.param(lambda r: emulator.sleep(-1), ValueError, r"ms must be between 0 and 3600000, got -1",
                 id="sleep-negative"),
    pytest.param(lambda r: emulator.sleep(1e12), ValueError, r"ms must be between 0 and 3600000",
                 id="sleep-huge"),
    pytest.param(lambda r: emulator.sleep(float("nan")), ValueError, r"ms must be between 0 and 3600000, got nan",
                 id="sleep-nan"),
    pytest.param(lambda r: emulator.sleep("5"), TypeError, r"ms must be a number, got str", id="sleep-str"),
    pytest.param(lambda r: emulator.sleep(None), TypeError, r"ms must be a number, got NoneType", id="sleep-None"),
    pytest.param(lambda r: emulator.copy_(r.a4, r.a8), ValueError,
                 r"copy_ needs arrays of equal size, got 16 and 32 bytes", id="copy-mismatched-sizes"),
    pytest.param(lambda r: emulator.copy_(r.a4, np.zeros(4, np.float32)), TypeError,
                 r"copy_ expects two DeviceArrays", id="copy-numpy-source"),
    pytest.param(lambda r: emulator.copy_([0.0] * 4, r.a4), TypeError, r"copy_ expects two DeviceArrays",
                 id="copy-list-destination"),
    pytest.param(lambda r: emulator.fill_(r.a4, "abc"), TypeError,
                 r"cannot fill a float32 array with 'abc'", id="fill-str-into-float32"),
    pytest.param(lambda r: emulator.fill_(r.u8, 1000), TypeError, r"cannot fill a uint8 array with 1000",
                 id="fill-out-of-range-into-uint8"),
    pytest.param(lambda r: emulator.fill_(r.a4, None), TypeError, r"cannot fill a float32 array with None",
                 id="fill-None"),
    pytest.param(lambda r: emulator.fill_(r.a4, [1.0, 2.0]), TypeError, r"fill_ value must be a scalar",
                 id="fill-sequence"),
    pytest.param(lambda r: emulator.fill_(np.zeros(4), 1.0), TypeError, r"fill_ expects a DeviceArray",
                 id="fill-numpy-destination"),
    pytest.param(lambda r: emulator.fill_(r.a4, 1.0, stream="s"), TypeError,
                 r"stream must be an mtia_alloc.Stream or None, got str", id="fill-stream-str"),
    pytest.param(lambda r: emulator.fail_device_allocations(-1), ValueError,
                 r"after_n must be a non-negative int below 2\*\*63, got -1", id="fail-after-negative"),
    pytest.param(lambda r: emulator.fail_device_allocations(1, every=-2), ValueError,
                 r"every must be a non-negative int below 2\*\*63, got -2", id="fail-every-negative"),
    pytest.param(lambda r: emulator.fail_device_allocations(1.5), ValueError,
                 r"after_n must be a non-negative int below 2\*\*63, got 1\.5", id="fail-after-float"),
    pytest.param(lambda r: emulator.configure(device_count=4), RuntimeError,
                 r"emulator.configure\(\) must be called before mtia_alloc is initialized",
                 id="configure-after-init"),
    pytest.param(lambda r: emulator.configure(memory_per_device="abc"), RuntimeError,
                 r"must be called before mtia_alloc is initialized", id="configure-bad-type-after-init"),
    # ------------------------------------------------------------ empty(): dtypes and shapes
    pytest.param(lambda r: mtia.empty(4, dtype=object), TypeError, r"invalid dtype .*plain numeric data",
                 id="empty-dtype-object"),
    pytest.param(lambda r: mtia.empty(4, dtype="float1024"), TypeError, r"invalid dtype 'float1024'",
                 id="empty-dtype-float1024"),
    pytest.param(lambda r: mtia.empty(4, dtype="V0"), TypeError, r"invalid dtype 'V0'", id="empty-dtype-void0"),
    pytest.param(lambda r: mtia.empty(4, dtype=[("a", "O"), ("b", "f4")]), TypeError,
                 r"plain numeric data", id="empty-dtype-struct-with-object"),
    pytest.param(lambda r: mtia.empty(4, dtype=[("a", "i4", -1)]), TypeError, r"invalid dtype",
                 id="empty-dtype-negative-subarray"),
    pytest.param(lambda r: mtia.empty(4, dtype=3), TypeError, r"invalid dtype 3", id="empty-dtype-int"),
    pytest.param(lambda r: mtia.empty(-4), ValueError, r"shape entries must be non-negative",
                 id="empty-shape-negative"),
    pytest.param(lambda r: mtia.empty((3, -1)), ValueError, r"shape entries must be non-negative, got \(3, -1\)",
                 id="empty-shape-negative-entry"),
    pytest.param(lambda r: mtia.empty(4.0), TypeError, r"shape must be an int or a tuple of ints, got float",
                 id="empty-shape-float"),
    pytest.param(lambda r: mtia.empty((2, 2.5)), TypeError, r"shape entries must be ints, got 2\.5",
                 id="empty-shape-float-entry"),
    pytest.param(lambda r: mtia.empty("4"), TypeError, r"shape entries must be ints, got '4'",
                 id="empty-shape-str"),
    pytest.param(lambda r: mtia.empty(None), TypeError, r"shape must be an int or a tuple of ints, got NoneType",
                 id="empty-shape-None"),
    pytest.param(lambda r: mtia.empty((1 << 40, 1 << 40)), mtia.OutOfMemoryError,
                 r"more than 1EB memory \(an array of shape \(1099511627776, 1099511627776\)",
                 id="empty-shape-product-2^82-bytes"),
    pytest.param(lambda r: mtia.empty((1 << 62, 4)), mtia.OutOfMemoryError, r"more than 1EB memory",
                 id="empty-shape-product-wraps-to-0-in-64-bits"),
    pytest.param(lambda r: mtia.empty(1 << 61, "float32"), mtia.OutOfMemoryError, r"more than 1EB memory",
                 id="empty-nbytes-2^63"),
    pytest.param(lambda r: mtia.empty(1 << 70), mtia.OutOfMemoryError, r"more than 1EB memory",
                 id="empty-shape-int-2^70"),
    pytest.param(lambda r: mtia.empty((0, 1 << 70)), ValueError, r"shape entries must be less than 2\*\*63",
                 id="empty-shape-zero-times-2^70"),
    pytest.param(lambda r: mtia.empty(4, stream=0), TypeError, r"stream must be an mtia_alloc.Stream, got int",
                 id="empty-stream-int"),
    pytest.param(_empty_on_stream_of_other_device, ValueError, r"is on device 0, not on device 1",
                 id="empty-stream-of-another-device"),
    pytest.param(_alloc_on_stream_of_other_device, ValueError, r"is on device 0, not on device 1",
                 id="alloc-stream-of-another-device"),
    pytest.param(lambda r: mtia.caching_allocator_alloc(4096, stream="s"), TypeError,
                 r"stream must be an mtia_alloc.Stream, got str", id="alloc-stream-str"),
    pytest.param(lambda r: mtia.caching_allocator_delete("0x10"), TypeError, r"ptr must be an int, got str",
                 id="delete-str"),
    pytest.param(lambda r: mtia.caching_allocator_delete(-4096), RuntimeError, r"invalid device pointer: -4096",
                 id="delete-negative"),
    pytest.param(lambda r: mtia.caching_allocator_delete(1 << 70), RuntimeError, r"invalid device pointer: 0x4",
                 id="delete-beyond-64-bits"),
    # ------------------------------------------------------------ history, snapshots, metadata
    pytest.param(lambda r: mtia.record_memory_history(enabled="everything"), ValueError,
                 r"^expected state to be 'state', 'all', or None$", id="history-enabled-bad"),
    pytest.param(lambda r: mtia.record_memory_history(context="stacks"), ValueError,
                 r"^expected context to be 'state', 'alloc', 'all', or None$", id="history-context-bad"),
    pytest.param(lambda r: mtia.record_memory_history(context=True), ValueError,
                 r"^expected context to be 'state', 'alloc', 'all', or None$", id="history-context-bool"),
    pytest.param(lambda r: mtia.record_memory_history(stacks=None), ValueError,
                 r"^expected stacks to be 'python', or 'all'$", id="history-stacks-None"),
    pytest.param(lambda r: mtia.record_memory_history(max_entries="100"), TypeError,
                 r"max_entries must be an int, got str", id="history-max-entries-str"),
    pytest.param(lambda r: mtia.record_memory_history(max_entries=-5), ValueError,
                 r"max_entries must be non-negative, got -5", id="history-max-entries-negative"),
    pytest.param(lambda r: mtia.record_memory_history(trace_alloc_max_entries=5), TypeError,
                 r"unexpected keyword arguments \['trace_alloc_max_entries'\]", id="history-legacy-kwarg-new-form"),
    pytest.param(lambda r: mtia.memory._record_memory_history(True, bogus=1), TypeError,
                 r"unexpected keyword arguments \['bogus'\]", id="history-legacy-unknown-kwarg"),
    pytest.param(lambda r: mtia.memory_snapshot((0, 1, 2)), TypeError,
                 r"expected a MemPool or a \(int, int\) pool id, got \(0, 1, 2\)", id="memory_snapshot-3-tuple"),
    pytest.param(lambda r: mtia.memory_snapshot("pool"), TypeError, r"expected a MemPool or a \(int, int\) pool id",
                 id="memory_snapshot-str"),
    pytest.param(lambda r: mtia.memory_snapshot((0, -1)), TypeError, r"expected a MemPool or a \(int, int\) pool id",
                 id="memory_snapshot-negative-half"),
    pytest.param(lambda r: mtia.memory_snapshot((0, 1 << 64)), TypeError,
                 r"expected a MemPool or a \(int, int\) pool id", id="memory_snapshot-half-beyond-64-bits"),
    pytest.param(lambda r: mtia.memory._set_memory_metadata(b"x"), TypeError, r"metadata must be a str, got bytes",
                 id="set_memory_metadata-bytes"),
    pytest.param(lambda r: mtia.set_per_process_memory_fraction(float("nan"), 0), ValueError, r"fraction",
                 id="fraction-nan"),
    pytest.param(lambda r: mtia.set_per_process_memory_fraction(0.5, "mtia:x"), ValueError,
                 r"Invalid device string 'mtia:x'", id="fraction-bad-device-string"),
    pytest.param(lambda r: mtia.attach_out_of_memory_observer("print"), TypeError, r"observer must be callable",
                 id="oom-observer-not-callable"),
    # ------------------------------------------------------------ allocator settings (§10.4), not in test_config
    pytest.param(lambda r: mtia.memory._set_allocator_settings(3), TypeError, r"settings must be a str, got int",
                 id="settings-not-str"),
    *[pytest.param(lambda r, conf=conf: mtia.memory._set_allocator_settings(conf), exc, message, id=f"settings-{sid}")
      for conf, sid, exc, message in [
          ("max_split_size_mb:-5", "negative-size", RuntimeError,
           r"Expected a non-negative integer at index 2 in ConfigTokenizer but got '-5'"),
          ("max_split_size_mb:20.5", "fractional-size", RuntimeError,
           r"Expected a non-negative integer at index 2 in ConfigTokenizer but got '20\.5'"),
          ("max_split_size_mb:0x20", "hex-size", RuntimeError, r"Expected a non-negative integer .* got '0x20'"),
          ("max_split_size_mb:99999999999999999999999", "size-overflow", RuntimeError,
           r"Expected a non-negative integer .* got '99999999999999999999999'"),
          ("max_non_split_rounding_mb:abc", "non-split-rounding-abc", RuntimeError,
           r"Expected a non-negative integer .* got 'abc'"),
          ("garbage_collection_threshold:x", "threshold-not-a-number", RuntimeError,
           r"Expected a number at index 2 in ConfigTokenizer but got 'x'"),
          ("garbage_collection_threshold:-0.5", "threshold-negative", RuntimeError,
           r"garbage_collect_threshold is invalid, set it in \(0\.0, 1\.0\)"),
          ("garbage_collection_threshold:nan", "threshold-nan", RuntimeError,
           r"garbage_collect_threshold is invalid, set it in \(0\.0, 1\.0\)"),
          ("expandable_segments:TRUE", "bool-uppercase", ValueError,
           r"Expected 'True' or 'False' at index 2 in ConfigTokenizer but got 'TRUE'"),
          ("max_split_size_mb:100,expandable_segments:maybe", "bool-after-valid-key", ValueError,
           r"Expected 'True' or 'False' at index 6 in ConfigTokenizer but got 'maybe'"),
          ("expandable_segments", "missing-colon-and-value", RuntimeError, r"Index out of bounds in ConfigTokenizer"),
          (":", "lone-colon", RuntimeError, r"Index out of bounds in ConfigTokenizer"),
          ("max_split_size_mb:20:30", "two-values", RuntimeError,
           r"Error parsing CachingAllocator settings, expected , at index 3 but got ':'"),
          ("roundup_power2_divisions:[:1]", "list-missing-key", RuntimeError,
           r"Error parsing CachingAllocator settings, expected :"),
          ("roundup_power2_divisions:256:1]", "list-missing-open-bracket", RuntimeError,
           r"Error parsing CachingAllocator settings, expected , at index 3"),
          ("roundup_power2_divisions:[0:2]", "list-key-zero", RuntimeError,
           r"For roundups, the intervals have to be power of 2"),
          ("roundup_power2_divisions:[256:1,>:6]", "list-default-not-power-of-2", RuntimeError,
           r"For roundups, the divisions has to be power of 2 or 0 to disable roundup"),
          ("garbage_collection_threshold:0.5,roundup_power2_divisions:[64:2,128:4", "unclosed-after-valid",
           RuntimeError,
           r"Expected closing bracket '\]' in ConfigTokenizer but reached end of config"),
          ("backend:cudaMallocAsync", "backend-async", RuntimeError, r"Unknown allocator backend 'cudaMallocAsync'"),
          ("Max_Split_Size_MB:100", "key-wrong-case", RuntimeError,
           r"Unrecognized key 'Max_Split_Size_MB' in Accelerator allocator config\."),
      ]],
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
    # ------------------------------------------------------------ record_stream
    pytest.param(lambda r: mtia.record_stream(r.ptr, 0), TypeError,
                 r"record_stream expects an mtia_alloc.Stream, got int", id="record_stream-int-stream"),
    pytest.param(_record_stream_other_device, ValueError, r"is on device 1, but block 0x[0-9a-f]+ is on device 0",
                 id="record_stream-stream-of-another-device"),
    pytest.param(lambda r: mtia.record_stream(0x7F00_DEAD_0000, r.side0), RuntimeError,
                 r"invalid device pointer: 0x7f00dead0000", id="record_stream-unknown-pointer"),
    pytest.param(lambda r: mtia.record_stream(r.ptr + 512, r.side0), RuntimeError, r"invalid device pointer",
                 id="record_stream-interior-pointer"),
    pytest.param(lambda r: mtia.record_stream(float(r.ptr), r.side0), TypeError, r"ptr must be an int, got float",
                 id="record_stream-float-pointer"),
    pytest.param(lambda r: mtia.record_stream(-1, r.side0), RuntimeError, r"invalid device pointer",
                 id="record_stream-negative-pointer"),
    pytest.param(lambda r: r.a4.record_stream("s"), TypeError, r"record_stream expects an mtia_alloc.Stream",
                 id="DeviceArray-record_stream-str"),
    # ------------------------------------------------------------ RNG
    pytest.param(lambda r: mtia.set_rng_state(b"\x00" * 40), TypeError, r"RNG state must be a uint8 array",
                 id="set_rng_state-bytes"),
    pytest.param(lambda r: mtia.set_rng_state("garbage"), TypeError, r"RNG state must be a uint8 array",
                 id="set_rng_state-str"),
    pytest.param(lambda r: mtia.set_rng_state(None), TypeError, r"RNG state must be a uint8 array",
                 id="set_rng_state-None"),
    pytest.param(lambda r: mtia.set_rng_state(np.zeros(3, np.uint8)), ValueError,
                 r"RNG state must have 40 bytes, got 3",
                 id="set_rng_state-short"),
    pytest.param(lambda r: mtia.set_rng_state(np.zeros(40, np.float32)), TypeError, r"got float32 with shape \(40,\)",
                 id="set_rng_state-float32"),
    pytest.param(lambda r: mtia.set_rng_state(np.zeros((5, 8), np.uint8)), TypeError, r"1-d uint8 array",
                 id="set_rng_state-2d"),
    pytest.param(lambda r: mtia.set_rng_state(BAD_STATE), ValueError, r"bad has_uint32 field",
                 id="set_rng_state-corrupt"),
    pytest.param(lambda r: mtia.set_rng_state_all([r.rng_state, b"x"]), TypeError, r"RNG state must be a uint8 array",
                 id="set_rng_state_all-garbage"),
    pytest.param(lambda r: mtia.manual_seed(1.5), TypeError, r"seed must be an int, got float", id="manual_seed-float"),
    pytest.param(lambda r: mtia.manual_seed("42"), TypeError, r"seed must be an int, got str", id="manual_seed-str"),
    pytest.param(lambda r: mtia.manual_seed(True), TypeError, r"seed must be an int, got bool", id="manual_seed-bool"),
    pytest.param(lambda r: mtia.manual_seed_all(None), TypeError, r"seed must be an int, got NoneType",
                 id="manual_seed_all-None"),
]


@pytest.mark.parametrize("call, exc, message", CASES)
def test_bad_input(res, call, exc, message):
    mtia.synchronize()
    mtia.empty_cache()
    with state_unchanged(), pytest.raises(exc, match=message):
        call(res)
    assert not mtia.is_current_stream_capturing()


# ----------------------------------------------------------------------------- fresh interpreters

PROBE = "import mtia_alloc as m\nm.caching_allocator_delete(m.caching_allocator_alloc(4096))\nprint('initialised')\n"

ENV_CASES = {
    # id: (environment, code, exception type name, message fragment)
    "devices-0": ({"MTIA_EMULATOR_DEVICES": "0"}, PROBE, "ValueError",
                  r"MTIA_EMULATOR_DEVICES must be between 1 and 64, got 0"),
    "devices-abc": ({"MTIA_EMULATOR_DEVICES": "abc"}, PROBE, "ValueError",
                    r"MTIA_EMULATOR_DEVICES must be a whole number of devices, got 'abc'"),
    "devices-100": ({"MTIA_EMULATOR_DEVICES": "100"}, PROBE, "ValueError",
                    r"MTIA_EMULATOR_DEVICES must be between 1 and 64, got 100"),
    "devices-1.5": ({"MTIA_EMULATOR_DEVICES": "1.5"}, PROBE, "ValueError",
                    r"MTIA_EMULATOR_DEVICES must be a whole number of devices, got '1\.5'"),
    "memory--1": ({"MTIA_EMULATOR_MEMORY": "-1"}, PROBE, "ValueError",
                  r"MTIA_EMULATOR_MEMORY: '-1' is out of range"),
    "memory-abc": ({"MTIA_EMULATOR_MEMORY": "abc"}, PROBE, "ValueError",
                   r"MTIA_EMULATOR_MEMORY: cannot parse 'abc' as a memory size"),
    "memory-1PiB": ({"MTIA_EMULATOR_MEMORY": "1PiB"}, PROBE, "ValueError",
                    r"MTIA_EMULATOR_MEMORY: cannot parse '1PiB' as a memory size"),
    "memory-100-bytes": ({"MTIA_EMULATOR_MEMORY": "100"}, PROBE, "ValueError",
                         r"MTIA_EMULATOR_MEMORY must be at least 1 MiB, got '100'"),
    "memory-512KiB": ({"MTIA_EMULATOR_MEMORY": "512KiB"}, PROBE, "ValueError",
                      r"MTIA_EMULATOR_MEMORY must be at least 1 MiB, got '512KiB'"),
    "alloc-conf-bogus": ({"MTIA_ALLOC_CONF": "bogus:1"}, PROBE, "RuntimeError",
                         r"MTIA_ALLOC_CONF='bogus:1': Unrecognized key 'bogus' in Accelerator allocator config\."),
    "alloc-conf-bad-bool": ({"MTIA_ALLOC_CONF": "expandable_segments:true"}, PROBE, "ValueError",
                            r"MTIA_ALLOC_CONF='expandable_segments:true': Expected 'True' or 'False'"),
    "alloc-conf-bad-number": ({"MTIA_ALLOC_CONF": "max_split_size_mb:abc"}, PROBE, "RuntimeError",
                              r"MTIA_ALLOC_CONF='max_split_size_mb:abc': Expected a non-negative integer"),
    "configure-count-str": ({}, "import mtia_alloc as m\nm.emulator.configure(device_count='2')\n", "TypeError",
                            r"device_count must be an int, got str"),
    "configure-count-0": ({}, "import mtia_alloc as m\nm.emulator.configure(device_count=0)\n", "ValueError",
                          r"device_count must be between 1 and 64, got 0"),
    "configure-memory-float": ({}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device=1.5e9)\n",
                               "TypeError", r"memory_per_device must be an int number of bytes or a string"),
    "configure-memory-abc": ({}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device='abc')\n",
                             "ValueError", r"memory_per_device: cannot parse 'abc'"),
    "configure-memory-100-bytes": ({}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device='100')\n",
                                   "ValueError", r"memory_per_device must be at least 1 MiB, got '100'"),
    "configure-memory-1PiB-int": ({}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device=1 << 50)\n",
                                  "ValueError", r"memory_per_device must be at most 64 TiB"),
    "configure-runtime-reserved-bool": ({}, "import mtia_alloc as m\nm.emulator.configure(runtime_reserved=True)\n",
                                        "TypeError", r"runtime_reserved must be an int number of bytes or a string"),
    "configure-runtime-reserved-negative": ({}, "import mtia_alloc as m\nm.emulator.configure(runtime_reserved=-1)\n",
                                            "ValueError", r"runtime_reserved must be >= 0, got -1"),
    "configure-runtime-reserved-whole-device": (
        {}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device='8MiB', runtime_reserved='8MiB')\n",
        "ValueError", r"runtime_reserved \(8388608 bytes\) must be less than memory_per_device \(8388608 bytes\)"),
    "configure-runtime-reserved-over-env-memory": (
        {"MTIA_EMULATOR_MEMORY": "4MiB"}, "import mtia_alloc as m\nm.emulator.configure(runtime_reserved='4MiB')\n" + PROBE,
        "ValueError", r"emulator.configure\(runtime_reserved=4194304\) must be less than the device memory"),
    "deferred-set_rng_state-bad-device": (
        {}, "import numpy, mtia_alloc as m\nm.set_rng_state(numpy.zeros(40, numpy.uint8), 9)\n" + PROBE,
        "DeferredMtiaCallError", r"MTIA call failed lazily at initialization with error: Invalid device index 9"),
}


def _run_fresh(env, code):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    full_env.update(env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mtia.__file__)))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def fresh_runs():
    """Every ENV_CASES interpreter, run in parallel once for the module."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {cid: pool.submit(_run_fresh, env, code) for cid, (env, code, _, _) in ENV_CASES.items()}
        return {cid: f.result() for cid, f in futures.items()}


@pytest.mark.parametrize("case_id", list(ENV_CASES), ids=list(ENV_CASES))
def test_malformed_setting_in_a_fresh_interpreter(fresh_runs, case_id):
    _, _, exc_name, message = ENV_CASES[case_id]
    proc = fresh_runs[case_id]
    assert proc.returncode != 0, proc.stdout
    assert "initialised" not in proc.stdout
    assert "Fatal" not in proc.stderr and "Segmentation" not in proc.stderr, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert re.search(rf"^(\w+\.)*{exc_name}: ", proc.stderr, re.M), proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


# ----------------------------------------------------------------------------- raising observers and allocators

class Boom(Exception):
    pass


_raising_observer = {"armed": False, "calls": []}


def _observer(device, alloc_size, total, free):
    _raising_observer["calls"].append((device, alloc_size))
    if _raising_observer["armed"]:
        raise Boom(f"observer refused {alloc_size} bytes on device {device}")


_observer_attached = []


@pytest.fixture
def raising_observer():
    """An OOM observer that raises while the test runs. Observers cannot be detached: it is
    attached once and disarmed after the test, so later tests never see it raise."""
    if not _observer_attached:
        mtia.attach_out_of_memory_observer(_observer)
        _observer_attached.append(True)
    _raising_observer["calls"].clear()
    _raising_observer["armed"] = True
    try:
        yield _raising_observer["calls"]
    finally:
        _raising_observer["armed"] = False


def _too_big(device=0):
    return _C.mem_get_info(device)[1] + (1 << 30)


def test_oom_observer_that_raises_propagates_and_leaves_the_allocator_usable(raising_observer):
    mtia.synchronize()
    mtia.empty_cache()
    with state_unchanged(allow=OOM_COUNTERS):
        ooms = mtia.memory_stats(0)["num_ooms"]
        with pytest.raises(Boom, match="observer refused") as info:
            mtia.caching_allocator_alloc(_too_big(0), 0)
        assert isinstance(info.value.__context__, mtia.OutOfMemoryError)  # raised while handling the OOM
        assert mtia.memory_stats(0)["num_ooms"] == ooms + 1
        assert raising_observer == [(0, _too_big(0))]
        with pytest.raises(Boom):
            mtia.empty(_too_big(0) // 4)  # the same through empty()
    ptr = mtia.caching_allocator_alloc(1 << 20, 0)  # still usable
    mtia.caching_allocator_delete(ptr)
    mtia.memory.check_invariants()


class HostAllocator:
    """alloc_fn/free_fn of a PythonAllocator over numpy host buffers; either may be made to raise."""

    def __init__(self):
        self.buffers = {}
        self.alloc_raises = self.free_raises = False

    def alloc(self, size, device, stream):
        if self.alloc_raises:
            raise Boom(f"alloc_fn refused {size} bytes")
        buf = np.empty(size + 512, np.uint8)
        ptr = (buf.ctypes.data + 511) & ~511
        self.buffers[ptr] = buf
        return ptr

    def free(self, ptr, size, device, stream):
        del self.buffers[ptr]
        if self.free_raises:
            raise Boom(f"free_fn failed on {ptr:#x}")


def test_python_allocator_whose_alloc_fn_raises():
    host = HostAllocator()
    pool = MemPool(allocator=PythonAllocator(host.alloc, host.free))
    host.alloc_raises = True
    mtia.synchronize()
    mtia.empty_cache()
    with state_unchanged(allow=OOM_COUNTERS):
        with use_mem_pool(pool), pytest.raises(mtia.OutOfMemoryError, match="MTIA out of memory") as info:
            mtia.caching_allocator_alloc(4096)
        assert isinstance(info.value.__cause__, Boom)
        assert "alloc_fn refused" in str(info.value.__cause__)
        assert pool.use_count() == 1
        assert mtia.memory_snapshot(pool.id) == []
    host.alloc_raises = False  # the same pool works once the raw allocator does
    with use_mem_pool(pool):
        a = mtia.empty(1000)
    assert mtia.memory_snapshot(pool.id)[0]["segment_pool_id"] == pool.id
    del a, pool
    gc.collect()
    mtia.empty_cache()
    assert host.buffers == {}
    mtia.memory.check_invariants()


def test_python_allocator_whose_free_fn_raises(monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    host = HostAllocator()
    mtia.synchronize()
    mtia.empty_cache()
    before = {d: mtia.memory_stats(d) for d in DEVICES}
    pool = MemPool(allocator=PythonAllocator(host.alloc, host.free))
    with use_mem_pool(pool):
        a = mtia.empty(1000)
    assert mtia.memory_reserved(0) > before[0]["reserved_bytes.all.current"]
    host.free_raises = True
    del a, pool  # the pool dies: its now free segment goes back through free_fn, which raises
    gc.collect()
    mtia.empty_cache()
    assert [type(u.exc_value) for u in unraisable] == [Boom]
    assert "free_fn failed" in str(unraisable[0].exc_value)
    assert host.buffers == {}
    after = mtia.memory_stats(0)
    for key in ("reserved_bytes.all.current", "allocated_bytes.all.current", "segment.all.current",
                "active_bytes.all.current"):
        assert after[key] == before[0][key], key  # the segment is gone from the stats all the same
    assert after["num_device_free"] == before[0]["num_device_free"] + 1
    mtia.memory.check_invariants()


# ----------------------------------------------------------------------------- must work

def test_free_of_a_graph_pool_block_after_reset(res):
    mtia.synchronize()
    mtia.empty_cache()
    base = {d: _C.mem_get_info(d) for d in DEVICES}
    allocated, reserved = mtia.memory_allocated(0), mtia.memory_reserved(0)
    g = mtia.MTIAGraph()
    with mtia.stream(res.side0):
        g.capture_begin()
        out = mtia.empty(1000)
        emulator.fill_(out, 1.0)
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


def test_dtype_none_means_float32():
    a = mtia.empty(4, dtype=None)
    assert a.dtype == np.float32 and a.nbytes == 16
    del a


def test_out_of_range_priority_maps_to_the_nearest_valid_one():
    """As torch.Stream: no error for a priority outside the range (it used to overflow a C int)."""
    with state_unchanged():
        assert mtia.Stream(priority=1 << 40).priority == (1 << 31) - 1
        assert mtia.Stream(priority=-(1 << 40)).priority == -(1 << 31)


def test_nested_use_of_one_pool_leaves_the_outer_context_working(res):
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

