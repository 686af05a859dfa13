"""Memory history and snapshots (torch.cuda.memory's _record_memory_history, _snapshot,
_dump_snapshot): what the allocator records about allocations over time, and the snapshot
dict in PyTorch's schema that carries it (segments, device_traces, allocator_settings,
external_annotations). "History" here is always this record of the allocator's events;
the allocation traces the `replay` command reads are workloads (tools/workload.py).

Owns: record_memory_history (and its torch.cuda and legacy forms; path= streams the
history to a .mtrace file), record_to / stop_recording, snapshot(), _dump_snapshot, the
per-thread memory metadata, snapshot_segments (the segment list), the skip_actions mask.
Relies on: _lazy_init, _C (the core records the history, streams it and builds the
dicts; reading a .mtrace is mtrace.py's)."""
import atexit
import contextlib
import gc
import json
import operator
import os
import pickle
import sys
import threading
import warnings

from . import _C
from ._lazy_init import is_initialized, lazy_init

__all__ = ["record_memory_history", "record_to", "stop_recording", "snapshot", "snapshot_segments"]


@contextlib.contextmanager
def _gc_paused():
    """Building 100k small dicts would trigger the cyclic GC many times over (it doubles the
    time of a big snapshot); none of them can be garbage, so pause it meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def snapshot_segments(pool_id=None):
    """The segment dicts of every device (of one pool if pool_id is given), built with the
    cyclic GC paused ([] before initialisation)."""
    if not is_initialized():
        return []
    with _gc_paused():
        return _C.snapshot_segments(pool_id)


def snapshot(device=None):
    """PyTorch's snapshot dict: segments (all devices, address-sorted per device),
    device_traces (index = device), allocator_settings, external_annotations. `device` is
    accepted and ignored, as in torch.cuda.memory._snapshot. Wrap it in
    mtia_alloc.memory.Snapshot for a REPL view."""
    if not is_initialized():
        return {"segments": [], "device_traces": [], "allocator_settings": {}, "external_annotations": []}
    with _gc_paused():
        # As PyTorch: the traces are read first, so the "snapshot" entry this snapshot
        # records shows up in the next one.
        traces = [_C.device_trace(d) for d in range(_C.device_count())]
        segments = _C.snapshot_segments(None)
    return {
        "segments": segments,
        "device_traces": traces,
        "allocator_settings": _C.allocator_settings(),
        "external_annotations": [],
    }


_CONTEXTS = {None: 0, "state": 1, "alloc": 2, "all": 3}
# The trace actions skip_actions may name (torch's, with the expandable segments' map/unmap).
TRACE_ACTIONS = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map",
                 "segment_unmap", "oom", "snapshot")

# The core's action numbers (history.h TraceAction): skip_actions becomes a bit mask the
# core tests before it records anything, so skipped actions take no place in the buffer.
_ACTION_BITS = {"alloc": 0, "free_requested": 1, "free_completed": 2, "segment_alloc": 3, "segment_free": 4,
                "snapshot": 5, "oom": 6, "segment_map": 7, "segment_unmap": 8}

# The streamed recording (record_memory_history(path=...)): its path, or None.
_stream_path = None
_stream_lock = threading.Lock()


def _skip_mask(skip):
    mask = 0
    for a in skip:
        mask |= 1 << _ACTION_BITS[a]
    return mask


def _skip_actions_arg(skip_actions):
    if skip_actions is None:
        return frozenset()
    if isinstance(skip_actions, (str, bytes)) or not hasattr(skip_actions, "__iter__"):
        raise TypeError(f"skip_actions must be a list of action names, got {type(skip_actions).__name__}")
    actions = list(skip_actions)
    for a in actions:
        if a not in TRACE_ACTIONS:
            raise ValueError(f"Invalid action {a!r} in skip_actions; valid actions are {', '.join(TRACE_ACTIONS)}")
    return frozenset(actions)


def record_memory_history(enabled="all", context="all", stacks="python", max_entries=sys.maxsize, device=None,
                          clear_history=False, compile_context=False, global_record_annotations=False,
                          skip_actions=None, path=None, **legacy):
    """Records alloc/free history for snapshots: enabled None/'state'/'all', context
    None/'state'/'alloc'/'all', stacks 'python'/'all', max_entries = ring buffer size
    (the signature of torch.cuda.memory._record_memory_history, torch 2.13's included).
    torch.mtia's positional form record_memory_history(enabled, stacks, max_entries) is
    understood too.

    skip_actions: trace actions not to record, e.g. ["free_requested"] (names from
    TRACE_ACTIONS; others raise ValueError). The core drops them before recording, so they
    take no place in the max_entries ring buffer (nor in a streamed recording).

    path: also stream every recorded event, as it happens, to this file (a .mtrace:
    delta-encoded binary records with the frame table, history_stream.h), so nothing is lost
    when the ring buffer wraps; `python -m mtia_alloc convert run.mtrace -o snap.pickle`
    turns it into a snapshot, and replay/fit/diff read it directly. Recording with a new
    path closes the previous file; enabled=None (or stop_recording()) closes it. A write
    error (disk full) stops the file with a RuntimeWarning; allocation goes on. An
    unwritable path raises OSError at once. compile_context: torch records the torch.compile
    context of each entry; there is none here, so it is accepted and entries keep
    compile_context 'N/A'. global_record_annotations: torch records profiler annotations
    from every thread into external_annotations; the emulator has no profiler annotations,
    so it is accepted and external_annotations stays empty.

    Time stamps (time_us): read from a coarse clock that a background thread refreshes
    every millisecond while history is on (reading the TSC per event costs more than the
    rest of the record); the first 16 events of each millisecond on a device still read
    the TSC. So an entry's time is exact, or (in a burst) the previous entry's, at most
    about a millisecond early; times never decrease on a device.

    As torch.mtia.record_memory_history, it does nothing before the device is initialised
    (it warns here, as that is easy to trip over): call mtia_alloc.init() first, or use
    mtia_alloc.memory._record_memory_history, which initialises the device as torch.cuda's
    does. Applies to every device (`device` is ignored, as in PyTorch). enabled=None stops
    recording and clears the history; clear_history=True clears it when (re)enabling.
    The legacy form record_memory_history(True/False, record_context=True,
    trace_alloc_max_entries=1, trace_alloc_record_context=False) is understood too."""
    apply = _history_setter(enabled, context, stacks, max_entries, clear_history, legacy, compile_context,
                            global_record_annotations, skip_actions, path)
    if not is_initialized():
        warnings.warn("record_memory_history() before the device is initialised is ignored, as in torch.mtia; "
                      "call mtia_alloc.init() first (or use mtia_alloc.memory._record_memory_history, which "
                      "initialises the device as torch.cuda's does)", stacklevel=2)
        return
    apply()


def _record_memory_history(enabled="all", context="all", stacks="python", max_entries=sys.maxsize, device=None,
                           clear_history=False, compile_context=False, global_record_annotations=False,
                           skip_actions=None, path=None, **legacy):
    """torch.cuda.memory._record_memory_history: as record_memory_history, but it initialises
    the device first (as torch.cuda's does), so it may be the first call of a program. The
    legacy form (enabled: bool, record_context, trace_alloc_max_entries, ...) works too."""
    apply = _history_setter(enabled, context, stacks, max_entries, clear_history, legacy, compile_context,
                            global_record_annotations, skip_actions, path)
    lazy_init()
    apply()


def _history_setter(enabled, context, stacks, max_entries, clear_history, legacy, compile_context=False,
                    global_record_annotations=False, skip_actions=None, path=None):
    """Validates record_memory_history's arguments; returns the call that applies them."""
    if path is not None:
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if enabled is None or (isinstance(enabled, bool) and not enabled):
            raise ValueError("path= records to a file: it needs enabled='state' or 'all', not None")
    if isinstance(enabled, bool):
        if path is not None:
            raise TypeError("the legacy record_memory_history(enabled: bool, ...) form takes no path; pass enabled='all'")
        if compile_context is not False or global_record_annotations is not False or skip_actions is not None:
            raise TypeError("the legacy record_memory_history(enabled: bool, ...) form takes no compile_context, "
                            "global_record_annotations or skip_actions; pass enabled='all'")
        return _legacy_history_setter(enabled, context, stacks, max_entries, legacy)
    for name, flag in (("compile_context", compile_context), ("global_record_annotations", global_record_annotations)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    skip = _skip_actions_arg(skip_actions)
    if legacy:
        raise TypeError(f"record_memory_history() got unexpected keyword arguments {sorted(legacy)}")
    int_stacks = isinstance(stacks, int) and not isinstance(stacks, bool)
    if context in ("python", "cpp") or (int_stacks and max_entries == sys.maxsize):
        # torch.mtia's positional order (enabled, stacks, max_entries=0): in torch.cuda's
        # order a context is never "python"/"cpp" and stacks never an int.
        context, stacks, max_entries = "all", context, stacks if int_stacks else 0
    if enabled not in (None, "state", "all"):
        raise ValueError("expected state to be 'state', 'all', or None")
    if context not in _CONTEXTS:
        raise ValueError("expected context to be 'state', 'alloc', 'all', or None")
    if stacks not in ("python", "all", "cpp"):
        raise ValueError("expected stacks to be 'python', or 'all'")
    if isinstance(max_entries, bool) or not hasattr(max_entries, "__index__"):
        raise TypeError(f"max_entries must be an int, got {type(max_entries).__name__}")
    max_entries = operator.index(max_entries)
    if max_entries < 0:  # PyTorch's binding takes a size_t
        raise ValueError(f"max_entries must be non-negative, got {max_entries}")
    entries = 1 if enabled == "state" else max(1, min(max_entries, 1 << 62))  # 0 means one, as in PyTorch
    level = _CONTEXTS[context] if enabled is not None else 0
    clear = bool(clear_history)

    mask = _skip_mask(skip)

    def apply():
        if enabled is None:
            _C.set_history(False, level, entries, clear, 0)
            stop_recording()
            return
        if path is not None:
            _start_stream(path, enabled, context, entries)
        _C.set_history(True, level, entries, clear, mask)

    return apply


def _start_stream(path, enabled, context, entries):
    global _stream_path
    header = {"format": "mtrace", "version": 1, "device_count": _C.device_count(), "pid": os.getpid(),
              "enabled": enabled, "context": context, "max_entries": entries,
              "allocator_settings": _C.allocator_settings(),
              # The state the recording starts from (a converted window rebuilds its segments from it).
              "segments": snapshot_segments()}
    with _stream_lock:
        stop_recording(_locked=True)
        _C.history_stream_start(path, json.dumps(header, default=str))
        _stream_path = path


def stop_recording(_locked=False):
    """Closes the file record_memory_history(path=...) streams to (history stays on in
    memory); warns if a write error had stopped it. No-op when nothing streams."""
    global _stream_path
    if not _locked:
        with _stream_lock:
            return stop_recording(_locked=True)
    if _stream_path is None:
        return
    path, _stream_path = _stream_path, None
    err = _C.history_stream_stop()
    if err:
        warnings.warn(f"mtia_alloc: the history recording to {path} stopped early: {err}", RuntimeWarning,
                      stacklevel=3)


def record_to(path, context="all", max_entries=sys.maxsize, skip_actions=None):
    """record_memory_history('all', context, path=path, ...): streams the history to
    `path` (a .mtrace file) as well as to the ring buffer; stop with stop_recording()."""
    _record_memory_history("all", context=context, max_entries=max_entries, skip_actions=skip_actions,
                           path=path)


atexit.register(stop_recording)


def _legacy_history_setter(enabled, context, stacks, max_entries, legacy):
    """The legacy signature (enabled: bool, record_context=True, trace_alloc_max_entries=1,
    trace_alloc_record_context=False, device=None, record_context_cpp=False), whose
    positional arguments arrive in the new form's slots; a slot still at its new-form
    default means the legacy default."""
    record_context = legacy.pop("record_context", True if context == "all" else context)
    max_entries_ = legacy.pop("trace_alloc_max_entries", 1 if stacks == "python" else stacks)
    alloc_context = legacy.pop("trace_alloc_record_context", False if max_entries == sys.maxsize else max_entries)
    legacy.pop("record_context_cpp", None)
    if legacy:
        raise TypeError(f"record_memory_history() got unexpected keyword arguments {sorted(legacy)}")
    if not isinstance(max_entries_, int):
        raise TypeError(f"trace_alloc_max_entries must be an int, got {type(max_entries_).__name__}")
    if not enabled:
        return _history_setter(None, "all", "python", sys.maxsize, False, {})
    context = "alloc" if alloc_context else ("state" if record_context else None)
    return _history_setter("all", context, "python", max(1, max_entries_), False, {})


def _set_memory_metadata(metadata):
    """Stamps `metadata` on every trace entry this thread records (PyTorch's
    torch.cuda.memory._set_memory_metadata)."""
    if not isinstance(metadata, str):
        raise TypeError(f"metadata must be a str, got {type(metadata).__name__}")
    _C.set_memory_metadata(metadata)


def _get_memory_metadata():
    return _C.get_memory_metadata()


def _dump_snapshot(filename="dump_snapshot.pickle"):
    """Writes snapshot() as a pickle (protocol 4: the memory_viz web page refuses 5)."""
    with open(filename, "wb") as f:
        pickle.dump(snapshot(), f, protocol=4)
