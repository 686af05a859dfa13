# cython: language_level=3, cdivision=True
"""A reader of snapshot pickles that scales: the pickle's opcode stream (protocols 0-5,
plain data only) is run by a small machine of our own, which builds ordinary Python
objects for everything but the trace entries. The entries of `device_traces[d]` go
straight into columns (action code, address, size, stream, time, stack id, device_free;
other keys in a sparse side table) and their dicts are dropped batch by batch (a pickler
appends at most 1000 items per APPENDS), so a trace of millions of entries costs about
40 bytes an entry instead of a dict, its ints and a list of frames each. Stacks are
interned: each distinct frame dict and each distinct stack (tuple of frame ids) is kept
once. Memo slots that held an entry, its frames list or a duplicate frame are replaced
by the canonical object (an entry's by a marker: a later GET of an entry, which torch
never writes, raises NeedsFallback).

Opcodes that name code (GLOBAL, STACK_GLOBAL, REDUCE, ...) are not run: a global that the
plain-data unpickler of viz.load allows (OrderedDict, set, numpy scalars) raises
NeedsFallback (the caller reads the file with that unpickler), any other raises
UnsafeGlobal(module, name); other opcodes raise NeedsFallback; running out of data raises
Truncated.

Owns: read_pickle, TraceBuilder's columns. Relies on nothing of mtia_alloc (viz.columns
wraps it)."""
from libc.stdint cimport int64_t, uint64_t, int32_t, uint32_t, uint8_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.long cimport PyLong_AsUnsignedLongLong, PyLong_AsLongLong
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject

import gc
import struct

import numpy as np


class NeedsFallback(Exception):
    """An opcode this reader does not run but the plain-data unpickler may accept."""


class UnsafeGlobal(Exception):
    """A global outside the plain-data allow list: args (module, name)."""


class Truncated(Exception):
    """The pickle ends before its STOP opcode, or an opcode's data is cut."""


class BadEntry(Exception):
    """A trace entry that is not a dict: args (device, index, object)."""


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
}

# present bits
DEF P_ADDR = 1
DEF P_SIZE = 2
DEF P_STREAM = 4
DEF P_TIME = 8
DEF P_DFREE = 16
DEF P_FRAMES = 32

_KEYS = {"action": 0, "addr": 1, "size": 2, "stream": 3, "time_us": 4, "device_free": 5, "frames": 6}
cdef dict _KEYS_C = _KEYS


cdef inline Py_ssize_t _ptr(object o):
    return <Py_ssize_t><void*>o


