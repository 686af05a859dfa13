# Declarations of src_cpp/size_policy.h.
from libc.stdint cimport uint64_t
from libcpp.string cimport string

from mtia_alloc._core.config cimport AllocatorConfig


cdef extern from "size_policy.h" namespace "mtia":
    size_t round_size(size_t size, const AllocatorConfig& cfg)
    string format_size(uint64_t size)
