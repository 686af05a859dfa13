"""`python -m mtia_alloc slice SNAPSHOT --from T0 --to T1 -o OUT.pickle` (times in µs, as the
trace entries' time_us; or `--events A:B`, entry indices of one device, B exclusive): a
snapshot of that window of the recording. Its trace is the window's entries; its segments
and blocks are the real state at the window's end, so that undoing the window (what
PyTorch's memory viewer and our replay do) starts from the real state at T0: no block of
the window is an orphan, and its figures at T0 and over the window (and so its peak) are
the whole snapshot's. Written as a protocol-4 pickle (the memory_viz page refuses 5),
streamed from the columns, so a window of millions of entries is written in bounded memory.

Bad input (an unreadable or truncated snapshot, a window outside the recording, an output
that cannot be written) is one `mtia_alloc: error: ...` line and exit status 2.

Owns: add_command, slice_main. Relies on: viz (load, timeline, columns, model),
tools.exit_status."""
import os

from .._format import format_bytes
from ..viz.columns import write_pickle
from ..viz.load import normalize
from ..viz.model import Snapshot
from ..viz.timeline import window
from .exit_status import OK, USAGE, error
from .output_path import check_output_path

__all__ = ["add_command", "slice_main"]


def _events(text):
    a, sep, b = text.partition(":")
    if not sep:
        raise ValueError(f"--events takes A:B (entry indices, B exclusive; either may be left out), got {text!r}")
    try:
        return (int(a) if a.strip() else None, int(b) if b.strip() else None)
    except ValueError:
        raise ValueError(f"--events takes A:B with whole numbers, got {text!r}") from None




def slice_main(args):
    if args.events is not None and (args.t0 is not None or args.t1 is not None):
        raise ValueError("give the window as --from/--to (µs) or as --events A:B, not both")
    if args.events is None and args.t0 is None and args.t1 is None:
        raise ValueError("give the window: --from T0 --to T1 (µs, as the entries' time_us) or --events A:B")
    events = _events(args.events) if args.events is not None else None
    check_output_path(args.output, "-o")
    if not os.path.exists(args.snapshot):
        raise ValueError(f"{args.snapshot}: no such file")
    try:
        snap = normalize(args.snapshot)
    except (ValueError, TypeError, KeyError, EOFError) as e:
        text = str(e)
        raise ValueError(text if text.startswith(f"{args.snapshot}:") else f"{args.snapshot}: {text}") from None
    out, info = window(snap, args.t0, args.t1, events, args.device)
    try:
        write_pickle(args.output, out)
    except OSError as e:
        raise ValueError(f"-o: cannot write {args.output}: {e.strerror or e}") from None
    view = Snapshot(out)
    for d, (a, b) in sorted(info["bounds"].items()):
        if b > a:
            segs = [s for s in out["segments"] if s["device"] == d]
            print(f"device {d}: entries {a} to {b - 1} ({b - a} entries); state at the end: {len(segs)} segments, "
                  f"{format_bytes(sum(s['total_size'] for s in segs))} reserved")
    print(f"wrote {args.output}: {view!r}")
    if info["orphans"]:
        print(f"note: {info['orphans']} live blocks lie in no segment of the state (left out)")
    return OK


def _guard(fn):
    def run(args):
        try:
            return fn(args)
        except (ValueError, OSError, TypeError) as e:
            error(f"slice: {e}")
            return USAGE
    return run


def add_command(sub):
    s = sub.add_parser("slice", help="write the snapshot of a time window (--from/--to µs) or entry range (--events)")
    s.add_argument("snapshot")
    s.add_argument("--from", dest="t0", type=int, metavar="T0", help="window start, µs (as time_us)")
    s.add_argument("--to", dest="t1", type=int, metavar="T1", help="window end, µs, inclusive")
    s.add_argument("--events", metavar="A:B", help="entry indices of the device instead (B exclusive)")
    s.add_argument("--device", type=int, help="the device --events counts (default: the one with the most entries)")
    s.add_argument("-o", "--output", required=True, help="the pickle to write (protocol 4)")
    s.set_defaults(func=_guard(slice_main))
