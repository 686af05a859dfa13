"""Command line: python -m mtia_alloc {replay,bench,summary,plot,fit,diff,ranks,slice,convert,peer}
(see --help; fit, diff and ranks are added by tools.analysis_cli, slice by tools.slice,
convert by tools.convert_cli, peer by tools.peer_build).

Every subcommand ends with one of the statuses of tools.exit_status (0 ok, 1 a replay that
ran out of memory where its trace did not, 2 usage or input error, 130 interrupted, 141
stdout closed early); errors are one `mtia_alloc: error: ...` line on stderr, with no
traceback and no usage text.

Owns: main (the argument parser; also the `mtia-alloc` console script), package_version,
and the replay command's checks, report and verdict. Relies on: tools.replay,
tools.peer_build, tools.shipped_traces (replay NAME),
tools.workload, tools.bench_suite, tools.snapshot_cli, tools.analysis_cli (fit, diff,
ranks), tools.slice, tools.convert_cli, tools.exit_status, viz.render (HTML names), _format,
_C, the façade (its __version__)."""
import argparse
import importlib.metadata
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import mtia_alloc as _package

from .. import _C
from .._format import format_size
from ..viz.render import is_html_name, not_html_message
from . import replay as _replay
from . import analysis_cli, convert_cli
from . import slice as _slice
from . import peer_build
from .bench_suite import run_bench
from .exit_status import (BROKEN_PIPE, FAILED, INTERRUPTED, OK, STATUS_HELP, USAGE, Failure, InputError, error,
                          note, warning)
from .output_path import check_output_path
from .shipped_traces import resolve_trace
from .snapshot_cli import plot_main, summary_main
from .workload import read_trace, write_csv


