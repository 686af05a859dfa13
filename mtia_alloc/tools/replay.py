"""Replay of a workload (an allocation trace read by tools/workload.py) for the CLI and the
benchmarks: configure a fresh allocator, replay the trace natively (mtia_alloc._C.replay, no Python per event), and optionally run
PyTorch's allocator (the peer harness that `python -m mtia_alloc peer build` makes) on the
same input for side-by-side figures. Also the memory curves of a replay (an untimed
pass through the Python API) and their HTML/SVG plot.

Traces read from snapshots start with a prefix of synthetic events that rebuilds the
allocator state the recorded trace began from (workload.trace_from_snapshot), and carry
cache-flush events where the recorded run released segments. The figures of such a
replay leave the prefix out of `events`, the time per op and the counters
(num_device_alloc, num_device_free, num_alloc_retries, num_ooms), and the flushes' failed
allocations out of num_ooms and num_alloc_retries: num_device_alloc is then comparable
with the snapshot's `segment_alloc` count. The peaks start from the rebuilt state: its
segments and live blocks count (the GPU held them too), the prefix's temporary
allocations do not. Every pass of a snapshot's trace starts from that state (the cache
is emptied and the prefix replayed again), so passes do not warm each other.
(Until _C.replay takes `prefix`, the time per op is the average over prefix and trace,
and the peaks come from an extra untimed pass through the Python API.)

Owns: setup_allocator, replay, memory_curve, plot_html, run_peer, RESULT_KEYS.
Relies on: a workload's Trace (duck-typed: tools.workload makes it), emulator (configure, fault injection),
streams, viz.render (nice_ticks), _format, _errors, _lazy_init, _C (the native replayer)."""
import html
import json
import os
import subprocess

import numpy as np

from .. import _C, emulator
from .._errors import OutOfMemoryError
from .._format import format_bytes
from .._lazy_init import lazy_init
from ..streams import Stream
from ..viz.render import nice_ticks

# the keys of the peer harness's RESULT line, in its order
RESULT_KEYS = ("mode", "events", "total_ns", "ns_per_op", "thread_cpu_ns_per_op", "peak_requested_bytes",
               "peak_allocated_bytes", "peak_reserved_bytes", "num_device_alloc", "num_device_free",
               "num_alloc_retries", "num_ooms", "ooms_caught")

DEFAULT_REPLAY_MEMORY = "80GiB"  # the peer harness's default device capacity
_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_ooms")


def setup_allocator(memory=None, conf=None):
    """Initialises mtia_alloc for a replay (before any other use in this process)."""
    if conf is not None:
        os.environ["MTIA_ALLOC_CONF"] = conf
    if not _C.is_initialized():
        # runtime_reserved=0: the whole capacity goes to the allocator, as in the peer's fake runtime
        emulator.configure(memory_per_device=memory or os.environ.get("MTIA_EMULATOR_MEMORY")
                           or DEFAULT_REPLAY_MEMORY, runtime_reserved=0)
    lazy_init()


def _stream_ids(trace, device, merge_streams):
    """(stream ids for the replay, per-event stream indices)."""
    if merge_streams:
        return [0], np.zeros_like(trace.streams)
    if 0 in trace.stream_values:
        ids = [0 if v == 0 else _C.new_stream(device, 0) for v in trace.stream_values]
    else:
        ids = [_C.new_stream(device, 0) for _ in trace.stream_values]
    return ids, trace.streams


_native_prefix = None


def _native_supports_prefix():
    """Whether _C.replay takes `prefix` (events replayed untimed before the stats reset)."""
    global _native_prefix
    if _native_prefix is None:
        empty64, empty32 = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        try:
            _C.replay(0, empty64, empty32, empty32, 0, [0], False, prefix=0)
            _native_prefix = True
        except TypeError:
            _native_prefix = False
    return _native_prefix


def _arm_faults(fail_after, fail_every, device):
    if fail_after is not None:
        emulator.fail_device_allocations(after_n=fail_after, every=fail_every or 0, device=device)


def _lift_faults(fail_after, device):
    if fail_after is not None:
        emulator.fail_device_allocations(None, device=device)


def _latency_figures(r, skip_alloc=0, skip_free=0):
    for kind, skip in (("alloc", skip_alloc), ("free", skip_free)):
        lat = np.asarray(r.pop(f"{kind}_latency_ns"), dtype=np.float64)[skip:]
        if len(lat):
            r[f"{kind}_latency_p50_ns"] = float(np.percentile(lat, 50))
            r[f"{kind}_latency_p99_ns"] = float(np.percentile(lat, 99))


