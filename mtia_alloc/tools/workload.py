"""Workloads for `replay` and the benchmarks: allocation traces, read into the dense
arrays the native replayer takes. ("Trace" in this module and in tools/replay.py means
such a replay trace; the allocator's own record of its events is its history, history.py.)

Formats:
  - the shared trace CSV (`op,id,size_bytes[,stream]`, op a/f; `.gz` is read through gzip);
  - RMM's logging CSV (`Thread,Time,Action,Pointer,Size,Stream`, actions allocate/free);
  - PyTorch (or mtia_alloc) snapshots with `device_traces`: pickles (plain data only,
    optionally gzip-compressed) or JSON files of the same structure; a streamed history
    (.mtrace, record_memory_history(path=...)) is read as the snapshot of its whole
    recording (mtrace.Recording.to_snapshot). Their alloc /
    free_completed events are replayed after a prefix of synthetic events that rebuilds
    the allocator state the trace started from (see trace_from_snapshot).

Owns: Trace, SlotPool, read_trace, write_csv, trace_from_snapshot, starting_state,
recorded_round_size. Relies on: viz.load (the safe snapshot loader), viz.columns and
viz.timeline (columnar traces: the starting state and the events read from the columns),
mtrace and tools.convert_cli (.mtrace input); no allocator state.
"""
import bisect
import gzip
import io
from dataclasses import dataclass, field

import numpy as np

from ..mtrace import MAGIC as MTRACE_MAGIC
from ..viz import timeline
from ..viz.columns import TraceColumns
from ..viz.load import load
from .convert_cli import read_recording

# PyTorch's caching-allocator constants (shared/spec/allocator_core.md §1.1)
K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
# The request of a cache-flush event: larger than any device, below the 1 EiB guard. It
# fails after the allocator has released every unused cached segment (its last resort
# before raising OOM), which is what empty_cache() does; the failure is not counted.
FLUSH_SIZE = 1 << 59


@dataclass
class Trace:
    sizes: np.ndarray      # uint64, 0 = free
    slots: np.ndarray      # uint32 allocation handles, from a SlotPool (freed ones are reused)
    streams: np.ndarray    # uint32 index into stream_values
    nslots: int
    stream_values: list = field(default_factory=list)  # the trace's own stream numbers
    skipped: int = 0       # lines dropped (frees of unknown ids, double allocations)
    source: str = ""
    # Leading events that are not part of the recorded trace: they rebuild the segments and
    # live blocks a snapshot's trace started from. The replay runs them before each pass and
    # leaves them out of events, time and device-allocation counts (peaks start from the
    # state they build).
    prefix: int = 0
    info: dict = field(default_factory=dict)  # format-specific facts (snapshot: see trace_from_snapshot);
    # every format: recorded_ooms, the allocations that failed in the recorded run (a
    # snapshot's 'oom' entries, an RMM log's 'allocate failure' lines): as many failures in
    # the replay are expected
    # Indices of cache-flush events (allocations of FLUSH_SIZE): where a snapshot's run
    # released cached segments (empty_cache, OOM retry), the replay releases them too.
    flushes: list = field(default_factory=list)

    @property
    def events(self):
        return len(self.sizes)

    @property
    def trace_events(self):
        """Events of the recorded trace itself (without the rebuilt starting state)."""
        return len(self.sizes) - self.prefix

    def peak_live_bytes(self):
        live = peak = 0
        size_of = {}
        for size, slot in zip(self.sizes.tolist(), self.slots.tolist()):
            if size >= FLUSH_SIZE:
                continue
            if size:
                size_of[slot] = size
                live += size
                peak = max(peak, live)
            else:
                live -= size_of.pop(slot, 0)
        return peak


class SlotPool:
    """Allocation handles for a trace: a freed one is handed out again, last freed first,
    so the replay's pointer table stays as small and as warm as the live set."""

    def __init__(self):
        self.count = 0  # slots ever handed out: the size of the replay's table
        self._freed = []

    def take(self):
        if self._freed:
            return self._freed.pop()
        self.count += 1
        return self.count - 1

    def give_back(self, slot):
        self._freed.append(slot)