def _replay_cmd(args):
    bounds = (("--repeat", args.repeat, 1, MAX_REPEAT), ("--fail-after", args.fail_after, 0, 2**63 - 1),
              ("--fail-every", args.fail_every, 0, 2**63 - 1), ("--device", args.device, 0, 63))
    for name, v, low, high in bounds:
        if v is not None and not low <= v <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {v}")
    if args.fail_every and args.fail_after is None:
        raise ValueError("--fail-every needs --fail-after")
    if args.plot:
        _check_plot_path(args.plot)
    args.trace = resolve_trace(args.trace)  # a shipped trace by name (gpt2_generate, ...)
    if args.compare_torch is not None:
        harness = os.path.join(args.compare_torch, "bin", "harness")
        if not os.access(harness, os.X_OK):
            raise InputError(f"--compare-torch: no peer harness at {harness} (build it with "
                             f"python -m mtia_alloc peer build {args.compare_torch})")
    try:
        _replay.setup_allocator(args.memory, args.conf)
    except (ValueError, RuntimeError) as e:
        # name the input the bad value came from: the flag, or else the environment
        memory = "--memory" if args.memory else "MTIA_EMULATOR_MEMORY"
        conf = "--conf " if args.conf is not None else "MTIA_ALLOC_CONF="
        raise InputError(str(e).replace("memory_per_device", memory).replace("MTIA_ALLOC_CONF=", conf)) from None
    try:
        trace = read_trace(args.trace, device=args.device, rebuild=not args.no_rebuild, flush=not args.no_flush)
    except OSError as e:
        raise InputError(f"cannot read the trace {args.trace}: {e.strerror or e}") from None
    skipped = f"{trace.skipped} events skipped (sizes <= 0, frees of unknown ids, duplicate ids)"
    if trace.trace_events == 0:
        raise InputError(f"{args.trace}: no allocation events to replay" + (f" ({skipped})" if trace.skipped else ""))
    if trace.skipped and args.json:  # the text output reports them with the trace line
        warning(skipped)
    merge = args.streams == "merge"
    results = _replay.replay(trace, repeat=args.repeat, latency=args.latency, merge_streams=merge,
                             fail_after=args.fail_after, fail_every=args.fail_every)
    curve = results[0].pop("_curve", None)
    peer = None
    if args.compare_torch:
        try:
            peer = _peer(args, trace)
        except (RuntimeError, OSError) as e:  # it ran and failed (or timed out)
            raise Failure(f"--compare-torch: {e}") from None
        if trace.prefix or trace.flushes:
            # same corrections as ours: the prefix's device allocations (the same in both
            # allocators by construction) and the flushes' failed allocations are taken off
            for p in peer:
                p["events"] -= trace.prefix
                p["num_device_alloc"] -= results[0]["prefix_device_alloc"]
                for k in ("num_ooms", "num_alloc_retries", "ooms_caught"):
                    p[k] = max(0, p.get(k, 0) - len(trace.flushes))
    info = trace.info
    if args.plot:
        if curve is None:
            curve = _replay.memory_curve(trace, 0, merge, args.fail_after, args.fail_every)
        notes = [f"input: {args.trace} ({info.get('format', '?')}), streams {args.streams}, "
                 f"MTIA_ALLOC_CONF={os.environ.get('MTIA_ALLOC_CONF', '')!r}"]
        if trace.prefix:
            notes.append(_start_note(trace))
        if trace.flushes:
            notes.append(f"{len(trace.flushes)} cache flushes where the recorded run released segments")
        with open(args.plot, "w", encoding="utf-8") as f:
            f.write(_replay.plot_html(curve, f"Replay of {os.path.basename(args.trace)}", results, notes))
    if args.json:
        for r in results:
            print(json.dumps({k: r[k] for k in _replay.RESULT_KEYS}))
        for p in peer or ():
            print(json.dumps({k: ("torch." + str(p.get(k))) if k == "mode" else p.get(k)
                              for k in _replay.RESULT_KEYS}))
        if args.plot:
            note(f"wrote {args.plot}")
        return _verdict(args, trace, results)
    fb = format_size
    fmt = info.get("format", "?")
    if fmt == "snapshot":
        fmt = f"snapshot, device {info['device']}, {info['entries']} trace entries"
    allocs = int((trace.sizes[trace.prefix:] != 0).sum()) - len(trace.flushes)
    print(f"trace: {args.trace} ({fmt})  events: {trace.trace_events}  allocations: {allocs}  "
          f"streams: {len(trace.stream_values)} ({args.streams})  skipped lines: {trace.skipped}")
    if info.get("recorded_ooms") and info.get("format") == "rmm":
        print(f"recorded OOMs: {info['recorded_ooms']} ('allocate failure' lines, not replayed; as many failed "
              f"allocations in the replay are expected)")
    if fmt.startswith("snapshot"):
        if trace.flushes:
            print(f"cache flushes: {len(trace.flushes)} (where the recorded run released segments: "
                  f"{info['segment_free']} segment_free entries; counted as events, not as OOMs or retries)")
        if trace.prefix:
            print(_start_note(trace))
        elif not args.no_rebuild:
            print("starting state: empty (no segment or live block predates the trace)")
        if info.get("recorded_ooms"):
            print(f"recorded OOMs: {info['recorded_ooms']} ('oom' entries in the trace; as many failed "
                  f"allocations in the replay are expected)")
        if info.get("settings"):
            print(f"snapshot allocator settings: {info['settings']!r} (this replay: "
                  f"{os.environ.get('MTIA_ALLOC_CONF', '')!r})")
    for i, r in enumerate(results):
        label = r["mode"]
        print(f"{label}.events: {r['events']}")
        print(f"{label}.ns_per_op: {r['ns_per_op']:.2f}  thread_cpu_ns_per_op: {r['thread_cpu_ns_per_op']:.2f}")
        if args.latency:
            for kind in ("alloc", "free"):
                if f"{kind}_latency_p50_ns" in r:
                    print(f"{label}.{kind}_latency_ns: p50 {r[kind + '_latency_p50_ns']:.0f}  "
                          f"p99 {r[kind + '_latency_p99_ns']:.0f}")
        print(f"{label}.peak_requested_bytes: {r['peak_requested_bytes']} ({fb(r['peak_requested_bytes'])})")
        print(f"{label}.peak_allocated_bytes: {r['peak_allocated_bytes']} ({fb(r['peak_allocated_bytes'])})")
        print(f"{label}.peak_reserved_bytes: {r['peak_reserved_bytes']} ({fb(r['peak_reserved_bytes'])})")
        ratio = r["peak_reserved_bytes"] / r["peak_allocated_bytes"] if r["peak_allocated_bytes"] else 0.0
        print(f"{label}.reserved_over_allocated: {ratio:.4f}")
        print(f"{label}.num_device_alloc: {r['num_device_alloc']}  num_device_free: {r['num_device_free']}")
        if fmt.startswith("snapshot"):
            same = "same" if r["num_device_alloc"] == info["segment_alloc"] else "DIFFERENT"
            print(f"{label}.snapshot_segment_alloc: {info['segment_alloc']}  (replay num_device_alloc "
                  f"{r['num_device_alloc']}: {same})  snapshot_segment_free: {info['segment_free']}")
        if "recorded_peak_reserved" in info:
            for what, key in (("reserved", "peak_reserved_bytes"), ("requested", "peak_requested_bytes")):
                rec = info[f"recorded_peak_{what}"]
                print(f"{label}.snapshot_peak_{what}_bytes: {rec} ({fb(rec)}; replay "
                      f"{'same' if rec == r[key] else f'{r[key] - rec:+d} bytes'})")
        print(f"{label}.num_alloc_retries: {r['num_alloc_retries']}  num_ooms: {r['num_ooms']}")
        if r["first_failing_event"] >= 0:
            k = trace.prefix + r["first_failing_event"]
            stream = trace.stream_values[int(trace.streams[k])]
            print(f"{label}.first_failing_event: {r['first_failing_event']} (allocation of "
                  f"{int(trace.sizes[k])} bytes, stream {stream})")
        if r.get("prefix_failure"):
            print(f"{label}.prefix_failure: rebuilding the starting state ran out of memory (the device is "
                  f"smaller than the snapshot's state: give it more --memory)")
        if r.get("time_includes_prefix"):
            print(f"{label}.note: time per op averaged over the trace and its {trace.prefix}-event prefix "
                  f"(this build's native replay cannot leave the prefix untimed)")
        if r.get("skipped_frees"):
            print(f"{label}.skipped_frees: {r['skipped_frees']} (frees of allocations that failed)")
        if peer and i < len(peer):
            p = peer[i]
            cpu = p["thread_cpu_ns_per_op"] / r["thread_cpu_ns_per_op"] if r["thread_cpu_ns_per_op"] else 0.0
            print(f"{label}.torch: thread_cpu_ns_per_op {p['thread_cpu_ns_per_op']:.2f} ({cpu:.1f}x ours)  "
                  f"peak_reserved {p['peak_reserved_bytes']} "
                  f"({'same' if p['peak_reserved_bytes'] == r['peak_reserved_bytes'] else 'DIFFERENT'})  "
                  f"num_device_alloc {p['num_device_alloc']} "
                  f"({'same' if p['num_device_alloc'] == r['num_device_alloc'] else 'DIFFERENT'})")
    if peer and trace.prefix:
        print(f"note: the torch harness replays the {trace.prefix} events that rebuild the starting state "
              f"timed and inside its peaks; its events and counters are corrected for them and for the "
              f"cache flushes")
    if args.plot:
        print(f"plot: wrote {args.plot}")
    return _verdict(args, trace, results)


