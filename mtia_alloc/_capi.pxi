# _capi.pxi: the C function table of _capi.h, exported in a capsule for native code
# outside this module (the PyTorch backend, mtia_alloc/torch). Included at the end of
# _C.pyx, so it shares _C's allocator, thread-local current device/stream, memory-history
# level and OOM observers. Every entry is callable without the GIL and never raises: C++
# exceptions become a return code plus a thread-local message.
from cpython.pycapsule cimport PyCapsule_New


cdef extern from "_capi.h":
    ctypedef struct MtiaAllocOom:
        int device
        uint64_t alloc_size, total_or_allowed, device_free
        int notify_observers
    ctypedef struct MtiaAllocCAPI:
        int version
        int struct_size
        int (*ensure_init)() noexcept nogil
        int (*is_initialized)() noexcept nogil
        int (*device_count)() noexcept nogil
        const char* (*last_error)() noexcept nogil
        void (*last_oom)(MtiaAllocOom*) noexcept nogil
        int (*current_device)() noexcept nogil
        void (*set_current_device)(int) noexcept nogil
        int64_t (*current_stream)(int) noexcept nogil
        void (*set_current_stream)(int, int64_t) noexcept nogil
        int (*malloc)(int, size_t, int64_t, uintptr_t*) noexcept nogil
        int (*free)(uintptr_t) noexcept nogil
        int (*record_stream)(uintptr_t, int, int64_t) noexcept nogil
        int (*device_of)(uintptr_t) noexcept nogil
        int (*notify_oom)() noexcept nogil
        int (*stream_exists)(int, int64_t) noexcept nogil
        int (*new_stream)(int, int, int64_t*) noexcept nogil
        int (*stream_query)(int, int64_t) noexcept nogil
        int (*stream_synchronize)(int, int64_t) noexcept nogil
        int (*device_synchronize)(int) noexcept nogil
        int (*mem_get_info)(int, uint64_t*, uint64_t*) noexcept nogil
        void* (*event_create)(int) noexcept nogil
        void (*event_destroy)(void*) noexcept nogil
        int (*event_record)(void*, int, int64_t) noexcept nogil
        int (*event_query)(void*) noexcept nogil
        int (*event_synchronize)(void*) noexcept nogil
        int (*event_wait)(void*, int, int64_t) noexcept nogil
        int (*event_elapsed_ms)(void*, void*, double*) noexcept nogil
        int (*event_recorded)(void*) noexcept nogil
        int (*record_level)() noexcept nogil
    int MTIA_ALLOC_CAPI_VERSION


cdef extern from "_binding.h" namespace "mtia_binding":
    int capi_tls_device "mtia_binding::current_device"() noexcept nogil
    void capi_tls_set_device "mtia_binding::set_current_device"(int d) noexcept nogil
    int64_t capi_tls_stream "mtia_binding::current_stream"(int d) noexcept nogil
    void capi_tls_set_stream "mtia_binding::set_current_stream"(int d, int64_t s) noexcept nogil


