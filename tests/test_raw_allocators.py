"""Raw allocators under memory pools: PythonAllocator (a pool's segments come from it and go
back through it when the pool is emptied, it stays alive while the pool holds segments, its
failures become OOMs with the state intact, an alloc_fn or free_fn that raises, an alloc_fn
that frees device memory), PluggableAllocator over a C library compiled at test time (skipped
without a C compiler), and change_current_allocator (PyTorch's TestMemPool,
pools_graphs_streams_api.md §5.4).

PyTorch's dummy C allocator (which sets called_dummy_alloc = 123 / called_dummy_free = 321)
becomes helpers.HostAllocator, a PythonAllocator handing out 512-byte-aligned numpy host buffers
(the emulated device memory is host memory) and counting its calls.

Values are written by kernels (helpers.fill, fill_arange) and read back after a synchronize,
so the data a pool hands out is checked too.
"""
import ctypes
import gc
import shutil
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import (DEVICES, NELEM_1MB, OOM_COUNTERS, Boom, HostAllocator, fill, fill_arange, host, kLargeBuffer,
                     kSmallBuffer, run_code, segments, state_unchanged)
from mtia_alloc.memory import MemPool, PluggableAllocator, PythonAllocator, use_mem_pool


# ----------------------------------------------------------------------------- PythonAllocator

def test_mempool_with_allocator(empty_device):
    d = empty_device
    assert MemPool().allocator is None  # no allocator by default
    host_alloc = HostAllocator()
    allocator = host_alloc.python_allocator()
    pool = MemPool(allocator)
    assert pool.allocator is allocator
    assert pool.use_count() == 1  # the MemPool object's reference
    assert (host_alloc.alloc_calls, host_alloc.free_calls) == (0, 0)

    with use_mem_pool(pool):
        out_0 = mtia.empty(NELEM_1MB)
        fill_arange(out_0)
        assert pool.use_count() == 2  # + the use_mem_pool context
    assert pool.use_count() == 1
    assert host_alloc.alloc_calls == 1  # the pool's segment came from the custom allocator
    assert host_alloc.owns(out_0.data_ptr())
    np.testing.assert_array_equal(host(out_0), np.arange(NELEM_1MB, dtype=np.float32))

    out_non_pool = mtia.empty(NELEM_1MB)  # the default pool: not from the custom allocator
    assert host_alloc.alloc_calls == 1 and not host_alloc.owns(out_non_pool.data_ptr())
    with use_mem_pool(pool):
        # 1 MiB was packed into a 2 MiB small segment
        assert len(pool.snapshot()) == 1
        out_1 = mtia.empty(NELEM_1MB)
        assert len(pool.snapshot()) == 1  # a second 1 MiB fits in the same segment
        out_2 = mtia.empty(NELEM_1MB)
        assert len(pool.snapshot()) == 2  # a third needs a new 2 MiB segment
    assert len(pool.snapshot()) == 2
    assert host_alloc.alloc_calls == 2
    assert all(s["segment_pool_id"] == pool.id and s["total_size"] == kSmallBuffer for s in pool.snapshot())
    fill(out_1, 7.0)
    fill(out_2, 8.0)
    assert (host(out_1) == 7).all() and (host(out_2) == 8).all()
    assert (host(out_0) == np.arange(NELEM_1MB)).all()  # out_1 did not overwrite out_0
    assert host_alloc.free_calls == 0

    del out_0, out_1, out_2
    del pool  # the destructor empties the (now freeable) pool through the custom free
    assert host_alloc.free_calls == 2 and not host_alloc.buffers
    assert len(segments(device=d)) == 1  # only out_non_pool's default segment is left
    del out_non_pool


def test_tensor_delete_after_allocator_delete(empty_device):
    host_alloc = HostAllocator()
    freed = []

    def counting(free_fn):
        return lambda *args: (freed.append(args[0]), free_fn(*args))

    allocator = PythonAllocator(host_alloc.alloc, counting(host_alloc.free))
    alive = weakref.ref(host_alloc)
    pool = MemPool(allocator)
    with use_mem_pool(pool):
        x = mtia.empty((1024, 1024))
        fill(x, 3.0)
    pid = pool.id
    del pool
    del allocator, host_alloc  # the Python objects go; the pool keeps the raw allocator
    gc.collect()
    assert alive() is not None, "the pool must keep its allocator alive while it holds segments"
    assert freed == []
    assert (host(x) == 3.0).all()  # the memory is still valid

    del x
    assert freed == []
    mtia.empty_cache()
    assert len(freed) == 1
    assert segments(pid) == []
    gc.collect()
    assert alive() is None, "the raw allocator should be released with the pool's last segment"


def test_raw_allocator_failure_is_out_of_memory_with_state_intact(empty_device):
    calls = []

    def failing(size, device, stream):
        calls.append(size)
        raise MemoryError("no memory in this allocator")

    raising = MemPool(PythonAllocator(failing, lambda *a: None))
    zero = MemPool(PythonAllocator(lambda size, device, stream: 0, lambda *a: None))
    before = mtia.memory_stats()
    for pool in (raising, zero):
        with use_mem_pool(pool), pytest.raises(mtia.OutOfMemoryError, match="Tried to allocate"):
            mtia.empty(1000)
        assert pool.snapshot() == []
    after = mtia.memory_stats()
    assert calls == [kSmallBuffer]
    assert after["num_ooms"] == before["num_ooms"] + 2
    for key in ("segment.all.current", "reserved_bytes.all.current", "allocated_bytes.all.current"):
        assert after[key] == before[key]
    mtia.memory.check_invariants()
    # both pools stay usable for cached blocks and die cleanly
    del raising, zero


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