def _verdict(args, trace, results):
    """The replay's exit status, once its report is out: FAILED (with one error line) when a
    pass could not rebuild a snapshot's starting state, or met more out-of-memory failures
    than the trace records (failures injected with --fail-after are expected); OK otherwise,
    and always with --allow-oom."""
    if args.allow_oom:
        return OK
    capacity = format_size(_C.mem_get_info(0)[1])
    hint = "give it more --memory, or pass --allow-oom to accept out-of-memory failures"
    for r in results:
        if r.get("prefix_failure"):
            info = trace.info
            error(f"{r['mode']}: the snapshot's starting state ({info.get('start_segments', 0)} segments, "
                  f"{format_size(info.get('start_reserved', 0))}) does not fit on the device ({capacity}): "
                  f"{hint}")
            return FAILED
    if args.fail_after is not None:
        return OK
    recorded = trace.info.get("recorded_ooms", 0)
    worst = max(results, key=lambda r: r["num_ooms"])
    n = worst["num_ooms"]
    if n > recorded:
        first = worst["first_failing_event"]
        where = f", the first at event {first}" if first >= 0 else ""
        rec = f" ({recorded} recorded in the trace)" if recorded else ""
        error(f"the replay ran out of memory: {n} allocation{'s' if n != 1 else ''} failed in {worst['mode']}"
              f"{rec}{where}, on a device of {capacity}: {hint}")
        return FAILED
    return OK


