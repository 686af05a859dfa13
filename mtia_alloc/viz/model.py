"""A REPL-friendly view of a memory snapshot: Snapshot, Segment, Block, Fragmentation.

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

Owns: the classes above. Works on plain dicts (viz.load validates them first).
Relies on: viz.load, viz.render (plot), _format (format_bytes, summary_table), _C (the
current device, for a device argument 'mtia'), and history.snapshot for `Snapshot()`
without an argument (the one call into the live allocator).
"""
import operator
import os
import pickle

from .. import _C
from .._format import format_bytes, summary_table
from ..history import snapshot
from .load import SIZED_ACTIONS, normalize, plain
from .render import is_html_name, not_html_message, render_html

__all__ = ["Snapshot", "Segment", "Block", "Fragmentation"]


def _device_number(device):
    """The device index a device argument names, without the live device-count check (a
    snapshot may come from another process): int/__index__, 'mtia:N', 'mtia' (the current
    device), or an object with .type == 'mtia' and .index."""
    what = f"device must be an integer, 'mtia:N' or a torch.device, got {type(device).__name__} {device!r:.40}"
    if isinstance(device, str):
        text = device.strip()
        if text == "mtia":
            return _C.current_device() if _C.is_initialized() else 0
        if text.startswith("mtia:") and text[5:].isdigit():
            return int(text[5:])
        raise TypeError(what)
    if hasattr(device, "type") and hasattr(device, "index") and not hasattr(device, "__index__"):
        if device.type != "mtia":
            raise TypeError(what)
        if device.index is None:
            return _C.current_device() if _C.is_initialized() else 0
        device = device.index
    if isinstance(device, bool) or not hasattr(device, "__index__"):
        raise TypeError(what)
    return operator.index(device)

ACTIVE_STATES = ("active_allocated", "active_pending_free")
SMALL_SEGMENT_MAX = 2 << 20  # PyTorch's small-pool segment size (kSmallBuffer)
# frames inside the package itself are skipped when naming an allocation site
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


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
        parts = [f"{self.address:#x}", format_bytes(self.size), self.state]
        if self.is_active and self.requested_size != self.size:
            parts.append(f"requested {format_bytes(self.requested_size)}")
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
            requested += _requested(b)
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
                if frames is None:
                    history = b.get("history")
                    if history and isinstance(history, list) and isinstance(history[0], dict):
                        frames = history[0].get("frames")
                out.append(Block(addr, size, _requested(b), b.get("state", "inactive"), frames or [], self))
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
        parts = [f"device {self.device}", f"{self.address:#x}", f"{format_bytes(self.total_size)} {self.segment_type}",
                 f"{format_bytes(self.allocated_size)} allocated in {self.n_allocated} of {self.n_blocks} blocks"]
        if self.pending_free_size:
            parts.append(f"{format_bytes(self.pending_free_size)} pending free")
        parts.append(f"largest free {format_bytes(self.largest_free_block)}")
        if self.stream:
            parts.append(f"stream {self.stream}")
        if self.pool_id != (0, 0):
            parts.append(f"pool {self.pool_id}")
        if self.is_expandable:
            parts.append("expandable")
        return f"Segment({', '.join(parts)})"


def _requested(b):
    """requested_size of a block dict; without one, the legacy history's real_size, else size."""
    req = b.get("requested_size")
    if req is not None:
        return int(req)
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
        return (f"Fragmentation({self.ratio:.1%} of {format_bytes(self.reserved)} reserved is free inside "
                f"{self.partly_used_segments} partly used segments ({format_bytes(self.free_in_partly_used)}); "
                f"largest free block {format_bytes(lf['all'])} (small pool {format_bytes(lf['small_pool'])}, "
                f"large pool {format_bytes(lf['large_pool'])}); releasable {format_bytes(self.releasable)})")

    def __str__(self):
        lf = self.largest_free_block
        lines = [
            f"reserved                      {format_bytes(self.reserved)}",
            f"free (inactive blocks)        {format_bytes(self.free)}",
            f"  inside partly used segments {format_bytes(self.free_in_partly_used)} in "
            f"{self.partly_used_segments} segments = {self.ratio:.1%} of reserved (not releasable)",
            f"  in unused segments          {format_bytes(self.releasable)} (empty_cache() releases it)",
            f"pending free (other streams)  {format_bytes(self.pending_free)}",
            f"largest free block            {format_bytes(lf['all'])} (small pool {format_bytes(lf['small_pool'])}, "
            f"large pool {format_bytes(lf['large_pool'])})",
            f"external fragmentation        {self.external:.1%} (1 - largest free block / free)",
        ]
        for pool, size in sorted(self.largest_free_block_by_pool.items()):
            if pool != (0, 0):
                lines.append(f"  largest free block in pool {pool}: {format_bytes(size)}")
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
            snapshot_or_path = snapshot()
        self.source = os.fspath(snapshot_or_path) if isinstance(snapshot_or_path, (str, os.PathLike)) else None
        self.data = snapshot_or_path.data if isinstance(snapshot_or_path, Snapshot) else normalize(snapshot_or_path)
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
        """The index of `device` (an integer, 'mtia:N', or a torch.device-like object with
        .type 'mtia', as every device argument; 'mtia' alone is the current device) if this
        snapshot has it (a segment or a trace list; device 0 of an empty snapshot), else a
        ValueError naming the devices it has: a table of zeros would mislead."""
        known = sorted(set(self.devices) | set(range(len(self.device_traces)))) or [0]
        index = _device_number(device)
        if index not in known:
            raise ValueError(f"device {device} is not in this snapshot (devices: {known})")
        return index

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
                f"reserved={format_bytes(frag.reserved)}, allocated={format_bytes(self.allocated)}, "
                f"largest_free_block={format_bytes(frag.largest_free_block['all'])}, "
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
        devices = [self._check_device(device)] if device is not None else (self.devices or [0])
        tables = [summary_table(self.stats(d), d, abbreviated) for d in devices]
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
            size = int(e["size"]) if a in SIZED_ACTIONS else 0  # validated for these actions only
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
        return plain(self.data)

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
            raise ValueError(not_html_message(os.fspath(path)))
        if device is not None:
            device = self._check_device(device)
        text = render_html(self, device)
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            f.write(text)
        return path
