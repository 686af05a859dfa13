"""Issue 20, item 6: `python -m mtia_alloc ranks A B ...`: per rank peaks (replayed), segments
and the largest live allocations; the rank that peaks is flagged and its difference from
the median rank is attributed to call sites."""
import json

import pytest

from helpers import fresh_python
from memdebug_snapshots import snapshots_dir
from mtia_alloc.memory import Snapshot
from mtia_alloc.viz.reports import DiffReport, RanksReport

MiB = 1 << 20


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    return snapshots_dir(tmp_path_factory)


def test_the_peak_rank_is_flagged_and_explained(snaps):
    paths = [f"{snaps}/rank{i}.pickle" for i in range(4)]
    proc = fresh_python("-m", "mtia_alloc", "ranks", *paths, "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["peak_rank"] == 2 and d["median_rank"] != 2
    rows = d["rows"]
    assert rows[2]["peak_reserved"] == max(r["peak_reserved"] for r in rows)
    for r, path in zip(rows, paths):
        snap = Snapshot(path)
        assert r["segments"] == len(snap.segments) and r["peak_allocated"] >= snap.allocated
        sizes = sorted((b.size for b in snap.blocks if b.is_allocated), reverse=True)[:3]
        assert [x["size"] for x in r["largest"]] == sizes
    assert rows[2]["largest"][0]["where"].endswith("in leak")
    top = d["diff"]["rows"][0]
    assert top["site"].endswith("in leak") and top["delta_end"] == 4 * 40 * MiB
    text = fresh_python("-m", "mtia_alloc", "ranks", *paths).stdout
    assert "<- peak" in text and "against the median rank" in text


def test_repl_ranks(snaps):
    r = Snapshot.ranks([f"{snaps}/rank0.pickle", f"{snaps}/rank2.pickle", f"{snaps}/rank1.pickle"])
    assert isinstance(r, RanksReport) and r.data["peak_rank"] == 1
    assert isinstance(r.diff, DiffReport) and len(r.rows) == 3 and "RanksReport(3 ranks" in repr(r)


def test_bad_input(snaps, tmp_path):
    one = fresh_python("-m", "mtia_alloc", "ranks", f"{snaps}/rank0.pickle")
    missing = fresh_python("-m", "mtia_alloc", "ranks", f"{snaps}/rank0.pickle", str(tmp_path / "x.pickle"))
    for proc in (one, missing):
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
