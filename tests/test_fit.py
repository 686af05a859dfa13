"""Issue 20, item 4: `python -m mtia_alloc fit SNAPSHOT_OR_TRACE --memory M`: the workload is
replayed on a fresh allocator of that capacity; it fits (exit 0: peak reserved, headroom) or
not (exit 3: the first failing allocation, its call site and size, the allocator's state
then). Bad input: one line on stderr, exit 2."""
import collections
import json
import pickle

import pytest

from helpers import fresh_python
from memdebug_snapshots import snapshots_dir
from mtia_alloc.memory import Snapshot
from mtia_alloc.tools.workload import trace_from_snapshot
from mtia_alloc.viz.reports import FitReport

MiB = 1 << 20


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    return snapshots_dir(tmp_path_factory)


def cli(*args):
    return fresh_python("-m", "mtia_alloc", *map(str, args))


def test_fits_reports_peak_reserved_and_headroom(snaps):
    proc = cli("fit", f"{snaps}/base.pickle", "--memory", "1GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    with open(f"{snaps}/base.pickle", "rb") as f:
        info = trace_from_snapshot(pickle.load(f)).info
    assert d["fits"] and d["memory"] == 1 << 30 and d["failure"] is None
    assert d["peak_reserved"] == info["recorded_peak_reserved"]  # the recorded run's peak, reproduced
    assert d["peak_requested"] == info["recorded_peak_requested"]
    assert d["headroom"] == d["memory"] - d["peak_reserved"]
    assert d["start_reserved"] == info["start_reserved"] > 0
    text = cli("fit", f"{snaps}/base.pickle", "--memory", "1GiB").stdout
    assert "FITS: peak reserved" in text and "headroom" in text


def test_does_not_fit_names_the_failing_call_site_and_the_state(snaps):
    proc = cli("fit", f"{snaps}/base.pickle", "--memory", "150MiB", "--json")
    assert proc.returncode == 3, proc.stderr
    d = json.loads(proc.stdout)
    f = d["failure"]
    assert not d["fits"] and d["headroom"] is None
    assert f["size"] == 24 * MiB and f["where"].endswith("in optimizer_state")
    assert f["stack"][0] == f["where"] and "unwind" not in " ".join(f["stack"])
    st = f["state"]
    assert st["capacity"] == 150 * MiB and st["reserved"] <= 150 * MiB
    assert st["free_but_unusable"] == st["cached_free"] + st["device_free"]
    assert max(st["largest_free_block"].values()) < st["rounded_request"]  # no free block could take it
    assert st["device_free"] < st["segment_needed"]                        # nor a new segment
    assert "OutOfMemory" not in f["message"] and "Tried to allocate" in f["message"]
    # the trace entry it came from is the allocation of that size
    with open(f"{snaps}/base.pickle", "rb") as fh:
        entry = pickle.load(fh)["device_traces"][0][f["entry"]]
    assert entry["action"] == "alloc" and entry["size"] == f["size"]
    text = cli("fit", f"{snaps}/base.pickle", "--memory", "150MiB").stdout
    assert "DOES NOT FIT" in text and "optimizer_state" in text and "free but unusable" in text


def test_trace_csv_input(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("op,id,size_bytes\n" + "".join(f"a,{i},{8 * MiB}\n" for i in range(10))
                    + "".join(f"f,{i},{8 * MiB}\n" for i in range(10)))
    ok = cli("fit", path, "--memory", "1GiB", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["peak_reserved"] == 100 * MiB  # 20 MiB segments, two blocks each
    bad = cli("fit", path, "--memory", "60MiB")
    assert bad.returncode == 3 and "not recorded (no stack in the input)" in bad.stdout


def bad_inputs(tmp_path, snaps):
    ints = tmp_path / "ints.pickle"
    ints.write_bytes(pickle.dumps([1, 2, 3]))
    other = tmp_path / "dict.pickle"
    other.write_bytes(pickle.dumps({"a": 1}))
    objs = tmp_path / "counter.pickle"
    objs.write_bytes(pickle.dumps(collections.Counter(a=1)))
    return {
        "missing file": ([tmp_path / "nope.pickle", "--memory", "1GiB"], "no such file"),
        "list of ints": ([ints, "--memory", "1GiB"], "not a memory snapshot"),
        "dict pickle": ([other, "--memory", "1GiB"], "not a memory snapshot"),
        "pickle of objects": ([objs, "--memory", "1GiB"], "not a memory snapshot"),
        "directory": ([tmp_path, "--memory", "1GiB"], "is a directory"),
        "no trace": ([f"{snaps}/segments.pickle", "--memory", "1GiB"], "no device_traces"),
        "below the starting state": ([f"{snaps}/base.pickle", "--memory", "50MiB"], "starting state does not fit"),
        "bad memory": ([f"{snaps}/base.pickle", "--memory", "lots"], "--memory"),
        "bad conf": ([f"{snaps}/base.pickle", "--memory", "1GiB", "--conf", "max_split_size_mb:5"], "refused"),
        "device without events": ([f"{snaps}/base.pickle", "--memory", "1GiB", "--device", "1"], "no allocations"),
    }


@pytest.mark.parametrize("case", ["missing file", "list of ints", "dict pickle", "pickle of objects", "directory",
                                  "no trace", "below the starting state", "bad memory", "bad conf",
                                  "device without events"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, snaps):
    args, words = bad_inputs(tmp_path, snaps)[case]
    proc = cli("fit", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and words in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_repl_fit_report(snaps):
    snap = Snapshot(f"{snaps}/base.pickle")
    yes, no = snap.fit("1GiB"), snap.fit(150 * MiB)
    assert isinstance(yes, FitReport) and yes.fits and not no.fits
    assert repr(yes).startswith("FitReport(fits on 1.00 GiB") and "NOT fit" in repr(no)
    assert yes.rows[0]["headroom"] == yes.data["headroom"] and no.rows[0]["failure_size"] == 24 * MiB
    assert "DOES NOT FIT" in no.table() and str(no) == no.table()


def test_memory_recorded_re_enacts_and_explains_the_recorded_oom(snaps):
    with open(f"{snaps}/oom.pickle", "rb") as f:
        entries = pickle.load(f)["device_traces"][0]
    oom_at = next(i for i, e in enumerate(entries) if e["action"] == "oom")
    proc = cli("fit", f"{snaps}/oom.pickle", "--memory", "recorded", "--json")
    assert proc.returncode == 3, proc.stderr
    d = json.loads(proc.stdout)
    f = d["failure"]
    assert d["recorded_ooms"] == 1
    assert f["entry"] == oom_at and f["size"] == entries[oom_at]["size"]
    assert f["state"]["device_free"] == entries[oom_at]["device_free"]  # the recorded run's free memory
    assert f["where"].endswith("in forward")
    # free memory there was, but no piece of it could serve the request
    assert f["state"]["free_but_unusable"] > f["size"] > max(f["state"]["largest_free_block"].values())
    text = cli("fit", f"{snaps}/oom.pickle", "--memory", "recorded").stdout
    assert "raised 1 OOM(s)" in text and "free but unusable" in text
    # on a larger device the failed request is a transient allocation, and it fits
    assert cli("fit", f"{snaps}/oom.pickle", "--memory", "1GiB").returncode == 0
    no_oom = cli("fit", f"{snaps}/base.pickle", "--memory", "recorded")
    assert no_oom.returncode == 2 and "records no OOM" in no_oom.stderr
