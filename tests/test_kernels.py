"""Kernels on streams (API.md §4): asynchronous FIFO execution on the stream's worker, the
current stream by default, streams running independently, kernel errors surfacing at the
stream's or the device's synchronize() (and the stream working on), a failed kernel's
arguments released, the native sleep, and bad launch/sleep arguments.
"""
import gc
import threading
import time

import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
from helpers import BUSY_MS, MiB
from mtia_alloc.streams import KernelError


def test_kernels_run_asynchronously_in_fifo_order():
    s = mtia.Stream()
    ran = []
    emulator.sleep(BUSY_MS, stream=s)
    for i in range(200):
        emulator.launch(ran.append, i, stream=s)
    # launch returned at once: nothing ran yet, the stream is busy.
    assert ran == []
    assert not s.query()
    s.synchronize()
    assert s.query()
    assert ran == list(range(200))


def test_launch_uses_the_current_stream():
    s = mtia.Stream(device=1)
    seen = []
    with mtia.stream(s):
        emulator.sleep(BUSY_MS)
        emulator.launch(lambda: seen.append(threading.current_thread().ident))
    assert not s.query()
    assert mtia.default_stream(1).query()
    s.synchronize()
    assert len(seen) == 1 and seen[0] != threading.get_ident()  # ran on the stream's worker


def test_streams_run_concurrently_and_independently():
    slow, fast = mtia.Stream(), mtia.Stream()
    done = []
    emulator.sleep(BUSY_MS, stream=slow)
    emulator.launch(done.append, "slow", stream=slow)
    emulator.launch(done.append, "fast", stream=fast)
    fast.synchronize()  # does not wait for the other stream
    assert done == ["fast"]
    assert not slow.query()
    slow.synchronize()
    assert done == ["fast", "slow"]


def failing_kernel(message):
    raise ValueError(message)


def test_kernel_error_surfaces_at_the_stream_synchronize_and_the_stream_keeps_working():
    s = mtia.Stream()
    ran = []
    emulator.sleep(50, stream=s)
    emulator.launch(failing_kernel, "kernel boom", stream=s)
    emulator.launch(ran.append, "after", stream=s)  # later kernels still run
    with pytest.raises(KernelError) as info:
        s.synchronize()
    assert isinstance(info.value, RuntimeError)
    text = str(info.value)
    assert "ValueError: kernel boom" in text
    assert "failing_kernel" in text and "Kernel traceback" in text  # the kernel's traceback
    assert isinstance(info.value.__cause__, ValueError)
    assert ran == ["after"]
    s.synchronize()  # reported once
    emulator.launch(ran.append, "again", stream=s)
    s.synchronize()
    assert ran == ["after", "again"]
    assert s.query()


def test_kernel_error_surfaces_at_the_device_synchronize():
    s = mtia.Stream(device=1)
    emulator.launch(failing_kernel, "first", stream=s)
    emulator.launch(failing_kernel, "second", stream=mtia.default_stream(1))
    mtia.synchronize(0)  # another device: nothing to report
    with pytest.raises(KernelError, match=r"first|second") as info:
        mtia.synchronize(1)
    assert "1 more kernel error" in str(info.value)
    mtia.synchronize(1)
    s.synchronize()
    mtia.default_stream(1).synchronize()


def test_failed_kernel_does_not_keep_its_arguments_alive():
    s = mtia.Stream()
    before = mtia.memory_allocated(0)
    a = mtia.empty(MiB, "uint8", stream=s)
    emulator.launch(failing_kernel_with_array, a, stream=s)
    del a
    # The kernel ran (another stream waited for it, which observes no error of s); its
    # error is not collected yet.
    done = mtia.Stream()
    done.wait_event(s.record_event())
    done.synchronize()
    gc.collect()
    assert mtia.memory_allocated(0) == before
    with pytest.raises(KernelError, match="array kernel boom"):
        s.synchronize()


def failing_kernel_with_array(array):
    raise OSError("array kernel boom")


def test_launch_and_sleep_reject_bad_arguments():
    with pytest.raises(TypeError):
        emulator.launch("not callable")
    with pytest.raises(TypeError):
        emulator.launch(print, stream="stream")
    with pytest.raises(TypeError):
        emulator.sleep("10")
    with pytest.raises(ValueError):
        emulator.sleep(-1)
    with pytest.raises(RuntimeError):
        emulator.configure(device_count=3)  # only before init


def test_native_sleep_keeps_the_stream_busy_for_at_least_ms():
    s = mtia.Stream()
    start = time.perf_counter()
    emulator.sleep(BUSY_MS, stream=s)
    assert not s.query()
    s.synchronize()
    assert time.perf_counter() - start >= BUSY_MS / 1000 * 0.999
