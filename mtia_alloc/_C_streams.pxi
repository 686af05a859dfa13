# _C_streams.pxi, part of _C.pyx (included; one extension module): the current device
# and stream (thread-local, _binding.h), streams, kernels (Python callables and native
# copy/fill/sleep tasks) and events. Every entry point goes through _allocator() (or
# _not_forgotten()), so in a child forked after initialisation it raises the bad-fork
# error instead of waiting for streams whose workers do not exist there. Waits for a
# stream or an event end with the pending KeyboardInterrupt on Ctrl-C (_binding.h,
# check_signals): Cython's `except +` keeps a pending Python exception.

cdef inline int _not_forgotten() except -1:
    if _forgotten and _alloc == NULL:
        _lazy_init()  # raises the bad-fork error
    return 0


def current_device():
    _not_forgotten()
    return tls_current_device()


def set_current_device(int d):
    _not_forgotten()
    tls_set_current_device(d)


def current_stream_id(int d):
    _not_forgotten()
    return tls_current_stream(d)


def set_current_stream_id(int d, int64_t s):
    _not_forgotten()
    tls_set_current_stream(d, s)


def new_stream(int device, int priority):
    return _allocator().emulator().new_stream(device, priority).id()


cdef inline Stream* _stream_ptr(int device, int64_t sid) except NULL:
    return _allocator().emulator().stream(device, sid)


def stream_query(int device, int64_t sid):
    return _stream_ptr(device, sid).query()


def stream_synchronize(int device, int64_t sid):
    cdef Stream* s = _stream_ptr(device, sid)
    with nogil:
        s.synchronize()


def stream_progress(int device, int64_t sid):
    """(enqueued, completed) task counts."""
    cdef Stream* s = _stream_ptr(device, sid)
    return s.enqueued(), s.completed()


def device_synchronize(int device):
    cdef EmulatedDevice* dev = &_allocator().emulator().device(device)
    with nogil:
        dev.synchronize()


def launch_python(int device, int64_t sid, fn):
    """Queues fn() on the stream; returns the task's sequence number."""
    cdef Stream* s = _stream_ptr(device, sid)
    return s.enqueue(make_py_task(fn))


def launch_sleep(int device, int64_t sid, double ms):
    cdef Stream* s = _stream_ptr(device, sid)
    return s.enqueue(make_sleep_task(<int64_t>(ms * 1e6)))


def launch_copy(int device, int64_t sid, uintptr_t dst, uintptr_t src, size_t n, keep):
    """Queues a native memmove; `keep` (the arrays) stays alive until it has run."""
    cdef Stream* s = _stream_ptr(device, sid)
    return s.enqueue(keep_alive(make_copy_task(dst, src, n), keep))


def launch_fill(int device, int64_t sid, uintptr_t dst, size_t n, bytes pattern, keep):
    """Queues a native fill of n bytes with a repeated element pattern."""
    cdef Stream* s = _stream_ptr(device, sid)
    return s.enqueue(keep_alive(make_fill_task(dst, n, pattern, len(pattern)), keep))


cdef class EventHandle:
    """An emulated event (the core's mtia::Event)."""
    cdef Event* ev
    cdef readonly int device

    def __cinit__(self, cbool enable_timing, int device):
        self.ev = new Event(enable_timing)
        self.device = device

    def __dealloc__(self):
        del self.ev

    def record(self, int device, int64_t sid):
        """Records the event on the stream; returns the stream position it follows (the
        tasks queued before it, a timing event's marker included)."""
        return self.ev.record(_stream_ptr(device, sid))

    def query(self):
        _allocator()
        return self.ev.query()

    def synchronize(self):
        _allocator()
        with nogil:
            self.ev.synchronize()

    def wait(self, int device, int64_t sid):
        stream_wait_mark(_stream_ptr(device, sid), self.ev.mark())

    @property
    def recorded(self):
        return self.ev.recorded()

    @property
    def timing(self):
        return self.ev.timing()

    def elapsed_ms(self, EventHandle end):
        cdef double ms
        _allocator()
        with nogil:
            ms = self.ev.elapsed_ms(end.ev[0])
        return ms
