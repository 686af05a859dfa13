"""Device traces held as columns, so that snapshots of millions of trace entries open in
about 40 bytes an entry: the reader of big pickles (viz._pickle_reader, the opcode
stream run into numpy columns, each distinct stack kept once), TraceColumns (one device's
trace; still a sequence of entry dicts for code that iterates, built on the fly), and a
streaming pickle writer (protocol 4, plain data) for snapshots whose traces are columns.

Owns: TraceColumns, read_columnar, write_pickle, COLUMNAR_MIN_BYTES.
Relies on: viz._pickle_reader (the opcode machine); nothing else of mtia_alloc."""
import collections.abc
import io
import os
import struct

import numpy as np

from ._pickle_reader import BadEntry, NeedsFallback, TraceBuilder, read_pickle

__all__ = ["TraceColumns", "read_columnar", "write_pickle", "COLUMNAR_MIN_BYTES", "NeedsFallback"]

# files at least this big (uncompressed size unknown for gzip: its compressed size) are read
# into columns; smaller ones keep the plain-data unpickler (every entry a dict)
COLUMNAR_MIN_BYTES = int(os.environ.get("MTIA_ALLOC_COLUMNAR_MIN_BYTES", 64 << 20))

P_ADDR, P_SIZE, P_STREAM, P_TIME, P_DFREE, P_FRAMES = 1, 2, 4, 8, 16, 32
_NONE = 255  # action code of an entry without a (string) action


