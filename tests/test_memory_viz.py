"""Our snapshots load in PyTorch's memory visualizer.

Without torch: mtia_alloc.tools.viz_check applies the rules of shared/memory_viz_format.md (the
schema every renderer needs, and what the pytorch.org/memory_viz page additionally needs:
blocks tiling segments, every live block inside a segment at every point of the trace,
device == trace index, the `category` quirk, pickle protocol <= 4, plain types) to
snapshots taken in many allocator states; and the checker itself is shown to catch each rule.

With torch installed (the `viz` extra): torch.cuda._memory_viz renders the same snapshots:
segment_plot, trace_plot, memory and segments flamegraphs, segsum (the CLI `stats` command,
run as PyTorch's CLI) and trace."""
import base64
import copy
import json
import pickle
import runpy
import sys
import warnings

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import DEVICES, MiB
from mtia_alloc.tools import viz_check as vc






def _scenario(name):
    """Takes a snapshot after driving the allocator into a state worth rendering."""
    mtia.record_memory_history(None)
    mtia.empty_cache()
    live = []

    def alloc(n, device=None, stream=None):
        p = mtia.caching_allocator_alloc(n, device, stream)
        live.append(p)
        return p

    def free(p):
        live.remove(p)
        mtia.caching_allocator_delete(p)

    try:
        if name == "no-history":
            alloc(1000), alloc(3 * MiB)
            return mtia.snapshot()
        if name == "ring-buffer-truncated":
            mtia.record_memory_history(max_entries=9)
        elif name == "state-only":
            mtia.record_memory_history(enabled="state")
        else:
            mtia.record_memory_history(context="all")
        if name == "pool-and-devices":
            pool = mtia.MemPool()
            with mtia.use_mem_pool(pool):
                q = alloc(6 * MiB)
            alloc(512, DEVICES[-1])
            snap = mtia.snapshot()
            free(q)
            del pool
            return snap
        if name == "pending-free":
            side = mtia.Stream(device=0)
            p = alloc(2 * MiB)
            mtia.emulator.sleep(100, stream=side)
            mtia.record_stream(p, side)
            free(p)
            return mtia.snapshot()
        if name == "oom":
            mtia.set_per_process_memory_fraction(0.001, 0)
            try:
                alloc(1 << 30)
            except mtia.OutOfMemoryError:
                pass
            mtia.set_per_process_memory_fraction(1.0, 0)
            alloc(100)
            return mtia.snapshot()
        # "churn", "ring-buffer-truncated", "state-only": allocations, frees, segment frees
        ptrs = [alloc(n) for n in (100, 1000, 512, 5 * MiB, 3 * MiB, 30 * MiB, 700)]
        for p in ptrs[1::2]:
            free(p)
        mtia.empty_cache()
        for n in (4096, 25 * MiB, 2 * MiB):
            alloc(n)
        free(ptrs[0])
        return mtia.snapshot()
    finally:
        mtia.record_memory_history(None)
        for p in list(live):
            free(p)
        mtia.empty_cache()


SCENARIOS = ["churn", "no-history", "ring-buffer-truncated", "state-only", "pool-and-devices", "pending-free", "oom"]


@pytest.fixture(scope="module")
def snapshots():
    # History recording needs an initialised device (before init it is ignored, as in
    # torch.mtia); this module may run first, or alone.
    mtia.init()
    return {name: _scenario(name) for name in SCENARIOS}


# ----------------------------------------------------------------------------- our checker

@pytest.mark.parametrize("name", SCENARIOS)
def test_our_snapshots_meet_memory_viz_format(snapshots, name, tmp_path):
    snap = snapshots[name]
    assert vc.check(snap) == []
    path = tmp_path / "s.pickle"
    mtia.memory.Snapshot(snap).dump(path)
    assert vc.check_pickle(path) == []
    assert vc.check(snap["segments"]) == []  # memory_snapshot()'s bare list, as the CLI wraps it
    if name != "no-history":
        assert any(snap["device_traces"]), "history was recorded"


def test_dump_snapshot_file_meets_memory_viz_format(tmp_path, blocks):
    mtia.record_memory_history()
    try:
        blocks.alloc(3 * MiB)
        path = tmp_path / "dump.pickle"
        mtia.memory._dump_snapshot(str(path))
    finally:
        mtia.record_memory_history(None)
    assert vc.check_pickle(path) == []
    # the page also reads a JSON file with the same structure
    assert vc.check(json.loads(json.dumps(pickle.loads(path.read_bytes())))) == []


def _base():
    return copy.deepcopy(_scenario("churn"))


def _first_block_segment(s):
    return next(seg for seg in s["segments"] if len(seg["blocks"]) > 1)


