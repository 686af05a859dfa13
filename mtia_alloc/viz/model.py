"""A REPL-friendly view of a memory snapshot: Snapshot, Segment, Block, Fragmentation.

    >>> from mtia_alloc.memory import Snapshot
    >>> s = Snapshot()                      # the allocator's state now (mtia_alloc.snapshot())
    >>> s = Snapshot("snap.pickle")          # a pickle from _dump_snapshot, or from PyTorch itself
    >>> s
    Snapshot(MTIA devices=[0], segments=3, blocks=7, reserved=42.00 MiB, allocated=12.50 MiB
             (requested 12.31 MiB), largest_free_block=17.00 MiB, fragmentation=2.4%)
    >>> s.segments[0], s.blocks[:3]          # small objects with readable reprs; Block.where = call site
    >>> print(s.summary())                   # the memory_summary table (peaks replayed from the trace)
    >>> s.fragmentation()                    # torch's viewer's figures, and the one fragmentation figure
    >>> s.plot("snap.html")                  # self-contained HTML + inline SVG (no network, no matplotlib)
    >>> s.dump("copy.pickle")                # pickle protocol 4 (the memory_viz page refuses 5)
    >>> s.fit("24GiB"), s.sweep("24GiB")     # will the trace fit? which allocator settings?
    >>> s.diff("other.pickle")               # per call site: what changed between two runs
    >>> s.window(t0, t1)                     # the snapshot of a time window (µs), its real starting state

A snapshot is PyTorch's dict (segments, device_traces, allocator_settings,
external_annotations). `Snapshot` also takes a bare segment list (memory_snapshot()), an
older PyTorch snapshot (blocks with a legacy `history`), a JSON file of the same structure,
or a gzip-compressed pickle. Pickles are read with an unpickler that accepts plain data only.

Owns: Snapshot (Block, Segment and Fragmentation live in viz.segments). Works on plain
dicts (viz.load validates them first). Relies on: viz.segments, viz.load, viz.columns and viz.timeline (traces of millions of entries held as
columns: curves, counts, windows), viz.frames (call sites), viz.render (plot), viz.reports and viz.runner
(fit, sweep, diff, ranks and the summary's peaks: the command line in a child process, as a
replay needs a fresh allocator), _format (format_bytes, summary_table), _C (the current
device, for a device argument 'mtia'), and history.snapshot for `Snapshot()` without an
argument (the one call into the live allocator).
"""
import contextlib
import operator
import os
import pickle

from .. import _C
from .._format import format_bytes, summary_table
from ..history import snapshot
import numpy as np

from . import runner, timeline
from .columns import P_TIME, TraceColumns, write_pickle
from .frames import where
from .load import normalize, plain
from .render import is_html_name, not_html_message, render_html
from .segments import Block, Fragmentation, Segment, _requested  # noqa: F401 (_requested: for tools.diff)
from .reports import DiffReport, FitReport, RanksReport, SweepReport

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



_KIND_HINTS = (("cuda", "CUDA"), ("hip", "ROCm"), ("xpu", "XPU"), ("mtia", "MTIA"))


def detect_device_kind(data, limit=2000):
    """The device kind a snapshot was recorded on, as its stacks tell it ("CUDA" for frames of
    torch.cuda / c10::cuda, "MTIA" for torch.mtia or mtia_alloc, ...); "" when nothing tells.
    Looks at the stacks of at most `limit` blocks and trace entries. A "device_kind" key
    (Snapshot().dump() writes one) decides first."""
    kind = data.get("device_kind")
    if isinstance(kind, str) and kind.isalnum() and len(kind) <= 16:
        return kind
    seen = set()
    lists = []
    for seg in data.get("segments", ()):
        lists.append(seg.get("frames"))
        lists.extend(b.get("frames") for b in seg.get("blocks", ()) if isinstance(b, dict))
        if len(lists) > limit:
            break
    for t in data.get("device_traces", ()):
        lists.extend(e.get("frames") for e in t[:limit] if isinstance(e, dict))
    for frames in lists:
        if not frames or id(frames) in seen or not isinstance(frames, list):
            continue
        seen.add(id(frames))
        for fr in frames:
            if not isinstance(fr, dict):
                continue
            text = f"{fr.get('filename', '')} {fr.get('name', '')}".lower()
            if "mtia_alloc" in text:
                return "MTIA"
            for hint, kind in _KIND_HINTS:
                if f"/{hint}/" in text or f"{hint}::" in text or f"torch.{hint}" in text or \
                        f"{hint}cachingallocator" in text:
                    return kind
    return ""


