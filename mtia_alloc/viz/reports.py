"""The REPL faces of the memory-debugging commands (fit, sweep, diff, ranks): each result is
plain data (what the command prints with --json), wrapped in an object with a readable
repr, .table() (the command's text output) and .rows (a list of dicts). Diff and sweep
results also draw themselves as self-contained HTML (.plot(path)).

Owns: Report, FitReport, SweepReport, DiffReport, RanksReport.
Relies on: _format (format_bytes), viz.render (nice_ticks, HTML names)."""
import html
import json
import os

from .._format import format_bytes
from .render import is_html_name, nice_ticks, not_html_message

__all__ = ["Report", "FitReport", "SweepReport", "DiffReport", "RanksReport"]


def _b(n):
    return "n/a" if n is None else format_bytes(n)


def _signed(n):
    if n is None:
        return "n/a"
    return ("+" if n > 0 else "") + format_bytes(n)


def _grid(header, rows, align=None):
    """A text table: header (list of str), rows (lists of str); numbers right-aligned."""
    cols = len(header)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(cols)]
    align = align or ["<"] + [">"] * (cols - 1)
    fmt = lambda r: "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


class Report:
    """Plain data with a face: .data (the --json document), .rows, .table(), repr."""
    command = ""

    def __init__(self, data):
        self.data = data

    @property
    def rows(self):
        return list(self.data.get("rows", []))

    def table(self):
        raise NotImplementedError

    def __str__(self):
        return self.table()

    def to_json(self):
        return json.dumps(self.data)

    def _write_html(self, path, title, body):
        path = os.fspath(path)
        if not is_html_name(path):
            raise ValueError(not_html_message(path))
        esc = html.escape
        text = "\n".join([
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
            "svg text{font-size:11px;fill:#333}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
            "pre{background:#f6f6f6;padding:.6em;font-size:12px;overflow-x:auto}"
            ".k{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}</style>",
            "</head><body>", f"<h1>{esc(title)}</h1>", *body, "</body></html>", ""])
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


# ------------------------------------------------------------------ fit

