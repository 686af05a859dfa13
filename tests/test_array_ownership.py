"""A DeviceArray owns its block (issue 19, item 5): caching_allocator_delete() of the
pointer of a live DeviceArray raises RuntimeError and frees nothing (else the array's
death would later free whatever block sits at that address, aliasing memory the user
still holds). The array's own death frees the block as before; a pointer from
caching_allocator_alloc, and a block an array held before it died, delete as before."""
import copy

import numpy as np
import pytest

import mtia_alloc as mtia
from mtia_alloc import emulator

from helpers import block_state


def _refused(ptr):
    with pytest.raises(RuntimeError, match="belongs to a live DeviceArray"):
        mtia.caching_allocator_delete(ptr)


@pytest.mark.parametrize("make", [
    lambda: mtia.empty(1024),                      # the binding's fast path
    lambda: mtia.empty((4, 8), np.dtype("int16")),  # the general path
    lambda: mtia.empty(3 << 20, "uint8"),           # large pool
    lambda: copy.copy(mtia.empty(100)),             # a copy's new block
])
def test_deleting_a_live_arrays_pointer_raises_and_frees_nothing(make):
    x = make()
    p = x.data_ptr()
    before = mtia.memory_stats()
    _refused(p)
    _refused(p)
    after = mtia.memory_stats()
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
    assert after["allocation.all.freed"] == before["allocation.all.freed"]
    assert block_state(p) == "active_allocated"
    mtia.memory.check_invariants()
    x.numpy()[...] = 1  # still the array's memory
    q = mtia.caching_allocator_alloc(x.nbytes)
    assert q != p
    mtia.caching_allocator_delete(q)
    freed = mtia.memory_stats()["allocation.all.freed"]
    del x  # the array's death frees its block
    assert mtia.memory_stats()["allocation.all.freed"] == freed + 1
    with pytest.raises(RuntimeError, match="invalid device pointer"):
        mtia.caching_allocator_delete(p)
    mtia.memory.check_invariants()


def test_a_block_an_array_held_deletes_normally_once_reused_by_caching_allocator_alloc():
    mtia.empty_cache()
    x = mtia.empty(4096, "uint8")
    p = x.data_ptr()
    del x
    q = mtia.caching_allocator_alloc(4096)
    assert q == p  # the same cached block, no longer an array's
    mtia.caching_allocator_delete(q)
    mtia.memory.check_invariants()


def test_ownership_holds_with_history_and_stream_uses():
    s = mtia.Stream()
    mtia.memory._record_memory_history("all")
    try:
        x = mtia.empty(2048)
        x.record_stream(s)
        emulator.sleep(50, stream=s)
        _refused(x.data_ptr())
        mtia.memory.check_invariants()
        del x  # a pending free, completed once s has run
        s.synchronize()
        mtia.memory.check_invariants()
    finally:
        mtia.memory._record_memory_history(None)


def test_an_array_allocated_in_a_mempool_is_owned_too():
    pool = mtia.MemPool()
    with mtia.use_mem_pool(pool):
        x = mtia.empty(5000)
    _refused(x.data_ptr())
    del x
    mtia.memory.check_invariants()


def test_plain_pointers_still_delete():
    p = mtia.caching_allocator_alloc(1000)
    mtia.caching_allocator_delete(p)
    a = mtia.empty(0)
    assert a.data_ptr() == 0
    mtia.caching_allocator_delete(a.data_ptr())  # 0: a no-op
    mtia.memory.check_invariants()
