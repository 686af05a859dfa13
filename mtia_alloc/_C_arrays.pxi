# _C_arrays.pxi, part of _C.pyx (included; one extension module): ArrayBase (a Python
# object owning one allocated block) and the C fast path of mtia_alloc.empty.

cdef bint _shut_down = False


def _mark_shut_down():
    """From here on dying arrays no longer free their blocks (the interpreter is exiting),
    and threads other than the main one that take the GIL back inside the allocator first
    give finalization a chance to begin, and park if it does (see _binding.h)."""
    global _shut_down
    _shut_down = True
    park_other_threads_at_exit()


@cython.auto_pickle(False)  # a pickled or copied _ptr would free the block twice
cdef class ArrayBase:
    """Owns one allocated block and gives it back to the cache when the object dies. The
    block is allocated marked as an array's (the core's Block::deferred bit, which means
    nothing else while a block is allocated), so caching_allocator_delete() of its address
    raises instead of freeing memory the array still uses; the mark goes with the free.
    mtia_alloc.DeviceArray subclasses it with the array API. The fields are read-only
    from Python: the native kernels and the host view trust them."""
    cdef readonly uintptr_t _ptr
    cdef readonly object shape
    cdef readonly object dtype
    cdef readonly Py_ssize_t nbytes
    cdef readonly int _device
    cdef readonly int64_t _stream_id
    cdef object __weakref__

    def data_ptr(self):
        return self._ptr

    def __dealloc__(self):
        cdef FramesPtr frames
        if self._ptr == 0 or _alloc == NULL or _shut_down:
            return
        if _record_level() >= 3:
            frames = _capture_frames()
        try:
            _alloc.free(self._ptr, frames, True)  # by the array: its block's only free (the mark)
        except Exception:
            pass  # cannot happen for a block this object owns; never raise from a destructor
        self._ptr = 0


def alloc_array(cls, tuple shape, dtype, Py_ssize_t itemsize, device=None, stream=None):
    """A new `cls` (an ArrayBase subclass) holding itemsize * prod(shape) bytes."""
    cdef Py_ssize_t n
    cdef ArrayBase a
    cdef int d
    cdef int64_t s
    total = itemsize  # Python ints: no silent overflow
    for dim in shape:
        total *= dim
    if total >= (1 << 60):
        raise _oom_error(f"MTIA out of memory. Tried to allocate more than 1EB memory (an array of shape "
                         f"{shape} needs {total} bytes).")
    n = total
    if _alloc == NULL:
        _lazy_init()
    if device is None and stream is not None:
        device = getattr(stream, "device_index", None)
    d = _device(device)
    s = _stream_of(stream, d)
    a = ArrayBase.__new__(cls)  # cls subclasses ArrayBase: a direct tp_new call, no lookup
    a.shape = shape
    a.dtype = dtype
    a.nbytes = n
    a._device = d
    a._stream_id = s
    if n:
        a._ptr = _malloc(n, d, s, True)  # marked: caching_allocator_delete refuses it
    return a


# mtia_alloc.empty: its common case (an int length and a dtype name seen before) runs here
# in C; everything else goes to the Python implementation in array.py, which also fills
# the dtype cache. configure_empty() wires the two together at import.
cdef object _empty_cls = None
cdef dict _empty_dtypes = {}  # dtype name -> (numpy dtype, itemsize)
cdef object _empty_general = None


def configure_empty(cls, general):
    global _empty_cls, _empty_general
    _empty_cls = cls
    _empty_general = general


def cache_dtype(str name, dtype):
    _empty_dtypes[name] = (dtype, dtype.itemsize)


def empty(shape, dtype="float32", device=None, stream=None):
    """An uninitialised DeviceArray allocated through the caching allocator on `stream`."""
    cdef object entry
    if type(shape) is int and type(dtype) is str and shape >= 0:
        entry = _empty_dtypes.get(dtype)
        if entry is not None:
            return alloc_array(_empty_cls, (shape,), entry[0], entry[1], device, stream)
    return _empty_general(shape, dtype, device, stream)
