"""`python -m mtia_alloc diff A B [--by site|file|frame:N] [--json] [--plot FILE]`: two runs
compared, the difference attributed to call sites.

For each call site (viz.frames: the first user frame of the allocation's stack), the live
bytes (requested bytes of live allocations, as torch's viewer counts them) at the end of
each snapshot and at each run's peak, and the deltas B - A; sorted by the largest
absolute delta. Memory that was live before the recording window began is not dropped:
the starting state is rebuilt (workload.starting_state) and its blocks are attributed to
their sites when a stack names them (the final block's, or the free entry's that releases
them), else to "<allocated before recording, no stack>". A run's peak is the trace entry
where its live bytes are highest (starting state included). Run-level figures: reserved
bytes, segments and the largest free block at the end (from the segments), and the peak
reserved and allocated bytes measured by replaying each trace from its rebuilt starting
state, each on a fresh allocator in a process of its own (both at once).

Columnar traces (big snapshots, viz.columns) are profiled from the columns (viz.timeline):
the curve, the peak entry and the live set there, without a dict per entry.

Owns: site_profile, diff_snapshots, diff_main. Relies on: tools.fit (loading, replays),
tools.sweep (parallel replays), tools.workload (starting_state), viz (frames, model,
reports)."""
import json
import os

import numpy as np

from ..viz import timeline
from ..viz.columns import TraceColumns
from ..viz.frames import BEFORE_RECORDING, NO_STACK, SiteKey, where
from ..viz.model import Fragmentation, Segment, _requested, detect_device_kind
from ..viz.reports import DiffReport
from . import fit as _fit
from . import sweep as _sweep
from .workload import _as_int, starting_state, trace_from_snapshot

__all__ = ["site_profile", "diff_snapshots", "diff_main"]

_CURVE_POINTS = 600


def pick_device(snap, device, path):
    """The device to read: `device` if given (it must be in the snapshot), else the one
    whose trace has the most entries, else the first device holding a segment."""
    traces = snap.get("device_traces") or []
    seg_devs = {_as_int(s.get("device", 0)) for s in snap.get("segments") or [] if isinstance(s, dict)}
    if device is not None:
        if device not in seg_devs and not (device < len(traces) and traces[device]):
            known = sorted(seg_devs | {i for i, t in enumerate(traces) if t})
            raise ValueError(f"{path}: no device {device} in the snapshot (devices: {known or 'none'})")
        return device
    if any(traces):
        return max(range(len(traces)), key=lambda d: len(traces[d]))
    return min(seg_devs) if seg_devs else 0


