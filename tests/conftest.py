"""Shared fixtures: restore the allocator's global state after every test, and a `blocks`
helper that frees, at teardown, every block a test allocated and did not free itself."""
import pytest

import mtia_alloc as mtia
import mtia_alloc.memory


@pytest.fixture(autouse=True)
def _restore_allocator_state():
    """After each test: default allocator config, no memory fraction, empty cache."""
    yield
    mtia.memory._set_allocator_settings("")
    for device in range(mtia.device_count()):
        mtia.set_per_process_memory_fraction(1.0, device)
    mtia.empty_cache()


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
