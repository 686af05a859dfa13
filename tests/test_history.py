"""Memory history (allocator_core.md §9, must-haves §15.25-28): record_memory_history's
arguments and PyTorch semantics, the trace entries and their fields, stacks per context
level, the ring buffer, and _dump_snapshot.

Other tests run in the same process: every test here starts from a cleared, disabled history
and an empty cache (the `history` fixture) and switches history off again at the end."""
import pickle
import sys
import time
import weakref

import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import DEVICES, MiB, run_code

ENTRY_KEYS = {"action", "size", "stream", "time_us", "compile_context", "user_metadata"}


@pytest.fixture
def history():
    mtia.record_memory_history(None)
    mtia.empty_cache()
    yield
    mtia.record_memory_history(None)


def trace(device=0):
    return mtia.snapshot()["device_traces"][device]


def ops(entries, *addrs):
    """(action, addr, size) of the entries at these addresses (all but snapshot entries if none)."""
    return [(e["action"], e.get("addr"), e["size"]) for e in entries
            if (e["action"] != "snapshot") and (not addrs or e.get("addr") in addrs)]






def names(frames):
    return [f["name"] for f in frames]


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs, error, match", [
    ({"enabled": "yes"}, ValueError, "expected state to be 'state', 'all', or None"),
    ({"enabled": 1}, ValueError, "expected state"),
    ({"context": "stack"}, ValueError, "expected context to be 'state', 'alloc', 'all', or None"),
    ({"stacks": "c++"}, ValueError, "expected stacks to be 'python', or 'all'"),
    ({"max_entries": 1.5}, TypeError, "max_entries must be an int"),
    ({"max_entries": True}, TypeError, "max_entries must be an int"),
])
def test_bad_arguments_are_rejected(history, kwargs, error, match):
    with pytest.raises(error, match=match):
        mtia.record_memory_history(**kwargs)
    assert all(t == [] for t in mtia.snapshot()["device_traces"])


def test_private_alias_and_legacy_bool_form(history):
    mtia.memory._record_memory_history(True, trace_alloc_max_entries=3, trace_alloc_record_context=True)
    for _ in range(3):
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))
    t = trace()
    assert [e["action"] for e in t] == ["alloc", "free_requested", "free_completed"]
    assert "frames" in t[0]  # trace_alloc_record_context -> context "alloc"
    mtia.memory._record_memory_history(False)
    assert trace() == []
    mtia.memory._record_memory_history("all", context=None, max_entries=10, device=0)
    mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))
    assert [e["action"] for e in trace()][-3:] == ["alloc", "free_requested", "free_completed"]


# ----------------------------------------------------------------------------- §15.26-27 entries

def test_trace_of_malloc_free_and_empty_cache(history):
    """Spec must-have 26 (allocator_core.md §15.26)."""
    mtia.record_memory_history()
    size = 37 * MiB + 5  # a large request: gets a fresh segment of its own
    t0 = time.time()
    ptr = mtia.caching_allocator_alloc(size)
    seg = next(s for s in mtia.memory_snapshot() if s["address"] <= ptr < s["address"] + s["total_size"])
    mtia.caching_allocator_delete(ptr)
    mtia.empty_cache()
    entries = trace()
    t1 = time.time()
    assert ops(entries, ptr, seg["address"]) == [
        ("segment_alloc", seg["address"], seg["total_size"]),
        ("alloc", ptr, size),
        ("free_requested", ptr, size),
        ("free_completed", ptr, size),
        ("segment_free", seg["address"], seg["total_size"]),
    ]
    # memory_snapshot() above added a snapshot entry; trace()'s own snapshot() adds one that
    # only the next snapshot shows (PyTorch reads the traces first)
    assert [e["action"] for e in entries].count("snapshot") == 1
    assert entries[-1]["action"] == "segment_free"
    assert [e for e in entries if e["action"] == "snapshot"][0]["addr"] == 0
    for e in entries:
        assert ENTRY_KEYS <= set(e) and ("addr" in e) != ("device_free" in e)
        assert type(e["time_us"]) is int and int(t0 * 1e6) - 1_000_000 <= e["time_us"] <= int(t1 * 1e6) + 1_000_000
        assert e["compile_context"] == "N/A" and e["user_metadata"] == "" and e["stream"] == 0
    times = [e["time_us"] for e in entries]
    assert times == sorted(times)


