"""Shared fixtures: restore the allocator's global state after every test, a `blocks`
helper that frees, at teardown, every block a test allocated and did not free itself, and a
check at the end of the session that nothing leaked (issue 7 item 5)."""
import gc

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc._C
import mtia_alloc.memory
from mtia_alloc.streams import KernelError


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


class TorchDevice:
    """A torch.device look-alike (.type/.index), so tests do not need torch."""

    def __init__(self, text):
        kind, _, index = text.partition(":")
        self.type, self.index = kind, int(index) if index else None


class _Raw:
    """numpy view of raw (emulated device) memory at an address, holding no DeviceArray."""

    __slots__ = ("__array_interface__",)

    def __init__(self, ptr, n, dtype):
        self.__array_interface__ = {"data": (ptr, False), "shape": (n,), "typestr": np.dtype(dtype).str,
                                    "version": 3}


def view(ptr, n, dtype="float32"):
    """Kernels use this to compute on device memory by address (no array reference kept)."""
    return np.asarray(_Raw(ptr, n, dtype))


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