cdef extern from *:
    """
    #include <string>
    #include "_capi.h"
    namespace mtia_capi {
    inline thread_local std::string last_error_text;
    inline thread_local MtiaAllocOom last_oom_info;
    inline int fail(const std::string& m) { last_error_text = m; return -1; }
    inline const char* last_error() { return last_error_text.c_str(); }
    inline void last_oom(MtiaAllocOom* out) { *out = last_oom_info; }
    // The core's history level (RecordContext as an int; 0 before initialisation).
    inline int record_level_of(mtia::Allocator* a) { return a ? static_cast<int>(a->record_level()) : 0; }
    // Runs f, turning C++ exceptions into a return code (1 = out of memory) and a message.
    template <class F> inline int guarded(F&& f) {
      try {
        f();
        return 0;
      } catch (const mtia::OutOfMemory& e) {
        last_error_text = e.what();
        last_oom_info = MtiaAllocOom{e.device, e.alloc_size, e.total_or_allowed, e.device_free, e.notify_observers};
        return 1;
      } catch (const std::exception& e) {
        return fail(e.what());
      } catch (...) {
        return fail("unknown C++ exception in mtia_alloc");
      }
    }
    // The caller's Python stack, for memory history (takes the GIL if this thread lacks it).
    inline mtia::FramesPtr frames_with_gil() {
      if (!mtia_binding::interpreter_alive()) return mtia::FramesPtr();
      PyGILState_STATE st = PyGILState_Ensure();
      mtia::FramesPtr f = mtia_binding::capture_frames();
      PyGILState_Release(st);
      return f;
    }
    inline bool bad_device(mtia::Allocator* a, int d) {
      if (!a) { fail("mtia_alloc is not initialized"); return true; }
      if (d < 0 || d >= a->device_count()) {
        fail("Invalid device index " + std::to_string(d) + ": the valid range is [0, " +
             std::to_string(a->device_count() - 1) + "]");
        return true;
      }
      return false;
    }
    inline int malloc_(mtia::Allocator* a, int level, int d, size_t n, int64_t s, uintptr_t* out) {
      if (bad_device(a, d)) return -1;
      mtia::FramesPtr frames;
      if (level) frames = frames_with_gil();
      return guarded([&] { *out = a->malloc(d, n, s, frames); });
    }
    inline int free_(mtia::Allocator* a, int level, bool shut_down, uintptr_t p) {
      if (p == 0 || shut_down || !a) return 0;  // at exit blocks are left to the process
      mtia::FramesPtr frames;
      if (level >= 3) frames = frames_with_gil();
      return guarded([&] { a->free(p, frames); });
    }
    inline int record_stream_(mtia::Allocator* a, uintptr_t p, int d, int64_t s) {
      if (bad_device(a, d)) return -1;
      return guarded([&] { a->emulator().stream(d, s); a->device(d).record_stream(p, s); });
    }
    inline int device_of_(mtia::Allocator* a, uintptr_t p) {
      if (!a || !p) return -1;
      int r = -1;
      guarded([&] { r = a->device_of(p); });
      return r;
    }
    inline mtia::Stream* stream_(mtia::Allocator* a, int d, int64_t s) {
      if (bad_device(a, d)) return nullptr;
      mtia::Stream* out = nullptr;
      guarded([&] { out = a->emulator().stream(d, s); });
      return out;
    }
    inline int stream_exists_(mtia::Allocator* a, int d, int64_t s) {
      if (!a || d < 0 || d >= a->device_count()) return 0;
      return a->emulator().device(d).stream(s) != nullptr;
    }
    inline int new_stream_(mtia::Allocator* a, int d, int priority, int64_t* out) {
      if (bad_device(a, d)) return -1;
      return guarded([&] { *out = a->emulator().new_stream(d, priority)->id(); });
    }
    inline int stream_query_(mtia::Allocator* a, int d, int64_t s) {
      mtia::Stream* st = stream_(a, d, s);
      return st ? int(st->query()) : -1;
    }
    inline int stream_synchronize_(mtia::Allocator* a, int d, int64_t s) {
      mtia::Stream* st = stream_(a, d, s);
      if (!st) return -1;
      return guarded([&] { mtia::BlockingScope scope; st->synchronize(); });
    }
    inline int device_synchronize_(mtia::Allocator* a, int d) {
      if (bad_device(a, d)) return -1;
      return guarded([&] { mtia::BlockingScope scope; a->emulator().device(d).synchronize(); });
    }
    inline int mem_get_info_(mtia::Allocator* a, int d, uint64_t* f, uint64_t* t) {
      if (bad_device(a, d)) return -1;
      mtia::DeviceMemory& m = a->emulator().device(d).memory();
      *f = m.capacity() - m.used();
      *t = m.capacity();
      return 0;
    }
    inline void* event_create_(int timing) { return new mtia::Event(timing != 0); }
    inline void event_destroy_(void* e) { delete static_cast<mtia::Event*>(e); }
    inline int event_record_(mtia::Allocator* a, void* e, int d, int64_t s) {
      mtia::Stream* st = stream_(a, d, s);
      if (!st) return -1;
      return guarded([&] { static_cast<mtia::Event*>(e)->record(st); });
    }
    inline int event_query_(void* e) { return static_cast<mtia::Event*>(e)->query(); }
    inline int event_synchronize_(void* e) {
      return guarded([&] { mtia::BlockingScope scope; static_cast<mtia::Event*>(e)->synchronize(); });
    }
    inline int event_wait_(mtia::Allocator* a, void* e, int d, int64_t s) {
      mtia::Stream* st = stream_(a, d, s);
      if (!st) return -1;
      return guarded([&] { mtia::stream_wait_mark(st, static_cast<mtia::Event*>(e)->mark()); });
    }
    inline int event_elapsed_(void* a, void* b, double* out) {
      return guarded([&] {
        mtia::BlockingScope scope;
        *out = static_cast<mtia::Event*>(a)->elapsed_ms(*static_cast<mtia::Event*>(b));
      });
    }
    inline int event_recorded_(void* e) { return static_cast<mtia::Event*>(e)->recorded(); }
    }  // namespace mtia_capi
    """
    const char* capi_last_error "mtia_capi::last_error"() noexcept nogil
    void capi_last_oom "mtia_capi::last_oom"(MtiaAllocOom* out) noexcept nogil
    int capi_fail "mtia_capi::fail"(const string& m) noexcept nogil
    int capi_record_level_of "mtia_capi::record_level_of"(Allocator* a) noexcept nogil
    int capi_malloc_ "mtia_capi::malloc_"(Allocator* a, int level, int d, size_t n, int64_t s, uintptr_t* out) noexcept nogil
    int capi_free_ "mtia_capi::free_"(Allocator* a, int level, cbool shut_down, uintptr_t p) noexcept nogil
    int capi_record_stream_ "mtia_capi::record_stream_"(Allocator* a, uintptr_t p, int d, int64_t s) noexcept nogil
    int capi_device_of_ "mtia_capi::device_of_"(Allocator* a, uintptr_t p) noexcept nogil
    int capi_stream_exists_ "mtia_capi::stream_exists_"(Allocator* a, int d, int64_t s) noexcept nogil
    int capi_new_stream_ "mtia_capi::new_stream_"(Allocator* a, int d, int priority, int64_t* out) noexcept nogil
    int capi_stream_query_ "mtia_capi::stream_query_"(Allocator* a, int d, int64_t s) noexcept nogil
    int capi_stream_synchronize_ "mtia_capi::stream_synchronize_"(Allocator* a, int d, int64_t s) noexcept nogil
    int capi_device_synchronize_ "mtia_capi::device_synchronize_"(Allocator* a, int d) noexcept nogil
    int capi_mem_get_info_ "mtia_capi::mem_get_info_"(Allocator* a, int d, uint64_t* f, uint64_t* t) noexcept nogil
    void* capi_event_create_ "mtia_capi::event_create_"(int timing) noexcept nogil
    void capi_event_destroy_ "mtia_capi::event_destroy_"(void* e) noexcept nogil
    int capi_event_record_ "mtia_capi::event_record_"(Allocator* a, void* e, int d, int64_t s) noexcept nogil
    int capi_event_query_ "mtia_capi::event_query_"(void* e) noexcept nogil
    int capi_event_synchronize_ "mtia_capi::event_synchronize_"(void* e) noexcept nogil
    int capi_event_wait_ "mtia_capi::event_wait_"(Allocator* a, void* e, int d, int64_t s) noexcept nogil
    int capi_event_elapsed_ "mtia_capi::event_elapsed_"(void* a, void* b, double* out) noexcept nogil
    int capi_event_recorded_ "mtia_capi::event_recorded_"(void* e) noexcept nogil


