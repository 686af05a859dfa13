"""A REPL-friendly view of a memory snapshot, and the `summary` / `plot` CLI commands.

    >>> from mtia_alloc.memory import Snapshot
    >>> s = Snapshot()                      # the allocator's state now (mtia_alloc.snapshot())
    >>> s = Snapshot("snap.pickle")          # a pickle from _dump_snapshot, or from PyTorch itself
    >>> s
    Snapshot(devices=[0], segments=3, blocks=7, reserved=42.00 MiB, allocated=12.50 MiB,
             largest_free_block=17.00 MiB, fragmentation=2.4%)
    >>> s.segments[0], s.blocks[:3]          # small objects with readable reprs
    >>> print(s.summary())                   # the memory_summary table for that state
    >>> s.fragmentation()                    # free bytes in partly used segments, largest free blocks
    >>> s.plot("snap.html")                  # self-contained HTML + inline SVG (no network, no matplotlib)
    >>> s.dump("copy.pickle")                # pickle protocol 4 (the memory_viz page refuses 5)

A snapshot is PyTorch's dict (segments, device_traces, allocator_settings,
external_annotations). `Snapshot` also takes a bare segment list (memory_snapshot()), an
older PyTorch snapshot (blocks with a legacy `history`), a JSON file of the same structure,
or a gzip-compressed pickle. Pickles are read with an unpickler that accepts plain data only.
"""
import datetime
import gzip
import html
import io
import json
import math
import operator
import os
import pickle
import sys

__all__ = ["Snapshot", "Segment", "Block", "Fragmentation", "load", "summary_main", "plot_main"]

ACTIVE_STATES = ("active_allocated", "active_pending_free")
SMALL_SEGMENT_MAX = 2 << 20  # PyTorch's small-pool segment size (kSmallBuffer)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def format_size(n):
    """PyTorch's format_size ('512 bytes', '1.50 KiB', '2.00 MiB'), also for negative numbers."""
    n = int(n)
    if abs(n) < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if abs(value) < 1024.0 or unit == "PiB":
            return f"{value:.2f} {unit}"
    return f"{n} bytes"  # not reached


# ------------------------------------------------------------------ loading

class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to code (a class or function), not only to plain data."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dict, list, tuple, str, int, float, bool, None, plus a few
    harmless containers and numpy scalars); any other global is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"the snapshot pickle refers to {module}.{name}; only plain data (dicts, lists, numbers, "
            f"strings) is accepted")


def load(path):
    """The snapshot stored at `path`: a pickle (protocol 0-5, optionally gzip-compressed) or
    a JSON file of the same structure. Returns what the file holds (a dict, or a list for a
    bare memory_snapshot() segment list)."""
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:3] == b"\xef\xbb\xbf":  # a UTF-8 BOM, as some Windows editors and tools write JSON
        data = data[3:]
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid JSON snapshot: {e}") from None
    if not data:
        raise ValueError(f"{path}: the file is empty")
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or foreign files raise many types
        raise ValueError(f"{path}: not a snapshot pickle ({type(e).__name__}: {e})") from None


