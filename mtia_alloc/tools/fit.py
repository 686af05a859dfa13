"""`python -m mtia_alloc fit SNAPSHOT_OR_TRACE --memory 24GiB [--conf ...] [--json]`: will
this workload fit on a device of that capacity? The workload (a snapshot's device trace
after its rebuilt starting state, a trace CSV or an RMM log) is replayed on a fresh
emulated allocator of exactly that capacity (nothing kept for a runtime). If it fits: the
peak reserved and the headroom. If not: the first allocation that fails, its call site
(snapshots with stacks), its size, and the allocator's state at that moment: reserved,
allocated, the largest free block per pool, and how much memory was free but unusable
for the request. Exit status 0 fits, 3 does not fit, 2 bad input.

Also the engine the sweep, diff and ranks commands share: load_workload (a path -> the
replay trace and, for snapshots, the snapshot and each event's trace entry), setup (a fresh
allocator) and run (the replay, through the Python API so that it can stop at the first
failure and read the state; ~2 us per event).

Owns: Workload, load_workload, setup, run, fit_main, EXIT_FITS, EXIT_DOES_NOT_FIT (the
statuses of tools.exit_status).
Relies on: tools.workload (traces, starting states), viz (load, frames, reports),
emulator, stats, streams, _settings, _lazy_init, _errors, _C."""
import gzip
import json
import os
import pickle

import numpy as np

from .. import _C, emulator
from .._errors import OutOfMemoryError
from .._format import format_bytes
from .._lazy_init import lazy_init
from .._settings import parse_memory
from ..stats import memory_stats
from ..streams import Stream
from ..viz.columns import TraceColumns
from ..viz.frames import SiteKey, format_frame, site_frame, user_frames
from ..mtrace import MAGIC as MTRACE_MAGIC
from ..mtrace import is_mtrace
from ..viz.load import load as load_snapshot
from ..viz.load import normalize
from ..viz.reports import FitReport
from .exit_status import DOES_NOT_FIT, OK
from .convert_cli import read_recording
from .workload import _as_int, read_trace, starting_state, trace_from_snapshot

EXIT_FITS, EXIT_DOES_NOT_FIT = OK, DOES_NOT_FIT
GiB = 1 << 30


class Workload:
    """A replay trace plus what the report needs to name things: the snapshot dict (None for
    CSV / RMM inputs), its device, and for each trace event (after the prefix) the index of
    the snapshot trace entry it came from (negative for cache flushes)."""

    def __init__(self, path, trace, snap=None, device=None, rebuild=True):
        self.path, self.trace, self.snap, self.device = path, trace, snap, device
        self._rebuild = rebuild
        self._entry_of = None

    @property
    def entry_of(self):
        """Per trace event (prefix excluded), the index of its snapshot entry (computed on
        first use: only a failure report needs it)."""
        if self._entry_of is None:
            self._entry_of = [] if self.snap is None else _entry_map(self.snap, self.device, self.entries, self.trace,
                                                                       self._rebuild)
        return self._entry_of

    @property
    def entries(self):
        if self.snap is None:
            return []
        traces = self.snap.get("device_traces") or []
        return traces[self.device] if self.device is not None and self.device < len(traces) else []

    def entry(self, event):
        """The snapshot trace entry of trace event `event` (prefix excluded), or None."""
        if 0 <= event < len(self.entry_of) and self.entry_of[event] >= 0:
            return self.entries[self.entry_of[event]]
        return None


def _is_snapshot_file(path):
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:len(MTRACE_MAGIC)] == MTRACE_MAGIC:  # a streamed history reads as a snapshot
        return True
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as f:
            try:
                head = f.read(64)
            except (OSError, EOFError):
                return False
    stripped = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] in (b"\x80", b"(", b"}", b"]") or stripped[:1] in (b"{", b"[")


