"""Issue 20, item 3: `python -m mtia_alloc diff A B` and Snapshot.diff: per call site, live
bytes at the end and at each run's peak in A and B and the deltas, sorted by the largest
absolute delta; run-level reserved, peak reserved (replayed), segments and largest free
block; memory live before the recording window is counted from the rebuilt starting
state, never dropped."""
import json
import pickle

import pytest

from helpers import fresh_python
from memdebug_snapshots import snapshots_dir
from mtia_alloc.memory import Snapshot
from mtia_alloc.tools.workload import trace_from_snapshot
from mtia_alloc.viz.frames import BEFORE_RECORDING
from mtia_alloc.viz.reports import DiffReport

MiB = 1 << 20


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    return snapshots_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def diff(snaps):
    proc = fresh_python("-m", "mtia_alloc", "diff", f"{snaps}/base.pickle", f"{snaps}/bigger.pickle", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def site(rows, name):
    return next(r for r in rows if r["site"].endswith(name))


def test_rows_attribute_the_difference_to_call_sites(diff):
    rows = diff["rows"]
    keys = [max(abs(r["delta_end"]), abs(r["delta_peak"] or 0)) for r in rows]
    assert keys == sorted(keys, reverse=True)
    top = rows[0]
    assert top["site"].endswith("in leak") and top["a_end"] == 0
    assert top["delta_end"] == 40 * (3 * MiB // 2)  # one 1.5 MiB buffer per step, 40 steps
    fwd = site(rows, "in forward")
    assert fwd["delta_end"] == 0 and fwd["delta_peak"] > 0  # activations: larger at the peak, gone at the end
    assert site(rows, "in optimizer_state")["delta_end"] == 0
    for r in rows:
        assert r["delta_end"] == r["b_end"] - r["a_end"] and r["delta_peak"] == r["b_peak"] - r["a_peak"]
        assert "unwind" not in r["site"] and "torch" not in r["site"]


def test_memory_live_before_recording_is_counted(diff, snaps):
    before = site(diff["rows"], BEFORE_RECORDING)
    assert before["a_end"] == before["a_peak"] == 8 * 12 * MiB  # the weights: allocated before recording
    with open(f"{snaps}/base.pickle", "rb") as f:
        info = trace_from_snapshot(pickle.load(f)).info
    a = diff["totals"]["a"]
    assert a["live_peak"] == info["recorded_peak_requested"]  # the starting state is in the peak
    assert sum(r["a_peak"] for r in diff["rows"]) == a["live_peak"]
    assert sum(r["a_end"] for r in diff["rows"]) == a["live_end"] == Snapshot(f"{snaps}/base.pickle").requested


def test_run_level_figures(diff, snaps):
    t = diff["totals"]
    for side, name in (("a", "base"), ("b", "bigger")):
        snap = Snapshot(f"{snaps}/{name}.pickle")
        with open(f"{snaps}/{name}.pickle", "rb") as f:
            info = trace_from_snapshot(pickle.load(f)).info
        assert t[side]["reserved"] == snap.reserved and t[side]["segments"] == len(snap.segments)
        assert t[side]["largest_free_block"] == snap.largest_free_block
        assert t[side]["peak_reserved"] == info["recorded_peak_reserved"]  # replayed from the starting state
    for k in ("reserved", "segments", "peak_reserved", "live_end"):
        assert t["delta"][k] == t["b"][k] - t["a"][k]


def test_text_by_file_and_plot(snaps, tmp_path):
    out = tmp_path / "d.html"
    proc = fresh_python("-m", "mtia_alloc", "diff", f"{snaps}/base.pickle", f"{snaps}/bigger.pickle",
                        "--by", "file", "--plot", out)
    assert proc.returncode == 0, proc.stderr
    assert "grouped by file" in proc.stdout and "memdebug_snapshots.py" in proc.stdout
    assert "peak reserved (replay)" in proc.stdout
    page = out.read_text()
    assert page.count("<svg") == 3 and "Change per site" in page and "<script" not in page


def test_repl_diff_and_frame_grouping(snaps):
    a = Snapshot(f"{snaps}/base.pickle")
    d = a.diff(f"{snaps}/bigger.pickle", by="frame:2", replay=False)
    assert isinstance(d, DiffReport) and d.rows and " < " in d.rows[0]["site"]
    assert d.totals["a"]["peak_reserved"] is None  # no replay asked: n/a, not another figure
    assert "n/a" in d.table() and repr(d).startswith("DiffReport(")


@pytest.mark.parametrize("case", ["missing", "different kinds", "bad by", "no such device", "wrong pickle"])
def test_bad_input(case, snaps, tmp_path):
    mtia = tmp_path / "mtia.pickle"
    with open(f"{snaps}/base.pickle", "rb") as f:
        data = pickle.load(f)
    data["device_kind"] = "MTIA"
    mtia.write_bytes(pickle.dumps(data))
    wrong = tmp_path / "w.pickle"
    wrong.write_bytes(pickle.dumps(["not", "segments"]))
    base = f"{snaps}/base.pickle"
    args = {"missing": [base, tmp_path / "none.pickle"], "different kinds": [base, mtia],
            "bad by": [base, base, "--by", "line"], "no such device": [base, base, "--device", "5"],
            "wrong pickle": [base, wrong]}[case]
    proc = fresh_python("-m", "mtia_alloc", "diff", *map(str, args))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_snapshot_plot_shows_a_diff_and_a_sweep(snaps, tmp_path):
    a = Snapshot(f"{snaps}/base.pickle")
    sweep = a.sweep("1GiB", grid={"roundup_power2_divisions": ["none", 4]})
    out = a.plot(tmp_path / "p.html", diff=f"{snaps}/bigger.pickle", sweep=sweep)
    page = out.read_text()
    assert "Compared with another run" in page and "Change per site" in page
    assert "Allocator settings sweep" in page and "roundup_power2_divisions:4" in page
    assert page.count("<svg") >= 5 and "<script" not in page
    with pytest.raises(TypeError, match="SweepReport"):
        a.plot(tmp_path / "q.html", sweep="nope")