def test_python_allocator_that_frees_device_memory_does_not_deadlock():
    """Regression: a PythonAllocator's alloc_fn runs while the device allocator's lock is
    held. If it makes a DeviceArray of that device die (here by gc.collect(), which any
    allocation in alloc_fn may also trigger implicitly), the free re-enters the allocator on
    the same thread; with a non-recursive device lock that deadlocked. Run in a child process
    with a timeout so that a regression cannot hang the suite."""
    script = textwrap.dedent("""
        import gc
        import numpy as np
        import mtia_alloc as mtia, mtia_alloc.memory as mm
        bufs = {}
        def alloc(size, device, stream):
            gc.collect()
            b = np.empty(size, np.uint8)
            bufs[b.ctypes.data] = b
            return b.ctypes.data
        def free(ptr, size, device, stream):
            del bufs[ptr]
        pool = mm.MemPool(mm.PythonAllocator(alloc, free))
        gc.disable()
        class Cycle: pass
        c = Cycle(); c.me = c; c.arr = mtia.empty(100)  # a DeviceArray only a cycle keeps alive
        del c
        with mm.use_mem_pool(pool):
            x = mtia.empty(1000)
        print("done")
    """)
    try:
        r = run_code(script, timeout=4)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: DeviceAllocator::alloc_block calls the Python raw allocator with the "
                     "device lock held, and a DeviceArray freed inside it waits for that lock "
                     "(src_cpp/device_allocator.cpp, mtia_alloc/_binding.h PyRawAllocator)")
    assert r.returncode == 0 and "done" in r.stdout, r.stderr


# ----------------------------------------------------------------------------- PluggableAllocator

C_ALLOCATOR = r"""
#include <stdlib.h>
#include <sys/types.h>
int alloc_calls = 0, free_calls = 0;
long long live_bytes = 0;
void* my_alloc(ssize_t size, int device, void* stream) {
  void* p = NULL;
  if (posix_memalign(&p, 512, (size_t)size)) return NULL;
  alloc_calls++;
  live_bytes += size;
  return p;
}
void my_free(void* ptr, ssize_t size, int device, void* stream) {
  free_calls++;
  live_bytes -= size;
  free(ptr);
}
"""


@pytest.fixture(scope="module")
def c_allocator_lib(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("pluggable")
    src, so = d / "alloc.c", d / "liballoc.so"
    src.write_text(C_ALLOCATOR)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(so), str(src)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot compile the test allocator: {r.stderr}")
    return so


def test_pluggable_allocator(empty_device, c_allocator_lib):
    lib = ctypes.CDLL(str(c_allocator_lib))
    counter = lambda name: ctypes.c_int.in_dll(lib, name).value  # noqa: E731
    start_alloc, start_free = counter("alloc_calls"), counter("free_calls")
    allocator = PluggableAllocator(c_allocator_lib, "my_alloc", "my_free")
    pool = MemPool(allocator)
    assert pool.allocator is allocator
    with use_mem_pool(pool):
        x = mtia.empty(NELEM_1MB)
        y = mtia.empty(6 * NELEM_1MB)
    fill_arange(x)
    fill(y, 9.0)
    assert (host(x) == np.arange(NELEM_1MB)).all() and (host(y) == 9.0).all()
    assert counter("alloc_calls") - start_alloc == 2
    assert ctypes.c_longlong.in_dll(lib, "live_bytes").value == kSmallBuffer + kLargeBuffer
    del x, y
    assert counter("free_calls") == start_free
    del pool, allocator
    assert counter("free_calls") - start_free == 2
    assert ctypes.c_longlong.in_dll(lib, "live_bytes").value == 0


def test_pluggable_allocator_errors(tmp_path, c_allocator_lib):
    with pytest.raises(RuntimeError, match="cannot load"):
        PluggableAllocator(tmp_path / "missing.so", "my_alloc", "my_free")
    with pytest.raises(RuntimeError, match="lacks a symbol"):
        PluggableAllocator(c_allocator_lib, "my_alloc", "no_such_free")


# ----------------------------------------------------------------------------- change_current_allocator

def test_change_current_allocator_only_before_init():
    mtia.init()
    with pytest.raises(RuntimeError, match="before mtia_alloc is initialized"):
        mtia.memory.change_current_allocator(HostAllocator().python_allocator())
    with pytest.raises(TypeError):
        mtia.memory.change_current_allocator(object())


def test_change_current_allocator_puts_it_under_the_default_pools():
    """In a fresh interpreter (the allocator must be set before initialisation)."""
    script = textwrap.dedent("""
        import numpy as np
        import mtia_alloc as mtia, mtia_alloc.memory as mm
        bufs, calls = {}, []
        def alloc(size, device, stream):
            b = np.empty(size + 512, np.uint8)
            p = (b.ctypes.data + 511) & ~511
            bufs[p] = b
            calls.append(("alloc", size, device))
            return p
        def free(ptr, size, device, stream):
            del bufs[ptr]
            calls.append(("free", size, device))
        mm.change_current_allocator(mm.PythonAllocator(alloc, free))
        x = mtia.empty(1000)
        x.numpy()[:] = 3
        assert any(p <= x.data_ptr() < p + 2 ** 21 for p in bufs), "not from the custom allocator"
        pool = mm.MemPool()  # a pool without its own allocator uses the device's: the custom one
        with mm.use_mem_pool(pool):
            y = mtia.empty(1000)
        del x, y, pool
        mtia.empty_cache()
        assert not bufs, bufs
        print(calls)
    """)
    r = run_code(script, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = eval(r.stdout.strip().splitlines()[-1])
    assert calls == [("alloc", kSmallBuffer, 0), ("alloc", kSmallBuffer, 0),
                     ("free", kSmallBuffer, 0), ("free", kSmallBuffer, 0)]