class FitReport(Report):
    """Whether a workload fits a device: fits, peak_reserved, headroom, failure (the first
    failing allocation and the allocator's state then)."""
    command = "fit"

    @property
    def fits(self):
        return self.data["fits"]

    @property
    def rows(self):
        d = self.data
        keys = ("fits", "memory", "peak_reserved", "peak_allocated", "peak_requested", "headroom",
                "num_device_alloc", "num_alloc_retries", "num_ooms")
        row = {k: d.get(k) for k in keys}
        f = d.get("failure")
        if f:
            st = f["state"]
            row.update(failure_event=f["event"], failure_size=f["size"], failure_site=f.get("where"),
                       reserved_at_failure=st["reserved"], allocated_at_failure=st["allocated"],
                       largest_free_small=st["largest_free_block"]["small_pool"],
                       largest_free_large=st["largest_free_block"]["large_pool"],
                       free_but_unusable=st["free_but_unusable"])
        return [row]

    def __repr__(self):
        d = self.data
        if d["fits"]:
            return (f"FitReport(fits on {_b(d['memory'])}: peak reserved {_b(d['peak_reserved'])}, "
                    f"headroom {_b(d['headroom'])})")
        f = d["failure"]
        return (f"FitReport(does NOT fit on {_b(d['memory'])}: allocation of {_b(f['size'])} at event "
                f"{f['event']}{' at ' + f['where'] if f.get('where') else ''} fails)")

    def table(self):
        d = self.data
        src = f"{d.get('input', '?')} ({d.get('format', '?')}"
        if d.get("device") is not None:
            src += f", device {d['device']}"
        src += f", {d.get('events', '?')} events)"
        lines = [f"fit: {src} on a {_b(d['memory'])} device, settings {d.get('conf', '')!r}"]
        rec = d.get("recorded_settings")
        if rec is not None and rec != d.get("conf", ""):
            lines.append(f"note: the snapshot was recorded with settings {rec!r}; this replay uses "
                         f"{d.get('conf', '')!r} (--conf)")
        if d.get("recorded_ooms"):
            lines.append(f"the recorded run raised {d['recorded_ooms']} OOM(s): each failed request is replayed "
                         f"at its place (and freed at once if it succeeds here)")
        if d.get("start_reserved"):
            lines.append(f"starting state (rebuilt from the snapshot): {_b(d['start_reserved'])} reserved in "
                         f"{d.get('start_segments', 0)} segments, {_b(d.get('start_live_bytes'))} live")
        if d["fits"]:
            share = d["headroom"] / d["memory"] if d["memory"] else 0.0
            lines.append(f"FITS: peak reserved {_b(d['peak_reserved'])}, headroom {_b(d['headroom'])} "
                         f"({share:.1%} of the device)")
        else:
            f = d["failure"]
            st = f["state"]
            entry = f" (trace entry {f['entry']})" if f.get("entry") is not None else ""
            lines.append(f"DOES NOT FIT: the allocation of {_b(f['size'])} at event {f['event']}{entry}, "
                         f"stream {f['stream']}, fails")
            if f.get("stack"):
                lines.append(f"  at {f['stack'][0]}")
                lines.extend(f"     {s}" for s in f["stack"][1:6])
            elif f.get("where"):
                lines.append(f"  at {f['where']}")
            else:
                lines.append("  call site: not recorded (no stack in the input)")
            lines.append(f"  allocator state then: reserved {_b(st['reserved'])} in {st['segments']} segments, "
                         f"allocated {_b(st['allocated'])} (requested {_b(st['requested'])})")
            lines.append(f"  largest free block: small pool {_b(st['largest_free_block']['small_pool'])}, "
                         f"large pool {_b(st['largest_free_block']['large_pool'])}")
            lines.append(f"  free but unusable: {_b(st['free_but_unusable'])} ({_b(st['cached_free'])} cached in "
                         f"segments, {_b(st['device_free'])} of the device unreserved; the request rounds to "
                         f"{_b(st['rounded_request'])} and needs a free block of that size or a "
                         f"{_b(st['segment_needed'])} segment)")
            lines.append(f"  peaks up to then: reserved {_b(d['peak_reserved'])}, allocated "
                         f"{_b(d['peak_allocated'])}")
        lines.append(f"peak allocated {_b(d['peak_allocated'])}, peak requested {_b(d['peak_requested'])}, "
                     f"device allocations {d['num_device_alloc']}, retries {d['num_alloc_retries']}")
        if d["fits"]:
            lines.append("note: the whole capacity is the allocator's here; a real device's runtime context "
                         "takes some of it (CUDA: a few hundred MiB)")
        return "\n".join(lines)


# ------------------------------------------------------------------ sweep

