"""torch.cuda parity (issue 19 items 12 and 13): the deprecated memory aliases, the
allocator backend's name, stream priorities (range, clamping, positional form), elapsed_time
on an event still pending, pickling events and streams, device arguments of
Snapshot.stats, and integer-like (__index__) sizes and indices in the façade."""
import copy
import pickle
import threading

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from mtia_alloc import emulator
from mtia_alloc.memory import Snapshot


# ----------------------------------------------------------------------------- item 12

@pytest.mark.parametrize("name, target, text", [
    ("memory_cached", "memory_reserved", "torch.mtia.memory_cached has been renamed to torch.mtia.memory_reserved"),
    ("max_memory_cached", "max_memory_reserved",
     "torch.mtia.max_memory_cached has been renamed to torch.mtia.max_memory_reserved"),
])
def test_deprecated_cached_aliases_warn_and_answer(blocks, name, target, text):
    blocks.alloc(3 << 20)
    for module in (mtia.memory, mtia):
        with pytest.warns(FutureWarning, match=text):
            value = getattr(module, name)(0)
        assert value == getattr(mtia, target)(0) > 0


@pytest.mark.parametrize("name", ["reset_max_memory_allocated", "reset_max_memory_cached"])
def test_deprecated_reset_aliases_reset_the_peaks(blocks, name):
    p = blocks.alloc(8 << 20)
    blocks.free(p)
    assert mtia.max_memory_allocated(0) >= 8 << 20
    with pytest.warns(FutureWarning, match=rf"torch.mtia.{name} now calls torch.mtia.reset_peak_memory_stats, "
                                           r"which resets /all/ peak memory stats\."):
        getattr(mtia.memory, name)(0)
    assert mtia.max_memory_allocated(0) == mtia.memory_allocated(0)
    assert hasattr(mtia, name)


def test_get_allocator_backend_is_native():
    assert mtia.memory.get_allocator_backend() == "native"
    assert mtia.get_allocator_backend() == "native"


def test_get_allocator_backend_names_a_pluggable_allocator():
    import os, subprocess, sys, textwrap
    code = textwrap.dedent("""
        import ctypes, mtia_alloc as mtia
        assert mtia.memory.get_allocator_backend() == "native"
        libc = ctypes.CDLL(None)
        mtia.memory.change_current_allocator(mtia.memory.PythonAllocator(lambda *a: 0, lambda *a: None))
        print(mtia.memory.get_allocator_backend())
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(mtia.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "pluggable"


def test_priority_range_and_clamping():
    least, greatest = mtia.Stream.priority_range()
    assert (least, greatest) == (0, -3)
    assert mtia.Stream().priority_range() == (least, greatest)
    assert mtia.Stream(priority=10 ** 6).priority == least
    assert mtia.Stream(priority=-(10 ** 6)).priority == greatest
    assert mtia.Stream(priority=-2).priority == -2
    assert mtia.Stream(priority=1 << 70).priority == least


# ----------------------------------------------------------------------------- item 13

def test_two_positionals_are_device_and_priority():
    s = mtia.Stream(1, -1)
    assert (s.device_index, s.priority) == (1, -1)
    s = mtia.Stream("mtia:0", 5)
    assert (s.device_index, s.priority) == (0, 0)
    with pytest.raises(TypeError, match="multiple values for argument 'priority'"):
        mtia.Stream(0, -1, priority=-1)
    # three positionals stay torch.Stream's rebuild form
    r = mtia.Stream(s.stream_id, s.device_index, s.device_type)
    assert r == s
    with pytest.raises(TypeError, match="at most 3 positional"):
        mtia.Stream(0, 1, 2, 3)


def test_elapsed_time_on_a_pending_event_raises():
    s = mtia.Stream()
    start, end = mtia.Event(enable_timing=True), mtia.Event(enable_timing=True)
    gate = threading.Event()
    start.record(s)
    emulator.launch(lambda: gate.wait(30), stream=s)
    end.record(s)
    try:
        with pytest.raises(RuntimeError, match=r"^Both events must be completed before calculating elapsed "
                                               r"time\.$"):
            start.elapsed_time(end)
    finally:
        gate.set()
    end.synchronize()
    assert start.elapsed_time(end) >= 0


def test_event_pickling_is_refused_with_a_clear_message():
    e = mtia.Event()
    for attempt in (lambda: pickle.dumps(e), lambda: copy.copy(e), lambda: copy.deepcopy(e)):
        with pytest.raises(TypeError, match="^Event objects cannot be pickled$"):
            attempt()


def test_stream_pickling_is_refused_with_a_clear_message_and_copy_is_the_stream():
    s = mtia.Stream()
    with pytest.raises(TypeError, match="Stream objects cannot be pickled"):
        pickle.dumps(s)
    assert copy.copy(s) is s and copy.deepcopy(s) is s


def test_snapshot_stats_takes_every_device_form(blocks):
    blocks.alloc(4096, device=1)
    snap = Snapshot()

    class TorchDevice:
        type, index = "mtia", 1

    expected = snap.stats(device=1)
    for device in ("mtia:1", TorchDevice(), np.int64(1)):
        assert snap.stats(device=device) == expected
        assert snap.fragmentation(device) is not None
        assert "device ID 1" in snap.summary(device=device)
    with mtia.device(1):
        assert snap.stats(device="mtia") == expected
    with pytest.raises(ValueError, match="device 5 is not in this snapshot"):
        snap.stats(device=5)
    with pytest.raises(TypeError, match="device must be an integer"):
        snap.stats(device="cuda:0")


def test_facade_takes_index_integers(blocks):
    one = np.int64(1)
    assert mtia.memory_allocated(one) == mtia.memory_allocated(1)
    with mtia.device(one):
        assert mtia.current_device() == 1
    s = mtia.Stream(device=one, priority=np.int32(-1))
    assert (s.device_index, s.priority) == (1, -1)
    r = mtia.Stream(stream_id=np.int64(s.stream_id), device_index=one)
    assert r == s
    assert mtia.memory._round_size(np.uint32(1000)) == 1024
    e = mtia.Event(device=one)
    e.record(s)
    assert mtia.empty(np.int64(4), device=one).shape == (4,)
    assert mtia.memory_stats(np.int8(0))["num_alloc_retries"] >= 0


def test_more_facade_sizes_and_indices_take_index_integers(blocks):
    assert mtia.memory.format_size(np.int64(2048)) == "2.00 KiB"
    a = mtia.empty((np.int32(2), np.uint8(3)), "float32")
    assert a.shape == (2, 3) and all(type(n) is int for n in a.shape)
    mtia.set_device(np.int64(-1))  # ignored, as -1
    with mtia.device(np.int64(-1)):
        pass
    p = blocks.alloc(4096, device=0)
    mtia.record_stream(np.uint64(p), mtia.current_stream(0))
    emulator.sleep(np.int64(1))
    emulator.sleep(np.float32(0.5))
    emulator.fail_device_allocations(np.int64(5), np.int64(0), device=0)
    emulator.fail_device_allocations(None, device=0)
    mtia.manual_seed(np.uint32(7))
    pool = mtia.MemPool()
    assert mtia.memory.memory_snapshot((np.int64(pool.id[0]), np.int64(pool.id[1]))) == pool.snapshot()
    mtia.memory._record_memory_history("all", max_entries=np.int64(10))
    mtia.memory._record_memory_history(None)
    for bad in (True, 1.5, "3"):
        with pytest.raises(ValueError):
            mtia.memory.format_size(bad)
