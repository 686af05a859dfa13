"""Reading snapshots safely: the plain-data unpickler, the loader of pickle / gzip / JSON
files, and the validator every consumer of a snapshot relies on (so that bad input fails
with a message naming the segment, block or trace entry, never later).

Big pickles (viz.columns.COLUMNAR_MIN_BYTES and more, or columnar=True) are read by the
columnar reader (viz.columns): the same plain data, but each device trace a TraceColumns
instead of a list of dicts, so that millions of entries fit in memory; what it cannot read
falls back to the plain-data unpickler, and what that refuses it refuses with the same line.

Owns: load, normalize (any accepted input -> PyTorch's snapshot dict, validated), plain
(a deep copy in plain Python types), UnsafePickleError.
Relies on: viz.columns (the columnar reader); works on plain dicts, as torch.cuda._memory_viz."""
import gzip
import io
import json
import math
import operator
import os
import pickle

import numpy as np

from ._pickle_reader import NeedsFallback, Truncated, UnsafeGlobal
from .columns import COLUMNAR_MIN_BYTES, P_SIZE, TraceColumns, read_columnar

__all__ = ["load", "normalize", "plain", "UnsafePickleError", "SIZED_ACTIONS"]


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


def _truncated(path, head):
    what = ("the pickle is truncated or corrupt" if head[:1] in (b"\x80", b"(", b"}", b"]")
            else "the file is neither a pickle nor JSON")
    return ValueError(f"{path}: not a snapshot pickle: {what} (expected a snapshot dict with 'segments' "
                      f"and 'device_traces', pickled or as JSON, optionally gzip-compressed)")


def _load_columnar(path):
    """The columnar reader's result, or None when the file is not a pickle it runs (JSON, an
    opcode or global only the plain-data unpickler handles)."""
    with open(os.fspath(path), "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
        try:
            head = f.peek(3)[:3] if hasattr(f, "peek") else b""
        except (OSError, EOFError, ValueError):
            raise ValueError(f"{path}: not a readable gzip file: its data is truncated or corrupt") from None
        if head[:1] != b"\x80":  # protocol 0/1 pickles and JSON: the plain reader
            return None
        try:
            return read_columnar(f)
        except NeedsFallback:
            return None
        except UnsafeGlobal as e:
            module, name = e.args
            raise UnsafePickleError(
                f"the snapshot pickle refers to {module}.{name}; only plain data (dicts, lists, numbers, "
                f"strings) is accepted") from None
        except (Truncated, EOFError):
            raise _truncated(path, head) from None
        except (OSError, gzip.BadGzipFile, ValueError) as e:
            if magic == b"\x1f\x8b" and not str(e).startswith("device_traces"):
                raise ValueError(f"{path}: not a readable gzip file: its data is truncated or corrupt") from None
            raise
        except (IndexError, KeyError, TypeError, MemoryError, OverflowError, RecursionError):
            raise _truncated(path, head) from None  # opcodes that do not fit together: corrupt data


def load(path, columnar=None):
    """The snapshot stored at `path`: a pickle (protocol 0-5, optionally gzip-compressed) or
    a JSON file of the same structure. Returns what the file holds (a dict, or a list for a
    bare memory_snapshot() segment list). columnar: read device traces into TraceColumns
    (True), as lists of dicts (False), or by size (None: files of COLUMNAR_MIN_BYTES and more)."""
    if columnar is None:
        try:
            columnar = os.path.getsize(os.fspath(path)) >= COLUMNAR_MIN_BYTES
        except OSError:
            columnar = False
    if columnar:
        obj = _load_columnar(path)
        if obj is not None:
            return obj
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, ValueError):
            raise ValueError(f"{path}: not a readable gzip file: its data is truncated or corrupt") from None
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
    except Exception:  # truncated or foreign files raise many types, none of them telling
        raise _truncated(path, data) from None


def plain(obj):
    """A deep copy made of plain Python types only (numpy scalars become int/float, sets and
    OrderedDicts become lists and dicts): what the memory_viz page can read."""
    if obj is None or type(obj) in (str, bool, int, float):
        return obj
    if isinstance(obj, TraceColumns):
        return [plain(e) for e in obj]
    if isinstance(obj, dict):
        return {(k if type(k) is str else plain(k)): plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [plain(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalar
        return plain(obj.item())
    for t in (bool, int, float, str):  # subclasses (IntEnum, ...)
        if isinstance(obj, t):
            return t(obj)
    raise TypeError(f"a snapshot holds plain data only, found {type(obj).__name__}")


def normalize(obj):
    """PyTorch's snapshot dict, validated and completed (device_traces, allocator_settings,
    external_annotations), from a dict, a segment list or a path."""
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
SIZED_ACTIONS = ("alloc", "free_requested", "free_completed", "free", "segment_alloc", "segment_free",
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
        if isinstance(trace, TraceColumns):
            _validate_columns(d, trace)
            continue
        if not isinstance(trace, (list, tuple)):
            raise TypeError(f"device_traces[{d}] must be a list of trace entries, got {type(trace).__name__}")
        for k, e in enumerate(trace):
            if not isinstance(e, dict):
                raise TypeError(f"device_traces[{d}][{k}] must be a dict, got {type(e).__name__} {e!r:.40}")
            action = e.get("action")
            if isinstance(action, str) and action in SIZED_ACTIONS:
                _uint(e, "size", f"device_traces[{d}][{k}] ({action})")


def _validate_columns(d, trace):
    """_validate's check of a columnar trace: entries of SIZED_ACTIONS carry a size."""
    bad = np.flatnonzero(trace.is_action(*SIZED_ACTIONS) & ((trace.present & P_SIZE) == 0))
    for k in bad.tolist():
        e = trace[k]
        _uint(e, "size", f"device_traces[{d}][{k}] ({e['action']})")
