# Declarations of src_cpp/raw_allocator.h.


cdef extern from "raw_allocator.h" namespace "mtia":
    cdef cppclass RawAllocator:
        pass