class SweepReport(Report):
    """A grid of allocator settings replayed on one device: rows sorted by peak reserved
    (OOM rows last), each {setting, status, oom, peak_reserved, ...}; .recommended."""
    command = "sweep"

    @property
    def recommended(self):
        return self.data.get("recommended")

    def __repr__(self):
        d = self.data
        ran = sum(1 for r in d["rows"] if r["status"] == "ran")
        rec = d.get("recommended")
        rec_txt = f"recommended {rec['setting'] or '(defaults)'}: peak reserved {_b(rec['peak_reserved'])}" if rec else \
            "no setting fits"
        return (f"SweepReport({len(d['rows'])} settings, {ran} replayed on {_b(d['memory'])} in "
                f"{d.get('seconds', 0):.2f} s on {d.get('workers', 1)} processes; {rec_txt})")

    def table(self):
        d = self.data
        header = ["setting", "OOM", "peak reserved", "peak allocated", "retries", "device allocs", "note"]
        rows, ignored = [], {}
        for r in d["rows"]:
            if r["status"] == "ran":
                rows.append([r["setting"] or "(defaults)", "yes" if r["oom"] else "no", _b(r["peak_reserved"]),
                             _b(r["peak_allocated"]), str(r["num_alloc_retries"]), str(r["num_device_alloc"]),
                             r.get("note", "")])
            elif r["status"] == "ignored":
                reason = r["note"].rsplit(": same as", 1)[0]
                ignored.setdefault(reason, []).append(r)
            else:
                rows.append([r["setting"] or "(defaults)", "-", "-", "-", "-", "-", f"{r['status']}: {r['note']}"])
        rec = d.get("recommended")
        ran = sum(1 for r in d["rows"] if r["status"] == "ran")
        head = (f"sweep: {d.get('input', '?')} on a {_b(d['memory'])} device, {len(d['rows'])} settings "
                f"({ran} replayed in {d.get('seconds', 0):.2f} s on {d.get('workers', 1)} processes, "
                f"{d.get('parallelism', 0):.1f} at a time on average, {d.get('worker_cpu_seconds', 0):.2f} s CPU)")
        out = [head, _grid(header, rows, ["<", "<", ">", ">", ">", ">", "<"])]
        for reason, rs in ignored.items():
            out.append(f"not run, {len(rs)} settings: PyTorch ignores them ({reason}); each is the same as the "
                       f"setting without it (rows in .rows / --json)")
        out.append(f"recommended: {rec['setting'] or '(defaults)'!s} (peak reserved {_b(rec['peak_reserved'])}, "
                   f"{rec['num_device_alloc']} device allocations; {rec.get('why', '')})" if rec
                   else "recommended: none: every setting runs out of memory")
        return "\n".join(out)

    def html_parts(self):
        """The sweep's HTML: its table and a bar chart of peak reserved per setting."""
        d = self.data
        ran = [r for r in d["rows"] if r["status"] == "ran"]
        esc = html.escape
        vmax = max([r["peak_reserved"] for r in ran] + [d["memory"], 1])
        ticks = nice_ticks(vmax)
        vtop = max(vmax, ticks[-1])
        left, bar_h, gap, width = 330, 14, 4, 900
        pw = width - left - 20
        height = 30 + len(ran) * (bar_h + gap)
        svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
               f'aria-label="peak reserved per setting">']
        for t in ticks:
            x = left + t / vtop * pw
            svg.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height - 20}" stroke="#eee"/>'
                       f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">{esc(format_bytes(t))}</text>')
        xm = left + d["memory"] / vtop * pw
        svg.append(f'<line x1="{xm:.1f}" x2="{xm:.1f}" y1="0" y2="{height - 20}" stroke="#e15759" '
                   f'stroke-dasharray="4 3"><title>device capacity {esc(format_bytes(d["memory"]))}</title></line>')
        for i, r in enumerate(ran):
            y = 4 + i * (bar_h + gap)
            w = r["peak_reserved"] / vtop * pw
            color = "#e15759" if r["oom"] else "#4e79a7"
            svg.append(f'<text x="{left - 6}" y="{y + bar_h - 3}" text-anchor="end">'
                       f'{esc(r["setting"] or "(defaults)")}</text>'
                       f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}">'
                       f'<title>{esc(r["setting"] or "(defaults)")}: peak reserved '
                       f'{esc(format_bytes(r["peak_reserved"]))}, OOM {"yes" if r["oom"] else "no"}</title></rect>')
        svg.append("</svg>")
        return [f"<pre>{esc(self.table())}</pre>", "<h2>Peak reserved per setting</h2>", "".join(svg)]

    def plot(self, path):
        """A bar chart of peak reserved per setting (OOM settings in red) and the table, as
        a self-contained HTML page (inline SVG, no script)."""
        return self._write_html(path, f"Allocator settings sweep: {self.data.get('input', '')}", self.html_parts())


# ------------------------------------------------------------------ diff