def _plain(obj):
    """A deep copy made of plain Python types only (numpy scalars become int/float, sets and
    OrderedDicts become lists and dicts): what the memory_viz page can read."""
    if obj is None or type(obj) in (str, bool, int, float):
        return obj
    if isinstance(obj, dict):
        return {(k if type(k) is str else _plain(k)): _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalar
        return _plain(obj.item())
    for t in (bool, int, float, str):  # subclasses (IntEnum, ...)
        if isinstance(obj, t):
            return t(obj)
    raise TypeError(f"a snapshot holds plain data only, found {type(obj).__name__}")


def _normalize(obj):
    """PyTorch's snapshot dict from a dict, a segment list, a Snapshot or a path."""
    if isinstance(obj, Snapshot):
        return obj.data
    if isinstance(obj, (str, bytes, os.PathLike)):
        obj = load(obj)
    if isinstance(obj, (list, tuple)):  # memory_snapshot(): segments only
        obj = {"segments": list(obj), "device_traces": []}
    if not isinstance(obj, dict):
        raise TypeError(f"Snapshot expects a snapshot dict, a segment list or a path, got {type(obj).__name__}")
    if "segments" not in obj:
        raise ValueError("not a memory snapshot: the dict has no 'segments' key")
    out = dict(obj)
    if "device_traces" not in out:
        traces = out.get("traces")  # torch's _memory_viz CLI writes this key for bare segment lists
        out["device_traces"] = traces if isinstance(traces, list) and all(isinstance(t, list) for t in traces) else []
    out.setdefault("allocator_settings", {})
    out.setdefault("external_annotations", [])
    _validate(out)
    # the memory_viz page needs device_traces[d] for every device d that has a segment
    need = max((int(s.get("device", 0)) for s in out["segments"]), default=-1) + 1
    if len(out["device_traces"]) < need:
        out["device_traces"] = list(out["device_traces"]) + [[] for _ in range(need - len(out["device_traces"]))]
    return out


_LIMIT = 1 << 64    # a device address or size fits in 64 bits
_MAX_DEVICE = 1024  # device_traces is padded to one list per device: keep that list small
# trace actions whose size moves the memory curves (memory_over_time): they must carry one
_SIZED_ACTIONS = ("alloc", "free_requested", "free_completed", "free", "segment_alloc", "segment_free",
                  "segment_map", "segment_unmap")


def _uint(d, key, where, limit=_LIMIT):
    """d[key] as an int in [0, limit), else a ValueError/TypeError saying where and what is wrong."""
    if key not in d:
        raise ValueError(f"{where}: no {key!r}")
    return _uint_value(d[key], f"{where}: {key!r}", limit)


def _uint_value(v, what, limit=_LIMIT):
    """v as an int in [0, limit). Integral floats (JSON writers) and numpy integers are accepted,
    as int() did before; NaN, infinities, bools, strings and values past 64 bits are not."""
    if type(v) is int and 0 <= v < limit:  # the common case, kept fast for 100k-block snapshots
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{what} is {v}, not a finite number")
        if not v.is_integer():
            raise ValueError(f"{what} is {v}, not a whole number")
        v = int(v)
    elif isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{what} must be an integer, got {type(v).__name__} {v!r:.40}")
    v = operator.index(v)
    if v < 0:
        raise ValueError(f"{what} is negative ({v})")
    if v >= limit:
        raise ValueError(f"{what} is {v}: out of range (must be below {limit:#x})")
    return v


def _validate(snap):
    """Checks the structure every consumer (Segment, summary, plot, memory_over_time) relies on,
    so that bad input fails here with a message naming the segment, block or trace entry, and
    never later with an AttributeError/IndexError or with impossible figures."""
    segments = snap["segments"]
    if not isinstance(segments, (list, tuple)):
        raise TypeError(f"'segments' must be a list of segment dicts, got {type(segments).__name__}")
    for i, seg in enumerate(segments):
        where = f"segment {i}"
        if not isinstance(seg, dict):
            raise TypeError(f"{where}: must be a dict, got {type(seg).__name__} {seg!r:.40}")
        if "device" in seg:
            _uint(seg, "device", where, _MAX_DEVICE)
        _uint(seg, "address", where)
        total = _uint(seg, "total_size", where)
        stream = seg.get("stream")
        if stream is not None:  # a stream handle: a 64-bit integer of either sign
            _uint_value(abs(stream) if isinstance(stream, (int, float)) else stream, f"{where}: 'stream'")
        pool = seg.get("segment_pool_id")
        if isinstance(pool, (list, tuple)):
            for x in pool:
                _uint_value(x, f"{where}: 'segment_pool_id' item")
        blocks = seg.get("blocks", ())
        if not isinstance(blocks, (list, tuple)):
            raise TypeError(f"{where}: 'blocks' must be a list of block dicts, got {type(blocks).__name__}")
        used = 0
        for j, b in enumerate(blocks):
            bwhere = f"{where} block {j}"
            if not isinstance(b, dict):
                raise TypeError(f"{bwhere}: must be a dict, got {type(b).__name__} {b!r:.40}")
            used += _uint(b, "size", bwhere)
            if b.get("requested_size") is not None:
                _uint(b, "requested_size", bwhere)
            else:
                history = b.get("history")
                if history and isinstance(history, list) and isinstance(history[0], dict) \
                        and "real_size" in history[0]:
                    _uint(history[0], "real_size", f"{bwhere} history[0]")
        # PyTorch's total_size is the sum of the block sizes (the blocks tile the segment)
        if used > total:
            raise ValueError(f"{where}: its blocks hold {used} bytes, more than its total_size {total}")
    traces = snap["device_traces"]
    if not isinstance(traces, (list, tuple)):
        raise TypeError(f"'device_traces' must be a list (one trace per device), got {type(traces).__name__}")
    for d, trace in enumerate(traces):
        if not isinstance(trace, (list, tuple)):
            raise TypeError(f"device_traces[{d}] must be a list of trace entries, got {type(trace).__name__}")
        for k, e in enumerate(trace):
            if not isinstance(e, dict):
                raise TypeError(f"device_traces[{d}][{k}] must be a dict, got {type(e).__name__} {e!r:.40}")
            action = e.get("action")
            if isinstance(action, str) and action in _SIZED_ACTIONS:
                _uint(e, "size", f"device_traces[{d}][{k}] ({action})")


def _where(frames):
    """'file.py:12 in fn' for the innermost frame outside mtia_alloc itself, or ''."""
    if not isinstance(frames, (list, tuple)):
        return ""
    frames = [fr for fr in frames if isinstance(fr, dict)]  # display only: skip what is not a frame
    if not frames:
        return ""
    chosen = frames[0]
    for fr in frames:
        fn = str(fr.get("filename", ""))
        if not fn.startswith(_PACKAGE_DIR) and not fn.startswith("<frozen"):
            chosen = fr
            break
    return f"{os.path.basename(str(chosen.get('filename', '?')))}:{chosen.get('line', '?')} in {chosen.get('name', '?')}"


# ------------------------------------------------------------------ segments and blocks

class Block:
    """One block of a segment: address, size, requested_size, state, frames, segment."""
    __slots__ = ("address", "size", "requested_size", "state", "frames", "segment")

    def __init__(self, address, size, requested_size, state, frames, segment):
        self.address = address
        self.size = size
        self.requested_size = requested_size
        self.state = state
        self.frames = frames
        self.segment = segment

    @property
    def device(self):
        return self.segment.device

    @property
    def is_active(self):
        """Allocated, or freed but still in use by another stream (pending free)."""
        return self.state in ACTIVE_STATES

    @property
    def is_allocated(self):
        return self.state == "active_allocated"

    @property
    def is_free(self):
        return self.state not in ACTIVE_STATES

    @property
    def end(self):
        return self.address + self.size

    @property
    def where(self):
        """The allocation site ('file.py:12 in fn') if a stack was recorded, else ''."""
        return _where(self.frames)

    def __repr__(self):
        parts = [f"{self.address:#x}", format_size(self.size), self.state]
        if self.is_active and self.requested_size != self.size:
            parts.append(f"requested {format_size(self.requested_size)}")
        parts.append(f"device {self.segment.device}")
        where = self.where
        if where:
            parts.append(f"at {where}")
        return f"Block({', '.join(parts)})"


class Segment:
    """One device allocation (a cudaMalloc-like reservation) and the blocks tiling it.
    The per-state totals are computed once from the raw block dicts; Block objects are made
    on first use of .blocks."""
    __slots__ = ("device", "address", "total_size", "stream", "segment_type", "pool_id", "is_expandable",
                 "frames", "allocated_size", "active_size", "requested_size", "pending_free_size",
                 "largest_free_block", "n_blocks", "n_allocated", "n_active", "_raw_blocks", "_blocks")

    def __init__(self, d):
        self.device = int(d.get("device", 0))
        self.address = int(d["address"])
        self.total_size = int(d["total_size"])
        self.stream = int(d.get("stream", 0) or 0)
        seg_type = d.get("segment_type")
        self.segment_type = seg_type if seg_type in ("small", "large") else (
            "small" if self.total_size <= SMALL_SEGMENT_MAX else "large")
        pool = d.get("segment_pool_id", (0, 0))
        self.pool_id = tuple(int(x) for x in pool) if isinstance(pool, (tuple, list)) else (0, 0)
        self.is_expandable = bool(d.get("is_expandable", False))
        self.frames = d.get("frames") or []
        raw = d.get("blocks", ())
        allocated = active = requested = pending = largest = n_alloc = n_active = 0
        for b in raw:
            state = b.get("state")
            size = b["size"]
            if state == "active_allocated":
                allocated += size
                n_alloc += 1
            elif state != "active_pending_free":
                if size > largest:
                    largest = size
                continue
            else:
                pending += size
            active += size
            n_active += 1
            req = b.get("requested_size")
            if req is None:
                req = _legacy_requested(b)
            requested += req
        self.allocated_size = int(allocated)
        self.active_size = int(active)
        self.requested_size = int(requested)
        self.pending_free_size = int(pending)
        self.largest_free_block = int(largest)
        self.n_blocks = len(raw)
        self.n_allocated = n_alloc
        self.n_active = n_active
        self._raw_blocks = raw
        self._blocks = None

    @property
    def blocks(self):
        """Block objects in address order (the page's rule: they tile the segment in list order)."""
        if self._blocks is None:
            out, addr = [], self.address
            for b in self._raw_blocks:
                size = int(b["size"])
                frames = b.get("frames")
                req = b.get("requested_size")
                if req is None:
                    req = _legacy_requested(b)
                if frames is None:
                    history = b.get("history")
                    if history and isinstance(history, list) and isinstance(history[0], dict):
                        frames = history[0].get("frames")
                out.append(Block(addr, size, int(req), b.get("state", "inactive"), frames or [], self))
                addr += size
            self._blocks = out
        return self._blocks

    @property
    def end(self):
        return self.address + self.total_size

    @property
    def free_size(self):
        """Bytes of inactive blocks."""
        return self.total_size - self.active_size

    @property
    def is_free(self):
        """No active block: empty_cache() can give this segment back to the device."""
        return self.active_size == 0

    @property
    def is_split(self):
        return self.n_blocks > 1

    @property
    def where(self):
        return _where(self.frames)

    def __repr__(self):
        parts = [f"device {self.device}", f"{self.address:#x}", f"{format_size(self.total_size)} {self.segment_type}",
                 f"{format_size(self.allocated_size)} allocated in {self.n_allocated} of {self.n_blocks} blocks"]
        if self.pending_free_size:
            parts.append(f"{format_size(self.pending_free_size)} pending free")
        parts.append(f"largest free {format_size(self.largest_free_block)}")
        if self.stream:
            parts.append(f"stream {self.stream}")
        if self.pool_id != (0, 0):
            parts.append(f"pool {self.pool_id}")
        if self.is_expandable:
            parts.append("expandable")
        return f"Segment({', '.join(parts)})"


def _legacy_requested(b):
    """requested_size of a block dict without one: the legacy history's real_size, else size."""
    history = b.get("history")
    if history and isinstance(history, list) and isinstance(history[0], dict) and "real_size" in history[0]:
        return int(history[0]["real_size"])
    return int(b["size"])


class Fragmentation:
    """How much cached memory is free but hard to use.

    reserved              bytes of all segments
    free                  bytes of inactive blocks
    free_in_partly_used   inactive bytes inside segments that also hold active blocks: they
                          cannot go back to the device (PyTorch's non-releasable memory)
    partly_used_segments  how many such segments
    releasable            inactive bytes in segments without an active block (empty_cache frees them)
    pending_free          bytes freed by the user but still used by another stream
    largest_free_block    {"all", "small_pool", "large_pool"}: the biggest inactive block of each kind
    largest_free_block_by_pool  {segment_pool_id: bytes}; (0, 0) is the default pool
    ratio                 free_in_partly_used / reserved
    external              1 - largest free block / free bytes (0 = all free memory is one block)
    """

    def __init__(self, segments):
        self.reserved = self.free = self.free_in_partly_used = self.releasable = self.pending_free = 0
        self.partly_used_segments = 0
        self.largest_free_block = lf = {"all": 0, "small_pool": 0, "large_pool": 0}
        self.largest_free_block_by_pool = by_pool = {}
        for s in segments:
            self.reserved += s.total_size
            self.pending_free += s.pending_free_size
            free_here = s.total_size - s.active_size
            largest = s.largest_free_block
            if largest:
                kind = "small_pool" if s.segment_type == "small" else "large_pool"
                lf[kind] = max(lf[kind], largest)
                lf["all"] = max(lf["all"], largest)
                by_pool[s.pool_id] = max(by_pool.get(s.pool_id, 0), largest)
            self.free += free_here
            if s.active_size == 0:
                self.releasable += free_here
            elif free_here:
                self.free_in_partly_used += free_here
                self.partly_used_segments += 1
        self.ratio = self.free_in_partly_used / self.reserved if self.reserved else 0.0
        self.external = 1.0 - lf["all"] / self.free if self.free else 0.0

    def as_dict(self):
        return {
            "reserved": self.reserved, "free": self.free, "free_in_partly_used": self.free_in_partly_used,
            "partly_used_segments": self.partly_used_segments, "releasable": self.releasable,
            "pending_free": self.pending_free, "largest_free_block": dict(self.largest_free_block),
            "largest_free_block_by_pool": dict(self.largest_free_block_by_pool), "ratio": self.ratio,
            "external": self.external,
        }

    def __repr__(self):
        lf = self.largest_free_block
        return (f"Fragmentation({self.ratio:.1%} of {format_size(self.reserved)} reserved is free inside "
                f"{self.partly_used_segments} partly used segments ({format_size(self.free_in_partly_used)}); "
                f"largest free block {format_size(lf['all'])} (small pool {format_size(lf['small_pool'])}, "
                f"large pool {format_size(lf['large_pool'])}); releasable {format_size(self.releasable)})")

    def __str__(self):
        lf = self.largest_free_block
        lines = [
            f"reserved                      {format_size(self.reserved)}",
            f"free (inactive blocks)        {format_size(self.free)}",
            f"  inside partly used segments {format_size(self.free_in_partly_used)} in "
            f"{self.partly_used_segments} segments = {self.ratio:.1%} of reserved (not releasable)",
            f"  in unused segments          {format_size(self.releasable)} (empty_cache() releases it)",
            f"pending free (other streams)  {format_size(self.pending_free)}",
            f"largest free block            {format_size(lf['all'])} (small pool {format_size(lf['small_pool'])}, "
            f"large pool {format_size(lf['large_pool'])})",
            f"external fragmentation        {self.external:.1%} (1 - largest free block / free)",
        ]
        for pool, size in sorted(self.largest_free_block_by_pool.items()):
            if pool != (0, 0):
                lines.append(f"  largest free block in pool {pool}: {format_size(size)}")
        return "\n".join(lines)


# ------------------------------------------------------------------ the snapshot

_POOL_METRICS = ("allocated_bytes", "active_bytes", "requested_bytes", "reserved_bytes", "inactive_split_bytes",
                 "allocation", "active", "segment", "inactive_split")


class Snapshot:
    """A memory snapshot with a REPL-friendly face. `Snapshot()` takes one now;
    `Snapshot(x)` wraps x: a snapshot dict, a memory_snapshot() segment list, another
    Snapshot, or the path of a pickle / JSON file (ours or PyTorch's)."""

    def __init__(self, snapshot_or_path=None):
        if snapshot_or_path is None:
            from .memory import snapshot
            snapshot_or_path = snapshot()
        self.source = os.fspath(snapshot_or_path) if isinstance(snapshot_or_path, (str, os.PathLike)) else None
        self.data = _normalize(snapshot_or_path)
        self._segments = None

    # -------------------------------------------------------------- contents

    @property
    def segments(self):
        """Segment objects, in snapshot order (address-sorted per device)."""
        if self._segments is None:
            self._segments = [Segment(s) for s in self.data["segments"]]
        return self._segments

    @property
    def blocks(self):
        """Every block of every segment, in address order within each segment."""
        return [b for s in self.segments for b in s.blocks]

    @property
    def device_traces(self):
        return self.data["device_traces"]

    @property
    def allocator_settings(self):
        return self.data["allocator_settings"]

    @property
    def devices(self):
        """Devices with a segment or a trace entry other than `snapshot` (taking a snapshot
        adds one to every device's trace)."""
        devs = {s.device for s in self.segments}
        devs.update(i for i, t in enumerate(self.device_traces)
                    if any(isinstance(e, dict) and e.get("action") != "snapshot" for e in t))
        return sorted(devs)

    def _segments_of(self, device):
        if device is None:
            return self.segments
        return [s for s in self.segments if s.device == device]

    def _check_device(self, device):
        """`device` if this snapshot has it (a segment or a trace list; device 0 of an empty
        snapshot), else a ValueError naming the devices it has: a table of zeros would mislead."""
        known = sorted(set(self.devices) | set(range(len(self.device_traces)))) or [0]
        if isinstance(device, bool) or not hasattr(device, "__index__"):
            raise TypeError(f"device must be an integer, got {type(device).__name__} {device!r:.40}")
        if operator.index(device) not in known:
            raise ValueError(f"device {device} is not in this snapshot (devices: {known})")
        return operator.index(device)

    @property
    def reserved(self):
        return sum(s.total_size for s in self.segments)

    @property
    def allocated(self):
        return sum(s.allocated_size for s in self.segments)

    @property
    def active(self):
        return sum(s.active_size for s in self.segments)

    @property
    def requested(self):
        return sum(s.requested_size for s in self.segments)

    @property
    def largest_free_block(self):
        return max((s.largest_free_block for s in self.segments), default=0)

    @property
    def n_blocks(self):
        return sum(s.n_blocks for s in self.segments)

    def __len__(self):
        return len(self.segments)

    def __repr__(self):
        segs = self.segments
        frag = Fragmentation(segs)
        n_trace = sum(len(t) for t in self.device_traces)
        trace = f", trace_entries={n_trace}" if n_trace else ""
        return (f"Snapshot(devices={self.devices}, segments={len(segs)}, blocks={sum(s.n_blocks for s in segs)}, "
                f"reserved={format_size(frag.reserved)}, allocated={format_size(self.allocated)}, "
                f"largest_free_block={format_size(frag.largest_free_block['all'])}, "
                f"fragmentation={frag.ratio:.1%}{trace})")

    # -------------------------------------------------------------- analysis

    def fragmentation(self, device=None):
        """Free bytes inside partly used segments, releasable bytes and the largest free block
        per pool kind and per pool id (all devices, or one)."""
        if device is not None:
            device = self._check_device(device)
        return Fragmentation(self._segments_of(device))

    def _max_split_size(self):
        m = self.allocator_settings.get("max_split_size", -1) if isinstance(self.allocator_settings, dict) else -1
        try:
            m = int(m)
        except (TypeError, ValueError):
            m = -1
        return m if m > 0 else None

    def stats(self, device=None):
        """A flat memory_stats()-shaped dict for this state (one device, or all). "current" is
        counted from the segments; the snapshot holds no history of the counters, so "peak"
        and "allocated" equal "current" and "freed" is 0 (the state as if built from empty).
        num_ooms counts the `oom` entries in the device trace."""
        if device is not None:
            device = self._check_device(device)
        cur = {m: {"all": 0, "small_pool": 0, "large_pool": 0} for m in _POOL_METRICS}
        max_split = self._max_split_size()
        oversize_allocations = oversize_segments = 0
        segs = self._segments_of(device)
        for s in segs:
            kind = "small_pool" if s.segment_type == "small" else "large_pool"
            if not s.is_expandable:
                cur["segment"][kind] += 1
                if max_split and s.total_size >= max_split:
                    oversize_segments += 1
            cur["reserved_bytes"][kind] += s.total_size
            cur["allocation"][kind] += s.n_allocated
            cur["allocated_bytes"][kind] += s.allocated_size
            cur["active"][kind] += s.n_active
            cur["active_bytes"][kind] += s.active_size
            cur["requested_bytes"][kind] += s.requested_size
            if s.n_blocks > 1 and not s.is_expandable:  # free pieces of split segments
                cur["inactive_split"][kind] += s.n_blocks - s.n_active
                cur["inactive_split_bytes"][kind] += s.total_size - s.active_size
            if max_split and s.allocated_size >= max_split:
                oversize_allocations += sum(1 for b in s._raw_blocks
                                            if b.get("state") == "active_allocated" and b["size"] >= max_split)
        flat = {}
        for m, pools in cur.items():
            pools["all"] = pools["small_pool"] + pools["large_pool"]
            for pool, v in pools.items():
                flat.update({f"{m}.{pool}.current": v, f"{m}.{pool}.peak": v, f"{m}.{pool}.allocated": v,
                             f"{m}.{pool}.freed": 0})
        for name, v in (("oversize_allocations", oversize_allocations), ("oversize_segments", oversize_segments)):
            flat.update({f"{name}.current": v, f"{name}.peak": v, f"{name}.allocated": v, f"{name}.freed": 0})
        traces = self.device_traces
        idx = range(len(traces)) if device is None else ([device] if 0 <= device < len(traces) else [])
        flat["num_ooms"] = sum(1 for i in idx for e in traces[i] if isinstance(e, dict) and e.get("action") == "oom")
        flat["num_alloc_retries"] = 0
        flat["num_device_alloc"] = cur["segment"]["all"]
        flat["num_device_free"] = 0
        flat["num_sync_all_streams"] = 0
        flat["max_split_size"] = max_split or -1
        lf = Fragmentation(segs).largest_free_block
        for k, v in lf.items():
            flat[f"largest_free_block_bytes.{k}"] = v
        return dict(sorted(flat.items()))

    def summary(self, device=None, abbreviated=False):
        """The memory_summary() table of this state, one per device (or of `device`). Only the
        "Cur Usage" column is measured; see stats() for the other columns."""
        from .memory import _summary_table
        devices = [self._check_device(device)] if device is not None else (self.devices or [0])
        tables = [_summary_table(self.stats(d), d, abbreviated) for d in devices]
        return "\n".join(tables)

    def memory_over_time(self, device):
        """The memory curves of `device` rebuilt from its trace: a dict of equal-length lists
        "index" (trace entry number), "time_us", "allocated" (requested bytes of live
        allocations, as the memory_viz timeline) and "reserved" (segment bytes), plus "oom"
        (indices of oom entries). The values at the end equal this snapshot's state; the
        start is inferred by undoing the trace."""
        device = self._check_device(device)
        traces = self.device_traces
        entries = traces[device] if device < len(traces) else []
        d_alloc, d_res = [], []
        for e in entries:
            a = e.get("action")
            size = int(e["size"]) if a in _SIZED_ACTIONS else 0  # validated for these actions only
            if a == "alloc":
                d_alloc.append(size), d_res.append(0)
            elif a in ("free_completed", "free"):
                d_alloc.append(-size), d_res.append(0)
            elif a in ("segment_alloc", "segment_map"):
                d_alloc.append(0), d_res.append(size)
            elif a in ("segment_free", "segment_unmap"):
                d_alloc.append(0), d_res.append(-size)
            else:
                d_alloc.append(0), d_res.append(0)
        segs = self._segments_of(device)
        alloc = sum(s.requested_size for s in segs) - sum(d_alloc)
        res = sum(s.total_size for s in segs) - sum(d_res)
        out = {"index": [], "time_us": [], "allocated": [], "reserved": [], "oom": []}
        for i, e in enumerate(entries):
            alloc += d_alloc[i]
            res += d_res[i]
            out["index"].append(i)
            out["time_us"].append(e.get("time_us"))
            out["allocated"].append(alloc)
            out["reserved"].append(res)
            if e.get("action") == "oom":
                out["oom"].append(i)
        return out

    # -------------------------------------------------------------- output

    def to_dict(self):
        """The snapshot as plain Python data (what dump() writes)."""
        return _plain(self.data)

    def dump(self, path):
        """Writes the snapshot as a pickle with protocol 4 (loads on pytorch.org/memory_viz)."""
        with open(os.fspath(path), "wb") as f:
            pickle.dump(self.to_dict(), f, protocol=4)
        return path

    def plot(self, path, device=None):
        """Writes a self-contained HTML page (inline SVG, no script, no network): the summary,
        a map of the segments coloured by block state, and memory over time rebuilt from the
        trace, for every device (or `device`). Returns path."""
        if not is_html_name(os.fspath(path)):
            raise ValueError(_not_html_message(os.fspath(path)))
        if device is not None:
            device = self._check_device(device)
        text = _render_html(self, device)
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            f.write(text)
        return path


# ------------------------------------------------------------------ HTML / SVG rendering

_MAP_WIDTH = 800     # cells per row of the segment map
_MAP_MAX_ROWS = 60
_ROW_H, _ROW_GAP = 10, 3
_COLORS = {"allocated": "#4e79a7", "mixed": "#a0cbe8", "pending": "#f28e2c", "free": "#dddddd"}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; }
h2 { border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: middle; }
svg text { font-size: 11px; fill: #333; }
.a { fill: #4e79a7; } .m { fill: #a0cbe8; } .p { fill: #f28e2c; } .f { fill: #dddddd; }
"""
_CLS = {"allocated": "a", "mixed": "m", "pending": "p", "free": "f"}


def _esc(s):
    return html.escape(str(s), quote=True)


def _spread(arr, base, off, size, bpc):
    """Adds the bytes [off, off+size) of a segment starting at cell `base` to arr's cells."""
    if size <= 0:
        return
    end = off + size
    c0, c1 = off // bpc, (end - 1) // bpc
    if c0 == c1:
        arr[base + c0] += size
        return
    arr[base + c0] += (c0 + 1) * bpc - off
    for c in range(base + c0 + 1, base + c1):
        arr[c] += bpc
    arr[base + c1] += end - c1 * bpc


def _segment_map_svg(segs):
    """An SVG strip of the device's segments in address order, wrapped into rows; each cell
    covers `bpc` bytes and is coloured by the state owning most of its bytes."""
    if not segs:
        return "<p>No segments.</p>", 0
    total = sum(s.total_size for s in segs)
    capacity = _MAP_WIDTH * _MAP_MAX_ROWS
    gaps = len(segs) < capacity // 4
    usable = capacity - (len(segs) if gaps else 0) - len(segs)  # - len(segs): ceil() slack
    bpc = max(1, -(-total // max(1, usable)))
    starts, cells = [], 0
    for s in segs:
        starts.append(cells)
        cells += max(1, -(-s.total_size // bpc)) + (1 if gaps else 0)
    alloc = [0] * cells
    pend = [0] * cells
    free = [0] * cells
    for s, base in zip(segs, starts):
        off = 0
        for b in s._raw_blocks:
            state, size = b.get("state"), int(b["size"])
            arr = alloc if state == "active_allocated" else pend if state == "active_pending_free" else free
            _spread(arr, base, off, size, bpc)
            off += size
    rows = -(-cells // _MAP_WIDTH)
    height = rows * (_ROW_H + _ROW_GAP)
    out = [f'<svg width="{_MAP_WIDTH}" height="{height}" viewBox="0 0 {_MAP_WIDTH} {height}" '
           f'role="img" aria-label="segment map">']
    for s, base in zip(segs, starts):
        n = max(1, -(-s.total_size // bpc))
        title = (f"segment {s.address:#x}: {format_size(s.total_size)} {s.segment_type}, stream {s.stream}, "
                 f"pool {s.pool_id}; allocated {format_size(s.allocated_size)} in "
                 f"{s.n_allocated} blocks, pending free "
                 f"{format_size(s.active_size - s.allocated_size)}, free {format_size(s.free_size)} "
                 f"(largest {format_size(s.largest_free_block)})")
        if s.where:
            title += f"; allocated at {s.where}"
        out.append(f"<g><title>{_esc(title)}</title>")
        run_cls, run_start = None, base
        for c in range(base, base + n + 1):
            if c < base + n:
                t = alloc[c] + pend[c] + free[c]
                if t == 0:
                    cls = None
                elif pend[c] * 2 >= t:
                    cls = "p"
                elif alloc[c] >= 0.95 * t:
                    cls = "a"
                elif (alloc[c] + pend[c]) <= 0.05 * t:
                    cls = "f"
                else:
                    cls = "m"
            else:
                cls = None
            if c < base + n and cls == run_cls and c % _MAP_WIDTH != 0:
                continue
            if run_cls is not None:
                row, x = divmod(run_start, _MAP_WIDTH)
                out.append(f'<rect class="{run_cls}" x="{x}" y="{row * (_ROW_H + _ROW_GAP)}" '
                           f'width="{c - run_start}" height="{_ROW_H}"/>')
            run_cls, run_start = cls, c
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out), bpc


def _nice_ticks(vmax, n=5):
    """Tick values 0, step, 2*step, ... up to vmax, with step a power of two near vmax/n."""
    if vmax <= 0:
        return [0]
    step = 1
    while step < vmax / n:
        step *= 2
    return [i * step for i in range(int(vmax // step) + 1)]


def _timeline_svg(curves, width=900, height=240):
    n = len(curves["index"])
    left, right, top, bottom = 80, 10, 10, 30
    pw, ph = width - left - right, height - top - bottom
    vmax = max(max(curves["reserved"], default=0), max(curves["allocated"], default=0), 1)
    ymin = min(min(curves["reserved"], default=0), min(curves["allocated"], default=0), 0)
    span = vmax - ymin or 1

    def y(v):
        return top + ph - (v - ymin) / span * ph

    def x(i):
        return left + (i / max(1, n - 1)) * pw

    def points(series):
        if n <= 2 * pw:
            pts, prev = [], None
            for i, v in enumerate(series):  # steps: the value changes at each event
                if prev is not None and v != prev:
                    pts.append(f"{x(i):.1f},{y(prev):.1f}")
                pts.append(f"{x(i):.1f},{y(v):.1f}")
                prev = v
            return " ".join(pts)
        pts = []
        per = n / pw
        for col in range(pw):  # min/max envelope per pixel column
            lo, hi = int(col * per), min(n, int((col + 1) * per) + 1)
            chunk = series[lo:hi]
            pts.append(f"{left + col:.1f},{y(min(chunk)):.1f}")
            pts.append(f"{left + col:.1f},{y(max(chunk)):.1f}")
        return " ".join(pts)

    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="memory over time">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="white" stroke="#999"/>']
    for t in _nice_ticks(vmax):
        if t < ymin:
            continue
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y(t) + 4:.1f}" text-anchor="end">{_esc(format_size(int(t)))}</text>')
    for i in curves["oom"]:
        out.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top}" y2="{top + ph}" stroke="#e15759" '
                   f'stroke-width="1.5"><title>oom at trace entry {i}</title></line>')
    out.append(f'<polyline fill="none" stroke="#f28e2c" stroke-width="1.5" points="{points(curves["reserved"])}">'
               f'<title>reserved (segments)</title></polyline>')
    out.append(f'<polyline fill="none" stroke="#4e79a7" stroke-width="1.5" points="{points(curves["allocated"])}">'
               f'<title>allocated (requested bytes of live allocations)</title></polyline>')
    out.append(f'<text x="{left}" y="{height - 8}">trace entry 0</text>')
    out.append(f'<text x="{left + pw}" y="{height - 8}" text-anchor="end">{n - 1}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _fmt_time(us):
    try:
        return datetime.datetime.fromtimestamp(int(us) / 1e6, datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S.%f UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def _render_html(snap, only_device=None):
    devices = [only_device] if only_device is not None else (snap.devices or [0])
    src = f" of {snap.source}" if snap.source else ""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Memory snapshot{_esc(src)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Memory snapshot{_esc(src)}</h1>", f"<pre>{_esc(repr(snap))}</pre>"]
    legend = "".join(f'<span style="background:{c}"></span>{_esc(label)}' for label, c in (
        ("allocated", _COLORS["allocated"]), ("partly allocated (small blocks)", _COLORS["mixed"]),
        ("pending free (other stream)", _COLORS["pending"]), ("free (cached)", _COLORS["free"])))
    for d in devices:
        segs = snap._segments_of(d)
        frag = Fragmentation(segs)
        parts.append(f"<h2>Device {d}</h2>")
        parts.append(f"<pre>{_esc(str(frag))}</pre>")
        svg, bpc = _segment_map_svg(segs)
        parts.append(f"<h3>Segments ({len(segs)}, {_esc(format_size(frag.reserved))})</h3>")
        if segs:
            parts.append(f'<p class="legend">{legend} &nbsp; one cell = {_esc(format_size(bpc))}; '
                         f"segments in address order, separated by a blank cell; hover for details.</p>")
        parts.append(svg)
        curves = snap.memory_over_time(d)
        parts.append("<h3>Memory over time</h3>")
        if curves["index"]:
            times = [t for t in curves["time_us"] if isinstance(t, (int, float))]
            span = f", {_esc(_fmt_time(times[0]))} to {_esc(_fmt_time(times[-1]))}" if times else ""
            parts.append(f'<p class="legend"><span style="background:#4e79a7"></span>allocated (requested bytes)'
                         f'<span style="background:#f28e2c"></span>reserved'
                         f'<span style="background:#e15759"></span>oom &nbsp; {len(curves["index"])} trace entries'
                         f"{span}; peak allocated {_esc(format_size(max(curves['allocated'])))}, peak reserved "
                         f"{_esc(format_size(max(curves['reserved'])))} (within the trace).</p>")
            parts.append(_timeline_svg(curves))
        else:
            parts.append("<p>No trace recorded for this device (call <code>record_memory_history()</code> "
                         "before allocating).</p>")
        if segs:
            top = sorted(segs, key=lambda s: -s.total_size)[:30]
            parts.append(f"<details><summary>Largest segments ({len(top)} of {len(segs)})</summary><table>"
                         "<tr><th>address</th><th>size</th><th>type</th><th>pool</th><th>stream</th>"
                         "<th>allocated</th><th>free</th><th>largest free</th><th>blocks</th><th>allocated at</th></tr>")
            for s in top:
                parts.append(
                    f"<tr><td>{s.address:#x}</td><td>{_esc(format_size(s.total_size))}</td><td>{s.segment_type}</td>"
                    f"<td>{_esc(s.pool_id)}</td><td>{s.stream}</td><td>{_esc(format_size(s.allocated_size))}</td>"
                    f"<td>{_esc(format_size(s.free_size))}</td><td>{_esc(format_size(s.largest_free_block))}</td>"
                    f"<td>{s.n_blocks}</td><td>{_esc(s.where)}</td></tr>")
            parts.append("</table></details>")
        parts.append(f"<details><summary>memory_summary</summary><pre>{_esc(snap.summary(d))}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ------------------------------------------------------------------ CLI

def _open(path):
    try:
        return Snapshot(path)
    except (OSError, ValueError, TypeError, KeyError, pickle.UnpicklingError, EOFError) as e:
        print(f"mtia_alloc: cannot read snapshot {path}: {e}", file=sys.stderr)
        return None


def summary_main(path):
    """`python -m mtia_alloc summary SNAPSHOT`: prints the overview, the fragmentation figures
    and the memory_summary table of each device. Works on PyTorch's pickles too. Returns the
    exit status."""
    snap = _open(path)
    if snap is None:
        return 1
    try:
        print(repr(snap))
        print()
        print(snap.fragmentation())
        print()
        print(snap.summary(), end="")
    except (KeyError, TypeError, ValueError) as e:
        print(f"mtia_alloc: malformed snapshot {path}: {e}", file=sys.stderr)
        return 1
    return 0


def is_html_name(path):
    """True for a file name the HTML plots may be written under (.html, .htm or none)."""
    return os.path.splitext(path)[1].lower() in ("", ".html", ".htm")


def _not_html_message(path):
    return (f"plot writes an HTML page with inline SVG pictures; name it .html, not {path!r} "
            "(raster formats would need an image library, which mtia_alloc does not depend on)")


def plot_main(path, out):
    """`python -m mtia_alloc plot SNAPSHOT -o FILE`: writes the HTML view. Returns the exit status."""
    if not is_html_name(out):
        print(f"mtia_alloc: {_not_html_message(out)}", file=sys.stderr)
        return 2
    snap = _open(path)
    if snap is None:
        return 1
    try:
        snap.plot(out)
    except OSError as e:
        print(f"mtia_alloc: cannot write {out}: {e}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError) as e:
        print(f"mtia_alloc: malformed snapshot {path}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
