# Declarations of src_cpp/types.h.
from libc.stdint cimport uint64_t


cdef extern from "types.h" namespace "mtia":
    cdef cppclass MempoolId:
        uint64_t first
        uint64_t second
