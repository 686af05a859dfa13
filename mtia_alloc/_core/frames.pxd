# Declarations of src_cpp/frames.h.
from libcpp.memory cimport shared_ptr
from libcpp.vector cimport vector


cdef extern from "frames.h" namespace "mtia":
    cdef cppclass Frame:
        const void* code
        int lasti
        int line
    ctypedef vector[Frame] Frames
    ctypedef shared_ptr[const Frames] FramesPtr
