"""Private memory pools (torch.cuda.MemPool, use_mem_pool) and the segment list of one pool
or of all (memory_snapshot). Graph pools are pools too: graphs.py creates them through _C.

Owns: MemPool, use_mem_pool, memory_snapshot, pool_id_of (a MemPool or an (int, int) id).
Relies on: raw_allocators (a pool's own raw allocator), _capture (a pool entered during
a capture is kept by the graph), history (snapshot_segments), _device_arg, _lazy_init,
_errors (refuse_copy), _C."""
import contextlib
import sys

from . import _C
from ._capture import retain_pool_in_capture
from ._device_arg import device_index
from ._errors import as_integer, refuse_copy
from ._lazy_init import lazy_init
from .history import snapshot_segments
from .raw_allocators import PluggableAllocator, PythonAllocator

__all__ = ["MemPool", "use_mem_pool", "memory_snapshot", "pool_id_of"]


def pool_id_of(pool):
    if isinstance(pool, MemPool):
        return pool.id
    if isinstance(pool, tuple) and len(pool) == 2:
        ids = tuple(as_integer(x) for x in pool)
        if all(x is not None and 0 <= x < (1 << 64) for x in ids):
            return ids
    raise TypeError(f"expected a MemPool or a (int, int) pool id, got {pool!r}")


class MemPool:
    """A private memory pool: MemPool(allocator=None, use_on_oom=False, no_split=False)."""

    __reduce_ex__ = refuse_copy  # it holds one reference to the pool

    def __init__(self, allocator=None, use_on_oom=False, no_split=False):
        if allocator is not None and not isinstance(allocator, (PythonAllocator, PluggableAllocator)):
            raise TypeError("allocator must be None, a PythonAllocator or a PluggableAllocator")
        lazy_init()
        self._device = _C.current_device()
        self._id = _C.new_user_pool_id()
        self._allocator = allocator
        _C.create_or_incref_pool(self._device, self._id, allocator._raw_spec() if allocator else None)
        self._alive = True
        if use_on_oom:
            _C.set_use_on_oom(self._device, self._id, True)
        if no_split:
            _C.set_no_split(self._device, self._id)

    @property
    def id(self):
        return self._id

    @property
    def allocator(self):
        return self._allocator

    def use_count(self):
        return _C.pool_use_count(self._device, self._id)

    def snapshot(self):
        return memory_snapshot(self._id)

    def __del__(self):
        if not getattr(self, "_alive", False) or sys.is_finalizing():
            return
        self._alive = False
        try:
            _C.set_use_on_oom(self._device, self._id, False)
            _C.release_pool(self._device, self._id)
            _C.empty_cache_device(self._device, self._id)
        except Exception:  # never raise from a destructor
            pass

    def __repr__(self):
        return f"MemPool(id={self._id}, device={self._device}, use_count={self.use_count()})"


@contextlib.contextmanager
def use_mem_pool(pool, device=None):
    """Routes this thread's allocations on `device` to `pool` inside the block."""
    if not isinstance(pool, MemPool):
        raise TypeError(f"use_mem_pool expects a MemPool, got {type(pool).__name__}")
    d = device_index(device)
    _C.create_or_incref_pool(d, pool.id, None)
    try:
        _C.begin_allocate_to_pool(d, pool.id, _C.KIND_THREAD)
    except BaseException:
        _C.release_pool(d, pool.id)
        raise
    try:
        retain_pool_in_capture(d, pool.id)
        yield
    finally:
        _C.end_allocate_to_pool(d, pool.id)
        _C.release_pool(d, pool.id)


def memory_snapshot(mempool_id=None, include_traces=True):
    """The segment list of snapshot() (one pool's segments when mempool_id is given).
    include_traces is accepted for PyTorch compatibility; the list never holds traces."""
    if mempool_id is not None:
        mempool_id = pool_id_of(mempool_id)
        if mempool_id == (0, 0):
            mempool_id = None
    return snapshot_segments(mempool_id)
