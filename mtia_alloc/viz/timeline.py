"""Whole-trace arithmetic on columns (numpy), for traces of millions of entries: the memory
curves, which alloc each free releases, the allocator state (segments and live blocks)
at any entry of the trace, the segment dicts of that state (blocks tiling each segment),
and windows of a snapshot (the entries between two moments, with the real state at the
first as the state the window starts from).

Every function takes a device trace as TraceColumns (as_columns converts a list of entry
dicts), so that small and big snapshots go through the same code.

Owns: as_columns, curves, alloc_of, state_at, segments_at, window, window_bounds.
Relies on: viz.columns (TraceColumns)."""
import bisect

import numpy as np

from .columns import P_SIZE, P_TIME, TraceColumns

__all__ = ["as_columns", "deltas", "curves", "alloc_of", "state_at", "segments_at", "window", "window_bounds",
           "ALLOC", "FREE", "SEG_ALLOC", "SEG_FREE"]

ALLOC = ("alloc",)
FREE = ("free_completed", "free")
SEG_ALLOC = ("segment_alloc", "segment_map")
SEG_FREE = ("segment_free", "segment_unmap")
K_MIN_BLOCK = 512
K_SMALL_BUFFER = 2 << 20


def as_columns(trace):
    """`trace` as TraceColumns (a list of entry dicts is converted; non-dicts are dropped)."""
    if isinstance(trace, TraceColumns):
        return trace
    return TraceColumns.from_entries(e for e in trace if isinstance(e, dict))


def _int(v, default=0):
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return default


def _signed_sizes(tc):
    size = tc.size.astype(np.int64)
    size[(tc.present & P_SIZE) == 0] = 0
    return size


def deltas(tc):
    """(d_alloc, d_res): per entry, its change of live requested bytes and of segment bytes."""
    size = _signed_sizes(tc)
    d_alloc = np.where(tc.is_action(*ALLOC), size, 0) - np.where(tc.is_action(*FREE), size, 0)
    d_res = np.where(tc.is_action(*SEG_ALLOC), size, 0) - np.where(tc.is_action(*SEG_FREE), size, 0)
    return d_alloc, d_res


def curves(tc, end_allocated, end_reserved):
    """(allocated, reserved): int64 arrays, the values after each entry, counted backwards
    from the values at the end (requested bytes of live blocks, segment bytes)."""
    d_alloc, d_res = deltas(tc)
    alloc = np.cumsum(d_alloc)
    res = np.cumsum(d_res)
    alloc += int(end_allocated) - (int(alloc[-1]) if len(alloc) else 0)
    res += int(end_reserved) - (int(res[-1]) if len(res) else 0)
    return alloc, res


def alloc_of(tc):
    """For each entry, the index of the latest earlier `alloc` entry at the same address
    (-1 without one): for a free, the allocation it releases."""
    n = len(tc)
    is_alloc = tc.is_action(*ALLOC)
    rel = is_alloc | tc.is_action(*FREE)
    idx = np.flatnonzero(rel)
    out = np.full(n, -1, dtype=np.int64)
    if not len(idx):
        return out
    order = idx[np.lexsort((idx, tc.addr[idx]))]      # by address, then time
    a = tc.addr[order]
    last = np.where(is_alloc[order], order, -1)
    # the latest alloc so far, restarted at each new address
    start = np.r_[True, a[1:] != a[:-1]]
    group = np.cumsum(start) - 1
    marker = np.where(last >= 0, last, -1)
    # running max of alloc index within each group (indices grow within a group)
    offs = group.astype(np.int64) * (n + 1)
    run = np.maximum.accumulate(np.where(marker >= 0, marker + offs, offs - 1))
    prev = run - offs
    prev[prev < 0] = -1
    out[order] = prev
    return out