cdef uint64_t _ptr_hash(list frames):
    """A hash of the identities of a list's items (FNV-1a over the pointers)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(frames)
    cdef uint64_t h = 1469598103934665603ULL ^ <uint64_t>n
    for i in range(n):
        h = (h ^ <uint64_t><size_t>PyList_GET_ITEM(frames, i)) * 1099511628211ULL
    return h


cdef bint _same_items(list a, list b):
    cdef Py_ssize_t i, n = PyList_GET_SIZE(a)
    if n != PyList_GET_SIZE(b):
        return False
    for i in range(n):
        if PyList_GET_ITEM(a, i) != PyList_GET_ITEM(b, i):
            return False
    return True

DEF CHUNK = 1 << 24

# what a memo slot holds once its trace entry went into the columns
_GONE = object()


cdef class TraceBuilder:
    """The columns of one device's trace while it is read."""
    cdef public Py_ssize_t n
    cdef Py_ssize_t cap
    cdef uint8_t* action
    cdef uint8_t* present
    cdef uint64_t* addr
    cdef uint64_t* size
    cdef int64_t* stream
    cdef int64_t* time
    cdef int32_t* stack
    cdef uint64_t* dfree
    cdef public dict extras      # row -> {key: raw value} for keys or values the columns do not hold
    cdef public int device

    def __cinit__(self):
        self.n = 0
        self.cap = 0
        self.action = NULL; self.present = NULL; self.addr = NULL; self.size = NULL
        self.stream = NULL; self.time = NULL; self.stack = NULL; self.dfree = NULL
        self.extras = {}

    def __dealloc__(self):
        free(self.action); free(self.present); free(self.addr); free(self.size)
        free(self.stream); free(self.time); free(self.stack); free(self.dfree)

    cdef int grow(self) except -1:
        cdef Py_ssize_t cap = self.cap * 2 if self.cap else 4096
        self.action = <uint8_t*>_re(self.action, cap * 1)
        self.present = <uint8_t*>_re(self.present, cap * 1)
        self.addr = <uint64_t*>_re(self.addr, cap * 8)
        self.size = <uint64_t*>_re(self.size, cap * 8)
        self.stream = <int64_t*>_re(self.stream, cap * 8)
        self.time = <int64_t*>_re(self.time, cap * 8)
        self.stack = <int32_t*>_re(self.stack, cap * 4)
        self.dfree = <uint64_t*>_re(self.dfree, cap * 8)
        self.cap = cap
        return 0

    def columns(self):
        """The columns as numpy arrays (copies), trimmed to n."""
        n = self.n
        out = {}
        for name, dt, ptr_size in (("action", np.uint8, 1), ("present", np.uint8, 1), ("addr", np.uint64, 8),
                                   ("size", np.uint64, 8), ("stream", np.int64, 8), ("time_us", np.int64, 8),
                                   ("stack", np.int32, 4), ("device_free", np.uint64, 8)):
            arr = np.empty(n, dtype=dt)
            if n:
                _copy_out(self, name, arr)
            out[name] = arr
        return out


cdef void* _re(void* p, size_t nbytes) except NULL:
    cdef void* q = realloc(p, nbytes)
    if q == NULL:
        raise MemoryError()
    return q


cdef _copy_out(TraceBuilder t, str name, arr):
    cdef unsigned char[::1] view = arr.view(np.uint8)
    cdef void* src
    cdef size_t width
    if name == "action":
        src, width = t.action, 1
    elif name == "present":
        src, width = t.present, 1
    elif name == "addr":
        src, width = t.addr, 8
    elif name == "size":
        src, width = t.size, 8
    elif name == "stream":
        src, width = t.stream, 8
    elif name == "time_us":
        src, width = t.time, 8
    elif name == "stack":
        src, width = t.stack, 4
    else:
        src, width = t.dfree, 8
    memcpy(&view[0], src, t.n * width)