class _Builder:
    def __init__(self):
        self.sizes, self.slots, self.streams = [], [], []
        self.live = {}        # trace id -> slot
        self.slot_pool = SlotPool()
        self.stream_index = {}
        self.skipped = 0
        self.flushes = []
        self.recorded_ooms = 0  # allocations that failed in the recorded run (not replayed)

    def stream(self, value):
        idx = self.stream_index.get(value)
        if idx is None:
            idx = self.stream_index[value] = len(self.stream_index)
        return idx

    def alloc(self, key, size, stream):
        if size >= 1 << 64:
            raise ValueError(f"size {size} does not fit in 64 bits")
        if key in self.live or size <= 0:
            self.skipped += 1
            return
        slot = self.slot_pool.take()
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
        self.slot_pool.give_back(slot)

    def flush(self, stream):
        """A cache-flush event (see FLUSH_SIZE); its allocation fails and is never freed."""
        self.flushes.append(len(self.sizes))
        slot = self.slot_pool.take()  # never freed: the slot stays taken
        self.sizes.append(FLUSH_SIZE)
        self.slots.append(slot)
        self.streams.append(self.stream(stream))

    def build(self, source, prefix=0, info=None):
        info = dict(info or {})
        info["recorded_ooms"] = info.get("recorded_ooms", 0) + self.recorded_ooms
        if not self.stream_index:
            self.stream(0)
        values = sorted(self.stream_index, key=self.stream_index.get)
        return Trace(np.asarray(self.sizes, dtype=np.uint64), np.asarray(self.slots, dtype=np.uint32),
                     np.asarray(self.streams, dtype=np.uint32), self.slot_pool.count, values, self.skipped, source,
                     prefix, info, self.flushes)