def replay(trace, repeat=1, latency=False, device=0, merge_streams=False, fail_after=None, fail_every=0):
    """Replays `trace` `repeat` times. Returns one result dict per pass: the RESULT_KEYS,
    plus first_failing_event (index into the trace's own events, -1 if none),
    prefix_failure (an allocation rebuilding a snapshot's starting state failed),
    skipped_frees, and the latency percentiles when asked.

    A CSV trace's passes run without emptying the cache (pass 1 cold, later passes warm).
    A snapshot's trace is replayed from its starting state in every pass (the rebuilt
    prefix, or an empty cache); see the module docstring for what the figures include. Fault injection
    (fail_after, fail_every) is armed before the first pass and counts the trace's own
    device allocations (those of the prefix are added to fail_after)."""
    lazy_init()
    stream_ids, streams = _stream_ids(trace, device, merge_streams)
    prefix = trace.prefix
    base = None
    if prefix:
        # The prefix alone, once, from an empty cache: its device allocations (added to
        # fail_after) and, without native support for prefixes, its counters, which are
        # subtracted from the passes' figures.
        _C.empty_cache_device(device, (0, 0))
        base = _C.replay(device, trace.sizes[:prefix], trace.slots[:prefix], streams[:prefix], trace.nslots,
                         stream_ids, latency)
        _C.empty_cache_device(device, (0, 0))
    native = bool(prefix) and _native_supports_prefix()
    flush_set = set(trace.flushes)
    from_start_state = bool(prefix) or trace.info.get("format") == "snapshot"
    _arm_faults(None if fail_after is None else fail_after + (base["num_device_alloc"] if base else 0),
                fail_every, device)
    out = []
    try:
        for i in range(repeat):
            if from_start_state:
                _C.empty_cache_device(device, (0, 0))
            if native:
                r = _C.replay(device, trace.sizes, trace.slots, streams, trace.nslots, stream_ids, latency,
                              prefix=prefix)
            else:
                r = _C.replay(device, trace.sizes, trace.slots, streams, trace.nslots, stream_ids, latency)
            if prefix and not native:
                # The clock ran over the prefix too: the time per op stays the average over
                # all events (subtracting the prefix's own time is too noisy), total_ns is
                # scaled to the trace's events.
                r["total_ns"] = int(round(r["ns_per_op"] * (r["events"] - prefix)))
                r["events"] -= prefix
                r["time_includes_prefix"] = True
                for k in _COUNTERS:
                    r[k] = max(0, r[k] - base[k])
                r["skipped_frees"] = max(0, r["skipped_frees"] - base["skipped_frees"])
            if trace.flushes:
                # each cache flush is one failed allocation after one retry: not counted
                for k in ("num_ooms", "num_alloc_retries"):
                    r[k] = max(0, r[k] - len(trace.flushes))
                if r["first_failing_event"] in flush_set:
                    r["first_failing_event"] = -2 if r["num_ooms"] else -1  # -2: found below
            f = r["first_failing_event"]
            if prefix:
                r["prefix_failure"] = 0 <= f < prefix
                if r["prefix_failure"]:  # the native replayer reports the first failure only
                    r["first_failing_event"] = -2 if r["num_ooms"] else -1
                elif f >= prefix:
                    r["first_failing_event"] = f - prefix
            r["mode"] = f"pass{i + 1}"
            r["ooms_caught"] = r["num_ooms"]
            r["prefix_device_alloc"] = base["num_device_alloc"] if base else 0
            if latency:
                skip_a = skip_f = 0
                if prefix and not native:
                    skip_a = int(np.count_nonzero(trace.sizes[:prefix]))
                    skip_f = prefix - skip_a
                _latency_figures(r, skip_a, skip_f)
            out.append(r)
    finally:
        _lift_faults(fail_after, device)
    curve = None
    if prefix and not native:
        # Without native support the passes' peaks include the prefix's temporaries; the
        # untimed pass measures them from the rebuilt state on (identical in every pass).
        curve = memory_curve(trace, device, merge_streams, fail_after, fail_every)
        for r in out:
            r["peak_requested_bytes"] = curve["peak_requested"]
            r["peak_allocated_bytes"] = curve["peak_allocated"]
            r["peak_reserved_bytes"] = curve["peak_reserved"]
    for r in out:
        if r["first_failing_event"] == -2:
            # the native replayer reports the first failure only, and that was a cache flush
            # or in the prefix: the untimed pass finds the first one of the trace (the passes
            # of a trace with a prefix or flushes start alike, from the same state)
            if curve is None:
                curve = memory_curve(trace, device, merge_streams, fail_after, fail_every)
            r["first_failing_event"] = curve["ooms"][0] if curve["ooms"] else -1
    if curve is not None:
        out[0]["_curve"] = curve
    return out


