# Declarations of src_cpp/private_pool.h.
from libc.stdint cimport uint64_t


cdef extern from "private_pool.h" namespace "mtia":
    cdef enum FilterKind "mtia::AllocationFilter::Kind":
        kFilterAll "mtia::AllocationFilter::kAll"
        kFilterThread "mtia::AllocationFilter::kThread"
        kFilterCapture "mtia::AllocationFilter::kCapture"
    cdef cppclass AllocationFilter:
        FilterKind kind
        uint64_t capture_id