# ------------------------------------------------------------------ the snapshot

# a summary replays a device's trace (a child process) up to this many alloc/free events;
# longer traces report the peaks the trace itself records (Snapshot._recorded_peaks)
REPLAY_MAX_EVENTS = int(os.environ.get("MTIA_ALLOC_SUMMARY_REPLAY_MAX", 1_000_000))

_POOL_METRICS = ("allocated_bytes", "active_bytes", "requested_bytes", "reserved_bytes", "inactive_split_bytes",
                 "allocation", "active", "segment", "inactive_split")


class Snapshot:
    """A memory snapshot with a REPL-friendly face. `Snapshot()` takes one now;
    `Snapshot(x)` wraps x: a snapshot dict, a memory_snapshot() segment list, another
    Snapshot, or the path of a pickle / JSON file (ours or PyTorch's)."""

    def __init__(self, snapshot_or_path=None, device_kind=None):
        live = snapshot_or_path is None
        if live:
            snapshot_or_path = snapshot()
        self.source = os.fspath(snapshot_or_path) if isinstance(snapshot_or_path, (str, os.PathLike)) else None
        self.data = snapshot_or_path.data if isinstance(snapshot_or_path, Snapshot) else normalize(snapshot_or_path)
        self._segments = None
        self._replayed = {}  # device -> the replay's figures (runner.replay_figures)
        if device_kind is None:
            device_kind = "MTIA" if live else (snapshot_or_path.device_kind if isinstance(snapshot_or_path, Snapshot)
                                               else detect_device_kind(self.data))
        self.device_kind = device_kind
        if live:
            # carried by dump() (a top-level key no renderer reads), so that a reload knows it
            self.data = dict(self.data, device_kind="MTIA")

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
                    if (len(t) > t.count("snapshot") if isinstance(t, TraceColumns) else
                        any(isinstance(e, dict) and e.get("action") != "snapshot" for e in t)))
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
        kind = f"{self.device_kind} " if self.device_kind else ""
        return (f"Snapshot({kind}devices={self.devices}, segments={len(segs)}, blocks={sum(s.n_blocks for s in segs)}, "
                f"reserved={format_bytes(frag.reserved)}, allocated={format_bytes(frag.allocated)} "
                f"(requested {format_bytes(frag.requested)}), "
                f"largest_free_block={format_bytes(frag.largest_free_block['all'])}, "
                f"fragmentation={frag.fragmentation:.1%}{trace})")

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

    def stats(self, device=None, replay=False):
        """A flat memory_stats()-shaped dict for this state (one device, or all). "current" is
        counted from the segments. The snapshot holds no counters, so every other figure is
        None (unknown) except: num_ooms, the `oom` entries of the trace; and, with
        `replay=True` and a device whose trace has events, the "peak" figures, measured by
        replaying the trace on a fresh emulated allocator from the rebuilt starting state
        (so they are the peaks from the start of the recording on). "allocated"/"freed"
        totals and num_alloc_retries stay None: the run before the recording is unknown."""
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
        peaks = {}
        if replay and device is not None and self._trace_events(device) > REPLAY_MAX_EVENTS:
            peaks = self._recorded_peaks(device)
        elif replay and device is not None:
            figures = self.replay_figures(device)
            peaks = figures.get("stats") or {} if figures else {}
        flat = {}
        for m, pools in cur.items():
            pools["all"] = pools["small_pool"] + pools["large_pool"]
            for pool, v in pools.items():
                flat.update({f"{m}.{pool}.current": v, f"{m}.{pool}.peak": peaks.get(f"{m}.{pool}.peak"),
                             f"{m}.{pool}.allocated": None, f"{m}.{pool}.freed": None})
        for name, v in (("oversize_allocations", oversize_allocations), ("oversize_segments", oversize_segments)):
            flat.update({f"{name}.current": v, f"{name}.peak": peaks.get(f"{name}.peak"), f"{name}.allocated": None,
                         f"{name}.freed": None})
        traces = self.device_traces
        idx = range(len(traces)) if device is None else ([device] if 0 <= device < len(traces) else [])
        flat["num_ooms"] = sum(traces[i].count("oom") if isinstance(traces[i], TraceColumns) else
                               sum(1 for e in traces[i] if isinstance(e, dict) and e.get("action") == "oom")
                               for i in idx)
        flat["num_alloc_retries"] = None
        flat["num_device_alloc"] = None
        flat["num_device_free"] = None
        flat["num_sync_all_streams"] = None
        flat["max_split_size"] = max_split or -1
        frag = Fragmentation(segs)
        for k, v in frag.largest_free_block.items():
            flat[f"largest_free_block_bytes.{k}"] = v
        flat["fragmentation.all"] = frag.fragmentation
        return dict(sorted(flat.items()))

    def _trace_events(self, device):
        traces = self.device_traces
        t = traces[device] if device < len(traces) else ()
        if isinstance(t, TraceColumns):
            return int(np.count_nonzero(t.is_action("alloc", "free_completed", "free")))
        return sum(1 for e in t if isinstance(e, dict) and e.get("action") in ("alloc", "free_completed", "free"))

    def _recorded_peaks(self, device):
        """The peaks a trace records by itself, from its rebuilt starting state on: requested
        and reserved bytes, live allocations and segments (all pools). For traces too long to
        replay in a summary (REPLAY_MAX_EVENTS); noted in self._replayed."""
        traces = self.device_traces
        tc = timeline.as_columns(traces[device] if device < len(traces) else [])
        segs0, live0 = timeline.state_at(self.data["segments"], device, tc, 0, frames=False)
        d_alloc, d_res = timeline.deltas(tc)
        n_alloc = tc.is_action(*timeline.ALLOC).astype(np.int64) - tc.is_action(*timeline.FREE)
        n_seg = tc.is_action(*timeline.SEG_ALLOC).astype(np.int64) - tc.is_action(*timeline.SEG_FREE)

        def peak(start, d):
            return start + max(0, int(np.cumsum(d).max())) if len(d) else start

        self._replayed[device] = {"recorded": True, "events": self._trace_events(device)}
        return {"requested_bytes.all.peak": peak(sum(b["requested"] for b in live0.values()), d_alloc),
                "reserved_bytes.all.peak": peak(sum(s["size"] for s in segs0.values()), d_res),
                "allocation.all.peak": peak(len(live0), n_alloc),
                "segment.all.peak": peak(len(segs0), n_seg)}

    def replay_figures(self, device):
        """What replaying `device`'s trace (from the rebuilt starting state, on a fresh emulated
        allocator in a separate process: `python -m mtia_alloc fit --json`) measures: a dict
        with "stats" (memory_stats() peaks from the start of the recording on), peak_reserved,
        peak_allocated, peak_requested, num_device_alloc, ...; None when the device's trace has
        no allocation events, or {"error": reason} when the replay failed. Cached."""
        device = self._check_device(device)
        if device not in self._replayed:
            if not self._trace_events(device):
                self._replayed[device] = None
            else:
                self._replayed[device] = runner.replay_figures(self, device)
        return self._replayed[device]

    def summary(self, device=None, abbreviated=False, replay=True, notes=False):
        """The memory_summary() table of this state, one per device (or of `device`), titled
        with the snapshot's device kind. "Cur Usage" is counted from the segments; "Peak
        Usage" comes from replaying the device's trace from its rebuilt starting state (the
        peaks since recording began; n/a without a trace, or with replay=False); the totals
        cannot be known from a snapshot and say n/a. notes=True adds lines under each table
        saying where the peaks come from (the summary command prints them)."""
        devices = [self._check_device(device)] if device is not None else (self.devices or [0])
        tables = []
        notes_on = notes
        for d in devices:
            stats = self.stats(d, replay=replay)
            figures = self._replayed.get(d) if replay else None
            if figures and figures.get("recorded"):
                notes = [f"Peak Usage: as recorded in the trace ({figures['events']} events from the rebuilt state: "
                         f"requested, reserved, allocations, segments); a trace this long is not replayed here "
                         f"(`fit SNAPSHOT --memory auto` replays it)"]
            elif figures and figures.get("error"):
                notes = [f"Peak Usage n/a: the replay failed ({figures['error']})"]
            elif figures:
                conf = figures.get("conf") or "default settings"
                notes = [f"Peak Usage: replay of {figures.get('events', '?')} trace events from the rebuilt state "
                         f"({conf})"]
                if figures.get("note"):
                    notes.append(figures["note"])
            else:
                notes = ["Peak Usage n/a: no allocation events recorded for this device"] if replay else []
            notes.append("Tot Alloc/Freed n/a: a snapshot does not record the totals")
            tables.append(summary_table(stats, d, abbreviated, kind=self.device_kind, notes=notes if notes_on else ()))
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
        columnar = isinstance(entries, TraceColumns)
        tc = timeline.as_columns(entries)
        segs = self._segments_of(device)
        alloc, res = timeline.curves(tc, sum(s.requested_size for s in segs), sum(s.total_size for s in segs))
        n = len(tc)
        times = np.where((tc.present & P_TIME) != 0, tc.time_us, -1)
        oom = np.flatnonzero(tc.action == tc.code("oom")) if tc.code("oom") >= 0 else np.zeros(0, dtype=np.int64)
        if columnar:  # arrays: a list of Python ints per entry would not fit for millions of entries
            return {"index": np.arange(n), "time_us": times, "allocated": alloc, "reserved": res,
                    "oom": oom.tolist()}
        return {"index": list(range(n)), "time_us": [t if t >= 0 else e.get("time_us") for t, e in
                                                     zip(times.tolist(), (e for e in entries if isinstance(e, dict)))],
                "allocated": alloc.tolist(), "reserved": res.tolist(), "oom": oom.tolist()}

    def top_sites_at(self, device, points, top=5):
        """For each trace entry index in `points` (sorted) of `device`, the `top` call sites
        (Block.where's naming) holding the most live requested bytes just after it:
        [[(site, bytes), ...], ...]."""
        device = self._check_device(device)
        traces = self.device_traces
        tc = timeline.as_columns(traces[device] if device < len(traces) else [])
        return timeline.top_sites(tc, self.data["segments"], device, points, where, top)

    def window(self, t0=None, t1=None, events=None, device=None):
        """The snapshot of a window of the recording: trace entries with t0 <= time_us <= t1
        (µs; None = the start / the end), or events=(a, b) (entry indices of `device`, b
        exclusive). Its segments and live blocks are the real state at the window's end, so
        that the state it starts from (undoing the window's entries) is the real state at
        t0: its figures at t0 and over the window equal this snapshot's. A Snapshot."""
        if device is not None:
            device = self._check_device(device)
        data, _ = timeline.window(self.data, t0, t1, events, device)
        return Snapshot(data, device_kind=self.device_kind)

    # -------------------------------------------------------------- what-if and comparisons
    # Each runs the command line in a child process (viz.runner): a replay needs a fresh
    # allocator of its own, which this process's may not be.

    def fit(self, memory, conf="", device=None, by="site"):
        """Would this snapshot's workload (its trace, from the rebuilt starting state) fit on a
        device of `memory` ("24GiB" or bytes) under settings `conf`? A FitReport (`fit`)."""
        args = ["--memory", str(memory), "--conf", conf, "--by", by] + \
            (["--device", str(self._check_device(device))] if device is not None else [])
        with runner.snapshot_file(self) as path:
            return FitReport(runner.run_json(["fit", path, *args, "--json"], ok=(0, 3)))

    def sweep(self, memory, grid=None, conf="", device=None, jobs=None):
        """Replays the trace under a grid of allocator settings on a `memory` device, all
        cores at once: a SweepReport sorted by peak reserved with the recommended setting.
        grid: {key: [values]} ("none" = unset); default: tools.sweep.DEFAULT_GRID."""
        args = ["--memory", str(memory), "--conf", conf, "--sweep"]
        for key, values in (grid or {}).items():
            args += ["--grid", f"{key}={','.join(str(v) for v in values)}"]
        if device is not None:
            args += ["--device", str(self._check_device(device))]
        if jobs is not None:
            args += ["--jobs", str(jobs)]
        with runner.snapshot_file(self) as path:
            return SweepReport(runner.run_json(["fit", path, *args, "--json"], ok=(0, 3)))

    def diff(self, other, by="site", device=None, replay=True):
        """This snapshot (A) against `other` (B, a Snapshot or a path): per call site, live
        bytes at the end and at each run's peak, and the run-level deltas. A DiffReport."""
        other = other if isinstance(other, Snapshot) else Snapshot(other)
        args = ["--by", by, "--json"] + (["--device", str(device)] if device is not None else []) + \
            ([] if replay else ["--no-replay"])
        with runner.snapshot_file(self) as a, runner.snapshot_file(other) as b:
            return DiffReport(runner.run_json(["diff", a, b, *args]))

    @staticmethod
    def ranks(snapshots, by="site", top=3):
        """One snapshot (or path) per rank: a RanksReport (peaks per rank, the rank that peaks
        and its difference from the median rank per call site)."""
        snaps = [s if isinstance(s, Snapshot) else Snapshot(s) for s in snapshots]
        with contextlib.ExitStack() as stack:
            paths = [stack.enter_context(runner.snapshot_file(s)) for s in snaps]
            return RanksReport(runner.run_json(["ranks", *paths, "--by", by, "--top", str(top), "--json"]))

    # -------------------------------------------------------------- output

    def to_dict(self):
        """The snapshot as plain Python data (what dump() writes)."""
        return plain(self.data)

    def dump(self, path):
        """Writes the snapshot as a pickle with protocol 4 (loads on pytorch.org/memory_viz)."""
        if any(isinstance(t, TraceColumns) for t in self.data.get("device_traces") or ()):
            write_pickle(path, self.data)  # streamed from the columns
            return path
        with open(os.fspath(path), "wb") as f:
            pickle.dump(self.to_dict(), f, protocol=4)
        return path

    def plot(self, path, device=None, diff=None, sweep=None):
        """Writes a self-contained HTML page (inline SVG, no script, no network): the summary,
        a map of the segments coloured by block state, and memory over time rebuilt from the
        trace, for every device (or `device`). diff: another snapshot (or path, or a
        DiffReport) to compare with: adds both timelines and the per-site bar chart; sweep: a
        SweepReport (Snapshot.sweep) to add. Returns path."""
        if not is_html_name(os.fspath(path)):
            raise ValueError(not_html_message(os.fspath(path)))
        if device is not None:
            device = self._check_device(device)
        text = render_html(self, device)
        extra = []
        if diff is not None:
            report = diff if isinstance(diff, DiffReport) else self.diff(diff)
            extra += ["<h2>Compared with another run</h2>", *report.html_parts()]
        if sweep is not None:
            if not isinstance(sweep, SweepReport):
                raise TypeError(f"sweep must be a SweepReport (Snapshot.sweep), got {type(sweep).__name__}")
            extra += ["<h2>Allocator settings sweep</h2>", *sweep.html_parts()]
        if extra:
            text = text.replace("</body>", "\n".join(extra) + "\n</body>", 1)
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            f.write(text)
        return path