cdef int _capi_ensure_init() noexcept nogil:
    if _alloc != NULL:
        return 0
    with gil:
        try:
            _ensure_init()
            return 0
        except BaseException as e:
            capi_fail(f"mtia_alloc initialisation failed: {type(e).__name__}: {e}".encode())
            return -1


cdef int _capi_is_initialized() noexcept nogil:
    return _alloc != NULL


cdef int _capi_device_count() noexcept nogil:
    return _ndev if _alloc != NULL else -1


cdef int _capi_current_device() noexcept nogil:
    return capi_tls_device()


cdef void _capi_set_current_device(int d) noexcept nogil:
    capi_tls_set_device(d)


cdef int64_t _capi_current_stream(int d) noexcept nogil:
    return capi_tls_stream(d)


cdef void _capi_set_current_stream(int d, int64_t s) noexcept nogil:
    capi_tls_set_stream(d, s)


cdef int _capi_malloc(int d, size_t n, int64_t s, uintptr_t* out) noexcept nogil:
    return capi_malloc_(_alloc, capi_record_level_of(_alloc), d, n, s, out)


cdef int _capi_free(uintptr_t p) noexcept nogil:
    return capi_free_(_alloc, capi_record_level_of(_alloc), _shut_down, p)


cdef int _capi_record_stream(uintptr_t p, int d, int64_t s) noexcept nogil:
    return capi_record_stream_(_alloc, p, d, s)


cdef int _capi_device_of(uintptr_t p) noexcept nogil:
    return capi_device_of_(_alloc, p)


cdef int _capi_notify_oom() noexcept nogil:
    cdef MtiaAllocOom info
    capi_last_oom(&info)
    if not info.notify_observers:
        return 0
    with gil:
        try:
            notify_oom_observers(info.device, info.alloc_size, info.total_or_allowed, info.device_free)
            return 0
        except BaseException as e:
            capi_fail(f"an out-of-memory observer raised {type(e).__name__}: {e}".encode())
            return -1


