# Declarations of src_cpp/stats.h.
from libc.stdint cimport int64_t


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
