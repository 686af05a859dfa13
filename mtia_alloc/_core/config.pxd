# Declarations of src_cpp/config.h.
from libcpp cimport bool as cbool
from libcpp.string cimport string


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