@pytest.mark.parametrize("breakage, expected", [
    (lambda s: s.pop("device_traces"), "'device_traces' missing"),
    (lambda s: s["segments"][0].pop("device"), "missing 'device'"),
    (lambda s: s["segments"][0].update(device=7), "has no device_traces[7]"),
    (lambda s: s["segments"][0].pop("stream"), "missing 'stream'"),
    (lambda s: _first_block_segment(s)["blocks"].pop(), "blocks add up to"),
    (lambda s: _first_block_segment(s)["blocks"].reverse(), "but the blocks before it end at"),
    (lambda s: s["segments"][0]["blocks"][0].update(state="active_awaiting_free"), "is not one of"),
    (lambda s: s["segments"][0]["blocks"][0].pop("requested_size"), "has 'frames' but no 'requested_size'"),
    (lambda s: s["segments"][0].update(address=np.int64(s["segments"][0]["address"])), "numpy.int64"),
    (lambda s: s["segments"][0].update(address=1 << 60), "not exact in JavaScript"),
    (lambda s: s["device_traces"][0][0].update(action="malloc"), "is not a known action"),
    (lambda s: s["device_traces"][0][0].update(category="activation"), "bug B3"),
    (lambda s: s["device_traces"][0].append({"action": "oom", "size": 1}), "missing 'device_free'"),
    (lambda s: s["device_traces"][0][0].update(frames=[{"filename": "x.py", "line": 1}]), "'name' missing"),
    (lambda s: s.update(segments=s["segments"][::-1]), "out of address order"),
    (lambda s: s.update(segments=[]), "lies in no segment"),
])
def test_checker_catches_each_rule(breakage, expected):
    snap = _base()
    assert vc.check(snap) == []
    breakage(snap)
    problems = vc.check(snap)
    assert any(expected in p for p in problems), problems


def test_checker_catches_pickle_encoding():
    snap = _scenario("no-history")
    assert vc.check_pickle(pickle.dumps(snap, protocol=4)) == []
    assert any("protocol 5" in p for p in vc.check_pickle(pickle.dumps(snap, protocol=5)))
    snap["segments"][0]["address"] = np.int64(snap["segments"][0]["address"])
    assert any("STACK_GLOBAL" in p for p in vc.check_pickle(pickle.dumps(snap, protocol=4)))
    snap["segments"][0]["address"] = b"\x00"
    assert any("BYTES" in p for p in vc.check_pickle(pickle.dumps(snap, protocol=4)))


def test_checker_undoes_free_requested_only_for_live_blocks():
    A = 0x7F0000000000
    snap = {"segments": [{"device": 0, "address": A, "total_size": 2 * MiB, "stream": 0,
                          "blocks": [{"size": 2 * MiB, "state": "inactive"}]}],
            "device_traces": [[{"action": "free_requested", "addr": A, "size": 8},
                               {"action": "alloc", "addr": A + 512, "size": 8}]]}
    assert any("free_requested" in p for p in vc.check(snap))
    snap["device_traces"][0].insert(1, {"action": "free_completed", "addr": A, "size": 8})
    assert vc.check(snap) == []  # merged into one 'free' event by the page


# ----------------------------------------------------------------------------- torch renders it

@pytest.fixture(scope="module")
def memory_viz():
    pytest.importorskip("torch")
    from torch.cuda import _memory_viz
    return _memory_viz


def _embedded(html_text):
    """The snapshot a _memory_viz HTML page embeds (base64 pickle)."""
    blob = json.loads(html_text.split("const local_files = ", 1)[1].split("\n", 1)[0])[0]["base64"]
    return pickle.loads(base64.b64decode(blob))


@pytest.mark.parametrize("name", SCENARIOS)
def test_torch_memory_viz_renders_our_snapshots(memory_viz, snapshots, name):
    snap = snapshots[name]
    for html_text, kind in (
            (memory_viz.segment_plot(copy.deepcopy(snap)), "Allocator State History"),
            (memory_viz.trace_plot(copy.deepcopy(snap)), "Active Memory Timeline"),
            (memory_viz.trace_plot(copy.deepcopy(snap), filter_freed=True), "Active Memory Timeline")):
        assert repr(kind) in html_text
        assert _embedded(html_text)["segments"] == snap["segments"]
    stats = memory_viz.segsum(snap)
    assert f"segments: {len(snap['segments'])}" in stats
    total = sum(s["total_size"] for s in snap["segments"])
    assert f"total_reserved: {memory_viz.Bytes(total)}" in stats
    trace_text = memory_viz.trace(snap)
    for d, t in enumerate(snap["device_traces"]):
        if t:
            assert f"Device {d} ----------------\n{len(t)} entries" in trace_text
    lines = memory_viz.memory(snap, format_flamegraph=lambda text: text)
    by_segment = memory_viz.segments(snap, format_flamegraph=lambda text: text)
    accounted = sum(int(line.rsplit(" ", 1)[1]) for line in lines.splitlines())
    assert accounted == total
    assert sum(int(line.rsplit(" ", 1)[1]) for line in by_segment.splitlines()) == total
    memory_viz.compare(snap["segments"], [], format_flamegraph=lambda text: text)


def test_torch_memory_viz_stats_cli(memory_viz, snapshots, tmp_path, capsys, monkeypatch):
    """`python -m torch.cuda._memory_viz stats FILE` on a file we wrote."""
    path = tmp_path / "ours.pickle"
    mtia.memory.Snapshot(snapshots["churn"]).dump(path)
    monkeypatch.setattr(sys, "argv", ["_memory_viz", "stats", str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        runpy.run_module("torch.cuda._memory_viz", run_name="__main__")
    out = capsys.readouterr().out
    assert f"segments: {len(snapshots['churn']['segments'])}" in out and "total_reserved:" in out
