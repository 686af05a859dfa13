"""Reading a streamed memory history (.mtrace, written by record_memory_history(path=...);
the format is described in src_cpp/history_stream.h) and turning it, or a window of it,
into a snapshot dict in PyTorch's schema (segments + device_traces), which the memory_viz
page, `replay`, `fit` and `diff` read.

A file cut short (a crash or a kill while recording) reads up to its last complete
record: read() reports the bytes left over in Recording.partial_bytes.

Owns: MAGIC, is_mtrace, read (-> Recording), Recording.to_snapshot (window by event index
or by time). Relies on nothing of mtia_alloc (pure Python)."""
import json
import os
import struct
from dataclasses import dataclass, field
from operator import itemgetter

__all__ = ["MAGIC", "Recording", "is_mtrace", "read"]

MAGIC = b"MTRACE\x00\x01"
ACTIONS = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "snapshot", "oom",
           "segment_map", "segment_unmap")
_EVENT = struct.Struct("<BBhIII QQQqQQ")
_FRAME_HEAD = struct.Struct("<IiH")
_CLOCK = struct.Struct("<Qq")
_SMALL_SEGMENT = 2 << 20  # the small pool's segment size
_MIN_BLOCK = 512
_U64 = (1 << 64) - 1
_TICK = itemgetter(4)  # an event tuple's time stamp