def test_snapshot_entry_records_the_active_bytes(history, blocks):
    mtia.record_memory_history()
    for n in (1000, 3 * MiB):
        blocks.alloc(n)
    snap = mtia.snapshot()
    assert all(e["action"] != "snapshot" for t in snap["device_traces"] for e in t)
    traces = mtia.snapshot()["device_traces"]  # the first snapshot's entry shows up here
    for d in DEVICES:
        last = traces[d][-1]
        active = sum(s["active_size"] for s in snap["segments"] if s["device"] == d)
        assert last["action"] == "snapshot" and last["addr"] == 0 and last["size"] == active


def test_oom_entry_has_device_free_instead_of_addr(history, blocks):
    mtia.record_memory_history()
    device = DEVICES[-1]
    free_before, total = mtia.mem_get_info(device)
    mtia.set_per_process_memory_fraction(0.001, device)
    request = 64 * MiB
    with pytest.raises(mtia.OutOfMemoryError):
        blocks.alloc(request, device)
    oom = [e for e in trace(device) if e["action"] == "oom"]
    assert len(oom) == 1
    assert "addr" not in oom[0] and oom[0]["device_free"] == mtia.mem_get_info(device)[0]
    assert oom[0]["size"] == mtia.memory._round_size(request)
    assert mtia.memory.Snapshot(mtia.snapshot()).stats(device)["num_ooms"] == 1


def test_each_device_has_its_own_trace(history, blocks):
    mtia.record_memory_history()
    if len(DEVICES) < 2:
        pytest.skip("needs two devices")
    p0, p1 = blocks.alloc(5000, 0), blocks.alloc(7000, 1)
    snap = mtia.snapshot()
    assert ("alloc", p0, 5000) in ops(snap["device_traces"][0])
    assert ("alloc", p1, 7000) in ops(snap["device_traces"][1])
    assert ("alloc", p1, 7000) not in ops(snap["device_traces"][0])
    assert any(s["device"] == 1 and s["address"] <= p1 < s["address"] + s["total_size"] for s in snap["segments"])


def test_pending_free_shows_in_trace_and_snapshot(history, blocks):
    mtia.record_memory_history()
    side = mtia.Stream(device=0)
    ptr = blocks.alloc(2 * MiB)
    mtia.emulator.sleep(150, stream=side)
    mtia.record_stream(ptr, side)
    blocks.free(ptr)
    snap = mtia.snapshot()
    assert ops(snap["device_traces"][0], ptr)[-1][0] == "free_requested"
    state = [b["state"] for s in snap["segments"] for b in s["blocks"] if b["address"] == ptr]
    assert state == ["active_pending_free"]
    side.synchronize()
    blocks.free(blocks.alloc(512))  # the next malloc processes the completed event
    assert ops(trace(), ptr)[-1] == ("free_completed", ptr, 2 * MiB)


def test_stream_of_entries_is_the_allocation_stream(history, blocks):
    mtia.record_memory_history()
    side = mtia.Stream(device=0)
    ptr = blocks.alloc(4096, 0, side)
    entry = [e for e in trace() if e["action"] == "alloc" and e["addr"] == ptr][-1]
    assert entry["stream"] == side.stream_id != 0


# ----------------------------------------------------------------------------- stacks per context

def test_context_none_records_no_stacks(history, blocks):
    mtia.record_memory_history(context=None)
    ptr = blocks.alloc(4096)
    snap = mtia.snapshot()
    assert all("frames" not in e for e in snap["device_traces"][0])
    assert [b["frames"] for s in snap["segments"] for b in s["blocks"] if b["address"] == ptr] == [[]]


def test_context_state_keeps_stacks_of_live_blocks_only(history, blocks):
    mtia.record_memory_history(context="state")
    ptr = blocks.alloc(3 * MiB + 1)
    snap = mtia.snapshot()
    assert all("frames" not in e for e in snap["device_traces"][0])
    seg = next(s for s in snap["segments"] if s["address"] <= ptr < s["address"] + s["total_size"])
    blk = next(b for b in seg["blocks"] if b["address"] == ptr)
    assert "test_context_state_keeps_stacks_of_live_blocks_only" in names(blk["frames"])
    f = next(f for f in blk["frames"] if f["name"] == "test_context_state_keeps_stacks_of_live_blocks_only")
    assert f["filename"] == __file__ and type(f["line"]) is int and f["line"] > 0
    assert "test_context_state_keeps_stacks_of_live_blocks_only" in names(seg["frames"])
    blocks.free(ptr)
    inactive = [b for s in mtia.memory_snapshot() for b in s["blocks"] if b["state"] == "inactive"]
    assert all(b["frames"] == [] for b in inactive)


