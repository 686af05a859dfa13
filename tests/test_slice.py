"""`python -m mtia_alloc slice` and Snapshot.window: the snapshot of a window of the
recording. Its starting state (what undoing the window gives) is the real state at T0,
its memory curves over the window are the whole snapshot's at the same moments (so its
peak is the window's peak), it passes our checker of memory_viz_format.md (and
torch.cuda._memory_viz when torch is installed), and bad input is one line, exit 2."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from mtia_alloc.tools.synth_snapshot import synth_snapshot
from mtia_alloc.tools.viz_check import check_pickle
from mtia_alloc.tools.workload import starting_state
from mtia_alloc.viz.load import load, normalize
from mtia_alloc.viz.model import Snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    path = tmp_path_factory.mktemp("slice") / "whole.pickle"
    snap = synth_snapshot(12000, seed=5, n_stacks=30, depth=10)
    path.write_bytes(pickle.dumps(snap, protocol=4))
    return path, snap


def _cli(*args, env=None):
    e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mtia_alloc", *args], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=600)


def _check_window(snap, out, k0, k1):
    entries = snap["device_traces"][0]
    # the state the window starts from is the real state at k0
    seg_w, live_w = starting_state(out, 0)
    seg_r, live_r = starting_state(snap, 0, entries[k0:])
    assert seg_w == seg_r
    assert set(live_w) == set(live_r)
    assert {a: b["requested"] for a, b in live_w.items()} == {a: b["requested"] for a, b in live_r.items()}
    # the curves over the window are the whole snapshot's
    cw = Snapshot(out).memory_over_time(0)
    cr = Snapshot(snap).memory_over_time(0)
    assert list(cw["allocated"]) == list(cr["allocated"][k0:k1])
    assert list(cw["reserved"]) == list(cr["reserved"][k0:k1])
    assert max(cw["allocated"]) == max(cr["allocated"][k0:k1])
    assert list(out["device_traces"][0]) == entries[k0:k1]


@pytest.mark.parametrize("columnar", ["0", "1000000000"])
def test_slice_by_time_keeps_the_state_and_the_curves(tmp_path, whole, columnar):
    path, snap = whole
    entries = snap["device_traces"][0]
    t0, t1 = entries[3000]["time_us"], entries[9000]["time_us"]
    out_path = tmp_path / "w.pickle"
    r = _cli("slice", str(path), "--from", str(t0), "--to", str(t1), "-o", str(out_path),
             env={"MTIA_ALLOC_COLUMNAR_MIN_BYTES": columnar})
    assert r.returncode == 0, r.stderr
    assert out_path.read_bytes()[:2] == b"\x80\x04"
    assert check_pickle(str(out_path)) == []
    out = normalize(load(out_path, columnar=False))
    k0 = next(i for i, e in enumerate(entries) if e["time_us"] >= t0)
    k1 = max(i for i, e in enumerate(entries) if e["time_us"] <= t1) + 1
    _check_window(snap, out, k0, k1)
    # the tools read it: a replay from its rebuilt state makes no orphan
    fit = _cli("fit", str(out_path), "--memory", "8GiB", "--skip-recorded-ooms", "--json")
    assert fit.returncode == 0, fit.stderr


def test_window_in_the_repl_and_by_events(tmp_path, whole):
    path, snap = whole
    s = Snapshot(str(path))
    w = s.window(events=(2500, 7000))
    _check_window(snap, w.data, 2500, 7000)
    w.dump(tmp_path / "w.pickle")
    assert check_pickle(str(tmp_path / "w.pickle")) == []
    r = _cli("slice", str(path), "--events", "2500:7000", "-o", str(tmp_path / "e.pickle"))
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "e.pickle", columnar=False)["device_traces"][0] == snap["device_traces"][0][2500:7000]
    # the whole recording, from the start and to the end
    w = s.window(events=(0, None))
    _check_window(snap, w.data, 0, len(snap["device_traces"][0]))


def test_slice_loads_in_torch_memory_viz(tmp_path, whole):
    mv = pytest.importorskip("torch.cuda._memory_viz")
    path, snap = whole
    out = tmp_path / "w.pickle"
    assert _cli("slice", str(path), "--events", "1000:4000", "-o", str(out)).returncode == 0
    with open(out, "rb") as f:
        data = pickle.load(f)
    mv.segsum(data)
    mv.trace(data)
    assert "Active Memory Timeline" in mv.trace_plot(data) or mv.trace_plot(data)


def test_bad_input_is_one_line_and_status_2(tmp_path, whole):
    path, snap = whole
    cut = tmp_path / "cut.pickle"
    cut.write_bytes(path.read_bytes()[:20000])
    first, last = snap["device_traces"][0][0]["time_us"], snap["device_traces"][0][-1]["time_us"]
    cases = [
        (("slice", str(cut), "--events", "0:10", "-o", str(tmp_path / "o.pickle")), "truncated"),
        (("slice", str(path), "--from", str(last + 10), "--to", str(last + 20), "-o", str(tmp_path / "o.pickle")),
         "outside the recording"),
        (("slice", str(path), "--from", "0", "--to", str(first - 1), "-o", str(tmp_path / "o.pickle")),
         "outside the recording"),
        (("slice", str(path), "--events", "5:999999", "-o", str(tmp_path / "o.pickle")), "outside the recording"),
        (("slice", str(path), "--events", "0:10", "-o", str(tmp_path / "no" / "o.pickle")), "cannot write"),
        (("slice", str(path), "--events", "0:10", "-o", str(tmp_path)), "is a directory"),
        (("slice", str(path), "-o", str(tmp_path / "o.pickle")), "give the window"),
        (("slice", str(tmp_path / "missing.pickle"), "--events", "0:1", "-o", str(tmp_path / "o.pickle")),
         "no such file"),
    ]
    for args, words in cases:
        for env in ({}, {"MTIA_ALLOC_COLUMNAR_MIN_BYTES": "0"}):
            r = _cli(*args, env=env)
            assert r.returncode == 2, (args, r.stderr)
            assert r.stderr.startswith("mtia_alloc: error: slice: ") and r.stderr.count("\n") == 1, r.stderr
            assert words in r.stderr, r.stderr
            assert not os.path.exists(tmp_path / "o.pickle")