class TraceColumns(collections.abc.Sequence):
    """One device's trace as numpy columns: action (codes into .actions), present (bits:
    which keys the entry had), addr, size, stream, time_us, stack (index into .stacks, the
    distinct frame lists; -1 = none), device_free; extras {row: {key: value}} for other keys
    and for values the columns cannot hold. Indexing, slicing and iteration give the entry
    dicts (built on the fly), so code written for a list of dicts works unchanged."""

    def __init__(self, cols, actions, stacks, extras=None):
        self.action = cols["action"]
        self.present = cols["present"]
        self.addr = cols["addr"]
        self.size = cols["size"]
        self.stream = cols["stream"]
        self.time_us = cols["time_us"]
        self.stack = cols["stack"]
        self.device_free = cols["device_free"]
        self.actions = list(actions)
        self.stacks = stacks
        self.extras = extras or {}

    # ---------------------------------------------------------------- the sequence
    def __len__(self):
        return len(self.action)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(*i.indices(len(self))))
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("trace entry index out of range")
        return self._entry(i)

    def _entry(self, i):
        d = {}
        code = int(self.action[i])
        if code != _NONE:
            d["action"] = self.actions[code]
        p = int(self.present[i])
        if p & P_ADDR:
            d["addr"] = int(self.addr[i])
        if p & P_SIZE:
            d["size"] = int(self.size[i])
        if p & P_STREAM:
            d["stream"] = int(self.stream[i])
        if p & P_TIME:
            d["time_us"] = int(self.time_us[i])
        if p & P_FRAMES:
            d["frames"] = self.stacks[int(self.stack[i])]
        if p & P_DFREE:
            d["device_free"] = int(self.device_free[i])
        extra = self.extras.get(i)
        if extra:
            d.update(extra)
        return d

    def __iter__(self):
        n = len(self)
        step = 65536
        actions = self.actions + [None] * (256 - len(self.actions))
        stacks, extras = self.stacks, self.extras
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            cols = zip(range(lo, hi), self.action[lo:hi].tolist(), self.present[lo:hi].tolist(),
                       self.addr[lo:hi].tolist(), self.size[lo:hi].tolist(), self.stream[lo:hi].tolist(),
                       self.time_us[lo:hi].tolist(), self.stack[lo:hi].tolist(), self.device_free[lo:hi].tolist())
            for i, a, p, addr, size, stream, t, s, dfree in cols:
                d = {} if a == _NONE else {"action": actions[a]}
                if p & P_ADDR:
                    d["addr"] = addr
                if p & P_SIZE:
                    d["size"] = size
                if p & P_STREAM:
                    d["stream"] = stream
                if p & P_TIME:
                    d["time_us"] = t
                if p & P_FRAMES:
                    d["frames"] = stacks[s]
                if p & P_DFREE:
                    d["device_free"] = dfree
                if extras:
                    extra = extras.get(i)
                    if extra:
                        d.update(extra)
                yield d

    def __reversed__(self):
        for i in range(len(self) - 1, -1, -1):
            yield self._entry(i)

    def __eq__(self, other):
        if isinstance(other, TraceColumns):
            other = list(other)
        return isinstance(other, (list, tuple)) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None

    def __repr__(self):
        return f"<TraceColumns: {len(self)} entries, {len(self.stacks)} distinct stacks>"

    # ---------------------------------------------------------------- columns
    def fields(self):
        """(index, action, addr, size, stream) of every entry, without building dicts
        (action None, addr/size/stream 0 when the entry has none)."""
        actions = self.actions + [None] * (256 - len(self.actions))
        n = len(self)
        step = 65536
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            yield from zip(range(lo, hi), (actions[a] for a in self.action[lo:hi].tolist()),
                           self.addr[lo:hi].tolist(), self.size[lo:hi].tolist(), self.stream[lo:hi].tolist())

    def code(self, name):
        """The action code of `name`, or -1 when no entry has that action."""
        try:
            return self.actions.index(name)
        except ValueError:
            return -1

    def is_action(self, *names):
        """A boolean array: entries whose action is one of `names`."""
        codes = [c for c in (self.code(n) for n in names) if c >= 0]
        if not codes:
            return np.zeros(len(self), dtype=bool)
        return np.isin(self.action, np.asarray(codes, dtype=np.uint8))

    def count(self, name):
        c = self.code(name)
        return 0 if c < 0 else int(np.count_nonzero(self.action == c))

    def take(self, idx):
        """The entries at indices `idx` (an integer array), as a new TraceColumns (stacks shared)."""
        idx = np.asarray(idx, dtype=np.int64)
        cols = {k: getattr(self, k)[idx] for k in ("action", "present", "addr", "size", "stream", "time_us",
                                                    "stack", "device_free")}
        extras = {}
        if self.extras:
            pos = {int(old): new for new, old in enumerate(idx.tolist()) if int(old) in self.extras}
            extras = {new: self.extras[old] for old, new in pos.items()}
        return TraceColumns(cols, self.actions, self.stacks, extras)

    def with_rows(self, before, after=None):
        """A new TraceColumns: the entry dicts `before`, these entries, then `after`."""
        parts = [TraceColumns.from_entries(before), self]
        if after:
            parts.append(TraceColumns.from_entries(after))
        return TraceColumns.concat(parts)

    @staticmethod
    def concat(parts):
        actions, stacks = [], []
        cols = {k: [] for k in ("action", "present", "addr", "size", "stream", "time_us", "stack", "device_free")}
        extras, base = {}, 0
        for p in parts:
            amap = np.full(256, _NONE, dtype=np.uint8)
            for i, a in enumerate(p.actions):
                if a not in actions:
                    actions.append(a)
                amap[i] = actions.index(a)
            stack = p.stack.copy()
            stack[stack >= 0] += len(stacks)
            stacks.extend(p.stacks)
            for k in cols:
                cols[k].append(amap[p.action] if k == "action" else stack if k == "stack" else getattr(p, k))
            extras.update({base + r: e for r, e in p.extras.items()})
            base += len(p)
        return TraceColumns({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}, actions, stacks,
                            extras)

    @classmethod
    def from_entries(cls, entries):
        """Columns of a list of entry dicts (stacks interned by content)."""
        entries = list(entries)
        n = len(entries)
        cols = {"action": np.full(n, _NONE, dtype=np.uint8), "present": np.zeros(n, dtype=np.uint8),
                "addr": np.zeros(n, dtype=np.uint64), "size": np.zeros(n, dtype=np.uint64),
                "stream": np.zeros(n, dtype=np.int64), "time_us": np.zeros(n, dtype=np.int64),
                "stack": np.full(n, -1, dtype=np.int32), "device_free": np.zeros(n, dtype=np.uint64)}
        actions, stacks, stack_ids, extras = [], [], {}, {}
        keys = {"addr": (P_ADDR, 0, 1 << 64), "size": (P_SIZE, 0, 1 << 64), "stream": (P_STREAM, -(1 << 63), 1 << 63),
                "time_us": (P_TIME, -(1 << 63), 1 << 63), "device_free": (P_DFREE, 0, 1 << 64)}
        for i, e in enumerate(entries):
            p = 0
            extra = {}
            for k, v in e.items():
                if k == "action" and type(v) is str:
                    if v not in actions:
                        actions.append(v)
                    cols["action"][i] = actions.index(v)
                elif k == "frames" and type(v) is list:
                    key = repr(v)
                    sid = stack_ids.get(key)
                    if sid is None:
                        sid = stack_ids[key] = len(stacks)
                        stacks.append(v)
                    cols["stack"][i] = sid
                    p |= P_FRAMES
                elif k in keys and _whole(v) is not None and keys[k][1] <= _whole(v) < keys[k][2]:
                    cols[k][i] = _whole(v)
                    p |= keys[k][0]
                    if type(v) is not int:  # an integral float or numpy integer: kept as given
                        extra[k] = v
                else:
                    extra[k] = v
            cols["present"][i] = p
            if extra:
                extras[i] = extra
        return cls(cols, actions, stacks, extras)