MAX_REPEAT = 100_000  # every pass's figures are kept until the end


def _check_plot_path(path):
    """Refuses a --plot file that cannot be written, before the replay runs."""
    if not is_html_name(path):
        raise ValueError(f"--plot: {not_html_message(path)}")
    check_output_path(path, "--plot")


def _start_note(trace):
    info = trace.info
    orphans = f" ({info['orphan_blocks']} outside any segment)" if info.get("orphan_blocks") else ""
    return (f"starting state (rebuilt from the snapshot): {info['start_segments']} segments "
            f"({format_size(info['start_reserved'])}), {info['start_live_blocks']} live blocks "
            f"({format_size(info['start_live_bytes'])}){orphans}; replayed first as {trace.prefix} synthetic "
            f"events, left out of events, time and counters (the peaks include the state)")


def _peer(args, trace):
    """The peer harness's results on the same input (it reads the shared CSV format only:
    other inputs are converted, a snapshot's prefix included)."""
    capacity = _C.mem_get_info(0)[1]
    if trace.info.get("format") == "csv":
        return _replay.run_peer(args.compare_torch, args.trace, args.repeat, capacity, args.conf)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.csv")
        write_csv(trace, path)
        return _replay.run_peer(args.compare_torch, path, args.repeat, capacity, args.conf,
                                empty_between=trace.info.get("format") == "snapshot")


def _bench_cmd(args):
    for flag, path in (("--torch-build", args.torch_build), ("--traces", args.traces)):
        if path is not None and not os.path.isdir(path):
            raise InputError(f"{flag}: no directory {path}")
    return run_bench(quick=args.quick, torch_build=args.torch_build, traces_dir=args.traces)


def _summary_cmd(args):
    return summary_main(args.snapshot)


def _plot_cmd(args):
    return plot_main(args.snapshot, args.output)