def is_mtrace(path):
    try:
        with open(os.fspath(path), "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass
class Recording:
    path: str
    header: dict
    # (action index, device, stack id, metadata id, tick, addr, size, stream, pool a, pool b)
    events: list
    frames: dict = field(default_factory=dict)    # frame id -> {"filename", "line", "name"}
    stacks: dict = field(default_factory=dict)    # stack id -> [frame ids]
    metadata: dict = field(default_factory=dict)  # metadata id -> str
    anchors: list = field(default_factory=list)   # (tick, epoch us), in tick order
    partial_bytes: int = 0  # bytes after the last complete record (a file cut short)

    @property
    def device_count(self):
        n = self.header.get("device_count")
        if isinstance(n, int) and n > 0:
            return n
        return max((e[1] for e in self.events), default=-1) + 1

    def time_us(self, tick):
        """Epoch microseconds of a clock reading: interpolated between the recorded
        anchors (extrapolated with the whole recording's rate past either end)."""
        a = self.anchors
        if not a:
            return 0
        if len(a) == 1 or a[-1][0] == a[0][0]:
            return a[0][1]
        import bisect
        i = bisect.bisect_right(a, (tick, float("inf")))
        if 0 < i < len(a) and a[i][0] != a[i - 1][0]:
            (t0, u0), (t1, u1) = a[i - 1], a[i]
        else:
            (t0, u0), (t1, u1) = a[0], a[-1]
        return int(u0 + (tick - t0) * (u1 - u0) / (t1 - t0))

    def _window(self, start=None, stop=None):
        """Event indices [i, j) of a window given by event index (int) or by time: a float
        or a string with a unit (\"2.5s\", \"300ms\", \"40us\"), measured from the first event."""
        n = len(self.events)
        t0 = self.time_us(self.events[0][4]) if n else 0

        def index(v, name):
            if v is None:
                return None
            if isinstance(v, str):
                text = v.strip()
                for unit, scale in (("us", 1), ("ms", 1e3), ("s", 1e6)):
                    if text.endswith(unit):
                        try:
                            us = float(text[:-len(unit)]) * scale
                        except ValueError:
                            break
                        return self._index_at(t0 + us)
                try:
                    return int(text)
                except ValueError:
                    raise ValueError(f"{name} {v!r}: expected an event index (e.g. 1000) or a time from the "
                                     f"start of the recording (e.g. 2.5s, 300ms, 40us)") from None
            if isinstance(v, float):
                return self._index_at(t0 + v * 1e6)
            return int(v)

        i, j = index(start, "--from"), index(stop, "--to")
        i = 0 if i is None else i
        j = n if j is None else j
        if i < 0 or j < 0:
            raise ValueError(f"the window [{start}, {stop}) has a negative bound; events are numbered from 0")
        if i >= n and n:
            raise ValueError(f"the window starts at event {i}, past the end of the recording ({n} events, "
                             f"0..{n - 1})")
        if j > n:
            raise ValueError(f"the window ends at event {j}, past the end of the recording ({n} events)")
        if j <= i:
            raise ValueError(f"the window [{i}, {j}) holds no event (the recording has {n} events)")
        return i, j

    def _index_at(self, us):
        for k, e in enumerate(self.events):
            if self.time_us(e[4]) >= us:
                return k
        return len(self.events)

    def to_snapshot(self, start=None, stop=None):
        """The snapshot dict of events [start, stop) (ValueError for a window outside the
        recording): device_traces holds the window's events; segments are the state at
        its end, rebuilt from the segments recorded when streaming started plus every
        event before that point (blocks are the live allocations, rounded as the allocator
        rounds them, with the gaps between them inactive)."""
        i, j = self._window(start, stop) if self.events else (0, 0)
        ndev = self.device_count
        stack_lists = {}

        def frames_of(sid):
            out = stack_lists.get(sid)
            if out is None:
                out = stack_lists[sid] = [self.frames.get(fid, {"filename": "??", "line": 0, "name": "??"})
                                          for fid in self.stacks.get(sid, ())]
            return out

        segs = [dict() for _ in range(ndev)]
        live = [dict() for _ in range(ndev)]
        for s in self.header.get("segments", ()):
            d = s.get("device", 0)
            if 0 <= d < ndev:
                segs[d][s["address"]] = dict(s, blocks=None)
                for b in s.get("blocks", ()):
                    if b.get("state") == "active_allocated":
                        live[d][b["address"]] = (b.get("requested_size", b["size"]), s.get("stream", 0),
                                                 b.get("frames", []), b["size"])
        traces = [[] for _ in range(ndev)]
        for k in range(j):
            a, d, sid, mid, tick, addr, size, stream, pa, pb = self.events[k]
            if not 0 <= d < ndev:
                continue
            action = ACTIONS[a] if a < len(ACTIONS) else "?"
            if action in ("segment_alloc", "segment_map"):
                segs[d].setdefault(addr, {"device": d, "address": addr, "total_size": size, "stream": stream,
                                          "segment_pool_id": (pa, pb), "is_expandable": action == "segment_map",
                                          "frames": frames_of(sid) if sid else [], "blocks": None})
            elif action in ("segment_free", "segment_unmap"):
                segs[d].pop(addr, None)
            elif action == "alloc":
                live[d][addr] = (size, stream, frames_of(sid) if sid else [], None)
            elif action == "free_completed":
                live[d].pop(addr, None)
            if k >= i:
                e = {"action": action}
                e["device_free" if action == "oom" else "addr"] = addr
                e.update(size=size, stream=stream, time_us=self.time_us(tick), compile_context="N/A",
                         user_metadata=self.metadata.get(mid, "") if mid else "", pool_id=(pa, pb))
                if sid:
                    e["frames"] = frames_of(sid)
                traces[d].append(e)
        segments = []
        for d in range(ndev):
            for base in sorted(segs[d]):
                segments.append(_segment(segs[d][base], live[d]))
        return {"segments": segments, "device_traces": traces,
                "allocator_settings": self.header.get("allocator_settings", {}), "external_annotations": []}


def _round(n):
    return max(_MIN_BLOCK, (n + _MIN_BLOCK - 1) // _MIN_BLOCK * _MIN_BLOCK)


def _segment(seg, live):
    base, total = seg["address"], seg["total_size"]
    blocks, at = [], base
    inside = sorted(a for a in live if base <= a < base + total)
    for addr in inside:
        size, _stream, frames, block = live[addr]
        if addr > at:
            blocks.append({"address": at, "size": addr - at, "requested_size": 0, "state": "inactive", "frames": []})
        bsize = min(block or _round(size), base + total - addr)
        blocks.append({"address": addr, "size": bsize, "requested_size": size, "state": "active_allocated",
                       "frames": frames})
        at = addr + bsize
    if at < base + total:
        blocks.append({"address": at, "size": base + total - at, "requested_size": 0, "state": "inactive",
                       "frames": []})
    allocated = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    return {"device": seg.get("device", 0), "address": base, "total_size": total, "allocated_size": allocated,
            "active_size": allocated, "requested_size": sum(b["requested_size"] for b in blocks),
            "stream": seg.get("stream", 0),
            "segment_type": seg.get("segment_type") or ("small" if total <= _SMALL_SEGMENT else "large"),
            "segment_pool_id": tuple(seg.get("segment_pool_id", (0, 0))),
            "is_expandable": bool(seg.get("is_expandable", False)), "frames": seg.get("frames", []),
            "blocks": blocks}


def _context(data, pos, end):
    """An event's context, when its head byte says it changed (both batch kinds): device,
    stream (zigzag), pool id's two halves and the metadata id, as varints; and where they end."""
    device, pos = _varint(data, pos, end)
    v, pos = _varint(data, pos, end)
    pa, pos = _varint(data, pos, end)
    pb, pos = _varint(data, pos, end)
    mid, pos = _varint(data, pos, end)
    return device, (v >> 1) ^ -(v & 1), pa, pb, mid, pos


def _batch(data, pos, end, events):
    """Appends the events of the 'Z' record data[pos:end] (history_stream.h: each a head
    byte and varints, relative to the previous event) to `events`; returns where the last
    complete one ends (`end` unless the file was cut short inside the record)."""
    device = stream = pa = pb = mid = tick = addr = size = 0
    done = pos
    try:
        while pos < end:
            head = data[pos]
            pos += 1
            if head & 0x10:
                device, stream, pa, pb, mid, pos = _context(data, pos, end)
            v, pos = _varint(data, pos, end)
            tick = (tick + ((v >> 1) ^ -(v & 1))) & _U64
            if not head & 0x40:
                v, pos = _varint(data, pos, end)
                addr = (addr + ((v >> 1) ^ -(v & 1))) & _U64
                size, pos = _varint(data, pos, end)
            sid = 0
            if head & 0x20:
                sid, pos = _varint(data, pos, end)
            events.append((head & 0x0F, device, sid, mid, tick, addr, size, stream, pa, pb))
            done = pos
    except IndexError:  # an event cut short
        pass
    return done


def _ybatch(data, pos, end, events):
    """As _batch, for a 'Y' record (history_stream.h: a head byte, the context's varints
    when it changes, a u16 of four byte counts, then the tick, addr and size deltas and the
    stack id, each in its byte count)."""
    device = stream = pa = pb = mid = tick = addr = size = 0
    done = pos
    from_bytes = int.from_bytes
    try:
        while pos < end:
            head = data[pos]
            pos += 1
            if head & 0x10:
                device, stream, pa, pb, mid, pos = _context(data, pos, end)
            if pos + 2 > end:
                raise IndexError(pos)
            lens = data[pos] | data[pos + 1] << 8
            nt, na, ns, nk = lens & 15, lens >> 4 & 15, lens >> 8 & 15, lens >> 12
            pos += 2
            if pos + nt + na + ns + nk > end:
                raise IndexError(pos)
            if nt:
                tick = (tick + from_bytes(data[pos:pos + nt], "little")) & _U64
                pos += nt
            if na:
                v = from_bytes(data[pos:pos + na], "little")
                addr = (addr + ((v >> 1) ^ -(v & 1))) & _U64
                pos += na
            if ns:
                v = from_bytes(data[pos:pos + ns], "little")
                size = (size + ((v >> 1) ^ -(v & 1))) & _U64
                pos += ns
            sid = from_bytes(data[pos:pos + nk], "little") if nk else 0
            pos += nk
            events.append((head & 0x0F, device, sid, mid, tick, addr, size, stream, pa, pb))
            done = pos
    except IndexError:  # an event cut short
        pass
    return done


def _varint(data, pos, end):
    if pos >= end:
        raise IndexError(pos)
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    v, shift = b & 0x7F, 7
    while True:
        pos += 1
        if pos >= end:
            raise IndexError(pos)
        b = data[pos]
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, pos + 1
        shift += 7


def read(path):
    """The Recording in `path`; ValueError naming the problem for a file that is not a
    .mtrace or whose header is cut short (OSError for a missing or unreadable file)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:len(MAGIC)] != MAGIC:
        if MAGIC.startswith(data):
            raise ValueError(f"{path}: truncated .mtrace file: it ends inside its {len(MAGIC)}-byte header "
                             f"({len(data)} bytes)")
        raise ValueError(f"{path}: not a .mtrace recording (no MTRACE header)")
    pos, n = len(MAGIC), len(data)
    rec = Recording(path, {}, [])
    unpack_event = _EVENT.unpack_from
    events = rec.events
    have_header = False
    while pos + 5 <= n:
        kind = data[pos]
        length = int.from_bytes(data[pos + 1:pos + 5], "little")
        body = pos + 5
        if body + length > n and kind not in (0x5A, 0x59):
            break
        if kind in (0x5A, 0x59):  # 'Z', 'Y'
            end = (_batch if kind == 0x5A else _ybatch)(data, body, min(body + length, n), events)
            if end < body + length:  # cut short inside the batch: its complete events count
                pos = end
                break
        elif kind == 0x45:  # 'E'
            if length == _EVENT.size:
                a, _z, d, sid, mid, _z2, tick, addr, size, stream, pa, pb = unpack_event(data, body)
                events.append((a, d, sid, mid, tick, addr, size, stream, pa, pb))
        elif kind == 0x46:  # 'F'
            fid, line, nf = _FRAME_HEAD.unpack_from(data, body)
            o = body + _FRAME_HEAD.size
            filename = data[o:o + nf].decode("utf-8", "replace")
            o += nf
            nn = int.from_bytes(data[o:o + 2], "little")
            name = data[o + 2:o + 2 + nn].decode("utf-8", "replace")
            rec.frames[fid] = {"filename": filename, "line": line, "name": name}
        elif kind == 0x53:  # 'S'
            sid, count = struct.unpack_from("<II", data, body)
            rec.stacks[sid] = list(struct.unpack_from(f"<{count}I", data, body + 8))
        elif kind == 0x4D:  # 'M'
            (mid,) = struct.unpack_from("<I", data, body)
            rec.metadata[mid] = data[body + 4:body + length].decode("utf-8", "replace")
        elif kind == 0x43:  # 'C'
            rec.anchors.append(_CLOCK.unpack_from(data, body))
        elif kind == 0x48:  # 'H'
            try:
                rec.header = json.loads(data[body:body + length].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"{path}: corrupt .mtrace header: {e}") from None
            have_header = True
        pos = body + length
    if not have_header:
        raise ValueError(f"{path}: truncated .mtrace file: it ends before its header record is complete "
                         f"({n} bytes)")
    rec.partial_bytes = n - pos
    rec.anchors.sort()
    # Batches of several devices interleave by chunk: merged by time (stable, and a
    # device's time stamps never decrease, so each device's events keep their order).
    events.sort(key=_TICK)
    return rec
