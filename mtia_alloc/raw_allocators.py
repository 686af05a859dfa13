"""Raw allocators: where the cache gets device memory from. By default the emulated
device; PythonAllocator and PluggableAllocator (CUDAPluggableAllocator's function
signatures) put user code under the cache, for one MemPool or, through
change_current_allocator (before initialisation), for the default pools.

Owns: PythonAllocator, PluggableAllocator, change_current_allocator, and the shared
libraries loaded for them (kept loaded until exit).
Relies on: _settings (the raw allocator initialisation installs), _lazy_init."""
import ctypes

from ._lazy_init import is_initialized
from ._settings import settings

__all__ = ["PythonAllocator", "PluggableAllocator", "change_current_allocator"]

_loaded_libraries = []  # shared objects stay loaded: pools may use them until exit


class PythonAllocator:
    """Raw device memory from two Python callables: alloc_fn(size, device, stream) -> int
    address (0 or an exception = out of memory) and free_fn(ptr, size, device, stream).

    free_fn runs when the cache gives a segment back (empty_cache, an OOM retry), under the
    allocator's lock, and only while the streams that may still use the range are idle
    (the allocator waits for them first, as cudaFree synchronizes the device). It must not
    wait for kernels itself: a kernel that allocates would wait for the lock."""

    def __init__(self, alloc_fn, free_fn):
        if not callable(alloc_fn) or not callable(free_fn):
            raise TypeError("PythonAllocator needs two callables: alloc_fn(size, device, stream) and "
                            "free_fn(ptr, size, device, stream)")
        self.alloc_fn, self.free_fn = alloc_fn, free_fn

    def _raw_spec(self):
        return ("python", self.alloc_fn, self.free_fn)


class PluggableAllocator:
    """Raw device memory from a shared library's C functions with CUDAPluggableAllocator's
    signatures: void* alloc(ssize_t size, int device, void* stream) and
    void free(void* ptr, ssize_t size, int device, void* stream)."""

    def __init__(self, path_to_so, alloc_fn_name, free_fn_name):
        try:
            lib = ctypes.CDLL(str(path_to_so))
        except OSError as e:
            raise RuntimeError(f"cannot load allocator library {path_to_so!r}: {e}") from None
        try:
            alloc = getattr(lib, alloc_fn_name)
            free = getattr(lib, free_fn_name)
        except AttributeError as e:
            raise RuntimeError(f"allocator library {path_to_so!r} lacks a symbol: {e}") from None
        _loaded_libraries.append(lib)
        self._lib = lib
        self._alloc_addr = ctypes.cast(alloc, ctypes.c_void_p).value
        self._free_addr = ctypes.cast(free, ctypes.c_void_p).value

    def _raw_spec(self):
        return ("c", self._alloc_addr, self._free_addr)


def change_current_allocator(allocator):
    """Puts a raw allocator under the default pools. Only before initialisation."""
    if not isinstance(allocator, (PythonAllocator, PluggableAllocator)):
        raise TypeError("allocator must be a PythonAllocator or a PluggableAllocator")
    if is_initialized():
        raise RuntimeError("change_current_allocator must be called before mtia_alloc is initialized "
                           "(before the first allocation)")
    settings["raw_allocator"] = allocator._raw_spec()