def test_context_alloc_free_entries_reuse_the_allocation_stack(history):
    mtia.record_memory_history(context="alloc")
    ptr = mtia.caching_allocator_alloc(4096)
    mtia.caching_allocator_delete(ptr)
    by_action = {e["action"]: e for e in trace() if e.get("addr") == ptr}
    me = "test_context_alloc_free_entries_reuse_the_allocation_stack"
    assert me in names(by_action["alloc"]["frames"])
    assert by_action["free_requested"]["frames"] == by_action["alloc"]["frames"]
    assert by_action["free_completed"]["frames"] == by_action["alloc"]["frames"]


def test_context_all_captures_the_free_stack(history):
    mtia.record_memory_history(context="all")
    ptr = mtia.caching_allocator_alloc(4096)
    mtia.caching_allocator_delete(ptr)
    by_action = {e["action"]: e for e in trace() if e.get("addr") == ptr}
    me = "test_context_all_captures_the_free_stack"
    line = lambda e: next(f["line"] for f in e["frames"] if f["name"] == me)  # noqa: E731
    assert line(by_action["free_requested"]) == line(by_action["alloc"]) + 1


def _alloc_inner():
    return mtia.caching_allocator_alloc(512)


def _alloc_via(path):
    return _alloc_inner()


def _alloc_gen():
    while True:
        yield mtia.caching_allocator_alloc(512)


def test_stacks_follow_outer_frames_that_moved_on(history):
    """The capture reuses a thread's recent stacks when the interpreter's frame chain is
    the same: an inner frame at the same place, at the same instruction, reached from
    another line of its caller (or a generator resumed from elsewhere) is another stack."""
    mtia.record_memory_history(context="all")
    me = "test_stacks_follow_outer_frames_that_moved_on"
    ptrs = []
    for _ in range(3):  # repeated: the cached chains are hit, and must still tell them apart
        ptrs.append(_alloc_via(1))
        ptrs.append(_alloc_via(2))
    gen = _alloc_gen()
    ptrs.append(next(gen))
    ptrs.append((lambda: next(gen))())
    ptrs.append(next(gen))
    allocs = {e["addr"]: e["frames"] for e in trace() if e["action"] == "alloc"}
    for p in ptrs:
        mtia.caching_allocator_delete(p)
    line = lambda fr: next(f["line"] for f in fr if f["name"] == me)  # noqa: E731
    lines = [line(allocs[p]) for p in ptrs[:6]]
    assert lines[0] + 1 == lines[1] and lines[0::2] == [lines[0]] * 3 and lines[1::2] == [lines[1]] * 3
    assert all(names(allocs[p])[:2] == ["_alloc_inner", "_alloc_via"] for p in ptrs[:6])
    g = [names(allocs[p]) for p in ptrs[6:]]
    assert g[0][0] == "_alloc_gen" and g[0][1] == me and g[1][1] == "<lambda>" and g[2] == g[0], g


_kept_frames = []


def _loop_allocs(n, make_frame_object=False, keep_frame_object=False):
    if make_frame_object:
        sys._getframe()  # a frame object of someone else's (likely at a freed anchor's address)
    out = []
    for _ in range(n):
        out.append(mtia.caching_allocator_alloc(512))
    if keep_frame_object:
        _kept_frames.append(sys._getframe())  # the anchor's object outlives its frame
    return out


def test_anchored_stacks_follow_a_new_invocation(history):
    """After a hit the check anchors a chain to a frame (its frame object, marked): a new
    invocation of that frame at the same address and instruction, reached from another
    line, or with a frame object made by someone else, is another stack. (200 captures
    an invocation: the anchor stays on _loop_allocs's frame, each invocation's anew.)"""
    mtia.record_memory_history(context="all")
    me = "test_anchored_stacks_follow_a_new_invocation"
    runs = []
    runs.append(_loop_allocs(200))
    runs.append(_loop_allocs(200, keep_frame_object=True))
    runs.append(_loop_allocs(200))
    runs.append(_loop_allocs(200, make_frame_object=True))
    runs.append(_loop_allocs(200, make_frame_object=True))
    for _ in range(2):
        runs.append(_loop_allocs(200))
    _kept_frames.clear()
    allocs = {e["addr"]: e["frames"] for e in trace() if e["action"] == "alloc"}
    for r in runs:
        for p in r:
            mtia.caching_allocator_delete(p)
    line = lambda fr: next(f["line"] for f in fr if f["name"] == me)  # noqa: E731
    lines = [sorted({line(allocs[p]) for p in r}) for r in runs]
    assert all(len(x) == 1 for x in lines), lines
    first = lines[0][0]
    assert [x[0] - first for x in lines] == [0, 1, 2, 3, 4, 6, 6], lines
    assert all(names(allocs[p])[0] == "_loop_allocs" for r in runs for p in r)