cdef int _capi_stream_exists(int d, int64_t s) noexcept nogil:
    return capi_stream_exists_(_alloc, d, s)


cdef int _capi_new_stream(int d, int priority, int64_t* out) noexcept nogil:
    return capi_new_stream_(_alloc, d, priority, out)


cdef int _capi_stream_query(int d, int64_t s) noexcept nogil:
    return capi_stream_query_(_alloc, d, s)


cdef int _capi_stream_synchronize(int d, int64_t s) noexcept nogil:
    return capi_stream_synchronize_(_alloc, d, s)


cdef int _capi_device_synchronize(int d) noexcept nogil:
    return capi_device_synchronize_(_alloc, d)


cdef int _capi_mem_get_info(int d, uint64_t* f, uint64_t* t) noexcept nogil:
    return capi_mem_get_info_(_alloc, d, f, t)


cdef void* _capi_event_create(int timing) noexcept nogil:
    return capi_event_create_(timing)


cdef void _capi_event_destroy(void* e) noexcept nogil:
    capi_event_destroy_(e)


cdef int _capi_event_record(void* e, int d, int64_t s) noexcept nogil:
    return capi_event_record_(_alloc, e, d, s)


# The event entry points that read or wait for an event's stream check _alloc first: in a
# child forked after initialisation (_C.after_fork_in_child) the stream is the parent's,
# whose worker does not run there, and lazy initialisation fails with the bad-fork error.
cdef int _capi_event_query(void* e) noexcept nogil:
    if _alloc == NULL and _capi_ensure_init() != 0:
        return -1
    return capi_event_query_(e)


cdef int _capi_event_synchronize(void* e) noexcept nogil:
    if _alloc == NULL and _capi_ensure_init() != 0:
        return -1
    return capi_event_synchronize_(e)


cdef int _capi_event_wait(void* e, int d, int64_t s) noexcept nogil:
    return capi_event_wait_(_alloc, e, d, s)


cdef int _capi_event_elapsed_ms(void* a, void* b, double* out) noexcept nogil:
    if _alloc == NULL and _capi_ensure_init() != 0:
        return -1
    return capi_event_elapsed_(a, b, out)


cdef int _capi_event_recorded(void* e) noexcept nogil:
    return capi_event_recorded_(e)


cdef int _capi_record_level() noexcept nogil:
    return capi_record_level_of(_alloc)


cdef MtiaAllocCAPI _capi_table
_capi_table.version = MTIA_ALLOC_CAPI_VERSION
_capi_table.struct_size = sizeof(MtiaAllocCAPI)
_capi_table.ensure_init = _capi_ensure_init
_capi_table.is_initialized = _capi_is_initialized
_capi_table.device_count = _capi_device_count
_capi_table.last_error = capi_last_error
_capi_table.last_oom = capi_last_oom
_capi_table.current_device = _capi_current_device
_capi_table.set_current_device = _capi_set_current_device
_capi_table.current_stream = _capi_current_stream
_capi_table.set_current_stream = _capi_set_current_stream
_capi_table.malloc = _capi_malloc
_capi_table.free = _capi_free
_capi_table.record_stream = _capi_record_stream
_capi_table.device_of = _capi_device_of
_capi_table.notify_oom = _capi_notify_oom
_capi_table.stream_exists = _capi_stream_exists
_capi_table.new_stream = _capi_new_stream
_capi_table.stream_query = _capi_stream_query
_capi_table.stream_synchronize = _capi_stream_synchronize
_capi_table.device_synchronize = _capi_device_synchronize
_capi_table.mem_get_info = _capi_mem_get_info
_capi_table.event_create = _capi_event_create
_capi_table.event_destroy = _capi_event_destroy
_capi_table.event_record = _capi_event_record
_capi_table.event_query = _capi_event_query
_capi_table.event_synchronize = _capi_event_synchronize
_capi_table.event_wait = _capi_event_wait
_capi_table.event_elapsed_ms = _capi_event_elapsed_ms
_capi_table.event_recorded = _capi_event_recorded
_capi_table.record_level = _capi_record_level


def _capi_capsule():
    """A PyCapsule named "mtia_alloc._C._capi" holding the MtiaAllocCAPI table (_capi.h)."""
    return PyCapsule_New(<void*>&_capi_table, b"mtia_alloc._C._capi", NULL)
