"""Issue 20, item 5: `fit ... --sweep` and Snapshot.sweep: a grid of allocator settings, each
replayed on a fresh allocator in a process of its own, all cores at once; sorted by peak
reserved; combinations PyTorch ignores or refuses are reported, not run silently."""
import json

import pytest

from helpers import fresh_python
from memdebug_snapshots import snapshots_dir
from mtia_alloc.memory import Snapshot
from mtia_alloc.tools import sweep as S
from mtia_alloc.viz.reports import SweepReport


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    return snapshots_dir(tmp_path_factory)


def test_default_grid_plan():
    rows = S.plan(S.DEFAULT_GRID)
    assert len(rows) == 2 * 5 * 3 * 3
    run = [r for r in rows if r["status"] == "run"]
    assert len(run) == 5 * 3 + 3  # no memory fraction: GC ignored; expandable: max_split ignored
    ignored = [r for r in rows if r["status"] == "ignored"]
    assert all("same as" in r["note"] for r in ignored)
    gc = next(r for r in ignored if r["setting"] == "garbage_collection_threshold:0.6")
    assert "memory fraction" in gc["note"] and gc["same_as"] == ""
    # with a memory fraction, garbage collection runs (but not with expandable segments)
    with_fraction = S.plan(S.DEFAULT_GRID, "per_process_memory_fraction:0.9")
    assert sum(r["status"] == "run" for r in with_fraction) == 5 * 3 * 3 + 3
    assert all(r["conf"].startswith("per_process_memory_fraction:0.9") for r in with_fraction)


def test_sweep_runs_in_parallel_and_recommends(snaps):
    proc = fresh_python("-m", "mtia_alloc", "fit", f"{snaps}/bigger.pickle", "--memory", "300MiB", "--sweep",
                        "--json", "--grid", "expandable_segments=False,True",
                        "--grid", "max_split_size_mb=none,64,10", "--grid", "roundup_power2_divisions=none,4")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    rows = d["rows"]
    assert len(rows) == 12 and d["workers"] >= 1
    ran = [r for r in rows if r["status"] == "ran"]
    assert [(r["oom"], r["peak_reserved"]) for r in ran] == sorted((r["oom"], r["peak_reserved"]) for r in ran)
    refused = [r for r in rows if r["status"] == "refused"]
    assert refused and all("max_split_size_mb:10" in r["setting"] and "must be >= 20" in r["note"]
                           for r in refused)
    assert any(r["status"] == "ignored" and "expandable" in r["note"] for r in rows)
    rec = d["recommended"]
    assert rec == {**ran[0], "why": rec["why"]} and not rec["oom"]
    default = next(r for r in ran if r["setting"] == "")
    # the defaults' row is the fit command's figure
    fit = json.loads(fresh_python("-m", "mtia_alloc", "fit", f"{snaps}/bigger.pickle", "--memory", "300MiB",
                                  "--json").stdout)
    assert default["peak_reserved"] == fit["peak_reserved"]
    assert default["num_device_alloc"] == fit["num_device_alloc"]


def test_sweep_reports_ooms_and_exit_3_when_nothing_fits(snaps):
    proc = fresh_python("-m", "mtia_alloc", "fit", f"{snaps}/bigger.pickle", "--memory", "200MiB", "--sweep",
                        "--grid", "roundup_power2_divisions=none,4")
    assert proc.returncode == 3
    assert "recommended: none" in proc.stdout and "yes" in proc.stdout and "failed allocations" in proc.stdout


def test_repl_sweep_and_plot(snaps, tmp_path):
    s = Snapshot(f"{snaps}/base.pickle").sweep("1GiB", grid={"max_split_size_mb": ["none", 64]}, jobs=2)
    assert isinstance(s, SweepReport) and len(s.rows) == 2 and s.recommended["setting"] == ""
    assert "SweepReport(2 settings" in repr(s) and "recommended" in s.table()
    page = s.plot(tmp_path / "s.html") and (tmp_path / "s.html").read_text()
    assert "<svg" in page and "max_split_size_mb:64" in page


def test_bad_grid(snaps):
    for grid in ("max_split_size_mb", "=1", "a=1"):
        proc = fresh_python("-m", "mtia_alloc", "fit", f"{snaps}/base.pickle", "--memory", "1GiB", "--sweep",
                            "--grid", grid, "--grid", grid)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (grid, proc.stderr)