def _whole(v):
    """v as an int when it is one (or an integral float, a numpy integer), else None."""
    if type(v) is int:
        return v
    if isinstance(v, bool):
        return None
    if isinstance(v, float):
        return int(v) if v == v and v not in (float("inf"), float("-inf")) and v.is_integer() else None
    if hasattr(v, "__index__"):
        return int(v.__index__())
    return None


# -------------------------------------------------------------------- reading

def read_columnar(f):
    """The snapshot held by the binary file object `f` (a pickle), with each device trace a
    TraceColumns. Raises viz._pickle_reader's NeedsFallback (read it with the plain-data
    unpickler instead), UnsafeGlobal(module, name), Truncated, or ValueError (an entry that
    is not a dict)."""
    try:
        obj, reader = read_pickle(f)
    except BadEntry as e:
        device, row, entry = e.args
        raise ValueError(f"device_traces[{device}][{row}] must be a dict, got {type(entry).__name__} "
                         f"{entry!r:.40}") from None
    if reader.traces and isinstance(obj, dict):
        traces = obj.get("device_traces")
        if isinstance(traces, list):
            obj["device_traces"] = [TraceColumns(t.columns(), reader.actions, reader.stack_table, t.extras)
                                    if isinstance(t, TraceBuilder) else t for t in traces]
    return obj


# -------------------------------------------------------------------- writing

def write_pickle(path, snap):
    """Writes `snap` (plain data; device traces may be TraceColumns) as a protocol-4 pickle,
    streaming: the trace entries are written from the columns, each distinct stack once."""
    with open(os.fspath(path), "wb") as f:
        w = _Writer(io.BufferedWriter(f, 1 << 20) if not isinstance(f, io.BufferedWriter) else f)
        w.write(snap)
        w.out.flush()