def _open_text(path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":  # utf-8-sig: a byte-order mark is dropped
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _head(path, n=64):
    """The first bytes of the file, decompressed if it is gzip."""
    with open(path, "rb") as f:
        head = f.read(n)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(n)
        except (OSError, EOFError):
            raise ValueError(f"{path}: not a readable gzip file: its data is truncated or corrupt") from None
    return head


def read_trace(path, device=None, rebuild=True, flush=True):
    """Reads any supported trace format; raises ValueError naming the problem (OSError for
    a missing or unreadable file). For snapshots, `device` picks the device whose trace is
    read, `rebuild` whether their starting state is rebuilt and `flush` whether segment
    releases become cache flushes (trace_from_snapshot)."""
    path = str(path)
    head = _head(path)
    if head[:len(MTRACE_MAGIC)] == MTRACE_MAGIC or (1 < len(head) < len(MTRACE_MAGIC) and
                                                    MTRACE_MAGIC.startswith(head)):  # a streamed history: its whole recording, as a snapshot
        return trace_from_snapshot(read_recording(path).to_snapshot(), path, device, rebuild, flush)
    stripped = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    # A pickle (protocol 2+ starts with PROTO; 0 and 1 with a mark or an empty container,
    # which no CSV line does), or a JSON snapshot.
    if head[:1] in (b"\x80", b"(", b"}", b"]") or stripped[:1] in (b"{", b"["):
        try:
            snap = load(path)
        except ValueError:
            raise
        except Exception as e:  # UnsafePickleError and friends
            raise ValueError(f"{path}: cannot read the snapshot: {e}") from None
        return trace_from_snapshot(snap, path, device, rebuild, flush)
    if device is not None:
        raise ValueError("--device applies to snapshot inputs only")
    try:
        with _open_text(path) as f:
            first = f.readline()
            if first.lower().startswith("thread,time,action"):
                trace = _read_rmm(f, path)
                trace.info["format"] = "rmm"
            else:
                trace = _read_csv(first, f, path)
                trace.info["format"] = "csv"
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a trace: binary data that is not a snapshot pickle; {FORMATS}") from None
    except (EOFError, gzip.BadGzipFile):  # truncated or corrupt gzip
        raise ValueError(f"{path}: truncated or corrupt gzip file (it ends before its end-of-stream marker, "
                         f"or its data is damaged)") from None
    return trace


CSV_FORM = "'op,id,size_bytes[,stream]' (op 'a' to allocate or 'f' to free, e.g. 'a,7,4096,0')"
RMM_FORM = "'Thread,Time,Action,Pointer,Size[,Stream]' (e.g. '1,0.25,allocate,0x7f00,4096,0x0')"
FORMATS = ("the inputs replay reads are a trace CSV (lines 'op,id,size_bytes[,stream]', .gz ok), an RMM log "
           "CSV (header 'Thread,Time,Action,Pointer,Size,Stream') and a snapshot (pickle or JSON with device_traces)")


def _whole(text, name, base=10):
    try:
        return int(text, base)
    except ValueError:
        raise ValueError(f"{name} {text.strip()!r} is not a whole number") from None


def _csv_event(b, parts):
    op = parts[0].strip()
    if op not in ("a", "f"):
        if len(parts) < 2:
            raise ValueError(f"expected {CSV_FORM}, found {len(parts)} field")
        raise ValueError(f"unknown op {op!r} (expected 'a' to allocate or 'f' to free)")
    if len(parts) < (3 if op == "a" else 2):
        raise ValueError(f"expected {CSV_FORM}, found {len(parts)} field{'s' if len(parts) > 1 else ''}")
    key = parts[1]
    stream = _whole(parts[3], "stream") if len(parts) > 3 and parts[3].strip() else None
    if op == "a":
        b.alloc(key, _whole(parts[2], "size_bytes"), stream or 0)
    else:
        b.free(key, stream)


def _read_csv(first, lines, source):
    b = _Builder()
    events = 0
    for line_no, line in enumerate(_chain_first(first, lines), 1):
        line = line.strip()
        if not line or line[0] == "#" or line.startswith("op,"):
            continue
        try:
            _csv_event(b, line.split(","))
        except ValueError as e:
            hint = f"; is it a trace? {FORMATS}" if events == 0 else ""
            raise ValueError(f"{source}:{line_no}: cannot parse trace line {line[:80]!r}: {e}{hint}") from None
        events += 1
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
            if len(parts) < 5:
                raise ValueError(f"expected {RMM_FORM}, found {len(parts)} field{'s' if len(parts) > 1 else ''}")
            action, ptr, size = parts[2].strip().lower(), parts[3].strip(), _whole(parts[4], "Size")
            stream = _whole(parts[5].strip(), "Stream", 0) if len(parts) > 5 and parts[5].strip() else 0
        except ValueError as e:
            raise ValueError(f"{source}:{line_no}: cannot parse RMM log line {line[:80]!r}: {e}") from None
        if action.startswith("allocate"):
            if "failure" in action:  # the recorded run ran out of memory here
                b.recorded_ooms += 1
                continue
            b.alloc(ptr, size, stream)
        elif action.startswith("free"):
            b.free(ptr, stream)
    return b.build(source)


def write_csv(trace, path):
    """Writes `trace` (its prefix and cache-flush allocations included) in the shared CSV
    format (free lines repeat the allocation's size); for the peer harness, which reads only
    that format."""
    size_of = {}
    with open(path, "w", encoding="utf-8") as f:
        f.write("op,id,size_bytes,stream\n")
        for size, slot, s in zip(trace.sizes.tolist(), trace.slots.tolist(), trace.streams.tolist()):
            if size:
                size_of[slot] = size
                f.write(f"a,{slot},{size},{s}\n")
            else:
                f.write(f"f,{slot},{size_of.pop(slot, 0)},{s}\n")


# ------------------------------------------------------------------ snapshots

def _divisions(settings):
    """The 16 roundup_power2_divisions of a snapshot's allocator_settings (zeros if absent)."""
    out = [0] * 16
    d = settings.get("roundup_power2_divisions") if isinstance(settings, dict) else None
    try:
        if isinstance(d, dict):
            for k, v in d.items():
                idx = max(0, int(k).bit_length() - 1)  # keys are the interval's lower bound in MiB
                if idx < 16:
                    out[idx] = int(v)
        elif isinstance(d, (list, tuple)):
            for i, v in enumerate(d[:16]):
                out[i] = int(v)
    except (TypeError, ValueError):
        return [0] * 16
    return out


def recorded_round_size(size, divisions=None):
    """PyTorch's round_size (allocator_core.md §1.2-1.3) under a recorded run's
    roundup_power2_divisions: the block size a request had in the run that wrote the
    snapshot. Not the core's _C.round_size_ (memory._round_size), which rounds under this
    process's live settings; a snapshot replayed here may have been recorded under others."""
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    if divisions:
        d = divisions[min(15, max(0, size.bit_length() - 1 - 20))]
        if d > 1 and size > K_MIN_BLOCK * d:
            if size & (size - 1) == 0:
                return size
            floor = 1 << (size.bit_length() - 1)
            step = floor >> (d.bit_length() - 1)
            if step == 0:
                return 2 * floor
            return -(-size // step) * step
    return -(-size // K_MIN_BLOCK) * K_MIN_BLOCK


def _as_int(v, default=0):
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
        return default


def starting_state(snap, device, entries=None):
    """The segments and live blocks of `device` when its trace began: the snapshot's final
    segments with the trace undone backwards (an `alloc` means the block did not exist
    before, a `free_completed` that it did; `segment_alloc` means the segment did not exist,
    `segment_free` that it did). Returns (segments, live): segments maps address ->
    {"size", "stream", "small"}; live maps block address -> {"size" (None when only the
    trace knows the block, which records requested sizes), "requested", "stream"}."""
    if entries is None:
        traces = snap.get("device_traces") or []
        entries = traces[device] if device < len(traces) else []
    if isinstance(entries, TraceColumns):  # millions of entries: the columns' arithmetic
        segs, live = timeline.state_at(snap.get("segments") or [], device, entries, 0, frames=False)
        return ({a: {"size": s["size"], "stream": s["stream"], "small": s["small"]} for a, s in segs.items()},
                {a: {"size": b["size"], "requested": b["requested"], "stream": b["stream"]} for a, b in live.items()})
    segments, live = {}, {}
    for s in snap.get("segments") or []:
        if not isinstance(s, dict) or _as_int(s.get("device", 0)) != device:
            continue
        addr, total = _as_int(s.get("address")), _as_int(s.get("total_size"))
        stream = _as_int(s.get("stream", 0))
        kind = s.get("segment_type")
        small = kind == "small" if kind in ("small", "large") else total <= K_SMALL_BUFFER
        segments[addr] = {"size": total, "stream": stream, "small": small}
        b_addr = addr
        for b in s.get("blocks") or []:
            size = _as_int(b.get("size"))
            if b.get("state") in ("active_allocated", "active_pending_free"):
                req = b.get("requested_size")
                live[b_addr] = {"size": size, "requested": _as_int(req, size) if req else size, "stream": stream}
            b_addr += size  # the page's rule: blocks tile the segment in list order
    for e in reversed(entries):
        if not isinstance(e, dict):
            continue
        a = e.get("action")
        addr = _as_int(e.get("addr"))
        if a == "alloc":
            live.pop(addr, None)
        elif a in ("free_completed", "free"):
            live[addr] = {"size": None, "requested": _as_int(e.get("size")), "stream": _as_int(e.get("stream", 0))}
        elif a in ("segment_alloc", "segment_map"):
            segments.pop(addr, None)
        elif a in ("segment_free", "segment_unmap"):
            size = _as_int(e.get("size"))
            segments[addr] = {"size": size, "stream": _as_int(e.get("stream", 0)), "small": size <= K_SMALL_BUFFER}
    return segments, live


def _segment_pieces(seg_addr, seg, blocks, divisions):
    """The pieces [(is_live, block address or None, size, requested)] that tile one segment
    in address order: its live blocks and the free gaps between them. Block sizes the
    snapshot does not hold are estimated (round_size of the request, extended over a
    large-pool remainder too small to have been split off)."""
    end = seg_addr + seg["size"]
    pieces, pos = [], seg_addr
    for i, (addr, blk) in enumerate(blocks):
        nxt = blocks[i + 1][0] if i + 1 < len(blocks) else end
        size = blk["size"] or recorded_round_size(max(1, blk["requested"]), divisions)
        size = max(K_MIN_BLOCK, min(size, nxt - addr))
        if addr > pos:
            pieces.append([False, None, addr - pos, 0])
        pieces.append([True, addr, size, blk["requested"]])
        pos = addr + size
    if end > pos:
        pieces.append([False, None, end - pos, 0])
    if seg["small"]:
        return pieces
    # Large pool: a remainder of 1 MiB or less is never split off (§3.3), so a gap that
    # small is slack of the live block before it (at the segment's start: the one after it).
    out = []
    for p in pieces:
        if out and not p[0] and (not out[-1][0] or p[2] <= K_SMALL_SIZE):
            out[-1][2] += p[2]  # gap after a gap, or small gap after a live block
        elif out and p[0] and not out[-1][0] and out[-1][2] <= K_SMALL_SIZE:
            p[2] += out.pop()[2]  # small gap at the segment's start: the next block takes it
            out.append(p)
        else:
            out.append(p)
    return out


_MISSING = object()


def trace_from_snapshot(snap, source="<snapshot>", device=None, rebuild=True, flush=True):
    """The alloc / free_completed events of a PyTorch (or mtia_alloc) snapshot's
    device_traces, for the device with the most events unless `device` is given.

    Snapshots recorded on real GPUs begin mid-run: segments and live blocks predate the
    first trace event. With `rebuild` (the default), the state at the first event is
    rebuilt (starting_state) and replayed first, as a prefix of synthetic events
    (Trace.prefix of them), segment by segment in address order:
      - a large segment: one allocation of the segment's size, freed at once, so that the
        allocator makes a segment of that size (sizes >= 10 MiB and the 20 MiB segments
        come out exact);
      - then its pieces in address order, on the segment's stream: live blocks as
        allocations that stay live (keyed by address, so the trace's frees find them),
        free gaps as temporary allocations (small-pool gaps in pieces of at most 1 MiB).
        Every earlier segment is fully occupied meanwhile, so best fit carves the pieces
        out of this segment's free block, front to back, reproducing its layout;
      - live blocks that lie in no segment are allocated afterwards;
      - finally the temporaries are freed: the segments exist with the same sizes, the
        same live blocks and the same free pieces as when the trace began.
    With `flush` (the default), each run of `segment_free` entries (an empty_cache() call,
    an OOM retry or a garbage collection in the recorded run) becomes a cache-flush event
    (Trace.flushes): the replay releases its unused cached segments there too.

    A live block's request is its requested size when that rounds to the block size. A large
    block with unsplit slack (block size up to 1 MiB above the rounded request) has its
    place held by a temporary; after all segments are laid out, each such place is freed and
    requested at once, when it is its pool's only free block, so the block gets its exact
    size and requested size. Otherwise the block size is requested (the layout stays exact). Trace.info holds: format, device, entries,
    segment_alloc / segment_free (counts in the trace), settings (the snapshot's allocator
    settings string), recorded_ooms (its 'oom' entries) and, when rebuilt, start_segments, start_reserved, start_live_blocks,
    start_live_bytes (block bytes), start_requested, orphan_blocks, and the peaks the trace
    records from that state on: recorded_peak_reserved, recorded_peak_requested; flushes."""
    if not isinstance(snap, dict) or not isinstance(snap.get("device_traces"), list):
        raise ValueError(f"{source}: not a snapshot with device_traces")
    traces = snap["device_traces"]
    if not all(isinstance(t, (list, TraceColumns)) for t in traces):
        raise ValueError(f"{source}: malformed snapshot: device_traces must be a list of lists")
    if device is None:
        device = max(range(len(traces)), key=lambda d: len(traces[d])) if traces else 0
    elif not 0 <= device < max(1, len(traces)):
        raise ValueError(f"{source}: no device {device} in the snapshot ({len(traces)} device traces)")
    entries = traces[device] if device < len(traces) else []
    if not isinstance(entries, TraceColumns):
        entries = [e for e in entries if isinstance(e, dict)]
    settings = snap.get("allocator_settings") if isinstance(snap.get("allocator_settings"), dict) else {}
    divisions = _divisions(settings)
    columnar = isinstance(entries, TraceColumns)

    def count(action):
        return entries.count(action) if columnar else sum(1 for e in entries if e.get("action") == action)

    info = {"format": "snapshot", "device": device, "entries": len(entries),
            "segment_alloc": count("segment_alloc"), "segment_free": count("segment_free"),
            "recorded_ooms": count("oom"),
            "settings": str(settings.get("PYTORCH_CUDA_ALLOC_CONF", "") or ""),
            "start_segments": 0, "start_reserved": 0, "start_live_blocks": 0, "start_live_bytes": 0,
            "orphan_blocks": 0}
    b = _Builder()
    try:
        if rebuild:
            _rebuild_prefix(b, snap, device, entries, divisions, info)
        prefix = len(b.sizes)
        releasing = False
        rows = entries.fields() if columnar else (
            (None, e.get("action"), e.get("addr", _MISSING), e.get("size", _MISSING), e.get("stream", 0))
            for e in entries)
        for _, a, addr, size, stream in rows:
            if a == "alloc":
                if addr is _MISSING or size is _MISSING:
                    raise KeyError("addr" if addr is _MISSING else "size")
                b.alloc(_as_int(addr), _as_int(size), _as_int(stream))
            elif a in ("free_completed", "free"):
                if addr is _MISSING:
                    raise KeyError("addr")
                b.free(_as_int(addr), _as_int(stream))
            elif a in ("segment_free", "segment_unmap"):
                if flush and not releasing:
                    b.flush(_as_int(stream))
                releasing = True
                continue
            elif a not in ("alloc", "free_completed", "free", "segment_alloc", "segment_map", "oom"):
                continue  # free_requested, snapshot, annotations: no effect on a run of releases
            releasing = False
        info["flushes"] = len(b.flushes)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}: malformed snapshot ({type(e).__name__}: {e})") from None
    return b.build(source, prefix, info)


def _rebuild_prefix(b, snap, device, entries, divisions, info):
    segments, live = starting_state(snap, device, entries)
    by_segment = {a: [] for a in segments}
    seg_starts = sorted(segments)
    orphans = []
    for addr in sorted(live):
        i = bisect.bisect_right(seg_starts, addr) - 1
        if i >= 0 and addr < seg_starts[i] + segments[seg_starts[i]]["size"]:
            by_segment[seg_starts[i]].append((addr, live[addr]))
        else:
            orphans.append((addr, live[addr]))
    temps = []
    slack = []

    def temp(size, stream):
        key = ("tmp", len(b.sizes))
        b.alloc(key, size, stream)
        temps.append((key, stream))

    live_bytes = 0
    for seg_addr in seg_starts:
        seg = segments[seg_addr]
        if seg["size"] <= 0:
            continue
        stream = seg["stream"]
        if not seg["small"]:
            temp(seg["size"], stream)  # makes the segment, then frees it whole
            b.free(*temps.pop())
        for is_live, addr, size, requested in _segment_pieces(seg_addr, seg, by_segment[seg_addr], divisions):
            if is_live:
                rounded = recorded_round_size(requested, divisions) if requested else 0
                if rounded == size:
                    b.alloc(addr, requested, stream)
                elif not seg["small"] and K_SMALL_SIZE < rounded < size <= rounded + K_SMALL_SIZE:
                    # slack kept by an unsplit large block: hold its place now, request it later
                    temp(size, stream)
                    slack.append((temps.pop(), addr, requested))
                else:
                    b.alloc(addr, size, stream)
                live_bytes += size
            elif seg["small"]:
                while size > 0:
                    chunk = min(size, K_SMALL_SIZE)
                    temp(chunk, stream)
                    size -= chunk
            else:
                temp(size, stream)
    for (key, stream), addr, requested in slack:
        # the only free block of its pool is now the place held for this one: the request
        # takes it whole, as the remainder (at most 1 MiB) is not split off
        b.free(key, stream)
        b.alloc(addr, requested, stream)
    for addr, blk in orphans:
        b.alloc(addr, blk["requested"] or blk["size"] or K_MIN_BLOCK, blk["stream"])
        live_bytes += blk["size"] or recorded_round_size(max(1, blk["requested"]), divisions)
    for key, stream in temps:
        b.free(key, stream)
    reserved = sum(s["size"] for s in segments.values())
    requested = sum(blk["requested"] for blk in live.values())
    info.update(start_segments=len(segments), start_reserved=reserved, start_live_blocks=len(live),
                start_live_bytes=live_bytes, start_requested=requested, orphan_blocks=len(orphans))
    # the peaks the trace itself records, from that state on (what the replay should find)
    peak_reserved, peak_requested = reserved, requested
    if isinstance(entries, TraceColumns):
        d_alloc, d_res = timeline.deltas(entries)
        if len(d_alloc):
            peak_requested = max(peak_requested, requested + int(np.cumsum(d_alloc).max()))
            peak_reserved = max(peak_reserved, reserved + int(np.cumsum(d_res).max()))
        info.update(recorded_peak_reserved=peak_reserved, recorded_peak_requested=peak_requested)
        return
    for e in entries:
        a = e.get("action")
        if a == "alloc":
            requested += _as_int(e.get("size"))
            peak_requested = max(peak_requested, requested)
        elif a in ("free_completed", "free"):
            requested -= _as_int(e.get("size"))
        elif a in ("segment_alloc", "segment_map"):
            reserved += _as_int(e.get("size"))
            peak_reserved = max(peak_reserved, reserved)
        elif a in ("segment_free", "segment_unmap"):
            reserved -= _as_int(e.get("size"))
    info.update(recorded_peak_reserved=peak_reserved, recorded_peak_requested=peak_requested)
