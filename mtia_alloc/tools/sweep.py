"""`python -m mtia_alloc fit INPUT --memory 24GiB --sweep [--grid KEY=V1,V2 ...]`: choosing
allocator settings without trial and error on hardware. Every combination of a grid of
settings is replayed on a fresh allocator of the given capacity, one process per setting
(each replay needs an allocator of its own), on all cores; the table is sorted by peak
reserved, with OOM yes/no, retries and device allocations, and names the recommended
setting (the lowest peak reserved that does not run out of memory).

The default grid: expandable_segments False/True x max_split_size_mb none/64/128/256/512 x
garbage_collection_threshold none/0.6/0.8 x roundup_power2_divisions none/4/8. Combinations
PyTorch ignores are reported, not run: a garbage_collection_threshold without a memory
fraction below 1 (PyTorch collects only under per_process_memory_fraction), and
max_split_size_mb or garbage collection with expandable segments (both skip expandable
blocks). Combinations it refuses (a bad value in a --grid) are reported with its message.

Owns: DEFAULT_GRID, parse_grid, plan, run_parallel, sweep, sweep_main.
Relies on: tools.fit (the replay engine), viz.reports (SweepReport), _C."""
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import time

from .. import _C
from ..viz.render import is_html_name, not_html_message
from ..viz.reports import SweepReport
from . import fit as _fit

__all__ = ["DEFAULT_GRID", "parse_grid", "plan", "run_parallel", "sweep", "sweep_main"]

DEFAULT_GRID = (
    ("expandable_segments", ("False", "True")),
    ("max_split_size_mb", ("none", "64", "128", "256", "512")),
    ("garbage_collection_threshold", ("none", "0.6", "0.8")),
    ("roundup_power2_divisions", ("none", "4", "8")),
)
_DEFAULTS = {"expandable_segments": "False"}  # values that equal "not set"


def parse_grid(specs):
    """[("key", (values...)), ...] from --grid KEY=V1,V2 arguments."""
    out = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not key or not vals:
            raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. max_split_size_mb=none,128)")
        if any(k == key for k, _ in out):
            raise ValueError(f"--grid: {key} given twice")
        out.append((key, vals))
    return tuple(out)


def _conf_items(conf):
    items = {}
    for part in (conf or "").split(","):
        k, _, v = part.partition(":")
        if k.strip():
            items[k.strip()] = v.strip()
    return items


def plan(grid, base_conf=""):
    """The sweep's rows before running: each {setting, conf, status ("run" / "ignored"), note,
    same_as}. `setting` is the grid's part of the settings string ("" = all defaults)."""
    base = _conf_items(base_conf)
    try:
        fraction = float(base.get("per_process_memory_fraction", "1"))
    except ValueError:
        fraction = 1.0
    rows, seen = [], {}
    keys = [k for k, _ in grid]
    for combo in itertools.product(*(vals for _, vals in grid)):
        chosen = {k: v for k, v in zip(keys, combo) if v.lower() != "none" and _DEFAULTS.get(k) != v}
        effective = dict(chosen)
        notes = []
        expandable = {**base, **chosen}.get("expandable_segments") == "True"
        if "garbage_collection_threshold" in chosen and not fraction < 1:
            notes.append("PyTorch collects garbage only under a memory fraction < 1 "
                         "(per_process_memory_fraction in --conf)")
            effective.pop("garbage_collection_threshold")
        if expandable:
            for k in ("max_split_size_mb", "garbage_collection_threshold"):
                if k in effective:
                    notes.append(f"{k} does not apply to expandable segments")
                    effective.pop(k)
        setting = ",".join(f"{k}:{v}" for k, v in chosen.items())
        eff = ",".join(f"{k}:{v}" for k, v in effective.items())
        conf = ",".join(x for x in (base_conf, eff) if x)
        if notes:
            rows.append({"setting": setting, "conf": conf, "status": "ignored", "same_as": eff,
                         "note": "; ".join(notes) + f": same as {eff or '(defaults)'}"})
        elif setting not in seen:
            seen[setting] = True
            rows.append({"setting": setting, "conf": conf, "status": "run", "note": "", "order": len(rows)})
    return rows


# ------------------------------------------------------------------ parallel replays

_WORKS = {}  # inherited by forked workers: job id -> Workload


def _job(spec):
    """One replay in a worker process (fresh allocator): spec = (work id or path, device,
    memory, conf, stop_at_failure)."""
    key, path, device, memory, conf, stop = spec
    try:
        work = _WORKS.get(key) or _fit.load_workload(path, device=device)
        _fit.setup(memory, conf)
        r = _fit.run(work, stop_at_failure=stop)
        if not stop:
            r.pop("stats", None)
        return r
    except (ValueError, RuntimeError) as e:
        return {"error": str(e)}