class DiffReport(Report):
    """Two runs compared per call site: rows {site, a_end, b_end, delta_end, a_peak, b_peak,
    delta_peak} (live requested bytes), sorted by the largest absolute delta; .totals holds
    the run-level figures of A and B (reserved, peak reserved, segments, largest free block)."""
    command = "diff"

    @property
    def totals(self):
        return self.data["totals"]

    def __repr__(self):
        d = self.data
        t = d["totals"]
        top = d["rows"][0] if d["rows"] else None
        top_txt = f"; top site {top['site']!r}: {_signed(top['delta_peak'] if top['delta_peak'] is not None else top['delta_end'])}" \
            if top else ""
        return (f"DiffReport({len(d['rows'])} sites; peak reserved {_b(t['a']['peak_reserved'])} -> "
                f"{_b(t['b']['peak_reserved'])}, live at end {_b(t['a']['live_end'])} -> "
                f"{_b(t['b']['live_end'])}{top_txt})")

    def table(self, limit=25):
        d = self.data
        t = d["totals"]
        lines = [f"diff: A = {d['a']['input']} (device {d['a']['device']}), B = {d['b']['input']} "
                 f"(device {d['b']['device']}); grouped by {d['by']}; live = requested bytes of live allocations"]
        header = ["", "A", "B", "B - A"]
        rows = []
        for key, label in (("reserved", "reserved at end"), ("peak_reserved", "peak reserved (replay)"),
                           ("peak_allocated", "peak allocated (replay)"), ("live_end", "live at end"),
                           ("live_peak", "live at peak"), ("segments", "segments at end"),
                           ("largest_free_block", "largest free block")):
            a, b = t["a"].get(key), t["b"].get(key)
            delta = None if a is None or b is None else b - a
            if key == "segments":
                rows.append([label, str(a), str(b), "n/a" if delta is None else f"{delta:+d}"])
            else:
                rows.append([label, _b(a), _b(b), _signed(delta)])
        lines.append(_grid(header, rows))
        lines.append("")
        header = ["site", "A at end", "B at end", "delta end", "A at peak", "B at peak", "delta peak"]
        shown = d["rows"][:limit]
        prefix = _common_dir([r["site"] for r in shown])
        if prefix:
            lines.append(f"sites under {prefix}/ are shown relative to it")
        srows = [[_relative(r["site"], prefix), _b(r["a_end"]), _b(r["b_end"]), _signed(r["delta_end"]), _b(r["a_peak"]),
                  _b(r["b_peak"]), _signed(r["delta_peak"])] for r in shown]
        lines.append(_grid(header, srows))
        if len(d["rows"]) > limit:
            lines.append(f"... {len(d['rows']) - limit} more sites (.rows, or --json)")
        for side in ("a", "b"):
            nostack = sum((r[f"{side}_peak"] or 0) for r in d["rows"] if r["site"] == "<no stack recorded>")
            live = d["totals"][side]["live_peak"]
            if nostack and live:
                lines.append(f"note: {nostack / live:.0%} of {side.upper()}'s live bytes at its peak were allocated "
                             f"without a recorded stack (history recorded with context=None?): their sites are "
                             f"unknown, not unchanged")
        for side in ("a", "b"):
            if d[side].get("peak_event") is not None:
                lines.append(f"{side.upper()}'s peak: trace entry {d[side]['peak_event']} "
                             f"({_b(d[side]['live_peak'])} live)")
        return "\n".join(lines)

    def plot(self, path, limit=20):
        """Two memory timelines (A and B: live and reserved bytes over their trace entries)
        and the per-site bar chart of the deltas at peak, as a self-contained HTML page."""
        d = self.data
        return self._write_html(path, f"Memory diff: {d['a']['input']} vs {d['b']['input']}",
                                self.html_parts(limit))

    def html_parts(self, limit=20):
        """The diff's HTML: its table, both timelines and the per-site bar chart."""
        d = self.data
        esc = html.escape
        body = [f"<pre>{esc(self.table(limit=limit))}</pre>"]
        for side in ("a", "b"):
            curve = d[side].get("curve")
            body.append(f"<h2>{side.upper()}: {esc(d[side]['input'])}</h2>")
            body.append(_timeline_svg(curve) if curve else "<p>No trace recorded.</p>")
        body.append("<h2>Change per site (B - A)</h2>")
        body.append(_delta_bars_svg(d["rows"][:limit]))
        return body


def _common_dir(sites):
    """The longest directory shared by every site that is a path ('' if none or just '/')."""
    files = [s.split(":", 1)[0] for s in sites if s.startswith("/")]
    if len(files) < 2:
        return ""
    prefix = os.path.commonpath([os.path.dirname(f) for f in files])
    return prefix if len(prefix) > 1 else ""


def _relative(site, prefix):
    if prefix and site.startswith(prefix + "/"):
        return " < ".join(p[len(prefix) + 1:] if p.startswith(prefix + "/") else p for p in site.split(" < "))
    return site


