"""Text formatting of byte counts and the memory_summary table: the one home of each.

Owns:
  format_size    PyTorch's C++ format_size ('1024 bytes', '1.00 KiB', '1024.00 KiB',
                 '2.00 MiB', '3.00 GiB'), the wording of the allocator's own messages (OOM);
                 the core's function (_C.format_size_), so Python and C++ never disagree.
  format_bytes   the snapshot view's and the plots' format: the unit changes at 1024 exactly
                 ('1.00 KiB' for 1024 bytes), goes on to TiB and PiB, and takes negative
                 numbers (differences). A different format from format_size, on purpose: the
                 view reads like PyTorch's memory_viz, the messages like PyTorch's allocator.
  summary_table  torch.cuda.memory_summary's table from a flat memory_stats()-shaped dict
                 (memory_summary() of the live allocator and Snapshot.summary() both use it).
Relies on: _C.format_size_ and _errors.as_integer only; no allocator state."""
import textwrap

from . import _C
from ._errors import as_integer

__all__ = ["format_size", "format_bytes", "summary_table"]


def format_size(size):
    """PyTorch's format_size: '1024 bytes', '1.00 KiB', '2.00 MiB', '3.00 GiB'."""
    n = as_integer(size)
    if n is None or n < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    size = n
    if size >= 1 << 64:  # beyond the native uint64: the same format, in Python
        return f"{size / (1 << 30):.2f} GiB"
    return _C.format_size_(size)


def format_bytes(n):
    """'512 bytes', '1.00 KiB' (from 1024 on), '1.50 MiB', ... up to PiB; negative numbers too."""
    n = int(n)
    if abs(n) < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if abs(value) < 1024.0 or unit == "PiB":
            return f"{value:.2f} {unit}"
    return f"{n} bytes"  # not reached


def _scaled(value, ref, prefixes, limit, step):
    """value scaled down by `step` while the reference value ref is at least `limit`, and
    the prefix it ends at (torch.cuda.memory's _format_size / _format_count)."""
    prefix = prefixes[0]
    for new_prefix in prefixes[1:]:
        if ref < limit:
            break
        prefix = new_prefix
        value //= step
        ref /= step
    return value, prefix


def _fmt_size(sz, pref_sz):
    """A table cell in bytes, scaled as torch.cuda.memory's _format_size(sz, pref_sz)."""
    sz, prefix = _scaled(sz, pref_sz, ["B  ", "KiB", "MiB", "GiB", "TiB", "PiB"], 768 * 1024, 1024)
    return f"{sz:6d} {prefix}"


def _fmt_count(cnt, pref_cnt):
    """A table cell that counts, scaled as torch.cuda.memory's _format_count(cnt, pref_cnt)."""
    cnt, prefix = _scaled(cnt, pref_cnt, [" ", "K", "M"], 750 * 1000, 1000)
    return f"{cnt:7d} {prefix} "


_METRICS = [
    ("allocated_bytes", "Allocated memory", _fmt_size),
    ("active_bytes", "Active memory", _fmt_size),
    ("requested_bytes", "Requested memory", _fmt_size),
    ("reserved_bytes", "Device reserved memory", _fmt_size),
    ("inactive_split_bytes", "Non-releasable memory", _fmt_size),
    ("allocation", "Allocations", _fmt_count),
    ("active", "Active allocs", _fmt_count),
    ("segment", "Device reserved segments", _fmt_count),
    ("inactive_split", "Non-releasable allocs", _fmt_count),
]


def _cell(fmt, v, r):
    """A table cell; None (a figure that cannot be known) prints as n/a."""
    if v is None:
        return f"{'n/a':>10}"
    return fmt(v, v if r is None else r)


def summary_table(stats, device, abbreviated=False, kind="MTIA", notes=()):
    """The torch.cuda.memory_summary table of a flat stats dict, with MTIA wording (or the
    device kind `kind` names: "CUDA", ...; "" when unknown). A value of None is a figure that
    cannot be known: its cell says n/a. `notes`: lines added under the table."""
    # PyTorch's layout, with the metric column widened from 21 to 24 for "Device reserved memory"
    width = 78
    title = f"PyTorch {kind + ' ' if kind else ''}memory summary, device ID {device}"
    ooms, retries = stats.get("num_ooms", 0), stats.get("num_alloc_retries", 0)
    ooms = "n/a" if ooms is None else str(ooms)
    retries = "n/a" if retries is None else str(retries)
    lines = ["=" * width, f" {'':16} {title:<60}"[:width], "-" * width,
             f"  {'':9} {(kind or 'Device') + ' OOMs:':<10} {ooms:<12} | {'':6} "
             f"device alloc retries: {retries:<9}  "[:width],
             "=" * width, "        Metric            | Cur Usage  | Peak Usage | Tot Alloc  | Tot Freed  "]
    lines = [line.ljust(width) for line in lines]
    for key, name, fmt in _METRICS:
        lines.append("-" * width)
        subs = [("all", name)]
        if not abbreviated:
            subs += [("large_pool", "      from large pool"), ("small_pool", "      from small pool")]
        ref = None
        for sub, sub_name in subs:
            vals = [stats.get(f"{key}.{sub}.{f}", 0) for f in ("current", "peak", "allocated", "freed")]
            ref = ref or vals
            cells = " | ".join(_cell(fmt, v, r) for v, r in zip(vals, ref))
            lines.append(f" {sub_name:<24} | {cells} ")
    for key, name in (("oversize_allocations", "Oversize allocations"), ("oversize_segments", "Oversize Device segments")):
        lines.append("-" * width)
        vals = [stats.get(f"{key}.{f}", 0) for f in ("current", "peak", "allocated", "freed")]
        lines.append(f" {name:<24} | " + " | ".join(_cell(_fmt_count, v, v) for v in vals) + " ")
    lines.append("=" * width)
    for note in notes:
        lines.extend(f" {part}".ljust(width) for part in textwrap.wrap(note, width - 2))
    if notes:
        lines.append("=" * width)
    return "|" + "|\n|".join(lines) + "|\n"