def load_snapshot_dict(path):
    """The snapshot dict stored at `path` (a .mtrace: its whole recording); ValueError with
    one clear line otherwise."""
    if is_mtrace(path):
        return read_recording(path).to_snapshot()
    try:
        snap = load_snapshot(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a snapshot") from None
    except pickle.UnpicklingError as e:  # UnsafePickleError: a pickle of objects, not of plain data
        raise ValueError(f"{path}: not a memory snapshot ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    if isinstance(snap, list) and not all(isinstance(s, dict) for s in snap):
        raise ValueError(f"{path}: not a memory snapshot (a list that is not a list of segments)")
    if not isinstance(snap, (dict, list)) or isinstance(snap, dict) and "segments" not in snap:
        raise ValueError(f"{path}: not a memory snapshot (a pickle of {type(snap).__name__} without 'segments')")
    try:
        return normalize(snap)  # validated: later code may index what it checked
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed snapshot: {e}") from None


def _entry_map(snap, device, entries, trace, rebuild=True, flush=True):
    """For each trace event after the prefix, the index of the snapshot entry it came from
    (-2 - the index of its segment_free entry for a cache flush): the walk of workload.trace_from_snapshot, whose prefix leaves
    the starting state's live blocks live under their addresses. [] if the walk disagrees
    with the trace (then no event is named)."""
    entries = entries if isinstance(entries, TraceColumns) else [e for e in entries if isinstance(e, dict)]
    live = set(starting_state(snap, device, entries)[1]) if rebuild else set()
    out = []
    releasing = False
    rows = entries.fields() if isinstance(entries, TraceColumns) else (
        (i, e.get("action"), e.get("addr"), e.get("size"), None) for i, e in enumerate(entries))
    for i, a, addr, size, _ in rows:
        if a == "alloc":
            addr, size = _as_int(addr), _as_int(size)
            if addr not in live and size > 0:
                live.add(addr)
                out.append(i)
        elif a in ("free_completed", "free"):
            addr = _as_int(addr)
            if addr in live:
                live.discard(addr)
                out.append(i)
        elif a in ("segment_free", "segment_unmap"):
            if flush and not releasing:
                out.append(-2 - i)  # a cache flush: no entry of its own (entry() gives None)
            releasing = True
            continue
        elif a not in ("segment_alloc", "segment_map", "oom"):
            continue
        releasing = False
    return out if len(out) == trace.events - trace.prefix else []


def load_workload(path, device=None, rebuild=True, recorded_ooms=True):
    """The replay trace of `path` (snapshot pickle / JSON, trace CSV, RMM log); with
    recorded_ooms, a snapshot's failed requests are part of it (_add_recorded_ooms)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a snapshot or trace")
    if _is_snapshot_file(path):
        snap = load_snapshot_dict(path)
        if not snap.get("device_traces") or not any(snap["device_traces"]):
            raise ValueError(f"{path}: the snapshot has no device_traces to replay (record it with "
                             f"record_memory_history() on)")
        trace = trace_from_snapshot(snap, path, device, rebuild)
        dev = trace.info["device"]
        if trace.trace_events == 0:
            busy = [i for i, t in enumerate(snap["device_traces"])
                    if any(isinstance(e, dict) and e.get("action") == "alloc" for e in t)]
            raise ValueError(f"{path}: device {dev} recorded no allocations to replay (devices with allocations: "
                             f"{busy or 'none'})")
        work = Workload(path, trace, snap, dev, rebuild)
        if recorded_ooms:
            _add_recorded_ooms(work)
        return work
    if device is not None:
        raise ValueError("--device applies to snapshot inputs only")
    try:
        return Workload(path, read_trace(path))
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None


def _add_recorded_ooms(work):
    """The allocations that failed in the recorded run (its `oom` entries: the request, no
    alloc entry) are part of the workload: each becomes an allocation of its size at its
    place, freed at once (on a device where it succeeds it is a transient; where it fails,
    the report names it with the oom entry's stack). Trace.info["recorded_ooms"] counts them."""
    entries = work.entries
    if isinstance(entries, TraceColumns):
        ooms = [i for i in np.flatnonzero(entries.is_action("oom")).tolist() if _as_int(entries[i].get("size")) > 0]
    else:
        ooms = [i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("action") == "oom"
                and _as_int(e.get("size")) > 0]
    work.trace.info["recorded_ooms"] = len(ooms)
    if not ooms:
        return
    t = work.trace
    entry_of = work.entry_of
    if len(entry_of) != t.trace_events:
        return  # the walk disagrees with the trace: cannot place them
    sizes, slots, streams = t.sizes.tolist(), t.slots.tolist(), t.streams.tolist()
    p = t.prefix
    new_sizes, new_slots, new_streams, new_entry = sizes[:p], slots[:p], streams[:p], []
    slot = t.nslots
    stream_values = list(t.stream_values)
    flushes = set(t.flushes)
    new_flushes = [f for f in t.flushes if f < p]

    def add_failed_request(i):
        """The recorded OOM entry i, replayed as an allocation of its size and its free."""
        e = entries[i]
        sv = _as_int(e.get("stream", 0))
        if sv not in stream_values:
            stream_values.append(sv)
        si = stream_values.index(sv)
        new_sizes.extend((_as_int(e.get("size")), 0))
        new_slots.extend((slot, slot))
        new_streams.extend((si, si))
        new_entry.extend((i, i))

    k = 0
    for j in range(t.trace_events):
        at = entry_of[j] if entry_of[j] >= 0 else -2 - entry_of[j]  # a flush: its segment_free entry
        while k < len(ooms) and at > ooms[k]:
            add_failed_request(ooms[k])
            k += 1
        if p + j in flushes:
            new_flushes.append(len(new_sizes))
        new_sizes.append(sizes[p + j])
        new_slots.append(slots[p + j])
        new_streams.append(streams[p + j])
        new_entry.append(entry_of[j])
    for i in ooms[k:]:  # OOMs after the last replayed event
        add_failed_request(i)
    t.sizes = np.asarray(new_sizes, dtype=np.uint64)
    t.slots = np.asarray(new_slots, dtype=np.uint32)
    t.streams = np.asarray(new_streams, dtype=np.uint32)
    t.nslots = slot + 1
    t.stream_values = stream_values
    t.flushes = new_flushes
    work._entry_of = new_entry


def auto_memory(work):
    """A capacity comfortably above what the workload can need (for replays that only measure)."""
    info = work.trace.info
    if info.get("recorded_peak_reserved"):
        need = info["recorded_peak_reserved"]  # what the recorded run itself reserved at most
    elif work.snap is not None:
        seg = sum(int(e.get("size", 0) or 0) for e in work.entries
                  if isinstance(e, dict) and e.get("action") in ("segment_alloc", "segment_map"))
        need = info.get("start_reserved", 0) + seg
    else:
        need = work.trace.peak_live_bytes()
    need = 2 * need + GiB
    return -(-need // GiB) * GiB


def recorded_capacity(work):
    """The memory the recorded run had when its first OOM was raised: the bytes reserved at
    that `oom` entry (rebuilt starting state plus the trace's segment events) plus the
    entry's device_free. Replaying on exactly that much memory re-enacts the recorded OOM.
    ValueError if the trace records no OOM."""
    if work.snap is None:
        raise ValueError("--memory recorded needs a snapshot whose trace records an OOM")
    reserved = work.trace.info.get("start_reserved", 0)
    for e in work.entries:
        if not isinstance(e, dict):
            continue
        a = e.get("action")
        if a in ("segment_alloc", "segment_map"):
            reserved += _as_int(e.get("size"))
        elif a in ("segment_free", "segment_unmap"):
            reserved -= _as_int(e.get("size"))
        elif a == "oom":
            return reserved + _as_int(e.get("device_free"))
    raise ValueError(f"{work.path}: the trace of device {work.device} records no OOM: give --memory a capacity")


def setup(memory, conf=""):
    """A fresh allocator for this process: one emulated device of `memory` bytes, all of it
    for the allocator, with settings `conf` (MTIA_ALLOC_CONF syntax). Raises ValueError
    naming a refused setting."""
    os.environ["MTIA_ALLOC_CONF"] = conf or ""
    if _C.is_initialized():
        raise RuntimeError("a replay needs a fresh allocator: this process already initialized mtia_alloc")
    emulator.configure(device_count=1, memory_per_device=memory, runtime_reserved=0)
    try:
        lazy_init()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"allocator settings {conf!r} refused: {e}") from None


def _segment_size(rounded):
    """PyTorch's get_allocation_size: the device allocation a rounded request needs."""
    if rounded <= (1 << 20):
        return 2 << 20
    if rounded < (10 << 20):
        return 20 << 20
    return -(-rounded // (2 << 20)) * (2 << 20)


def _state(device, size):
    st = memory_stats(device)
    small, large = _C.largest_free_blocks(device)
    free_dev, total = _C.mem_get_info(device)
    reserved = st["reserved_bytes.all.current"]
    active = st["active_bytes.all.current"]
    rounded = _C.round_size_(size) if 0 < size < (1 << 63) else size
    return {
        "reserved": reserved, "allocated": st["allocated_bytes.all.current"],
        "requested": st["requested_bytes.all.current"], "active": active,
        "largest_free_block": {"small_pool": small, "large_pool": large},
        "cached_free": reserved - active, "device_free": free_dev, "capacity": total,
        "free_but_unusable": reserved - active + free_dev,
        "rounded_request": rounded, "segment_needed": _segment_size(rounded),
        "segments": st["segment.all.current"],
    }


def run(work, device=0, stop_at_failure=True, by="site"):
    """Replays the workload once on the (fresh) allocator of this process, from its rebuilt
    starting state. Returns a dict: fits, events, peaks (reserved/allocated/requested),
    num_device_alloc/free, num_alloc_retries, num_ooms (cache flushes left out), stats
    (memory_stats() peaks and counters from the starting state on) and failure (the first
    failing allocation: event, size, stream, site, stack, the OOM message and the state)."""
    trace = work.trace
    lazy_init()
    sids = []
    for v in trace.stream_values:
        sids.append(0 if v == 0 and 0 in trace.stream_values else _C.new_stream(device, 0))
    handles = [Stream(stream_id=sid, device_index=device) for sid in sids]
    sizes, slots, streams = trace.sizes.tolist(), trace.slots.tolist(), trace.streams.tolist()
    prefix = trace.prefix
    flush_set = set(trace.flushes)
    ptrs = [0] * trace.nslots
    alloc, free = _C.caching_allocator_alloc, _C.caching_allocator_delete
    failure = None
    ooms = flushes_run = 0
    if prefix == 0:
        _C.reset_peak_memory_stats(device)
        _C.reset_accumulated_memory_stats(device)
    try:
        for i in range(len(sizes)):
            if i == prefix and prefix:
                _C.reset_peak_memory_stats(device)
                _C.reset_accumulated_memory_stats(device)
            size = sizes[i]
            if size:
                try:
                    ptrs[slots[i]] = alloc(size, device, handles[streams[i]])
                except OutOfMemoryError as e:
                    if i in flush_set:
                        flushes_run += 1
                        continue
                    if i < prefix:
                        raise ValueError(
                            f"{work.path}: the snapshot's starting state does not fit in "
                            f"{format_bytes(_C.mem_get_info(device)[1])} (rebuilding it: "
                            f"{format_bytes(trace.info.get('start_reserved', 0))} reserved when recording began)"
                        ) from None
                    ooms += 1
                    if failure is None:
                        failure = _failure(work, i - prefix, size, trace.stream_values[streams[i]], str(e), device, by)
                        if stop_at_failure:
                            break
            else:
                p = ptrs[slots[i]]
                if p:
                    free(p)
                    ptrs[slots[i]] = 0
        st = memory_stats(device)
    finally:
        for p in ptrs:
            if p:
                free(p)
    # cache flushes are failed allocations after one retry each: not the workload's
    retries = max(0, st["num_alloc_retries"] - flushes_run)
    stats = {k: v for k, v in st.items() if k.endswith(".peak")}
    stats.update(num_device_alloc=st["num_device_alloc"], num_device_free=st["num_device_free"],
                 num_alloc_retries=retries, num_ooms=ooms)
    capacity = _C.mem_get_info(device)[1]
    out = {
        "fits": failure is None, "memory": capacity, "events": trace.trace_events,
        "peak_reserved": st["reserved_bytes.all.peak"], "peak_allocated": st["allocated_bytes.all.peak"],
        "peak_requested": st["requested_bytes.all.peak"], "num_device_alloc": st["num_device_alloc"],
        "num_device_free": st["num_device_free"], "num_alloc_retries": retries, "num_ooms": ooms,
        "stopped_at_failure": bool(failure) and stop_at_failure, "stats": stats, "failure": failure,
    }
    out["headroom"] = capacity - out["peak_reserved"] if failure is None else None
    return out


def _failure(work, event, size, stream, message, device, by):
    state = _state(device, size)
    e = work.entry(event)
    frames = e.get("frames") if isinstance(e, dict) else None
    fr = site_frame(frames) if frames else None
    return {
        "event": event, "entry": work.entry_of[event] if 0 <= event < len(work.entry_of) else None,
        "size": size, "stream": stream,
        "site": SiteKey(by)(frames) if frames else None,
        "where": format_frame(fr) if fr is not None else None,
        "stack": [format_frame(f) for f in user_frames(frames)][:12] if frames else [],
        "message": message.splitlines()[0] if message else "", "state": state,
    }


def describe_input(work):
    info = work.trace.info
    d = {"input": work.path, "format": info.get("format", "?"), "events": work.trace.trace_events}
    if work.snap is not None:
        d.update(device=work.device, recorded_ooms=info.get("recorded_ooms", 0),
                 start_reserved=info.get("start_reserved", 0),
                 start_live_bytes=info.get("start_live_bytes", 0), start_segments=info.get("start_segments", 0),
                 recorded_settings=info.get("settings", ""))
    return d


def parse_capacity(text):
    try:
        return parse_memory(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--memory: {e}") from None


def fit_main(args):
    """The fit command (and, with --sweep, the settings sweep of tools.sweep)."""
    if args.memory is None:
        raise ValueError("--memory is required (the device capacity, e.g. 24GiB)")
    work = load_workload(args.input, device=args.device)
    return fit_work(args, work)


def capacity(args, work):
    """--memory: a size, "auto" (room to spare) or "recorded" (what the recorded run had at its OOM)."""
    if args.memory == "auto":
        return auto_memory(work)
    if args.memory == "recorded":
        return recorded_capacity(work)
    return parse_capacity(args.memory)


def fit_work(args, work):
    memory = capacity(args, work)
    setup(memory, args.conf or "")
    result = run(work, by=args.by)
    result.update(describe_input(work), conf=args.conf or "", command="fit")
    report = FitReport(result)
    if args.json:
        print(json.dumps(report.data))
    else:
        print(report.table())
    return EXIT_FITS if result["fits"] else EXIT_DOES_NOT_FIT

