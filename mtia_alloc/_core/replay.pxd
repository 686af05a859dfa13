# Declarations of src_cpp/replay.h.
from libc.stdint cimport int64_t, uint64_t
from libcpp cimport bool as cbool
from libcpp.vector cimport vector

from mtia_alloc._core.allocator cimport Allocator


cdef extern from "replay.h" namespace "mtia":
    cdef cppclass ReplayEvent:
        uint64_t size
        unsigned int slot
        unsigned int stream
    cdef cppclass ReplayResult:
        uint64_t events, total_ns, cpu_ns
        int64_t peak_requested, peak_allocated, peak_reserved
        int64_t num_device_alloc, num_device_free, num_alloc_retries, num_ooms
        int64_t first_failure
        uint64_t skipped, leftover_freed
        vector[unsigned int] alloc_latency_ns, free_latency_ns
    ReplayResult replay_checked(Allocator& a, int device, const vector[ReplayEvent]& events, unsigned int slots,
                                const vector[int64_t]& streams, cbool latency, size_t prefix) except + nogil