class _Local:
    pass


def _holds_a_local(refs):
    obj = _Local()
    refs.append(weakref.ref(obj))
    for _ in range(20):
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(512))
    assert sys._getframe().f_trace_lines is True  # the anchor's mark reads as the flag it is


def test_anchors_keep_no_local_alive(history):
    mtia.record_memory_history(context="all")
    refs = []
    for _ in range(3):
        _holds_a_local(refs)
    assert [r() for r in refs] == [None] * 3


def test_stacks_under_a_tracer(history):
    mtia.record_memory_history(context="all")
    me = "test_stacks_under_a_tracer"
    seen = []

    def tracer(frame, event, arg):
        frame.f_trace_lines = bool(len(seen) % 2)  # a tracer sets the flag the anchors mark
        seen.append(event)
        return tracer
    sys.settrace(tracer)
    try:
        a = _loop_allocs(10)
        b = _loop_allocs(10)
    finally:
        sys.settrace(None)
    allocs = {e["addr"]: e["frames"] for e in trace() if e["action"] == "alloc"}
    for p in a + b:
        mtia.caching_allocator_delete(p)
    line = lambda fr: next(f["line"] for f in fr if f["name"] == me)  # noqa: E731
    la, lb = {line(allocs[p]) for p in a}, {line(allocs[p]) for p in b}
    assert len(la) == len(lb) == 1 and la != lb and seen


def _free_here(ptr):
    mtia.caching_allocator_delete(ptr)


def _empty_cache_here():
    mtia.empty_cache()


@pytest.mark.parametrize("context", ["state", "alloc", "all"])
def test_free_completed_and_segment_free_carry_the_call_stack_only_with_context_all(history, context):
    # PyTorch gathers a stack per free and per empty_cache at context "all" and records it
    # on free_completed and segment_free; otherwise they reuse the allocation's stacks.
    mtia.empty_cache()
    mtia.record_memory_history(context=context)
    ptr = mtia.caching_allocator_alloc(4096)
    _free_here(ptr)
    _empty_cache_here()
    entries = trace()
    alloc = next(e for e in entries if e["action"] == "alloc" and e["addr"] == ptr)
    completed = next(e for e in entries if e["action"] == "free_completed" and e["addr"] == ptr)
    segment_alloc = next(e for e in entries if e["action"] == "segment_alloc")
    segment_free = next(e for e in entries if e["action"] == "segment_free" and e["addr"] == segment_alloc["addr"])
    if context == "all":
        assert names(completed["frames"])[0] == "_free_here"
        assert names(segment_free["frames"])[0] == "_empty_cache_here"
    else:
        assert completed.get("frames") == alloc.get("frames")
        assert segment_free.get("frames") == segment_alloc.get("frames")