def state_at(segments, device, tc, k, frames=True):
    """The allocator state of `device` just before trace entry k (k = len(tc): the end):
    the snapshot's final `segments` with the entries from k on undone. Returns (segs, live):
    segs maps address -> {"size", "stream", "small", "seg"}; live maps block address ->
    {"size" (None when only the trace knows the block), "requested", "stream", "frames"}
    (frames=False: [] for blocks the trace knows, which saves pairing frees with allocs)."""
    segs, live = {}, {}
    for s in segments:
        if not isinstance(s, dict) or _int(s.get("device", 0)) != device:
            continue
        addr, total = _int(s.get("address")), _int(s.get("total_size"))
        kind = s.get("segment_type")
        small = kind == "small" if kind in ("small", "large") else total <= K_SMALL_BUFFER
        stream = _int(s.get("stream", 0))
        segs[addr] = {"size": total, "stream": stream, "small": small, "seg": s}
        b_addr = addr
        for b in s.get("blocks") or []:
            size = _int(b.get("size"))
            if b.get("state") in ("active_allocated", "active_pending_free"):
                req = b.get("requested_size")
                frames = b.get("frames")
                if frames is None and b.get("history"):
                    frames = (b["history"][0] or {}).get("frames") if isinstance(b["history"], list) else None
                live[b_addr] = {"size": size, "requested": _int(req, size) if req else size, "stream": stream,
                                "frames": frames or []}
            b_addr += size
    n = len(tc)
    if k >= n:
        return segs, live
    tail = slice(k, n)
    # live blocks: the first alloc/free at each address from k on decides
    is_alloc = tc.is_action(*ALLOC)[tail]
    is_free = tc.is_action(*FREE)[tail]
    m = np.flatnonzero(is_alloc | is_free)
    if len(m):
        uniq, first = np.unique(tc.addr[tail][m], return_index=True)
        first_idx = m[first] + k
        pairs = alloc_of(tc) if frames else None
        for addr, i in zip(uniq.tolist(), first_idx.tolist()):
            if is_alloc[i - k]:
                live.pop(addr, None)
            elif not frames:
                live[addr] = {"size": None, "requested": int(tc.size[i]), "stream": int(tc.stream[i]), "frames": []}
            else:
                j = int(pairs[i])
                src = j if 0 <= j < k else i
                frames = tc.stacks[int(tc.stack[src])] if tc.stack[src] >= 0 else []
                live[addr] = {"size": None, "requested": int(tc.size[i]), "stream": int(tc.stream[i]),
                              "frames": frames}
    s_alloc = tc.is_action(*SEG_ALLOC)[tail]
    s_free = tc.is_action(*SEG_FREE)[tail]
    m = np.flatnonzero(s_alloc | s_free)
    if len(m):
        uniq, first = np.unique(tc.addr[tail][m], return_index=True)
        for addr, i in zip(uniq.tolist(), (m[first] + k).tolist()):
            if s_alloc[i - k]:
                segs.pop(addr, None)
            else:
                size = int(tc.size[i])
                segs[addr] = {"size": size, "stream": int(tc.stream[i]), "small": size <= K_SMALL_BUFFER,
                              "seg": None}
    return segs, live


