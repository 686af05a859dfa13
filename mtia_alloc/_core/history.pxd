# Declarations of src_cpp/history.h.
from libc.stdint cimport int64_t, uintptr_t
from libcpp.string cimport string

from mtia_alloc._core.frames cimport FramesPtr
from mtia_alloc._core.types cimport MempoolId


cdef extern from "history.h" namespace "mtia":
    cdef enum class TraceAction(int):
        pass
    cdef enum class RecordContext(int):
        kNever, kState, kAlloc, kAll
    const char* trace_action_name(TraceAction a)
    const string& user_metadata()
    void set_user_metadata(const string& s) except +
    cdef cppclass TraceEntry:
        TraceAction action
        uintptr_t addr
        size_t size
        int64_t stream
        int64_t time_us
        MempoolId pool
        FramesPtr frames
        string user_metadata