def test_stack_starts_at_the_direct_caller(tmp_path):
    r = run_code("""
        import mtia_alloc as m
        m.init()
        m.record_memory_history()
        p = m.caching_allocator_alloc(4096)  # module level: a one-frame stack
        m.caching_allocator_delete(p)
        def f():
            return m.caching_allocator_alloc(4096)
        q = f()
        e = [e for e in m.snapshot()["device_traces"][0] if e["action"] == "alloc"][-1]
        assert e["frames"][0]["name"] == "f", e["frames"]
        assert e["frames"][1]["name"] == "<module>", e["frames"]
    """, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def _run(script):
    r = run_code(script, "-W", "error::UserWarning", timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_record_memory_history_before_initialisation_is_ignored():
    """Spec must-have 34 (pools_graphs_streams_api.md §6.34)."""
    # pools_graphs_streams_api.md §6.34, as torch.mtia: no effect, no initialisation;
    # both signatures (torch.cuda's keywords, torch.mtia's positional order); a warning says why
    _run("""
        import warnings
        import mtia_alloc as m
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.record_memory_history(max_entries=100)
            m.record_memory_history("all", "python", 0)
        assert len(caught) == 2 and "ignored" in str(caught[0].message), caught
        assert not m.is_initialized()
        m.caching_allocator_delete(m.caching_allocator_alloc(4096))
        assert m.snapshot()["device_traces"] == [[], []], m.snapshot()["device_traces"]
        print("ok")
    """)


def test_private_record_memory_history_initialises_like_torch_cuda():
    # torch.cuda.memory._record_memory_history initialises the device, so it may come first
    _run("""
        import mtia_alloc as m
        m.memory._record_memory_history(max_entries=100)
        assert m.is_initialized()
        def a(): return b()
        def b(): return c()
        def c(): return m.caching_allocator_alloc(4096)
        p = a()
        t = m.snapshot()["device_traces"][0]
        assert [e["action"] for e in t][-2:] == ["segment_alloc", "alloc"], t
        assert [f["name"] for f in t[-1]["frames"][:3]] == ["c", "b", "a"], t[-1]["frames"]
        print("ok")
    """)


def test_torch_mtia_positional_form_after_initialisation():
    # (enabled, stacks, max_entries): max_entries=0 keeps one entry, as the CUDA allocator does
    _run("""
        import mtia_alloc as m
        m.init()
        m.record_memory_history("all", "python", 0)
        for _ in range(3):
            m.caching_allocator_delete(m.caching_allocator_alloc(4096))
        assert [e["action"] for e in m.snapshot()["device_traces"][0]] == ["free_completed"]
        m.record_memory_history("all", "all", 5)
        for _ in range(3):
            m.caching_allocator_delete(m.caching_allocator_alloc(4096))
        assert len(m.snapshot()["device_traces"][0]) == 5
        m.record_memory_history("all", "python")  # torch.mtia's default max_entries=0: one entry
        for _ in range(3):
            m.caching_allocator_delete(m.caching_allocator_alloc(4096))
        assert len(m.snapshot()["device_traces"][0]) == 1
        print("ok")
    """)


# ----------------------------------------------------------------------------- §15.25 ring buffer

def test_ring_buffer_keeps_the_last_n_entries_oldest_first(history, blocks):
    """Spec must-have 25 (allocator_core.md §15.25)."""
    blocks.free(blocks.alloc(4096))  # a cached small block: the pairs below need no new segment
    mtia.record_memory_history(max_entries=7)
    for i in range(20):
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4000 + i))
    entries = trace()
    assert [(e["action"], e["size"]) for e in entries] == [
        ("free_completed", 4017),
        ("alloc", 4018), ("free_requested", 4018), ("free_completed", 4018),
        ("alloc", 4019), ("free_requested", 4019), ("free_completed", 4019)]
    assert [e["action"] for e in trace()][-1] == "snapshot"  # the previous snapshot's entry


def test_max_entries_counts_records_when_a_free_is_one_slot(history, blocks):
    # Without stacks a free's request and completion share one slot of the ring: the
    # trace still holds exactly the newest max_entries records, cut inside a pair too.
    blocks.free(blocks.alloc(4096))
    mtia.record_memory_history(max_entries=7, context=None)
    for i in range(300):
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4000 + i))
    entries = trace()
    assert [(e["action"], e["size"]) for e in entries] == [
        ("free_completed", 4297),
        ("alloc", 4298), ("free_requested", 4298), ("free_completed", 4298),
        ("alloc", 4299), ("free_requested", 4299), ("free_completed", 4299)]
    times = [e["time_us"] for e in entries]
    assert times == sorted(times)


def test_disabling_history_clears_it_and_state_keeps_one_entry(history):
    """Spec must-have 25 (allocator_core.md §15.25)."""
    mtia.record_memory_history()
    mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))
    assert len(trace()) >= 3
    mtia.record_memory_history(None)
    assert all(t == [] for t in mtia.snapshot()["device_traces"])
    mtia.record_memory_history(enabled="state")
    for _ in range(5):
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))
    traces = mtia.snapshot()["device_traces"]
    assert [e["action"] for e in traces[0]] == ["free_completed"]  # "state": a one-entry ring
    assert all(t == [] for t in traces[1:])  # nothing happened there


def test_clear_history_on_reenable(history):
    mtia.record_memory_history()
    mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))
    mtia.record_memory_history(clear_history=True)
    assert trace() == []
    assert [e["action"] for e in trace()] == ["snapshot"]  # the entry of the snapshot before


# ----------------------------------------------------------------------------- §15.28 dump

def test_dump_snapshot_is_a_protocol_4_pickle(history, blocks, tmp_path):
    """Spec must-have 28 (allocator_core.md §15.28)."""
    mtia.record_memory_history()
    blocks.alloc(12345)
    path = tmp_path / "snap.pickle"
    mtia.memory._dump_snapshot(str(path))
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x04"
    data = pickle.loads(raw)
    assert set(data) == {"segments", "device_traces", "allocator_settings", "external_annotations"}
    assert len(data["device_traces"]) == len(DEVICES)
    assert any(e["action"] == "alloc" and e["size"] == 12345 for e in data["device_traces"][0])