class _Writer:
    def __init__(self, out):
        self.out = out
        self.memo = {}     # ("s", str) or ("id", id) -> memo index
        self.keep = []     # objects memoized by id stay alive
        self.n = 0
        out.write(b"\x80\x04")

    def _memoize(self, key, obj=None):
        self.memo[key] = self.n
        self.n += 1
        if obj is not None:
            self.keep.append(obj)
        return b"\x94"

    def _get(self, idx):
        return b"h" + bytes((idx,)) if idx < 256 else b"j" + struct.pack("<I", idx)

    def str_bytes(self, s):
        idx = self.memo.get(("s", s))
        if idx is not None:
            return self._get(idx)
        b = s.encode("utf-8", "surrogatepass")
        head = b"\x8c" + bytes((len(b),)) if len(b) < 256 else b"X" + struct.pack("<I", len(b))
        return head + b + self._memoize(("s", s))

    @staticmethod
    def int_bytes(v):
        if 0 <= v < 256:
            return b"K" + bytes((v,))
        if 0 <= v < 65536:
            return b"M" + struct.pack("<H", v)
        if -(1 << 31) <= v < (1 << 31):
            return b"J" + struct.pack("<i", v)
        nb = (v.bit_length() + 8) // 8
        data = v.to_bytes(nb, "little", signed=True)
        return (b"\x8a" + bytes((nb,)) if nb < 256 else b"\x8b" + struct.pack("<I", nb)) + data

    def write(self, obj):
        self._obj(obj)
        self.out.write(b".")

    def _obj(self, obj):
        w = self.out.write
        t = type(obj)
        if obj is None:
            w(b"N")
        elif obj is True:
            w(b"\x88")
        elif obj is False:
            w(b"\x89")
        elif t is int or isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
            w(self.int_bytes(int(obj)))
        elif isinstance(obj, (float, np.floating)):
            w(b"G" + struct.pack(">d", float(obj)))
        elif isinstance(obj, str):
            w(self.str_bytes(str(obj)))
        elif isinstance(obj, TraceColumns):
            self._trace(obj)
        elif isinstance(obj, dict):
            idx = self.memo.get(("id", id(obj)))
            if idx is not None:
                w(self._get(idx))
                return
            w(b"}" + self._memoize(("id", id(obj)), obj))
            if obj:
                w(b"(")
                for k, v in obj.items():
                    self._obj(k)
                    self._obj(v)
                w(b"u")
        elif isinstance(obj, (list, set, frozenset)):
            idx = self.memo.get(("id", id(obj)))
            if idx is not None:
                w(self._get(idx))
                return
            w(b"]" + self._memoize(("id", id(obj)), obj))
            items = list(obj)
            for lo in range(0, len(items), 1000):
                w(b"(")
                for v in items[lo:lo + 1000]:
                    self._obj(v)
                w(b"e")
        elif isinstance(obj, tuple):
            w(b"(")
            for v in obj:
                self._obj(v)
            w(b"t")
        else:
            raise TypeError(f"a snapshot holds plain data only, found {type(obj).__name__}")

    def _trace(self, tr):
        w = self.out.write
        w(b"]" + self._memoize(("trace", id(tr)), tr))
        if not len(tr):
            return
        names = ("action", "addr", "size", "stream", "time_us", "frames", "device_free")
        for k in names + tuple(tr.actions):  # memoized once (pushed and popped), then referred to
            if ("s", k) not in self.memo:
                w(self.str_bytes(k) + b"0")
        k_action, k_addr, k_size, k_stream, k_time, k_frames, k_dfree = (self.str_bytes(k) for k in names)
        actions = [self.str_bytes(a) for a in tr.actions]
        stack_refs = {}
        ib = self.int_bytes
        n = len(tr)
        for lo in range(0, n, 1000):
            hi = min(n, lo + 1000)
            parts = [b"("]
            for i, a, p, addr, size, stream, t, s, dfree in zip(
                    range(lo, hi), tr.action[lo:hi].tolist(), tr.present[lo:hi].tolist(), tr.addr[lo:hi].tolist(),
                    tr.size[lo:hi].tolist(), tr.stream[lo:hi].tolist(), tr.time_us[lo:hi].tolist(),
                    tr.stack[lo:hi].tolist(), tr.device_free[lo:hi].tolist()):
                parts.append(b"}(")
                if a != _NONE:
                    parts += (k_action, actions[a])
                if p & P_ADDR:
                    parts += (k_addr, ib(addr))
                if p & P_SIZE:
                    parts += (k_size, ib(size))
                if p & P_STREAM:
                    parts += (k_stream, ib(stream))
                if p & P_TIME:
                    parts += (k_time, ib(t))
                if p & P_FRAMES:
                    ref = stack_refs.get(s)
                    parts.append(k_frames)
                    if ref is None:
                        w(b"".join(parts))
                        parts = []
                        self._obj(tr.stacks[s])  # memoized by id: later entries get it back
                        stack_refs[s] = self._get(self.memo[("id", id(tr.stacks[s]))])
                    else:
                        parts.append(ref)
                if p & P_DFREE:
                    parts += (k_dfree, ib(dfree))
                extra = tr.extras.get(i) if tr.extras else None
                if extra:
                    w(b"".join(parts))
                    parts = []
                    for k, v in extra.items():
                        self._obj(k)
                        self._obj(v)
                parts.append(b"u")
            parts.append(b"e")
            w(b"".join(parts))