def _child(fn, spec, conn):
    try:
        t0 = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        out = fn(spec)
        if isinstance(out, dict):
            out["_busy"] = (t0, time.monotonic(), time.process_time())
        conn.send(out)
    except BaseException as e:  # noqa: B902 - reported to the parent, never raised there
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def run_parallel(specs, workers=None, fn=None):
    """Runs fn(spec) (default _job) for every spec, each in a process of its own (one replay
    per process, so each has a fresh allocator), `workers` at a time (default: all cores),
    and returns the results in order. Workloads reach the workers by fork when this process
    has not started the allocator (its threads would not survive a fork), else the workers
    are spawned and reload them from their paths."""
    if not specs:
        return []
    fn = fn or _job
    workers = max(1, min(len(specs), workers or os.cpu_count() or 1))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and not _C.is_initialized() else "spawn"
    if method == "spawn" and fn is _job:
        specs = [(None,) + tuple(s[1:]) for s in specs]
    ctx = multiprocessing.get_context(method)
    results = [None] * len(specs)
    pending = list(enumerate(specs))
    running = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                i, spec = pending.pop(0)
                r, w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(fn, spec, w), daemon=True)
                p.start()
                w.close()
                running[r] = (i, p)
            for r in multiprocessing.connection.wait(list(running)):
                i, p = running.pop(r)
                try:
                    results[i] = r.recv()
                except EOFError:
                    p.join()
                    results[i] = {"error": f"the worker process died (exit status {p.exitcode})"}
                r.close()
                p.join()
    finally:
        for r, (_, p) in running.items():
            p.kill()
            p.join()
            r.close()
    return results


def share(work):
    """A key under which forked workers find `work`."""
    key = f"w{len(_WORKS)}"
    _WORKS[key] = work
    return key


def sweep(work, memory, grid=DEFAULT_GRID, base_conf="", workers=None):
    """Replays `work` under every setting of the grid; returns the SweepReport data."""
    rows = plan(grid, base_conf)
    todo = [r for r in rows if r["status"] == "run"]
    key = share(work)
    t0 = time.perf_counter()
    results = run_parallel([(key, work.path, work.device, memory, r["conf"], False) for r in todo], workers)
    seconds = time.perf_counter() - t0
    busy = [r.pop("_busy", None) for r in results]
    busy = [b for b in busy if b]
    # how many replays ran at once, on average (the workers' busy time over the sweep's time)
    parallelism = sum(b[1] - b[0] for b in busy) / seconds if seconds and busy else 0.0
    cpu = sum(b[2] for b in busy)
    for r, res in zip(todo, results):
        if "error" in res:
            r["status"] = "refused" if "refused" in res["error"] else "failed"
            r["note"] = res["error"].split("refused: ")[-1]
            continue
        r["status"] = "ran"
        r.update(oom=res["num_ooms"] > 0, peak_reserved=res["peak_reserved"], peak_allocated=res["peak_allocated"],
                 num_alloc_retries=res["num_alloc_retries"], num_device_alloc=res["num_device_alloc"],
                 num_ooms=res["num_ooms"],
                 first_failure=res["failure"]["event"] if res.get("failure") else None)
        if r["oom"]:
            r["note"] = f"{res['num_ooms']} failed allocations, first at event {r['first_failure']}"
    failed = [r for r in todo if r["status"] == "failed"]
    if failed and len(failed) == len(todo) and all("starting state does not fit" in r["note"] for r in failed):
        raise ValueError(failed[0]["note"])  # the device is too small for every setting: bad input
    ran = sorted((r for r in rows if r["status"] == "ran"),
                 key=lambda r: (r["oom"], r["peak_reserved"], r["num_alloc_retries"], r["num_device_alloc"],
                                r["setting"].count(":"), r["order"]))
    rest = [r for r in rows if r["status"] != "ran"]
    default = next((r for r in ran if r["setting"] == ""), None)
    rec = next((r for r in ran if not r["oom"]), None)
    recommended = None
    if rec:
        why = "the lowest peak reserved without OOM"
        if default is not None and default is not rec:
            saved = default["peak_reserved"] - rec["peak_reserved"]
            why += (f"; {saved / default['peak_reserved']:.1%} less than the defaults" if saved > 0 and
                    default["peak_reserved"] else "")
            if default["oom"]:
                why += "; the defaults run out of memory"
        elif default is rec:
            why += "; the defaults are best"
        recommended = dict(rec, why=why)
    return {"command": "sweep", "input": work.path, "device": work.device, "memory": memory,
            "base_conf": base_conf, "rows": ran + rest, "recommended": recommended, "seconds": seconds,
            "parallelism": parallelism, "worker_cpu_seconds": cpu,
            "workers": max(1, min(len(todo), workers or os.cpu_count() or 1)), "events": work.trace.trace_events}


def sweep_main(args, work):
    memory = _fit.capacity(args, work)
    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    if args.jobs is not None and not 1 <= args.jobs <= 256:
        raise ValueError(f"--jobs must be between 1 and 256, got {args.jobs}")
    if args.plot:
        _check_plot(args.plot)
    report = SweepReport(sweep(work, memory, grid, args.conf or "", args.jobs))
    if args.plot:
        report.plot(args.plot)
    if args.json:
        print(json.dumps(report.data))
    else:
        print(report.table())
        if args.plot:
            print(f"plot: wrote {args.plot}")
    return _fit.EXIT_FITS if report.recommended else _fit.EXIT_DOES_NOT_FIT


def _check_plot(path):
    """Refuses a --plot file that cannot be written, before the replays run."""
    if not is_html_name(path):
        raise ValueError(f"--plot: {not_html_message(path)}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))) or os.path.isdir(path):
        raise ValueError(f"--plot: cannot write {path}")
