# Declarations of src_cpp/segment_info.h.
from libc.stdint cimport int64_t, uintptr_t
from libcpp cimport bool as cbool
from libcpp.vector cimport vector

from mtia_alloc._core.frames cimport FramesPtr
from mtia_alloc._core.types cimport MempoolId


cdef extern from "segment_info.h" namespace "mtia":
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