cdef class Reader:
    cdef object f
    cdef bytes buf
    cdef const unsigned char* p
    cdef Py_ssize_t pos, end
    cdef list stack
    cdef list marks
    cdef list memo
    cdef Py_ssize_t scan_mark
    cdef object outer          # the list under the top-level key "device_traces"
    cdef Py_ssize_t outer_pos
    cdef public list traces    # TraceBuilders, in device order
    # interning
    cdef public list frame_table
    cdef dict frame_by_key
    cdef dict frame_by_id
    cdef public list stack_table
    cdef dict stack_by_key
    cdef dict stack_by_id
    cdef dict stack_by_ptrs     # hash of the canonical frames' identities -> stack id
    cdef dict tmp               # id(obj) -> replacement, for the batch being committed
    cdef public list actions
    cdef dict action_code

    def __init__(self, f):
        self.f = f
        self.buf = b""
        self.p = self.buf
        self.pos = 0
        self.end = 0
        self.stack = []
        self.marks = []
        self.memo = []
        self.scan_mark = 0
        self.outer = None
        self.outer_pos = -1
        self.traces = []
        self.frame_table = []
        self.frame_by_key = {}
        self.frame_by_id = {}
        self.stack_table = []
        self.stack_by_key = {}
        self.stack_by_id = {}
        self.stack_by_ptrs = {}
        self.tmp = {}
        self.actions = []
        self.action_code = {}

    cdef inline int need(self, Py_ssize_t n) except -1:
        if n >= 0 and self.pos + n <= self.end:
            return 0
        return self.refill(n)

    cdef int refill(self, Py_ssize_t n) except -1:
        if n < 0 or n > (1 << 62):  # a length no file holds: corrupt data
            raise Truncated()
        cdef bytes rest = self.buf[self.pos:]
        parts = [rest]
        have = len(rest)
        while have < n:  # chunk by chunk: a corrupt length reads to the end of the file, no further
            more = self.f.read(CHUNK)
            if not more:
                break
            parts.append(more)
            have += len(more)
        self.buf = b"".join(parts)
        self.p = self.buf
        self.pos = 0
        self.end = len(self.buf)
        if self.end < n:
            raise Truncated()
        return 0

    cdef inline uint64_t le(self, Py_ssize_t n):
        cdef uint64_t v = 0
        cdef Py_ssize_t i
        for i in range(n):
            v |= (<uint64_t>self.p[self.pos + i]) << (8 * i)
        self.pos += n
        return v

    cdef object text_line(self):
        """The bytes up to the next newline (protocol 0 arguments), without it."""
        cdef Py_ssize_t i
        while True:
            i = self.pos
            while i < self.end and self.p[i] != 10:
                i += 1
            if i < self.end:
                out = self.buf[self.pos:i]
                self.pos = i + 1
                return out
            self.refill(self.end - self.pos + 1)

    cdef object string(self, Py_ssize_t n):
        self.need(n)
        s = PyUnicode_DecodeUTF8(<const char*>(self.p + self.pos), n, "surrogatepass")
        self.pos += n
        return s

    cdef Py_ssize_t pop_mark(self) except -1:
        if not self.marks:
            raise NeedsFallback("no mark")
        return self.marks.pop()

    cdef memo_put(self, Py_ssize_t i, obj):
        cdef Py_ssize_t n = len(self.memo)
        if i < 0 or i > n + (1 << 20):  # a memo index far past any object read: corrupt data
            raise Truncated()
        if i == n:
            self.memo.append(obj)
        elif i < n:
            self.memo[i] = obj
        else:
            self.memo.extend([None] * (i - n))
            self.memo.append(obj)

    cdef inline object memo_get(self, Py_ssize_t i):
        cdef list memo = self.memo
        if i < 0 or i >= PyList_GET_SIZE(memo):
            raise NeedsFallback("memo")
        o = <object>PyList_GET_ITEM(memo, i)
        if o is _GONE:  # a trace entry referred to twice: never written by torch; the plain reader copes
            raise NeedsFallback("an entry referred to again")
        return o

    cdef new_list(self):
        """EMPTY_LIST / LIST: a TraceBuilder where the list is one device's trace."""
        cdef Py_ssize_t n = len(self.stack)
        st = self.stack
        if self.outer is None:
            if n >= 2 and type(st[n - 1]) is str and st[n - 1] == "device_traces" and type(st[0]) is dict:
                if (len(self.marks) == 1 and self.marks[0] == 1 and (n - 2) % 2 == 0) or \
                        (not self.marks and n == 2):
                    lst = []
                    self.outer = lst
                    self.outer_pos = n
                    return lst
            return []
        if n > self.outer_pos and st[self.outer_pos] is self.outer and (
                (n == self.outer_pos + 1 and (not self.marks or self.marks[-1] <= self.outer_pos)) or
                (self.marks and self.marks[-1] == self.outer_pos + 1)):
            t = TraceBuilder()
            t.device = len(self.traces)
            self.traces.append(t)
            return t
        return []

    cdef int commit(self, TraceBuilder t, list items) except -1:
        cdef Py_ssize_t i, n
        cdef dict tmp
        cdef list memo
        for d in items:
            self.add_entry(t, d)
        n = len(self.memo)
        tmp = self.tmp
        memo = self.memo
        if tmp:
            for i in range(self.scan_mark, n):
                o = memo[i]
                r = tmp.get(_ptr(o))
                if r is not None:
                    memo[i] = r
            tmp.clear()
        self.scan_mark = n
        return 0

    cdef int add_entry(self, TraceBuilder t, d) except -1:
        cdef Py_ssize_t row = t.n
        cdef uint8_t present = 0
        cdef int kid
        if type(d) is not dict:
            raise BadEntry(t.device, row, d)
        if row == t.cap:
            t.grow()
        t.addr[row] = 0
        t.size[row] = 0
        t.stream[row] = 0
        t.time[row] = 0
        t.stack[row] = -1
        t.dfree[row] = 0
        t.action[row] = 255
        extra = None
        for k, v in (<dict>d).items():
            kk = _KEYS_C.get(k)
            if kk is None:
                if extra is None:
                    extra = {}
                extra[k] = v
                continue
            kid = kk
            if kid == 0:
                code = self.action_code.get(v) if type(v) is str else None
                if code is None:
                    if type(v) is str and len(self.actions) < 255:
                        code = len(self.actions)
                        self.actions.append(v)
                        self.action_code[v] = code
                    else:
                        if extra is None:
                            extra = {}
                        extra[k] = v
                        continue
                t.action[row] = code
            elif kid == 6:
                if type(v) is list:
                    t.stack[row] = self.intern_stack(v)
                    present |= P_FRAMES
                else:
                    if extra is None:
                        extra = {}
                    extra[k] = v
            elif type(v) is int:
                try:
                    if kid == 1:
                        t.addr[row] = PyLong_AsUnsignedLongLong(v)
                        present |= P_ADDR
                    elif kid == 2:
                        t.size[row] = PyLong_AsUnsignedLongLong(v)
                        present |= P_SIZE
                    elif kid == 3:
                        t.stream[row] = PyLong_AsLongLong(v)
                        present |= P_STREAM
                    elif kid == 4:
                        t.time[row] = PyLong_AsLongLong(v)
                        present |= P_TIME
                    else:
                        t.dfree[row] = PyLong_AsUnsignedLongLong(v)
                        present |= P_DFREE
                except OverflowError:
                    if extra is None:
                        extra = {}
                    extra[k] = v
            else:
                if extra is None:
                    extra = {}
                extra[k] = v
        t.present[row] = present
        if extra is not None:
            t.extras[row] = extra
        t.n = row + 1
        self.tmp[_ptr(d)] = _GONE
        return 0

    cdef int32_t intern_stack(self, list frames) except -2:
        cdef uint64_t h = _ptr_hash(frames)
        sid = self.stack_by_ptrs.get(h)
        if sid is not None and _same_items(frames, <list>self.stack_table[<Py_ssize_t>sid]):
            if self.stack_table[<Py_ssize_t>sid] is not frames:
                self.tmp[_ptr(frames)] = self.stack_table[<Py_ssize_t>sid]
            return sid
        sid = self.stack_by_id.get(_ptr(frames))
        if sid is not None:
            return sid
        fids = []
        for fr in frames:
            fid = self.frame_by_id.get(_ptr(fr))
            if fid is None:
                key = _frame_key(fr)
                fid = self.frame_by_key.get(key)
                if fid is None:
                    fid = len(self.frame_table)
                    self.frame_table.append(fr)
                    self.frame_by_key[key] = fid
                    self.frame_by_id[_ptr(fr)] = fid
                else:
                    self.tmp[_ptr(fr)] = self.frame_table[fid]
            fids.append(fid)
        key = tuple(fids)
        sid = self.stack_by_key.get(key)
        if sid is None:
            sid = len(self.stack_table)
            canon = [self.frame_table[f] for f in fids]
            frames[:] = canon
            self.stack_table.append(frames)
            self.stack_by_key[key] = sid
            self.stack_by_id[_ptr(frames)] = sid
            self.stack_by_ptrs[_ptr_hash(frames)] = sid
        else:
            self.tmp[_ptr(frames)] = self.stack_table[sid]
        return sid

    def run(self):
        cdef unsigned char op
        cdef Py_ssize_t n, m
        cdef uint64_t u
        cdef Py_ssize_t i
        cdef list st = self.stack
        cdef list memo = self.memo
        cdef list marks = self.marks
        cdef object v, k, d, target
        while True:
            self.need(1)
            op = self.p[self.pos]
            self.pos += 1
            if op == 0x80:      # PROTO
                self.need(1)
                if self.p[self.pos] > 5:
                    raise NeedsFallback("protocol")
                self.pos += 1
            elif op == 0x95:    # FRAME
                self.need(8)
                self.pos += 8
            elif op == 0x2e:    # STOP
                if not st:
                    raise NeedsFallback("empty stack")
                return st.pop()
            elif op == 0x28:    # MARK
                marks.append(len(st))
            elif op == 0x7d:    # EMPTY_DICT
                st.append({})
            elif op == 0x5d:    # EMPTY_LIST
                st.append(self.new_list())
            elif op == 0x29:    # EMPTY_TUPLE
                st.append(())
            elif op == 0x94:    # MEMOIZE
                memo.append(st[len(st) - 1])
            elif op == 0x71:    # BINPUT
                self.need(1)
                self.memo_put(self.le(1), st[-1])
            elif op == 0x72:    # LONG_BINPUT
                self.need(4)
                self.memo_put(self.le(4), st[-1])
            elif op == 0x68:    # BINGET
                self.need(1)
                st.append(self.memo_get(self.le(1)))
            elif op == 0x6a:    # LONG_BINGET
                self.need(4)
                st.append(self.memo_get(self.le(4)))
            elif op == 0x8c:    # SHORT_BINUNICODE
                self.need(1)
                st.append(self.string(self.le(1)))
            elif op == 0x58:    # BINUNICODE
                self.need(4)
                st.append(self.string(self.le(4)))
            elif op == 0x8d:    # BINUNICODE8
                self.need(8)
                st.append(self.string(self.le(8)))
            elif op == 0x4b:    # BININT1
                self.need(1)
                st.append(<long>self.le(1))
            elif op == 0x4d:    # BININT2
                self.need(2)
                st.append(<long>self.le(2))
            elif op == 0x4a:    # BININT
                self.need(4)
                st.append(<long>(<int32_t>(<uint32_t>self.le(4))))
            elif op == 0x8a:    # LONG1
                self.need(1)
                n = self.le(1)
                self.need(n)
                if n == 0:
                    st.append(0)
                elif n <= 8:
                    u = self.le(n)
                    if n < 8 and (u >> (8 * n - 1)) & 1:
                        u |= (~(<uint64_t>0)) << (8 * n)
                    st.append(<int64_t>u)
                else:
                    st.append(int.from_bytes(self.buf[self.pos:self.pos + n], "little", signed=True))
                    self.pos += n
            elif op == 0x8b:    # LONG4
                self.need(4)
                n = self.le(4)
                self.need(n)
                st.append(int.from_bytes(self.buf[self.pos:self.pos + n], "little", signed=True))
                self.pos += n
            elif op == 0x47:    # BINFLOAT
                self.need(8)
                st.append(struct.unpack(">d", self.buf[self.pos:self.pos + 8])[0])
                self.pos += 8
            elif op == 0x4e:    # NONE
                st.append(None)
            elif op == 0x88:    # NEWTRUE
                st.append(True)
            elif op == 0x89:    # NEWFALSE
                st.append(False)
            elif op == 0x75:    # SETITEMS
                m = self.pop_mark()
                d = st[m - 1]
                if type(d) is not dict:
                    raise NeedsFallback("SETITEMS")
                for i in range(m, len(st) - 1, 2):
                    (<dict>d)[st[i]] = st[i + 1]
                del st[m:]
            elif op == 0x73:    # SETITEM
                v = st.pop()
                k = st.pop()
                d = st[-1]
                if type(d) is not dict:
                    raise NeedsFallback("SETITEM")
                (<dict>d)[k] = v
            elif op == 0x65:    # APPENDS
                m = self.pop_mark()
                target = st[m - 1]
                if type(target) is TraceBuilder:
                    self.commit(<TraceBuilder>target, st[m:])
                elif type(target) is list:
                    (<list>target).extend(st[m:])
                else:
                    raise NeedsFallback("APPENDS")
                del st[m:]
            elif op == 0x61:    # APPEND
                v = st.pop()
                target = st[-1]
                if type(target) is TraceBuilder:
                    self.commit(<TraceBuilder>target, [v])
                elif type(target) is list:
                    (<list>target).append(v)
                else:
                    raise NeedsFallback("APPEND")
            elif op == 0x85:    # TUPLE1
                st[-1] = (st[-1],)
            elif op == 0x86:    # TUPLE2
                v = st.pop()
                st[-1] = (st[-1], v)
            elif op == 0x87:    # TUPLE3
                v = st.pop()
                k = st.pop()
                st[-1] = (st[-1], k, v)
            elif op == 0x74:    # TUPLE
                m = self.pop_mark()
                v = tuple(st[m:])
                del st[m:]
                st.append(v)
            elif op == 0x6c:    # LIST
                m = self.pop_mark()
                v = st[m:]
                del st[m:]
                st.append(v)
            elif op == 0x64:    # DICT
                m = self.pop_mark()
                d = {}
                for i in range(m, len(st) - 1, 2):
                    d[st[i]] = st[i + 1]
                del st[m:]
                st.append(d)
            elif op == 0x30:    # POP
                if self.marks and self.marks[-1] == len(st):
                    self.marks.pop()
                else:
                    st.pop()
            elif op == 0x31:    # POP_MARK
                m = self.pop_mark()
                del st[m:]
            elif op == 0x32:    # DUP
                st.append(st[-1])
            elif op == 0x70:    # PUT (protocol 0)
                self.memo_put(int(self.text_line()), st[-1])
            elif op == 0x67:    # GET (protocol 0)
                st.append(self.memo_get(int(self.text_line())))
            elif op == 0x49:    # INT (protocol 0)
                line = self.text_line()
                st.append(True if line == b"01" else False if line == b"00" else int(line))
            elif op == 0x4c:    # LONG (protocol 0)
                st.append(int(self.text_line().rstrip(b"L")))
            elif op == 0x46:    # FLOAT (protocol 0)
                st.append(float(self.text_line()))
            elif op == 0x56:    # UNICODE (protocol 0)
                st.append(self.text_line().decode("raw-unicode-escape"))
            elif op == 0x63:    # GLOBAL
                module = self.text_line().decode("utf-8", "replace")
                name = self.text_line().decode("utf-8", "replace")
                _global(module, name)
            elif op == 0x93:    # STACK_GLOBAL
                name = st.pop() if st else ""
                module = st.pop() if st else ""
                _global(str(module), str(name))
            elif op in (0x69, 0x6f):  # INST, OBJ: build objects from classes
                raise UnsafeGlobal("an object", "its class")
            else:
                raise NeedsFallback(f"opcode {op:#x}")



def _global(module, name):
    if (module, name) in _ALLOWED_GLOBALS:
        raise NeedsFallback("global")
    raise UnsafeGlobal(module, name)


def _frame_key(fr):
    if type(fr) is dict:
        key = tuple((<dict>fr).items())
        try:
            hash(key)
            return key
        except TypeError:
            return ("repr", repr(fr))
    return ("obj", type(fr).__name__, repr(fr))


def read_pickle(f):
    """Runs the pickle read from the binary file `f`. Returns (obj, reader): obj is what the
    pickle holds, with a TraceBuilder in place of each list of device_traces; reader has
    traces, actions, frame_table and stack_table."""
    r = Reader(f)
    enabled = gc.isenabled()
    gc.disable()  # millions of containers, none of them garbage: the cyclic GC would only walk them
    try:
        obj = r.run()
    finally:
        if enabled:
            gc.enable()
    return obj, r
