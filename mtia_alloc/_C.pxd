# _C.pxd: Cython declarations of the C++ core (src_cpp/). Declarations only, no policy.
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libcpp cimport bool as cbool
from libcpp.memory cimport shared_ptr
from libcpp.string cimport string
from libcpp.utility cimport pair
from libcpp.vector cimport vector


cdef extern from "types.h" namespace "mtia":
    cdef cppclass MempoolId:
        uint64_t first
        uint64_t second


cdef extern from "block.h" namespace "mtia":
    cdef cppclass Frame:
        const void* code
        int lasti
        int line
    ctypedef vector[Frame] Frames
    ctypedef shared_ptr[const Frames] FramesPtr
    cdef cppclass RawAllocator:
        pass


cdef extern from "stats.h" namespace "mtia":
    cdef cppclass Stat:
        int64_t current, peak, allocated, freed
    cdef cppclass StatArray:
        Stat& operator[](size_t)
    cdef cppclass DeviceStats:
        StatArray allocation, segment, active, inactive_split
        StatArray allocated_bytes, reserved_bytes, active_bytes, inactive_split_bytes, requested_bytes
        int64_t num_alloc_retries, num_ooms, num_sync_all_streams, num_device_alloc, num_device_free
        Stat oversize_allocations, oversize_segments
        int64_t max_split_size


cdef extern from "config.h" namespace "mtia":
    cdef cppclass AllocatorConfig:
        size_t max_split_size
        size_t max_non_split_rounding_size
        size_t roundup_power2_divisions[16]
        double garbage_collection_threshold
        cbool expandable_segments
        cbool release_lock_on_cudamalloc
        cbool graph_capture_record_stream_reuse
        string last_settings


cdef extern from "size_policy.h" namespace "mtia":
    size_t round_size(size_t size, const AllocatorConfig& cfg)
    string format_size(uint64_t size)


cdef extern from "history.h" namespace "mtia":
    cdef enum class TraceAction(int):
        pass
    cdef enum class RecordContext(int):
        kNever, kState, kAlloc, kAll
    const char* trace_action_name(TraceAction a)
    string& user_metadata()
    cdef cppclass TraceEntry:
        TraceAction action
        uintptr_t addr
        size_t size
        int64_t stream
        int64_t time_us
        MempoolId pool
        FramesPtr frames
        string user_metadata


cdef extern from "stream.h" namespace "mtia":
    cdef cppclass Task:
        void (*run)(void*)
        void* arg
        void (*release)(void*)
    cdef cppclass Stream:
        int device()
        int64_t id()
        int priority()
        uint64_t enqueue(Task task) nogil
        uint64_t enqueued()
        uint64_t completed()
        cbool query()
        void synchronize() except + nogil
    cdef cppclass EventMark:
        cbool query()
    cdef cppclass Event:
        Event(cbool enable_timing)
        void record(Stream* s)
        cbool query()
        void synchronize() except + nogil
        cbool recorded()
        cbool timing()
        EventMark mark()
        double elapsed_ms(const Event& end) except + nogil
    void stream_wait_mark(Stream* s, const EventMark& mark)


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


cdef extern from "device_allocator.h" namespace "mtia":
    cdef enum FilterKind "mtia::AllocationFilter::Kind":
        kFilterAll "mtia::AllocationFilter::kAll"
        kFilterThread "mtia::AllocationFilter::kThread"
        kFilterCapture "mtia::AllocationFilter::kCapture"
    cdef cppclass AllocationFilter:
        FilterKind kind
        uint64_t capture_id
    cdef cppclass BlockInfo:
        uintptr_t address
        size_t size, requested_size
        const char* state
        FramesPtr frames
    cdef cppclass SegmentInfo:
        int device
        uintptr_t address
        size_t total_size, allocated_size, active_size, requested_size
        int64_t stream
        cbool is_small
        cbool is_expandable
        MempoolId pool
        FramesPtr frames
        vector[BlockInfo] blocks
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
        void set_history(cbool enabled, RecordContext context, size_t max_entries, cbool clear) except +
        string check_invariants() except +


cdef extern from "allocator.h" namespace "mtia":
    cdef cppclass Allocator:
        Allocator(int device_count, size_t memory_per_device, const string& conf,
                  shared_ptr[RawAllocator] raw) except +
        int device_count()
        Emulator& emulator() nogil
        DeviceAllocator& device(int d) nogil
        uintptr_t malloc(int device, size_t size, int64_t stream, FramesPtr frames) except +
        void free(uintptr_t ptr, FramesPtr frames) except +
        int device_of(uintptr_t ptr) except +
        void empty_cache(MempoolId pool, const FramesPtr& frames) except + nogil
        void set_config(const string& conf) except +
        const AllocatorConfig& config()
        MempoolId new_user_pool_id()
        MempoolId new_graph_pool_id()
        void shutdown() nogil
