"""Shared fixtures: restore the allocator's global state after every test, a `blocks`
helper that frees, at teardown, every block a test allocated and did not free itself, side
streams, an empty device 0, the objects of the bad-input cases, and a check at the end of the
session that nothing leaked (issue 7 item 5). Plain helpers are in helpers.py.

Every test runs in the same process as the others: tests measure DELTAS of memory_stats() and
free what they allocate (`blocks` frees what is still live at teardown); tests that need an
empty cache call mtia.empty_cache() first, or use `empty_device`."""
import gc
import os
import sys

import pytest

# tests/ has no __init__.py: make `import helpers` work whatever the import mode and cwd.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import mtia_alloc as mtia
import mtia_alloc._C
import mtia_alloc.memory
from mtia_alloc.streams import KernelError

from helpers import DEVICES, Resources, segments


def leaks():
    """What is still held on each device after a gc and empty_cache(): a list of
    (device, allocated, reserved, device bytes in use) for every device that is not empty."""
    gc.collect()
    for device in range(mtia.device_count()):
        try:
            mtia.synchronize(device)  # queued kernels hold their arrays until they have run
        except KernelError:
            pass  # an error a test left behind: not a leak
    gc.collect()
    mtia.empty_cache()
    out = []
    for device in range(mtia.device_count()):
        free, total = mtia_alloc._C.mem_get_info(device)
        used = total - free - mtia.emulator.runtime_reserved(device)
        allocated, reserved = mtia.memory_allocated(device), mtia.memory_reserved(device)
        if allocated or reserved or used:
            out.append((device, allocated, reserved, used))
    return out


@pytest.fixture(scope="session", autouse=True)
def _nothing_leaked_at_the_end():
    """After the whole suite: every array, pool and graph the tests made is gone, so
    empty_cache() leaves 0 bytes allocated and reserved and the devices report 0 bytes in use.
    Only checked if mtia_alloc was initialised; it resets nothing it did not create."""
    yield
    if not mtia.is_initialized():
        return
    left = leaks()
    assert not left, "memory leaked by the test suite (device, allocated, reserved, device bytes used): " + repr(left)


@pytest.fixture(autouse=True)
def _restore_allocator_state():
    """After each test: default allocator config, no memory fraction, empty cache."""
    yield
    mtia.memory._set_allocator_settings("expandable_segments:False")  # "" would keep it (PyTorch semantics)
    for device in range(mtia.device_count()):
        mtia.set_per_process_memory_fraction(1.0, device)
    mtia.empty_cache()


@pytest.fixture(autouse=True)
def _restore_current_device_and_streams():
    """Each test starts and ends with the same current device and streams (thread-local)."""
    device = mtia.current_device()
    streams = [mtia.current_stream(d) for d in range(mtia.device_count())]
    yield
    for s in streams:
        mtia.set_stream(s)
    mtia.set_device(device)


class LiveBlocks:
    """caching_allocator_alloc/delete that remembers which pointers are still live."""

    def __init__(self):
        self.live = []

    def alloc(self, size, device=None, stream=None):
        ptr = mtia.caching_allocator_alloc(size, device, stream)
        self.live.append(ptr)
        return ptr

    def free(self, ptr):
        self.live.remove(ptr)
        mtia.caching_allocator_delete(ptr)

    def free_all(self):
        while self.live:
            mtia.caching_allocator_delete(self.live.pop())


@pytest.fixture
def blocks():
    """Allocate through `blocks.alloc(...)`; whatever is still live is freed at teardown."""
    live = LiveBlocks()
    try:
        yield live
    finally:
        live.free_all()


@pytest.fixture
def side_stream():
    """A new stream on the current device."""
    return mtia.Stream()


@pytest.fixture(scope="module")
def side_streams():
    """One non-default stream per device, shared by the tests of a module."""
    return {d: mtia.Stream(device=d) for d in DEVICES}


@pytest.fixture
def empty_device():
    """Device 0 holds no segment at the start (needed by tests that count segments); the
    invariants are checked at the end."""
    gc.collect()
    mtia.synchronize()
    mtia.empty_cache()
    left = segments(device=0)
    assert not left, f"device 0 still holds segments from an earlier test: {left}"
    yield 0
    mtia.synchronize()
    mtia.memory.check_invariants()


@pytest.fixture(scope="module")
def resources():
    """The streams, arrays, pointer, pool and graph the bad-input cases use, made once per module."""
    r = Resources()
    yield r
    r.close()
    gc.collect()
    mtia.empty_cache()
