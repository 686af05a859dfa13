# Declarations of src_cpp/stream.h.
from libc.stdint cimport int64_t, uint64_t
from libcpp cimport bool as cbool


cdef extern from "stream.h" namespace "mtia":
    cdef cppclass Task:
        void (*run)(void*)
        void* arg
        void (*release)(void*)
    cdef cppclass Stream:
        int device()
        int64_t id()
        int priority()
        uint64_t enqueue(Task task) nogil
        uint64_t enqueued()
        uint64_t completed()
        cbool query()
        void synchronize() except + nogil
    cdef cppclass EventMark:
        cbool query()
    cdef cppclass Event:
        Event(cbool enable_timing)
        uint64_t record(Stream* s)
        cbool query()
        void synchronize() except + nogil
        cbool recorded()
        cbool timing()
        EventMark mark()
        double elapsed_ms(const Event& end) except + nogil
    void stream_wait_mark(Stream* s, const EventMark& mark)
