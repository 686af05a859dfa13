# Declarations of src_cpp/bench_loops.h (the checked entry points only: the binding
# forwards to them).
from libc.stdint cimport uint64_t
from libcpp.utility cimport pair

from mtia_alloc._core.allocator cimport Allocator


cdef extern from "bench_loops.h" namespace "mtia":
    pair[double, double] native_pair_ns(Allocator& a, int device, size_t size, uint64_t n) except + nogil
    pair[double, double] glibc_pair_ns(size_t size, uint64_t n) except + nogil
    double threaded_pairs_per_second(Allocator& a, int threads, size_t size, uint64_t n) except + nogil
    double threaded_compute_per_second(int threads, uint64_t n) except + nogil
    double cached_blocks_pair_checked(Allocator& a, int device, size_t cached, uint64_t pairs,
                                      uint64_t seed) except + nogil
