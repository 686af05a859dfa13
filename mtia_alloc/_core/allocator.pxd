# Declarations of src_cpp/allocator.h.
from libc.stdint cimport int64_t, uint32_t, uintptr_t
from libcpp cimport bool as cbool
from libcpp.memory cimport shared_ptr
from libcpp.string cimport string

from mtia_alloc._core.config cimport AllocatorConfig
from mtia_alloc._core.device_allocator cimport DeviceAllocator
from mtia_alloc._core.emulated_device cimport Emulator
from mtia_alloc._core.frames cimport FramesPtr
from mtia_alloc._core.history cimport RecordContext
from mtia_alloc._core.raw_allocator cimport RawAllocator
from mtia_alloc._core.types cimport MempoolId


cdef extern from "allocator.h" namespace "mtia":
    cdef cppclass Allocator:
        Allocator(int device_count, size_t memory_per_device, const string& conf,
                  shared_ptr[RawAllocator] raw) except +
        int device_count()
        Emulator& emulator() nogil
        DeviceAllocator& device(int d) nogil
        uintptr_t malloc(int device, size_t size, int64_t stream, FramesPtr frames) except +
        # by_array: the free of a DeviceArray's block by the array itself (else refused)
        void free(uintptr_t ptr, FramesPtr frames, cbool by_array) except +
        int device_of(uintptr_t ptr) except +
        void empty_cache(MempoolId pool, const FramesPtr& frames) except + nogil
        void set_config(const string& conf) except +
        const AllocatorConfig& config()
        MempoolId new_user_pool_id()
        MempoolId new_graph_pool_id()
        void shutdown() nogil
        void set_history(cbool enabled, RecordContext context, size_t max_entries, cbool clear,
                         uint32_t skip_mask) except +
        string start_history_stream(const string& path, const string& header_json) except +
        string stop_history_stream() nogil
        RecordContext record_level()
