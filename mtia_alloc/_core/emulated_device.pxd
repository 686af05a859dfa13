# Declarations of src_cpp/emulated_device.h.
from libc.stdint cimport int64_t, uint64_t
from libcpp.string cimport string

from mtia_alloc._core.stream cimport Stream


cdef extern from "emulated_device.h" namespace "mtia":
    cdef cppclass DeviceMemory:
        size_t capacity()
        size_t used()
        void reserve_for_runtime(size_t bytes) except +
        size_t runtime_reserved()
        void fail_allocations(int64_t after_n, int64_t every)
        uint64_t malloc_calls()
        uint64_t free_calls()
    cdef cppclass EmulatedDevice:
        DeviceMemory& memory()
        Stream* default_stream()
        void synchronize() except + nogil
    cdef cppclass Emulator:
        int device_count()
        EmulatedDevice& device(int d) nogil
        Stream* new_stream(int d, int priority)
        Stream* stream(int d, int64_t id) except +
    size_t c_parse_memory_size "mtia::parse_memory_size"(const string& text, const string& what) except +
