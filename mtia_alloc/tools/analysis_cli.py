"""The memory-debugging commands' arguments: `fit` (with `--sweep`), `diff` and `ranks`,
added to the main parser by tools.cli. Each command prints one error line and exits
non-zero on bad input (2), like the others; `fit` exits 3 when the workload does not fit.

Owns: add_commands. Relies on: tools.fit, tools.sweep, tools.diff, tools.ranks, tools.exit_status."""
from ..viz.frames import SiteKey
from . import diff as _diff
from . import fit as _fit
from . import ranks as _ranks
from . import sweep as _sweep
from .exit_status import USAGE, error

__all__ = ["add_commands"]


def _guard(fn):
    """Runs a command; bad input becomes one line on stderr and exit status 2."""
    def run(args):
        try:
            return fn(args)
        except (ValueError, OSError, RuntimeError) as e:
            error(f"{args.command}: {e}")
            return USAGE
    return run


def _fit_cmd(args):
    SiteKey(args.by)  # a bad --by fails before any work
    if not (args.sweep or args.grid):
        for flag, value in (("--plot", args.plot), ("--jobs", args.jobs)):
            if value is not None:
                raise ValueError(f"{flag} applies to --sweep only")
    work = _fit.load_workload(args.input, device=args.device, recorded_ooms=not args.skip_recorded_ooms)
    if args.sweep or args.grid:
        return _sweep.sweep_main(args, work)
    return _fit.fit_work(args, work)


def add_commands(sub):
    f = sub.add_parser("fit", help="will a snapshot's or trace's workload fit on a device of a given capacity?")
    f.add_argument("input", help="snapshot pickle / JSON (its device_traces), trace CSV or RMM log")
    f.add_argument("--memory", required=True, help="device capacity, e.g. 24GiB; 'recorded': what the recorded "
                                                   "run had when its first OOM was raised (reserved + device_free "
                                                   "of the oom entry): re-enacts and explains that OOM; 'auto': "
                                                   "twice what the workload can need, for measuring only")
    f.add_argument("--conf", default="", help="allocator settings (MTIA_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF syntax)")
    f.add_argument("--device", type=int, help="snapshot input: the device whose trace is replayed "
                                              "(default: the one with the most events)")
    f.add_argument("--by", default="site", help="call sites as site (default), file or frame:N")
    f.add_argument("--skip-recorded-ooms", action="store_true",
                   help="snapshot input: leave out the requests that failed in the recorded run (its oom "
                        "entries); the replay then measures what the run did (the summary's peaks)")
    f.add_argument("--json", action="store_true", help="one JSON document")
    f.add_argument("--sweep", action="store_true",
                   help="replay a grid of allocator settings in parallel and recommend one")
    f.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="with --sweep: the values of one setting (repeatable; replaces the default grid); "
                        "'none' = not set")
    f.add_argument("--jobs", type=int, help="with --sweep: worker processes (default: all cores)")
    f.add_argument("--plot", metavar="FILE", help="with --sweep: also write the sweep as HTML")
    f.set_defaults(func=_guard(_fit_cmd))

    d = sub.add_parser("diff", help="compare two snapshots per call site (live bytes at end and at peak)")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--by", default="site", help="site (default), file or frame:N (the first N user frames)")
    d.add_argument("--device", type=int, help="the device of both snapshots (default: the one with the most events)")
    d.add_argument("--json", action="store_true", help="one JSON document")
    d.add_argument("--limit", type=int, default=25, help="sites shown in the table (default 25)")
    d.add_argument("--plot", metavar="FILE", help="also write both timelines and the per-site chart as HTML")
    d.add_argument("--no-replay", action="store_true", help="skip the replays (peak reserved/allocated: n/a)")
    d.set_defaults(func=_guard(_diff.diff_main))

    r = sub.add_parser("ranks", help="compare the snapshots of several ranks: who peaks, and why")
    r.add_argument("snapshots", nargs="+")
    r.add_argument("--by", default="site", help="site (default), file or frame:N")
    r.add_argument("--device", type=int, help="the device of every snapshot (default: the one with the most events)")
    r.add_argument("--json", action="store_true", help="one JSON document")
    r.add_argument("--top", type=int, default=3, help="largest live allocations per rank (default 3)")
    r.set_defaults(func=_guard(_ranks.ranks_main))
