# Declarations of src_cpp/device_allocator.h.
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libcpp cimport bool as cbool
from libcpp.memory cimport shared_ptr
from libcpp.string cimport string
from libcpp.utility cimport pair
from libcpp.vector cimport vector

from mtia_alloc._core.frames cimport FramesPtr
from mtia_alloc._core.history cimport RecordContext, TraceEntry
from mtia_alloc._core.private_pool cimport AllocationFilter
from mtia_alloc._core.raw_allocator cimport RawAllocator
from mtia_alloc._core.segment_info cimport SegmentInfo
from mtia_alloc._core.stats cimport DeviceStats
from mtia_alloc._core.types cimport MempoolId


cdef extern from "device_allocator.h" namespace "mtia":
    cdef cppclass DeviceAllocator:
        void record_stream(uintptr_t ptr, int64_t stream) except +
        size_t block_size(uintptr_t ptr) except +
        void empty_cache(MempoolId pool, const FramesPtr& frames) except + nogil
        void process_events() except +
        void set_memory_fraction(double fraction) except +
        double memory_fraction() except +
        DeviceStats stats() except +
        void reset_peak_stats() except +
        void reset_accumulated_stats() except +
        pair[size_t, size_t] largest_free_blocks() except +
        void create_or_incref_pool(MempoolId id, shared_ptr[RawAllocator] allocator) except +
        void release_pool(MempoolId id) except +
        int pool_use_count(MempoolId id) except +
        void begin_allocate_to_pool(MempoolId id, AllocationFilter filter) except +
        void end_allocate_to_pool(MempoolId id) except +
        void set_use_on_oom(MempoolId id, cbool on) except +
        void set_no_split(MempoolId id) except +
        void set_stream_capture(int64_t stream, uint64_t capture_id) except +
        cbool any_capture_underway() except +
        vector[SegmentInfo] snapshot(MempoolId pool, cbool all_pools) except +
        vector[TraceEntry] trace() except +
        string check_invariants() except +