def _timeline_svg(curve, width=900, height=220):
    esc = html.escape
    live, res = curve["live"], curve["reserved"]
    n = len(live)
    vmax = max(max(res, default=0), max(live, default=0), 1)
    ticks = nice_ticks(vmax)
    vtop = max(vmax, ticks[-1])
    left, top, bottom = 80, 8, 24
    pw, ph = width - left - 10, height - top - bottom

    def pts(series):
        if not series:
            return ""
        step = pw / max(1, len(series) - 1)
        return " ".join(f"{left + i * step:.1f},{top + ph - v / vtop * ph:.1f}" for i, v in enumerate(series))

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="memory over time">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="white" stroke="#999"/>']
    for t in ticks:
        y = top + ph - t / vtop * ph
        svg.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{esc(format_bytes(t))}</text>')
    svg.append(f'<polyline fill="none" stroke="#f28e2c" stroke-width="1.5" points="{pts(res)}">'
               f'<title>reserved</title></polyline>')
    svg.append(f'<polyline fill="none" stroke="#4e79a7" stroke-width="1.5" points="{pts(live)}">'
               f'<title>live (requested bytes)</title></polyline>')
    svg.append(f'<text x="{left}" y="{height - 6}">trace start</text><text x="{left + pw}" y="{height - 6}" '
               f'text-anchor="end">{curve.get("entries", n)} entries</text></svg>')
    return "".join(svg)


def _delta_bars_svg(rows, width=900):
    esc = html.escape
    if not rows:
        return "<p>No allocation sites.</p>"
    vals = [(r["delta_peak"] if r["delta_peak"] is not None else r["delta_end"]) or 0 for r in rows]
    vmax = max(max(abs(v) for v in vals), 1)
    left, bar_h, gap = 420, 14, 4
    mid = left + (width - left - 10) / 2
    half = (width - left - 10) / 2
    height = 10 + len(rows) * (bar_h + gap)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="change per site">', f'<line x1="{mid:.1f}" x2="{mid:.1f}" y1="0" y2="{height}" stroke="#999"/>']
    for i, (r, v) in enumerate(zip(rows, vals)):
        y = 4 + i * (bar_h + gap)
        w = abs(v) / vmax * half
        x = mid if v >= 0 else mid - w
        color = "#e15759" if v > 0 else "#59a14f"
        site = r["site"] if len(r["site"]) <= 60 else "..." + r["site"][-57:]
        svg.append(f'<text x="{left - 6}" y="{y + bar_h - 3}" text-anchor="end">{esc(site)}</text>'
                   f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" fill="{color}">'
                   f'<title>{esc(r["site"])}: {esc(_signed(v))} at peak (end: {esc(_signed(r["delta_end"]))})</title>'
                   f'</rect>')
    svg.append("</svg>")
    return "".join(svg)


# ------------------------------------------------------------------ ranks

class RanksReport(Report):
    """One row per rank: peak allocated/reserved (replay), segments, largest live
    allocations; .peak_rank and .diff (the peak rank against the median rank, per site)."""
    command = "ranks"

    @property
    def diff(self):
        return DiffReport(self.data["diff"]) if self.data.get("diff") else None

    def __repr__(self):
        d = self.data
        peak = d["rows"][d["peak_rank"]] if d.get("peak_rank") is not None else None
        return (f"RanksReport({len(d['rows'])} ranks; rank {d.get('peak_rank')} peaks at "
                f"{_b(peak['peak_reserved'] if peak else None)} reserved, median rank {d.get('median_rank')})")

    def table(self):
        d = self.data
        header = ["rank", "input", "peak allocated", "peak reserved", "segments", "largest live allocations", ""]
        rows = []
        for r in d["rows"]:
            big = ", ".join(f"{format_bytes(x['size'])} at {x['where'] or '?'}" for x in r["largest"][:2])
            flag = "<- peak" if r["rank"] == d.get("peak_rank") else ("median" if r["rank"] == d.get("median_rank")
                                                                     else "")
            rows.append([str(r["rank"]), os.path.basename(r["input"]), _b(r["peak_allocated"]),
                         _b(r["peak_reserved"]), str(r["segments"]), big, flag])
        lines = [_grid(header, rows, ["<", "<", ">", ">", ">", "<", "<"])]
        if d.get("diff"):
            lines.append("")
            lines.append(f"rank {d['peak_rank']} against the median rank {d['median_rank']}:")
            lines.append(DiffReport(d["diff"]).table(limit=10))
        return "\n".join(lines)
