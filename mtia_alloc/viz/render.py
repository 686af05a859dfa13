"""The snapshot view's HTML page: a self-contained file (inline SVG, no script, no
network) with the summary, a map of the segments coloured by block state, and memory over
time, for each device. A trace longer than two entries per pixel column is binned (min
and max per column; bins link to panels naming the call sites live at their peak), so the
page stays small whatever the trace's length. Also the helpers the replay plot shares (nice_ticks, HTML names).

Owns: render_html, is_html_name, not_html_message, nice_ticks.
Relies on: _format (format_bytes); reads the snapshot only through a Snapshot object's
methods (devices, _segments_of, fragmentation, memory_over_time, top_sites_at, summary,
source), so it
imports nothing of the model above it."""
import datetime
import html
import os

import numpy as np

from .._format import format_bytes

__all__ = ["render_html", "is_html_name", "not_html_message", "nice_ticks"]


def is_html_name(path):
    """True for a file name the HTML plots may be written under (.html, .htm or none)."""
    return os.path.splitext(path)[1].lower() in ("", ".html", ".htm")


def not_html_message(path):
    return (f"plot writes an HTML page with inline SVG pictures; name it .html, not {path!r} "
            "(raster formats would need an image library, which mtia_alloc does not depend on)")


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
rect.bin { fill: transparent; cursor: pointer; } rect.bin:hover { fill: rgba(0,0,0,.08); }
.bin-panel { display: none; } .bin-panel:target { display: block; border: 1px solid #ccc; padding: .4em; }
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
        title = (f"segment {s.address:#x}: {format_bytes(s.total_size)} {s.segment_type}, stream {s.stream}, "
                 f"pool {s.pool_id}; allocated {format_bytes(s.allocated_size)} in "
                 f"{s.n_allocated} blocks, pending free "
                 f"{format_bytes(s.active_size - s.allocated_size)}, free {format_bytes(s.free_size)} "
                 f"(largest {format_bytes(s.largest_free_block)})")
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


def nice_ticks(vmax, n=5):
    """Tick values 0, step, 2*step, ... up to vmax, with step a power of two near vmax/n."""
    if vmax <= 0:
        return [0]
    step = 1
    while step < vmax / n:
        step *= 2
    return [i * step for i in range(int(vmax // step) + 1)]


_BIN_PX = 3       # width of a clickable bin of the binned timeline
_TOP_SITES = 5


def _timeline_svg(curves, width=900, height=240, sites=None, anchor="d0"):
    """The memory curves as SVG. A trace longer than two points per pixel column is binned:
    each column draws the min and max of its entries, so the page's size does not grow with
    the trace; then every _BIN_PX columns make a bin that links (#anchor-bin-J, no script:
    CSS :target shows it) to a panel naming the top call sites live at the bin's peak.
    sites(points) -> per entry index, [(site, bytes)]. Returns (svg, panels)."""
    alloc = np.asarray(curves["allocated"], dtype=np.int64)
    res = np.asarray(curves["reserved"], dtype=np.int64)
    n = len(alloc)
    left, right, top, bottom = 80, 10, 10, 30
    pw, ph = width - left - right, height - top - bottom
    vmax = max(int(res.max()) if n else 0, int(alloc.max()) if n else 0, 1)
    ymin = min(int(res.min()) if n else 0, int(alloc.min()) if n else 0, 0)
    span = vmax - ymin or 1

    def y(v):
        return top + ph - (v - ymin) / span * ph

    def x(i):
        return left + (i / max(1, n - 1)) * pw

    binned = n > 2 * pw
    if binned:
        edges = (np.arange(pw + 1) * n) // pw
        lo = edges[:-1]

    def points(series):
        if not binned:
            pts, prev = [], None
            for i, v in enumerate(series.tolist()):  # steps: the value changes at each event
                if prev is not None and v != prev:
                    pts.append(f"{x(i):.1f},{y(prev):.1f}")
                pts.append(f"{x(i):.1f},{y(v):.1f}")
                prev = v
            return " ".join(pts)
        mins = np.minimum.reduceat(series, lo)  # min/max envelope per pixel column
        maxs = np.maximum.reduceat(series, lo)
        pts = []
        for col, (a, b) in enumerate(zip(mins.tolist(), maxs.tolist())):
            pts.append(f"{left + col:.1f},{y(a):.1f}")
            pts.append(f"{left + col:.1f},{y(b):.1f}")
        return " ".join(pts)

    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="memory over time">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="white" stroke="#999"/>']
    for t in nice_ticks(vmax):
        if t < ymin:
            continue
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y(t) + 4:.1f}" text-anchor="end">{_esc(format_bytes(int(t)))}</text>')
    ooms = list(curves["oom"])
    for i in ooms[:200]:
        out.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top}" y2="{top + ph}" stroke="#e15759" '
                   f'stroke-width="1.5"><title>oom at trace entry {i}</title></line>')
    out.append(f'<polyline fill="none" stroke="#f28e2c" stroke-width="1.5" points="{points(res)}">'
               f'<title>reserved (segments)</title></polyline>')
    out.append(f'<polyline fill="none" stroke="#4e79a7" stroke-width="1.5" points="{points(alloc)}">'
               f'<title>allocated (requested bytes of live allocations)</title></polyline>')
    panels = []
    if binned:
        bin_edges = edges[::_BIN_PX]
        if bin_edges[-1] != n:
            bin_edges = np.r_[bin_edges, n]
        peaks = [int(a + np.argmax(alloc[a:b])) for a, b in zip(bin_edges[:-1].tolist(), bin_edges[1:].tolist())]
        tops = sites(peaks) if sites is not None else [[] for _ in peaks]
        for j, (a, b, p, top_j) in enumerate(zip(bin_edges[:-1].tolist(), bin_edges[1:].tolist(), peaks, tops)):
            bid = f"{anchor}-bin-{j}"
            names = "; ".join(f"{site} {format_bytes(v)}" for site, v in top_j[:3])
            tip = (f"entries {a}-{b - 1}: allocated up to {format_bytes(int(alloc[p]))} (entry {p}), reserved up "
                   f"to {format_bytes(int(res[a:b].max()))}" + (f"; live: {names}" if names else "") +
                   " (click for the call sites)")
            out.append(f'<a href="#{bid}"><rect class="bin" x="{left + j * _BIN_PX}" y="{top}" width="{_BIN_PX}" '
                       f'height="{ph}"><title>{_esc(tip)}</title></rect></a>')
            rows = "".join(f"<tr><td style='text-align:left'>{_esc(site)}</td><td>{_esc(format_bytes(v))}</td></tr>"
                           for site, v in top_j)
            panels.append(f'<div class="bin-panel" id="{bid}"><b>Entries {a} to {b - 1}</b>: at entry {p}, '
                          f"allocated {_esc(format_bytes(int(alloc[p])))}, reserved "
                          f"{_esc(format_bytes(int(res[p])))}. Top call sites live then:"
                          f"<table><tr><th>call site</th><th>live bytes</th></tr>{rows}</table></div>")
    out.append(f'<text x="{left}" y="{height - 8}">trace entry 0</text>')
    out.append(f'<text x="{left + pw}" y="{height - 8}" text-anchor="end">{n - 1}</text>')
    out.append("</svg>")
    return "\n".join(out), panels


def _fmt_time(us):
    try:
        return datetime.datetime.fromtimestamp(int(us) / 1e6, datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S.%f UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def render_html(snap, only_device=None):
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
        frag = snap.fragmentation(d)
        parts.append(f"<h2>Device {d}</h2>")
        parts.append(f"<pre>{_esc(str(frag))}</pre>")
        svg, bpc = _segment_map_svg(segs)
        parts.append(f"<h3>Segments ({len(segs)}, {_esc(format_bytes(frag.reserved))})</h3>")
        if segs:
            parts.append(f'<p class="legend">{legend} &nbsp; one cell = {_esc(format_bytes(bpc))}; '
                         f"segments in address order, separated by a blank cell; hover for details.</p>")
        parts.append(svg)
        curves = snap.memory_over_time(d)
        parts.append("<h3>Memory over time</h3>")
        n = len(curves["index"])
        if n:
            first = next((t for t in curves["time_us"][:1000] if isinstance(t, (int, float, np.integer)) and t >= 0),
                         None)
            last = curves["time_us"][n - 1] if n else None
            last = last if isinstance(last, (int, float, np.integer)) and last >= 0 else None
            span = f", {_esc(_fmt_time(first))} to {_esc(_fmt_time(last))}" if first is not None and \
                last is not None else ""
            binned = n > 2 * 810
            parts.append(f'<p class="legend"><span style="background:#4e79a7"></span>allocated (requested bytes)'
                         f'<span style="background:#f28e2c"></span>reserved'
                         f'<span style="background:#e15759"></span>oom &nbsp; {n} trace entries'
                         f"{span}; peak allocated {_esc(format_bytes(int(np.max(curves['allocated']))))}, peak "
                         f"reserved {_esc(format_bytes(int(np.max(curves['reserved']))))} (within the trace)."
                         + (" Binned: each pixel column shows the min and max of its entries; click a bin for "
                            "the call sites live at its peak." if binned else "") + "</p>")
            svg, panels = _timeline_svg(curves, sites=lambda pts, d=d: snap.top_sites_at(d, pts), anchor=f"d{d}")
            parts.append(svg)
            parts.extend(panels)
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
                    f"<tr><td>{s.address:#x}</td><td>{_esc(format_bytes(s.total_size))}</td><td>{s.segment_type}</td>"
                    f"<td>{_esc(s.pool_id)}</td><td>{s.stream}</td><td>{_esc(format_bytes(s.allocated_size))}</td>"
                    f"<td>{_esc(format_bytes(s.free_size))}</td><td>{_esc(format_bytes(s.largest_free_block))}</td>"
                    f"<td>{s.n_blocks}</td><td>{_esc(s.where)}</td></tr>")
            parts.append("</table></details>")
        parts.append(f"<details><summary>memory_summary</summary><pre>{_esc(snap.summary(d))}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