def memory_curve(trace, device=0, merge_streams=False, fail_after=None, fail_every=0):
    """Replays `trace` once more, untimed, through the Python API from an empty cache, and
    samples the device's requested, allocated (block) and reserved bytes after every event
    of the trace itself (a snapshot's prefix runs first, unsampled). Returns a dict of
    numpy arrays "requested", "allocated", "reserved" (one value per trace event), "start"
    (the three values before the first event), "ooms" (trace event indices of failed
    allocations, cache flushes left out) and the peaks (start included)."""
    lazy_init()
    _C.empty_cache_device(device, (0, 0))
    stream_ids, streams = _stream_ids(trace, device, merge_streams)
    handles = [Stream(stream_id=sid, device_index=device) for sid in stream_ids]
    n, prefix = trace.events, trace.prefix
    req = np.zeros(n - prefix, np.int64)
    alc = np.zeros(n - prefix, np.int64)
    res = np.zeros(n - prefix, np.int64)
    ptrs = [0] * trace.nslots
    blk = [0] * trace.nslots
    asked = [0] * trace.nslots
    ooms = []
    alloc, free, bsize, info = _C.caching_allocator_alloc, _C.caching_allocator_delete, _C.block_size, _C.mem_get_info
    capacity = info(device)[1]
    cur_req = cur_alc = 0
    start = None
    flush_set = set(trace.flushes)
    try:
        for i, (size, slot, s) in enumerate(zip(trace.sizes.tolist(), trace.slots.tolist(), streams.tolist())):
            if i == prefix:
                start = (cur_req, cur_alc, capacity - info(device)[0])
                _arm_faults(fail_after, fail_every, device)  # counts the trace's own device allocations
            if size:
                try:
                    p = alloc(size, device, handles[s])
                except OutOfMemoryError:
                    if i >= prefix and i not in flush_set:
                        ooms.append(i - prefix)
                    p = 0
                if p:
                    ptrs[slot], asked[slot] = p, size
                    blk[slot] = b = bsize(p)
                    cur_req += size
                    cur_alc += b
            else:
                p = ptrs[slot]
                if p:
                    free(p)
                    ptrs[slot] = 0
                    cur_req -= asked[slot]
                    cur_alc -= blk[slot]
            if i >= prefix:
                j = i - prefix
                req[j], alc[j], res[j] = cur_req, cur_alc, capacity - info(device)[0]
        if start is None:
            start = (cur_req, cur_alc, capacity - info(device)[0])
    finally:
        _lift_faults(fail_after, device)
        for p in ptrs:
            if p:
                free(p)
    return {
        "requested": req, "allocated": alc, "reserved": res, "start": start, "ooms": ooms,
        "peak_requested": int(max(start[0], req.max(initial=0))),
        "peak_allocated": int(max(start[1], alc.max(initial=0))),
        "peak_reserved": int(max(start[2], res.max(initial=0))),
    }


# ------------------------------------------------------------------ plot

def _polyline(series, x0, pw, y):
    """Points of a step line through `series` (one value per event, drawn from x0 over pw
    pixels); more than 2 values per pixel are reduced to each column's min and max."""
    n = len(series)
    if n == 0:
        return ""
    if n <= 2 * pw:
        xs = x0 + np.arange(n + 1) * (pw / n)
        pts = []
        for i, v in enumerate(series.tolist()):
            yy = y(v)
            pts.append(f"{xs[i]:.1f},{yy:.1f}")
            pts.append(f"{xs[i + 1]:.1f},{yy:.1f}")
        return " ".join(pts)
    edges = (np.arange(pw + 1) * n) // pw
    lo = np.minimum.reduceat(series, edges[:-1])
    hi = np.maximum.reduceat(series, edges[:-1])
    pts = []
    for c in range(pw):
        pts.append(f"{x0 + c + 0.5:.1f},{y(int(lo[c])):.1f}")
        pts.append(f"{x0 + c + 0.5:.1f},{y(int(hi[c])):.1f}")
    return " ".join(pts)


