"""Memory history and snapshots (torch.cuda.memory's _record_memory_history, _snapshot,
_dump_snapshot): what the allocator records about allocations over time, and the snapshot
dict in PyTorch's schema that carries it (segments, device_traces, allocator_settings,
external_annotations). "History" here is always this record of the allocator's events;
the allocation traces the `replay` command reads are workloads (tools/workload.py).

Owns: record_memory_history (and its torch.cuda and legacy forms), snapshot(),
_dump_snapshot, the per-thread memory metadata, snapshot_segments (the segment list).
Relies on: _lazy_init, _C (the core records the history and builds the dicts)."""
import contextlib
import gc
import operator
import pickle
import sys
import threading
import time
import warnings

from . import _C
from ._lazy_init import is_initialized, lazy_init

__all__ = ["record_memory_history", "snapshot", "snapshot_segments"]


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
        if _skip_epochs:
            traces = [_without_skipped(t) for t in traces]
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

# skip_actions in force since a time: [(epoch microseconds, frozenset of actions)], in
# order; empty while no call named any. The core records every action; snapshot() drops
# those recorded while they were skipped (the binding's set_history takes no filter).
_skip_epochs = []
_skip_lock = threading.Lock()


def _without_skipped(trace):
    epochs = list(_skip_epochs)
    out = []
    for e in trace:
        t = e["time_us"]
        skip = ()
        for since, actions in epochs:
            if t < since:
                break
            skip = actions
        if e["action"] not in skip:
            out.append(e)
    return out


def _note_skip_actions(enabled, skip, clear):
    """Called as a setting applies: from now on `skip` is in force (a history that is
    stopped or cleared forgets the earlier epochs)."""
    now = time.time_ns() // 1000
    with _skip_lock:
        if enabled is None or clear:
            _skip_epochs.clear()
        if enabled is not None and (skip or _skip_epochs):
            _skip_epochs.append((now, skip))


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
                          skip_actions=None, **legacy):
    """Records alloc/free history for snapshots: enabled None/'state'/'all', context
    None/'state'/'alloc'/'all', stacks 'python'/'all', max_entries = ring buffer size
    (the signature of torch.cuda.memory._record_memory_history, torch 2.13's included).
    torch.mtia's positional form record_memory_history(enabled, stacks, max_entries) is
    understood too.

    skip_actions: trace actions not to record, e.g. ["free_requested"] (names from
    TRACE_ACTIONS; others raise ValueError). The core records every action and snapshot()
    leaves out those recorded while they were skipped, so skipped actions still take
    places in the max_entries ring buffer. compile_context: torch records the torch.compile
    context of each entry; there is none here, so it is accepted and entries keep
    compile_context 'N/A'. global_record_annotations: torch records profiler annotations
    from every thread into external_annotations; the emulator has no profiler annotations,
    so it is accepted and external_annotations stays empty.

    As torch.mtia.record_memory_history, it does nothing before the device is initialised
    (it warns here, as that is easy to trip over): call mtia_alloc.init() first, or use
    mtia_alloc.memory._record_memory_history, which initialises the device as torch.cuda's
    does. Applies to every device (`device` is ignored, as in PyTorch). enabled=None stops
    recording and clears the history; clear_history=True clears it when (re)enabling.
    The legacy form record_memory_history(True/False, record_context=True,
    trace_alloc_max_entries=1, trace_alloc_record_context=False) is understood too."""
    apply = _history_setter(enabled, context, stacks, max_entries, clear_history, legacy, compile_context,
                            global_record_annotations, skip_actions)
    if not is_initialized():
        warnings.warn("record_memory_history() before the device is initialised is ignored, as in torch.mtia; "
                      "call mtia_alloc.init() first (or use mtia_alloc.memory._record_memory_history, which "
                      "initialises the device as torch.cuda's does)", stacklevel=2)
        return
    apply()


def _record_memory_history(enabled="all", context="all", stacks="python", max_entries=sys.maxsize, device=None,
                           clear_history=False, compile_context=False, global_record_annotations=False,
                           skip_actions=None, **legacy):
    """torch.cuda.memory._record_memory_history: as record_memory_history, but it initialises
    the device first (as torch.cuda's does), so it may be the first call of a program. The
    legacy form (enabled: bool, record_context, trace_alloc_max_entries, ...) works too."""
    apply = _history_setter(enabled, context, stacks, max_entries, clear_history, legacy, compile_context,
                            global_record_annotations, skip_actions)
    lazy_init()
    apply()


def _history_setter(enabled, context, stacks, max_entries, clear_history, legacy, compile_context=False,
                    global_record_annotations=False, skip_actions=None):
    """Validates record_memory_history's arguments; returns the call that applies them."""
    if isinstance(enabled, bool):
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

    def apply():
        _C.set_history(enabled is not None, level, entries, clear)
        _note_skip_actions(enabled, skip, clear)

    return apply


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