def site_profile(snap, device, key, top=0):
    """What one snapshot's device holds, per site: a dict with end {site: live bytes},
    peak {site: live bytes at the peak entry}, live_end, live_peak, peak_event (entry index,
    -1 = the starting state), reserved, segments, largest_free_block, curve (live and
    reserved bytes over the trace, at most _CURVE_POINTS points), has_trace, and with
    top > 0 the `top` largest live allocations at the end [{size, requested, where, site}]."""
    traces = snap.get("device_traces") or []
    entries = traces[device] if device < len(traces) else []
    columnar = isinstance(entries, TraceColumns)
    if not columnar:
        entries = [e for e in entries if isinstance(e, dict)]
    segs = [s for s in snap.get("segments") or [] if isinstance(s, dict) and _as_int(s.get("device", 0)) == device]
    allocated_in_trace, first_free_frames = set(), {}
    if columnar:
        allocated_in_trace, first_free_frames = _first_events(entries)
    for e in (() if columnar else entries):
        a = e.get("action")
        if a == "alloc":
            allocated_in_trace.add(_as_int(e.get("addr")))
        elif a in ("free_completed", "free"):
            addr = _as_int(e.get("addr"))
            if addr not in allocated_in_trace and addr not in first_free_frames:
                first_free_frames[addr] = e.get("frames")
    end = {}
    final_frames = {}  # block address -> frames of the final snapshot's allocated blocks
    largest = []
    for s in segs:
        addr = _as_int(s.get("address"))
        for b in s.get("blocks") or []:
            size = _as_int(b.get("size"))
            if b.get("state") == "active_allocated":
                frames = b.get("frames")
                if frames is None and b.get("history"):
                    frames = (b["history"][0] or {}).get("frames")
                req = _requested(b)
                # without a stack: allocated in the trace (recorded without stacks), or before
                # the recording began (or with no recording at all)
                site = key(frames, missing=NO_STACK if addr in allocated_in_trace else BEFORE_RECORDING)
                end[site] = end.get(site, 0) + req
                final_frames[addr] = frames
                if top:
                    largest.append((size, req, frames, site))
            addr += size
    seg_objs = [Segment(s) for s in segs]
    frag = Fragmentation(seg_objs)
    out = {"end": end, "live_end": sum(end.values()), "reserved": frag.reserved, "segments": len(seg_objs),
           "largest_free_block": frag.largest_free_block["all"], "has_trace": bool(entries)}
    if top:
        largest.sort(key=lambda x: -x[0])
        out["largest"] = [{"size": z, "requested": r, "where": where(f) or None, "site": site}
                          for z, r, f, site in largest[:top]]
    if not len(entries):
        out.update(peak=None, live_peak=None, peak_event=None, curve=None)
        return out
    if columnar:
        return _columnar_profile(snap, device, entries, key, out, first_free_frames, final_frames)
    seg0, live0 = starting_state(snap, device, entries)
    total = sum(blk["requested"] for blk in live0.values())
    live = {addr: (blk["requested"], None) for addr, blk in live0.items()}
    reserved = sum(s["size"] for s in seg0.values())
    peak, peak_i = total, -1
    n = len(entries)
    stride = max(1, -(-n // _CURVE_POINTS))
    curve_live, curve_res = [], []
    bucket_live = bucket_res = 0
    for i, e in enumerate(entries):
        a = e.get("action")
        if a == "alloc":
            addr, size = _as_int(e.get("addr")), _as_int(e.get("size"))
            old = live.pop(addr, None)
            if old:
                total -= old[0]
            live[addr] = (size, None)  # site resolved in the second pass
            total += size
            if total > peak:
                peak, peak_i = total, i
        elif a in ("free_completed", "free"):
            old = live.pop(_as_int(e.get("addr")), None)
            if old:
                total -= old[0]
        elif a in ("segment_alloc", "segment_map"):
            reserved += _as_int(e.get("size"))
        elif a in ("segment_free", "segment_unmap"):
            reserved -= _as_int(e.get("size"))
        bucket_live, bucket_res = max(bucket_live, total), max(bucket_res, reserved)
        if (i + 1) % stride == 0 or i == n - 1:
            curve_live.append(bucket_live)
            curve_res.append(bucket_res)
            bucket_live = bucket_res = 0
    # second pass: the live set at the peak entry, by site
    sites0 = {addr: key(first_free_frames.get(addr) if addr in first_free_frames else final_frames.get(addr),
                        missing=BEFORE_RECORDING) for addr in live0}
    live = {addr: (live0[addr]["requested"], None, sites0[addr]) for addr in live0}
    for e in entries[:peak_i + 1]:
        a = e.get("action")
        if a == "alloc":  # the stack is keyed only if the block is still live at the peak
            live[_as_int(e.get("addr"))] = (_as_int(e.get("size")), e.get("frames"), None)
        elif a in ("free_completed", "free"):
            live.pop(_as_int(e.get("addr")), None)
    at_peak = {}
    for size, frames, site in live.values():
        site = site if site is not None else key(frames)
        at_peak[site] = at_peak.get(site, 0) + size
    out.update(peak=at_peak, live_peak=peak, peak_event=peak_i,
               curve={"live": curve_live, "reserved": curve_res, "entries": n})
    return out


def _first_events(tc):
    """Columnar site_profile's first pass: the addresses the trace allocates, and for blocks
    older than the trace (their first event is a free) the frames of that free."""
    is_alloc = tc.is_action(*timeline.ALLOC)
    rel = np.flatnonzero(is_alloc | tc.is_action(*timeline.FREE))
    allocated = set(np.unique(tc.addr[is_alloc]).tolist())
    first_free = {}
    if len(rel):
        uniq, first = np.unique(tc.addr[rel], return_index=True)
        for addr, i in zip(uniq.tolist(), rel[first].tolist()):
            if not is_alloc[i]:
                first_free[addr] = tc.stacks[int(tc.stack[i])] if tc.stack[i] >= 0 else None
    return allocated, first_free


def _columnar_profile(snap, device, tc, key, out, first_free_frames, final_frames):
    """site_profile's trace figures for a columnar trace (millions of entries): the live
    curve from the columns, the live set at the peak entry from the state rebuilt there."""
    seg0, live0 = starting_state(snap, device, tc)
    start = sum(blk["requested"] for blk in live0.values())
    reserved0 = sum(s["size"] for s in seg0.values())
    d_alloc, d_res = timeline.deltas(tc)
    live = start + np.cumsum(d_alloc)
    res = reserved0 + np.cumsum(d_res)
    n = len(tc)
    peak_i = int(np.argmax(live))
    peak = int(live[peak_i])
    if peak <= start:
        peak, peak_i = start, -1
    stride = max(1, -(-n // _CURVE_POINTS))
    edges = np.arange(0, n, stride)
    curve = {"live": np.maximum.reduceat(live, edges).tolist(), "reserved": np.maximum.reduceat(res, edges).tolist(),
             "entries": n}
    _, at = timeline.state_at(snap.get("segments") or [], device, tc, peak_i + 1)
    is_alloc = tc.is_action(*timeline.ALLOC)
    uniq, first = np.unique(tc.addr[is_alloc], return_index=True)
    first_alloc = dict(zip(uniq.tolist(), np.flatnonzero(is_alloc)[first].tolist()))
    at_peak = {}
    for addr, blk in at.items():
        if addr in live0 and first_alloc.get(addr, n) > peak_i:
            frames = first_free_frames.get(addr) if addr in first_free_frames else final_frames.get(addr)
            site = key(frames, missing=BEFORE_RECORDING)
        else:
            site = key(blk["frames"] or None)
        at_peak[site] = at_peak.get(site, 0) + blk["requested"]
    out.update(peak=at_peak, live_peak=peak, peak_event=peak_i, curve=curve)
    return out


def _analyse(spec):
    """One snapshot, in a worker process of its own: loads it, profiles its sites and replays
    its trace on a fresh allocator. spec = (path, device, by, top, replay). Returns
    {kind, device, profile, replay} or {"error": message} (bad input)."""
    path, device, by, top, replay = spec
    try:
        snap = _fit.load_snapshot_dict(path)
        dev = pick_device(snap, device, path)
        prof = site_profile(snap, dev, SiteKey(by), top=top)
        rep = None
        traces = snap.get("device_traces") or []
        if replay and dev < len(traces) and any(isinstance(e, dict) and e.get("action") == "alloc"
                                                for e in traces[dev]):
            work = _fit.Workload(path, trace_from_snapshot(snap, path, dev), snap, dev)
            try:
                _fit.setup(_fit.auto_memory(work))
                rep = _fit.run(work, stop_at_failure=False)
                rep.pop("stats", None)
            except (ValueError, RuntimeError) as e:
                rep = {"error": str(e)}
        return {"kind": detect_device_kind(snap), "device": dev, "profile": prof, "replay": rep}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return {"error": str(e) if isinstance(e, ValueError) else f"{path}: malformed snapshot ({e})"}


def analyse(paths, by="site", device=None, top=0, replay=True, workers=None):
    """_analyse of every path, all at once (one process each, all cores); raises ValueError
    for the first bad input, and when the snapshots come from different kinds of device."""
    for p in paths:
        if not os.path.exists(p):
            raise ValueError(f"{p}: no such file")
    out = _sweep.run_parallel([(p, device, by, top, replay) for p in paths], workers, fn=_analyse)
    for r in out:
        if "error" in r:
            raise ValueError(r["error"])
    kinds = {p: r["kind"] for p, r in zip(paths, out)}
    if len({k for k in kinds.values() if k}) > 1:
        desc = ", ".join(f"{os.path.basename(p)}: {k or 'unknown'}" for p, k in kinds.items())
        raise ValueError(f"the snapshots come from different kinds of device ({desc})")
    return out


def diff_profiles(a, b, by, pa, pb, ra=None, rb=None, meta_a=None, meta_b=None):
    """The DiffReport data of two site profiles (and their replays, or None)."""
    sites = set(pa["end"]) | set(pb["end"]) | set(pa["peak"] or ()) | set(pb["peak"] or ())
    rows = []
    for s in sites:
        ae, be = pa["end"].get(s, 0), pb["end"].get(s, 0)
        ap = pa["peak"].get(s, 0) if pa["peak"] is not None else None
        bp = pb["peak"].get(s, 0) if pb["peak"] is not None else None
        dp = None if ap is None or bp is None else bp - ap
        rows.append({"site": s, "a_end": ae, "b_end": be, "delta_end": be - ae, "a_peak": ap, "b_peak": bp,
                     "delta_peak": dp})
    rows.sort(key=lambda r: (-max(abs(r["delta_end"]), abs(r["delta_peak"] or 0)), r["site"]))

    def totals(p, r):
        ok = r is not None and "error" not in r
        return {"reserved": p["reserved"], "segments": p["segments"], "largest_free_block": p["largest_free_block"],
                "live_end": p["live_end"], "live_peak": p["live_peak"],
                "peak_reserved": r["peak_reserved"] if ok else None,
                "peak_allocated": r["peak_allocated"] if ok else None,
                "replay_error": r["error"] if r is not None and not ok else None}

    ta, tb = totals(pa, ra), totals(pb, rb)
    return {"command": "diff", "by": by, "a": meta_a or {"input": a}, "b": meta_b or {"input": b},
            "totals": {"a": ta, "b": tb,
                       "delta": {k: (None if ta[k] is None or tb[k] is None else tb[k] - ta[k])
                                 for k in ("reserved", "segments", "largest_free_block", "live_end", "live_peak",
                                           "peak_reserved", "peak_allocated")}},
            "rows": rows}


def _meta(path, r):
    p = r["profile"]
    return {"input": path, "device": r["device"], "kind": r["kind"], "live_end": p["live_end"],
            "live_peak": p["live_peak"], "peak_event": p["peak_event"], "curve": p["curve"]}


def diff_snapshots(a, b, by="site", device=None, replay=True):
    """The DiffReport data of snapshot files a and b."""
    ra, rb = analyse([a, b], by, device, replay=replay)
    return diff_profiles(a, b, by, ra["profile"], rb["profile"], ra["replay"], rb["replay"], _meta(a, ra),
                         _meta(b, rb))


def diff_main(args):
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    SiteKey(args.by)  # checks --by before reading anything
    if args.plot:
        _sweep._check_plot(args.plot)
    report = DiffReport(diff_snapshots(args.a, args.b, args.by, args.device, replay=not args.no_replay))
    if args.plot:
        report.plot(args.plot)
    if args.json:
        print(json.dumps(report.data))
    else:
        print(report.table(limit=args.limit))
        if args.plot:
            print(f"plot: wrote {args.plot}")
    return 0
