"""Benchmarks of the emulated backend (pytest-benchmark; not part of the default test run,
which only collects tests/):

    python -m pytest bench/test_bench_streams.py --benchmark-only

* launching a no-op Python kernel on a stream and synchronizing it (a worker wake-up, the GIL
  hand-over to the worker and back, and the wait);
* a native sleep(0) kernel + synchronize (the same round trip without Python on the worker);
* mtia.empty(1024) + release (the DeviceArray path over the caching allocator's fast path);
* for comparison, a raw caching_allocator_alloc/delete pair of 4 KiB.
"""
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator


def _noop():
    pass


@pytest.fixture(scope="module")
def stream():
    s = mtia.Stream(device=0)
    emulator.launch(_noop, stream=s)  # start the worker thread outside the timings
    s.synchronize()
    return s


def test_launch_noop_python_kernel_and_synchronize(benchmark, stream):
    launch, sync = emulator.launch, stream.synchronize

    def run():
        launch(_noop, stream=stream)
        sync()

    benchmark(run)
    assert stream.query()


def test_native_sleep0_and_synchronize(benchmark, stream):
    sleep, sync = emulator.sleep, stream.synchronize

    def run():
        sleep(0, stream=stream)
        sync()

    benchmark(run)
    assert stream.query()


def test_empty_1024_and_release(benchmark):
    empty = mtia.empty
    before = mtia.memory_allocated(0)

    def run():
        empty(1024)  # the array dies at once: its block goes back to the cache

    benchmark(run)
    assert mtia.memory_allocated(0) == before


def test_raw_alloc_delete_4KiB(benchmark):
    alloc, delete = mtia.caching_allocator_alloc, mtia.caching_allocator_delete

    def run():
        delete(alloc(4096))

    benchmark(run)