def segments_at(segs, live, device):
    """Segment dicts (PyTorch's schema; blocks in address order tiling each segment) of a
    state from state_at. A block the trace alone knows gets its request rounded up to 512
    bytes, clamped to the next block; the free rest of a segment is inactive blocks. Live
    blocks in no segment are left out (second value: their count)."""
    starts = sorted(segs)
    by_seg = {a: [] for a in starts}
    orphans = 0
    for addr in sorted(live):
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < starts[i] + segs[starts[i]]["size"]:
            by_seg[starts[i]].append(addr)
        else:
            orphans += 1
    out = []
    for a in starts:
        seg = segs[a]
        end = a + seg["size"]
        blocks, pos = [], a
        addrs = by_seg[a]
        for j, b in enumerate(addrs):
            blk = live[b]
            nxt = addrs[j + 1] if j + 1 < len(addrs) else end
            size = blk["size"] or max(K_MIN_BLOCK, -(-max(1, blk["requested"]) // K_MIN_BLOCK) * K_MIN_BLOCK)
            size = max(1, min(size, nxt - b))
            if b > pos:
                blocks.append({"address": pos, "size": b - pos, "requested_size": 0, "state": "inactive",
                               "frames": []})
            blocks.append({"address": b, "size": size, "requested_size": min(blk["requested"], size),
                           "state": "active_allocated", "frames": blk["frames"] or []})
            pos = b + size
        if end > pos:
            blocks.append({"address": pos, "size": end - pos, "requested_size": 0, "state": "inactive",
                           "frames": []})
        src = seg.get("seg") or {}
        allocated = sum(b["size"] for b in blocks if b["state"] != "inactive")
        d = {"device": device, "address": a, "total_size": seg["size"], "allocated_size": allocated,
             "active_size": allocated,
             "requested_size": sum(b["requested_size"] for b in blocks if b["state"] != "inactive"),
             "stream": seg["stream"], "segment_type": "small" if seg["small"] else "large",
             "segment_pool_id": tuple(src.get("segment_pool_id", (0, 0))) if isinstance(
                 src.get("segment_pool_id"), (list, tuple)) else (0, 0),
             "is_expandable": bool(src.get("is_expandable", False)), "frames": src.get("frames") or [],
             "blocks": blocks}
        out.append(d)
    return out, orphans


def _times(tc):
    if not len(tc) or not np.all((tc.present & P_TIME) != 0):
        return None
    return np.maximum.accumulate(tc.time_us)


def window_bounds(tc, t0=None, t1=None, events=None):
    """The entry range [k0, k1) of a window: times t0 <= time_us <= t1 (µs, either may be
    None: the recording's start or end), or events=(a, b) entry indices (b exclusive).
    ValueError when the window holds no entry of the recording."""
    n = len(tc)
    if events is not None:
        a, b = events
        a = 0 if a is None else a
        b = n if b is None else b
        if not (0 <= a < b <= n):
            raise ValueError(f"--events {a}:{b} is outside the recording (entries 0:{n})")
        return a, b
    times = _times(tc)
    if times is None:
        raise ValueError("the trace entries carry no time_us: give the window as --events A:B")
    lo, hi = int(times[0]), int(times[-1])
    if t0 is not None and t1 is not None and t1 < t0:
        raise ValueError(f"the window ends ({t1}) before it begins ({t0})")
    if (t0 is not None and t0 > hi) or (t1 is not None and t1 < lo):
        raise ValueError(f"the window [{t0 if t0 is not None else lo}, {t1 if t1 is not None else hi}] µs lies "
                         f"outside the recording (time_us {lo} to {hi})")
    k0 = 0 if t0 is None else int(np.searchsorted(times, t0, "left"))
    k1 = n if t1 is None else int(np.searchsorted(times, t1, "right"))
    if k1 <= k0:
        raise ValueError(f"no trace entry between {t0} and {t1} µs (time_us {lo} to {hi})")
    return k0, k1


def window(snap, t0=None, t1=None, events=None, device=None):
    """The snapshot dict of a window: for each device, its trace entries in the window and,
    as segments, the real state at the window's end (so that undoing the window's entries
    gives the real state at its start: no live block of the window is an orphan). With
    `events`, the entry range is of `device` (default: the longest trace), and the other
    devices are cut at the same moments. Returns (dict, info) with info: k0, k1 per device."""
    traces = [as_columns(t) for t in snap.get("device_traces") or []]
    segments = snap.get("segments") or []
    if device is None:
        device = max(range(len(traces)), key=lambda d: len(traces[d])) if traces else 0
    if device >= len(traces) or not len(traces[device]):
        raise ValueError(f"device {device} has no trace entries to cut a window from")
    k0, k1 = window_bounds(traces[device], t0, t1, events)
    if events is not None:
        times = _times(traces[device])
        t0, t1 = (int(times[k0]), int(times[k1 - 1])) if times is not None else (None, None)
    new_traces, new_segments, info = [], [], {"bounds": {}, "orphans": 0}
    devices = sorted({_int(s.get("device", 0)) for s in segments if isinstance(s, dict)} | set(range(len(traces))))
    for d in devices:
        tc = traces[d] if d < len(traces) else TraceColumns.from_entries([])
        if d == device:
            a, b = k0, k1
        elif len(tc) and t0 is not None and _times(tc) is not None:
            times = _times(tc)
            a = int(np.searchsorted(times, t0, "left"))
            b = int(np.searchsorted(times, t1, "right")) if t1 is not None else len(tc)
        else:
            a, b = 0, len(tc)
        segs, live = state_at(segments, d, tc, b)
        seg_dicts, orphans = segments_at(segs, live, d)
        info["orphans"] += orphans
        new_segments += seg_dicts
        while len(new_traces) < d:
            new_traces.append([])
        new_traces.append(tc.take(np.arange(a, b)) if (a, b) != (0, len(tc)) else tc)
        info["bounds"][d] = (a, b)
    out = {"segments": new_segments, "device_traces": new_traces,
           "allocator_settings": snap.get("allocator_settings") or {},
           "external_annotations": [a for a in snap.get("external_annotations") or []
                                    if not isinstance(a, dict) or t0 is None or t1 is None
                                    or t0 <= _int(a.get("time_us"), t0) <= t1]}
    for k in ("device_kind",):
        if k in snap:
            out[k] = snap[k]
    return out, info


def top_sites(tc, segments, device, points, site_of, top=5):
    """For each entry index in `points` (sorted), the `top` call sites holding the most live
    (requested) bytes just after that entry: [[(site, bytes), ...], ...]. site_of(frames)
    names a stack's site ('' when it names none). Blocks live when the trace began are
    counted from the rebuilt starting state, under their stack's site when one is known."""
    points = np.asarray(points, dtype=np.int64)
    names, index = [], {}

    def sid(name):
        name = name or "<no stack recorded>"
        i = index.get(name)
        if i is None:
            i = index[name] = len(names)
            names.append(name)
        return i

    stack_site = np.array([sid(site_of(f)) for f in tc.stacks] + [sid("")], dtype=np.int64)
    _, live0 = state_at(segments, device, tc, 0)
    start = {}
    for blk in live0.values():
        s = sid(site_of(blk["frames"]) or "<allocated before recording, no stack>")
        start[s] = start.get(s, 0) + blk["requested"]
    start_addr_site = {a: sid(site_of(b["frames"]) or "<allocated before recording, no stack>")
                       for a, b in live0.items()}
    is_alloc = tc.is_action(*ALLOC)
    is_free = tc.is_action(*FREE)
    size = _signed_sizes(tc)
    entry_site = stack_site[tc.stack]  # stack -1 -> the last: no stack
    pairs = alloc_of(tc)
    free_idx = np.flatnonzero(is_free)
    paired = pairs[free_idx]
    known = paired >= 0
    free_site = np.full(len(free_idx), -1, dtype=np.int64)
    free_site[known] = entry_site[paired[known]]
    for j in np.flatnonzero(~known).tolist():  # frees of blocks older than the trace
        free_site[j] = start_addr_site.get(int(tc.addr[free_idx[j]]), -1)
    rows = np.concatenate([np.flatnonzero(is_alloc), free_idx[free_site >= 0]])
    sites = np.concatenate([entry_site[is_alloc], free_site[free_site >= 0]])
    deltas = np.concatenate([size[is_alloc], -size[free_idx[free_site >= 0]]])
    bucket = np.searchsorted(points, rows, "left")
    keep = bucket < len(points)
    mat = np.zeros((len(points), len(names)), dtype=np.int64)
    np.add.at(mat, (bucket[keep], sites[keep]), deltas[keep])
    mat = np.cumsum(mat, axis=0)
    for s, v in start.items():
        mat[:, s] += v
    out = []
    for row in mat:
        order = np.argsort(-row, kind="stable")[:top]
        out.append([(names[i], int(row[i])) for i in order.tolist() if row[i] > 0])
    return out