def plot_html(curve, title, results=(), notes=(), width=1000, height=320):
    """A self-contained HTML page (inline SVG, no script, no network) drawing reserved,
    allocated and requested bytes over the trace's events."""
    esc = html.escape
    n = len(curve["reserved"])
    left, right, top, bottom = 90, 20, 12, 36
    pw, ph = width - left - right, height - top - bottom
    # the value before the first event (the starting state) is drawn as event 0's left edge
    series = {k: np.concatenate(([v], curve[k])).astype(np.int64)
              for k, v in zip(("requested", "allocated", "reserved"), curve["start"])}
    vmax = max(1, max(int(s.max()) for s in series.values()))
    ticks = nice_ticks(vmax)
    vtop = max(vmax, ticks[-1])

    def y(v):
        return top + ph - v / vtop * ph

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="reserved and allocated bytes over the replay">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="white" stroke="#999"/>']
    for t in ticks:
        svg.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{left - 5}" y="{y(t) + 4:.1f}" text-anchor="end">{esc(format_bytes(t))}</text>')
    for i in curve["ooms"][:200]:
        x = left + (i + 1) * pw / (n + 1)
        svg.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#e15759">'
                   f'<title>allocation failed at event {i}</title></line>')
    for key, color, label, dash in (("reserved", "#f28e2c", "reserved (segments)", ""),
                                    ("allocated", "#4e79a7", "allocated (block bytes)", ""),
                                    ("requested", "#59a14f", "requested (bytes asked for)", ' stroke-dasharray="4 3"')):
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} '
                   f'points="{_polyline(series[key], left, pw, y)}"><title>{esc(label)}</title></polyline>')
    svg.append(f'<text x="{left}" y="{height - 12}">start</text>')
    svg.append(f'<text x="{left + pw}" y="{height - 12}" text-anchor="end">event {n - 1 if n else 0}</text>')
    svg.append(f'<text x="{left + pw / 2:.0f}" y="{height - 12}" text-anchor="middle">trace events</text>')
    svg.append("</svg>")

    peaks = (f"peak reserved {format_bytes(curve['peak_reserved'])}, peak allocated "
             f"{format_bytes(curve['peak_allocated'])}, peak requested {format_bytes(curve['peak_requested'])}")
    rows = []
    for r in results:
        cells = (f"{r.get(k):.2f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in RESULT_KEYS)
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    table = ""
    if rows:
        table = ("<h2>Replay figures</h2><table><tr>" + "".join(f"<th>{esc(k)}</th>" for k in RESULT_KEYS)
                 + "</tr>" + "".join(rows) + "</table>")
    legend = "".join(f'<span class="k" style="background:{c}"></span>{esc(t)}' for t, c in (
        ("reserved", "#f28e2c"), ("allocated", "#4e79a7"), ("requested", "#59a14f"), ("failed allocation", "#e15759")))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
        "svg text{font-size:11px;fill:#333}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        ".k{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}</style>",
        "</head><body>", f"<h1>{esc(title)}</h1>",
        f"<p>{n} trace events; {esc(peaks)}. Sampled after every event in an extra, untimed pass "
        f"from an empty cache (fault injection, if any, re-armed).</p>",
        *[f"<p>{esc(t)}</p>" for t in notes],
        f'<p class="legend">{legend}</p>', *svg, table, "</body></html>", ""])


# ------------------------------------------------------------------ peer

def run_peer(build_dir, path, repeat=1, memory_bytes=None, conf=None, timeout=1800, empty_between=False):
    """Runs PyTorch's allocator (peer harness) on the trace file; returns its RESULT dicts,
    or raises RuntimeError saying why it could not run. empty_between: empty the cache
    between passes (as the passes of a snapshot's trace do here)."""
    harness = os.path.join(build_dir, "bin", "harness")
    if not os.access(harness, os.X_OK):
        raise RuntimeError(f"no peer harness at {harness}: build it with "
                           f"python -m mtia_alloc peer build {build_dir}")
    env = dict(os.environ)
    if memory_bytes:
        env["FAKE_CUDA_MEM_BYTES"] = str(memory_bytes)
    if conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = conf
    cmd = [harness, "trace", str(path), "--repeat", str(repeat)] + (["--empty-cache-between"] if empty_between else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"peer harness failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return results