def package_version():
    """This package's version: its installed metadata when this very package is the installed
    one, else mtia_alloc.__version__, else pyproject.toml's (a checkout that is not installed)."""
    here = Path(_package.__file__).resolve().parent
    try:
        dist = importlib.metadata.distribution("mtia_alloc")
        if Path(dist.locate_file("mtia_alloc")).resolve() == here:
            return dist.version
    except (importlib.metadata.PackageNotFoundError, OSError, TypeError, ValueError):
        pass
    version = getattr(_package, "__version__", None)
    if version:
        return str(version)
    try:
        m = re.search(r'^version\s*=\s*"([^"]+)"', (here.parent / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    except OSError:
        m = None
    return m[1] if m else "unknown"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `mtia_alloc: error: ...` line (raised, printed by main), not argparse's
    usage text and exit."""

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


# options that take a value which may start with '-' (argparse takes `--memory -5GiB` for two
# options; the value is joined to its flag so that the value's own check can refuse it)
_VALUE_OPTIONS = ("--memory", "--repeat", "--fail-after", "--fail-every", "--device")


def _join_dash_values(argv):
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in _VALUE_OPTIONS and i + 1 < len(argv) and re.match(r"-\d", argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _parser():
    p = _Parser(prog="python -m mtia_alloc", epilog=STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="mtia_alloc: a caching allocator for an emulated MTIA device")
    p.add_argument("--version", action="version", version=f"mtia_alloc {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{replay,bench,summary,plot}")

    r = sub.add_parser("replay", help="replay an allocation trace natively and report speed and memory",
                       epilog=STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("trace", help="trace CSV (op,id,size_bytes[,stream]; .gz ok), RMM log CSV, or snapshot "
                                 "(pickle or JSON with device_traces); or the name of a trace shipped with "
                                 "mtia_alloc (gpt2_generate, gpt2_train, resnet50_train, rmm_random_100k_4MiB, "
                                 "rmm_random_100k_1MiB_2streams)")
    r.add_argument("--repeat", type=int, default=1,
                   help="passes; pass 1 starts cold and later ones reuse the cache (a snapshot's passes "
                        "each start from its rebuilt state)")
    r.add_argument("--json", action="store_true", help="one JSON object per pass (the peer harness's keys)")
    r.add_argument("--latency", action="store_true", help="also report p50/p99 per-op latency")
    r.add_argument("--memory", help="device capacity, e.g. 80GiB (default: MTIA_EMULATOR_MEMORY or 80GiB)")
    r.add_argument("--conf", help="allocator settings (default: MTIA_ALLOC_CONF)")
    r.add_argument("--streams", choices=("keep", "merge"), default="keep",
                   help="keep the trace's streams (default) or replay every event on the default stream")
    r.add_argument("--merge-streams", dest="streams", action="store_const", const="merge",
                   help="same as --streams merge")
    r.add_argument("--device", type=int, help="snapshot input: the device whose trace is replayed "
                                              "(default: the one with the most events)")
    r.add_argument("--no-rebuild", action="store_true",
                   help="snapshot input: do not rebuild the segments and blocks that predate the trace")
    r.add_argument("--no-flush", action="store_true",
                   help="snapshot input: do not release the cache where the recorded run released segments "
                        "(empty_cache, OOM retries)")
    r.add_argument("--plot", metavar="FILE", help="also write reserved and allocated bytes over the replay "
                                                  "as a self-contained HTML/SVG file (extra untimed pass)")
    r.add_argument("--compare-torch", metavar="BUILD_DIR", help="also run PyTorch's allocator (peer harness)")
    r.add_argument("--fail-after", type=int, metavar="N",
                   help="inject a device-allocation failure after N device allocations of the trace "
                        "(the out-of-memory failures that follow are expected: exit status 0)")
    r.add_argument("--fail-every", type=int, default=0, metavar="N", help="then fail every N-th allocation")
    r.add_argument("--allow-oom", action="store_true",
                   help="exit 0 even when allocations fail with out-of-memory where the trace did not, or a "
                        "snapshot's starting state does not fit (they are still reported)")
    r.set_defaults(func=_replay_cmd)

    b = sub.add_parser("bench", help="run the standard benchmark set and print a table")
    b.add_argument("--quick", action="store_true", help="fewer iterations, a 5k-allocation generated workload")
    b.add_argument("--torch-build", help="peer harness build dir (default: $MTIA_TORCH_PEER, or the default "
                                         "folder of `peer build` when built there)")
    b.add_argument("--traces", help="directory of traces, *.csv.gz (default: ../shared/traces when present, "
                                    "else the traces shipped with mtia_alloc; the table's note says which)")
    b.set_defaults(func=_bench_cmd)

    s = sub.add_parser("summary", help="print the memory summary of a snapshot pickle")
    s.add_argument("snapshot")
    s.set_defaults(func=_summary_cmd)

    pl = sub.add_parser("plot", help="draw segments and memory over time of a snapshot pickle (HTML)")
    pl.add_argument("snapshot")
    pl.add_argument("-o", "--output", required=True)
    pl.set_defaults(func=_plot_cmd)
    analysis_cli.add_commands(sub)  # fit (--sweep), diff, ranks
    _slice.add_command(sub)
    convert_cli.add_command(sub)  # .mtrace -> snapshot
    peer_build.add_commands(sub)  # peer build
    return p


def _run(argv):
    try:
        args = _parser().parse_args(_join_dash_values(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as e:  # --help, --version
        return OK if e.code is None else e.code
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except (InputError, Failure) as e:
        error(e)
        return e.status
    except (ValueError, OSError) as e:  # input the checks above did not foresee
        error(e)
        return USAGE
    except RuntimeError as e:  # something failed while running
        error(e)
        return FAILED


def main(argv=None):
    """Runs the command line; returns its exit status (see exit_status)."""
    try:
        try:
            status = _run(argv)
        except InputError as e:  # a usage error
            error(e)
            status = USAGE
        sys.stdout.flush()  # here, not at exit: a closed pipe must be caught below
        return status
    except BrokenPipeError:
        # the reader went away (`| head`): no message; stdout goes to devnull so that the
        # interpreter's own last flush does not complain either
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return BROKEN_PIPE
    except KeyboardInterrupt:
        note("interrupted")
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
