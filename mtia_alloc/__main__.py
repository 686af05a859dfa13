"""Command line: python -m mtia_alloc {replay,bench,summary,plot} (see --help)."""
import argparse
import json
import sys


def _replay_cmd(args):
    from . import _replay, emulator
    from ._trace import read_trace
    _replay.setup_allocator(args.memory, args.conf)
    if args.fail_after is not None:
        emulator.fail_device_allocations(after_n=args.fail_after, every=args.fail_every, device=0)
    trace = read_trace(args.trace)
    results = _replay.replay(trace, repeat=args.repeat, latency=args.latency, merge_streams=args.merge_streams)
    peer = None
    if args.compare_torch:
        from ._C import mem_get_info
        capacity = mem_get_info(0)[1]
        peer = _replay.run_peer(args.compare_torch, args.trace, args.repeat, capacity, args.conf)
    if args.json:
        for r in results:
            print(json.dumps({k: r[k] for k in _replay.RESULT_KEYS}))
        if peer:
            for r in peer:
                print(json.dumps({"peer": "torch", **{k: r.get(k) for k in _replay.RESULT_KEYS}}))
        return 0
    fb = _replay.fmt_bytes
    print(f"trace: {args.trace}  events: {trace.events}  allocations: {trace.nslots}  "
          f"streams: {len(trace.stream_values)}  skipped lines: {trace.skipped}")
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
        print(f"{label}.num_alloc_retries: {r['num_alloc_retries']}  num_ooms: {r['num_ooms']}")
        if r["first_failing_event"] >= 0:
            print(f"{label}.first_failing_event: {r['first_failing_event']}")
        if peer and i < len(peer):
            p = peer[i]
            cpu = p["thread_cpu_ns_per_op"] / r["thread_cpu_ns_per_op"] if r["thread_cpu_ns_per_op"] else 0.0
            print(f"{label}.torch: thread_cpu_ns_per_op {p['thread_cpu_ns_per_op']:.2f} ({cpu:.1f}x ours)  "
                  f"peak_reserved {p['peak_reserved_bytes']} "
                  f"({'same' if p['peak_reserved_bytes'] == r['peak_reserved_bytes'] else 'DIFFERENT'})  "
                  f"num_device_alloc {p['num_device_alloc']} "
                  f"({'same' if p['num_device_alloc'] == r['num_device_alloc'] else 'DIFFERENT'})")
    return 0


def _bench_cmd(args):
    from .bench_suite import run_bench
    return run_bench(quick=args.quick, torch_build=args.torch_build, traces_dir=args.traces)


def _summary_cmd(args):
    from .snapshot import summary_main
    return summary_main(args.snapshot)


def _plot_cmd(args):
    from .snapshot import plot_main
    return plot_main(args.snapshot, args.output)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mtia_alloc",
                                description="mtia_alloc: a caching allocator for an emulated MTIA device")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("replay", help="replay an allocation trace natively and report speed and memory")
    r.add_argument("trace", help="trace CSV (op,id,size[,stream]; .gz ok), RMM log CSV, or snapshot pickle")
    r.add_argument("--repeat", type=int, default=1, help="passes without emptying the cache (1 = cold)")
    r.add_argument("--json", action="store_true", help="one JSON object per pass (the peer harness's keys)")
    r.add_argument("--latency", action="store_true", help="also report p50/p99 per-op latency")
    r.add_argument("--memory", help="device capacity, e.g. 80GiB (default: MTIA_EMULATOR_MEMORY or 80GiB)")
    r.add_argument("--conf", help="allocator settings (default: MTIA_ALLOC_CONF)")
    r.add_argument("--merge-streams", action="store_true", help="replay every event on the default stream")
    r.add_argument("--compare-torch", metavar="BUILD_DIR", help="also run PyTorch's allocator (peer harness)")
    r.add_argument("--fail-after", type=int, help="inject a device-allocation failure after N allocations")
    r.add_argument("--fail-every", type=int, default=0, help="then fail every N-th allocation")
    r.set_defaults(func=_replay_cmd)

    b = sub.add_parser("bench", help="run the standard benchmark set and print a table")
    b.add_argument("--quick", action="store_true", help="fewer iterations")
    b.add_argument("--torch-build", help="peer harness build dir (default: $MTIA_TORCH_PEER or "
                                         "/tmp/torch_caching_allocator_peer when present)")
    b.add_argument("--traces", help="directory of shared traces (default: ../shared/traces when present)")
    b.set_defaults(func=_bench_cmd)

    s = sub.add_parser("summary", help="print the memory summary of a snapshot pickle")
    s.add_argument("snapshot")
    s.set_defaults(func=_summary_cmd)

    pl = sub.add_parser("plot", help="draw segments and memory over time of a snapshot pickle (HTML)")
    pl.add_argument("snapshot")
    pl.add_argument("-o", "--output", required=True)
    pl.set_defaults(func=_plot_cmd)

    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
