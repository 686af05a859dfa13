# Declarations of mtia_alloc/_binding.h, the C++ half of the binding (the parts of the
# binding that need Python.h). Cimported by _C.pyx.
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libcpp cimport bool as cbool
from libcpp.memory cimport shared_ptr
from libcpp.string cimport string

from mtia_alloc._core.allocator cimport Allocator
from mtia_alloc._core.frames cimport Frame, FramesPtr
from mtia_alloc._core.private_pool cimport AllocationFilter
from mtia_alloc._core.raw_allocator cimport RawAllocator
from mtia_alloc._core.stream cimport Task
from mtia_alloc._core.types cimport MempoolId


cdef extern from "_binding.h" namespace "mtia_binding":
    void raise_py_error()
    void set_oom_error_type(object t)
    void install_gil_hooks(unsigned long main_ident)
    void reset_gil_hooks_after_fork()
    void park_other_threads_at_exit()
    int tls_current_device "mtia_binding::current_device"()
    void tls_set_current_device "mtia_binding::set_current_device"(int d)
    int64_t tls_current_stream "mtia_binding::current_stream"(int d)
    void tls_set_current_stream "mtia_binding::set_current_stream"(int d, int64_t s)
    Task make_py_task(object fn)
    Task make_copy_task(uintptr_t dst, uintptr_t src, size_t n)
    Task make_fill_task(uintptr_t dst, size_t n, const char* pattern, size_t k)
    Task make_sleep_task(int64_t ns)
    Task keep_alive(Task inner, object keep)
    shared_ptr[RawAllocator] make_py_raw_allocator(object a, object f)
    shared_ptr[RawAllocator] make_c_raw_allocator(uintptr_t a, uintptr_t f)
    FramesPtr capture_frames()
    void stream_stack_table_now()
    void install_history_error_hook()
    void set_package_prefix(const string& p)
    int frame_line(const Frame& f)
    PyObject* frame_code(const Frame& f)
    uintptr_t frames_key(const FramesPtr& f)
    AllocationFilter make_filter(int kind, uint64_t capture_id)
    MempoolId make_pool_id(uint64_t a, uint64_t b)
    uintptr_t allocator_malloc(Allocator* a, int d, size_t n, int64_t s, FramesPtr f,
                               cbool array_owned) except +raise_py_error
    void add_oom_observer(object fn)
    int notify_oom_observers(int device, size_t alloc_size, size_t total_or_allowed, size_t device_free) except -1
