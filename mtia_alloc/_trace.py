"""Allocation traces: reading them into the dense arrays the native replayer takes.

Formats:
  - the shared trace CSV (`op,id,size_bytes[,stream]`, op a/f; `.gz` is read through gzip);
  - RMM's logging CSV (`Thread,Time,Action,Pointer,Size,Stream`, actions allocate/free);
  - PyTorch snapshot pickles with `device_traces` (their alloc / free_completed events).
"""
import gzip
import io
import pickle
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trace:
    sizes: np.ndarray      # uint64, 0 = free
    slots: np.ndarray      # uint32 dense allocation ids
    streams: np.ndarray    # uint32 index into stream_values
    nslots: int
    stream_values: list = field(default_factory=list)  # the trace's own stream numbers
    skipped: int = 0       # lines dropped (frees of unknown ids, double allocations)
    source: str = ""

    @property
    def events(self):
        return len(self.sizes)

    def peak_live_bytes(self):
        live = peak = 0
        size_of = {}
        for size, slot in zip(self.sizes.tolist(), self.slots.tolist()):
            if size:
                size_of[slot] = size
                live += size
                peak = max(peak, live)
            else:
                live -= size_of.pop(slot, 0)
        return peak


class _Builder:
    def __init__(self):
        self.sizes, self.slots, self.streams = [], [], []
        self.live = {}        # trace id -> slot
        self.stream_index = {}
        self.nslots = 0
        self.skipped = 0

    def stream(self, value):
        idx = self.stream_index.get(value)
        if idx is None:
            idx = self.stream_index[value] = len(self.stream_index)
        return idx

    def alloc(self, key, size, stream):
        if key in self.live or size <= 0:
            self.skipped += 1
            return
        slot = self.nslots
        self.nslots += 1
        self.live[key] = slot
        self.sizes.append(size)
        self.slots.append(slot)
        self.streams.append(self.stream(stream))

    def free(self, key, stream=None):
        slot = self.live.pop(key, None)
        if slot is None:
            self.skipped += 1
            return
        self.sizes.append(0)
        self.slots.append(slot)
        self.streams.append(self.streams[-1] if stream is None else self.stream(stream))

    def build(self, source):
        if not self.stream_index:
            self.stream(0)
        values = sorted(self.stream_index, key=self.stream_index.get)
        return Trace(np.asarray(self.sizes, dtype=np.uint64), np.asarray(self.slots, dtype=np.uint32),
                     np.asarray(self.streams, dtype=np.uint32), self.nslots, values, self.skipped, source)


def _open_text(path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_trace(path):
    """Reads any supported trace format; raises ValueError naming the problem."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # a pickle
        with open(path, "rb") as f:
            return trace_from_snapshot(pickle.load(f), str(path))
    with _open_text(path) as f:
        first = f.readline()
        if first.lower().startswith("thread,time,action"):
            return _read_rmm(f, str(path))
        return _read_csv(first, f, str(path))


def _read_csv(first, lines, source):
    b = _Builder()
    for line_no, line in enumerate(_chain_first(first, lines), 1):
        line = line.strip()
        if not line or line[0] == "#" or line.startswith("op,"):
            continue
        parts = line.split(",")
        try:
            op = parts[0]
            key = parts[1]
            if op == "a":
                b.alloc(key, int(parts[2]), int(parts[3]) if len(parts) > 3 and parts[3] else 0)
            elif op == "f":
                b.free(key, int(parts[3]) if len(parts) > 3 and parts[3] else None)
            else:
                raise ValueError(f"unknown op {op!r}")
        except (IndexError, ValueError) as e:
            raise ValueError(f"{source}:{line_no}: cannot parse trace line {line!r} "
                             f"(expected op,id,size_bytes[,stream]): {e}") from None
    return b.build(source)


def _chain_first(first, rest):
    if first:
        yield first
    yield from rest


def _read_rmm(lines, source):
    b = _Builder()
    for line_no, line in enumerate(lines, 2):
        line = line.strip()
        if not line:
            continue
        parts = line.split(",")
        try:
            action, ptr, size = parts[2].strip().lower(), parts[3].strip(), int(parts[4])
            stream = int(parts[5], 0) if len(parts) > 5 and parts[5].strip() else 0
        except (IndexError, ValueError) as e:
            raise ValueError(f"{source}:{line_no}: cannot parse RMM log line {line!r}: {e}") from None
        if action.startswith("allocate"):
            if "failure" in action:
                continue
            b.alloc(ptr, size, stream)
        elif action.startswith("free"):
            b.free(ptr, stream)
    return b.build(source)


def trace_from_snapshot(snap, source="<snapshot>", device=None):
    """The alloc / free_completed events of a PyTorch (or mtia_alloc) snapshot's
    device_traces; the device with the most events unless `device` is given.
    Not yet done: rebuilding the segments and live blocks that predate the first event
    (frees of such blocks are counted as skipped)."""
    if not isinstance(snap, dict) or "device_traces" not in snap:
        raise ValueError(f"{source}: not a snapshot with device_traces")
    traces = snap["device_traces"]
    if device is None:
        device = max(range(len(traces)), key=lambda d: len(traces[d])) if traces else 0
    b = _Builder()
    for e in traces[device] if device < len(traces) else []:
        a = e.get("action")
        if a == "alloc":
            b.alloc(e["addr"], int(e["size"]), e.get("stream", 0))
        elif a == "free_completed":
            b.free(e["addr"], e.get("stream", 0))
    return b.build(source)
