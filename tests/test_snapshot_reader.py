"""The columnar snapshot reader (viz.columns, viz._pickle_reader): every pickle protocol
torch's _dump_snapshot writes (2-5) and ours read into the same data as the plain-data
unpickler, each distinct stack kept once; what it cannot read falls back, what is unsafe or
truncated is refused with the plain reader's one line; and the snapshot view and the tools
give the same figures either way."""
import datetime
import gzip
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from mtia_alloc.tools import diff as diff_tool
from mtia_alloc.tools.synth_snapshot import synth_snapshot
from mtia_alloc.tools.workload import trace_from_snapshot
from mtia_alloc.viz.columns import TraceColumns, write_pickle
from mtia_alloc.viz.frames import SiteKey
from mtia_alloc.viz.load import UnsafePickleError, load, normalize
from mtia_alloc.viz.model import Snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def snap():
    return synth_snapshot(6000, seed=3, n_stacks=40, depth=12)


def _write(tmp_path, obj, protocol=4, name="s.pickle"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_protocol_reads_the_same_data(tmp_path, snap, protocol):
    path = _write(tmp_path, snap, protocol)
    col = load(path, columnar=True)
    ref = load(path, columnar=False)
    trace = col["device_traces"][0]
    assert isinstance(trace, TraceColumns)
    assert len(trace) == len(ref["device_traces"][0])
    assert list(trace) == ref["device_traces"][0]
    assert col["segments"] == ref["segments"]
    assert col["allocator_settings"] == ref["allocator_settings"]
    # each distinct stack once, each distinct frame once
    assert len(trace.stacks) <= 40
    ids = {id(fr) for st in trace.stacks for fr in st}
    assert len(ids) == len({json.dumps(fr, sort_keys=True) for st in trace.stacks for fr in st})


def test_gzip_and_duplicate_frame_objects(tmp_path, snap):
    # frames as separate (equal) dict objects, as a JSON round trip leaves them
    copy = json.loads(json.dumps(snap))
    path = tmp_path / "s.pickle.gz"
    path.write_bytes(gzip.compress(pickle.dumps(copy, protocol=4)))
    col = load(path, columnar=True)
    assert list(col["device_traces"][0]) == copy["device_traces"][0]
    assert len(col["device_traces"][0].stacks) <= 40


def test_entries_with_extra_keys_odd_values_and_several_devices(tmp_path):
    entries = [{"action": "segment_alloc", "addr": 1 << 40, "size": 2 << 20, "stream": -3, "time_us": 5},
               {"action": "alloc", "addr": (1 << 40) + 512, "size": 100, "stream": 0, "time_us": 6,
                "frames": [], "compile_context": "N/A", "user_metadata": {"a": 1}},
               {"action": "oom", "size": 1 << 30, "device_free": 7, "stream": 0},
               {"action": "free_completed", "addr": 1 << 64 - 1, "size": 100, "stream": 1 << 70},
               {"action": "snapshot", "addr": 0, "size": 0, "time_us": 2.5},
               {"addr": 3}]
    obj = {"segments": [], "device_traces": [entries, [], entries[:2]], "allocator_settings": {"x": [1, 2]}}
    path = _write(tmp_path, obj, 4)
    col = load(path, columnar=True)
    assert [list(t) for t in col["device_traces"]] == obj["device_traces"]
    assert col["device_traces"][0][3] == entries[3] and col["device_traces"][0][-1] == {"addr": 3}


def test_our_writer_round_trips_and_loads_in_the_plain_reader(tmp_path, snap):
    path = _write(tmp_path, snap, 4)
    col = load(path, columnar=True)
    out = tmp_path / "w.pickle"
    write_pickle(out, col)
    assert out.read_bytes()[:2] == b"\x80\x04"
    back = load(out, columnar=False)
    assert back["device_traces"][0] == snap["device_traces"][0]
    assert back["segments"] == json.loads(json.dumps(snap["segments"]), object_hook=None) or \
        back["segments"] == pickle.loads(pickle.dumps(snap["segments"]))


def test_refusals_match_the_plain_reader(tmp_path, snap):
    bad = _write(tmp_path, {"segments": [], "device_traces": [[{"action": "alloc", "x": datetime.date(2020, 1, 1)}]]},
                 4, "bad.pickle")
    with pytest.raises(UnsafePickleError, match=r"refers to datetime\.date; only plain data"):
        load(bad, columnar=True)
    data = pickle.dumps(snap, protocol=4)
    cut = tmp_path / "cut.pickle"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="the pickle is truncated or corrupt") as e1:
        load(cut, columnar=True)
    with pytest.raises(ValueError, match="the pickle is truncated or corrupt") as e2:
        load(cut, columnar=False)
    assert str(e1.value) == str(e2.value)
    # numpy scalars and sets: allowed globals, read by the plain unpickler
    odd = _write(tmp_path, {"segments": [], "device_traces": [[{"action": "alloc", "addr": np.int64(5),
                                                                 "size": 3}]]}, 4, "np.pickle")
    assert load(odd, columnar=True)["device_traces"][0][0]["addr"] == 5
    # protocol 0 and JSON: the plain readers
    p0 = _write(tmp_path, snap, 0, "p0.pickle")
    assert load(p0, columnar=True)["device_traces"][0] == snap["device_traces"][0]


def test_snapshot_view_same_figures_either_way(tmp_path, snap):
    path = _write(tmp_path, snap, 4)
    a = Snapshot(normalize(load(path, columnar=False)))
    b = Snapshot(normalize(load(path, columnar=True)))
    assert repr(a) == repr(b)
    assert a.devices == b.devices
    assert a.stats(0) == b.stats(0)
    assert a.summary(replay=False) == b.summary(replay=False)
    ca, cb = a.memory_over_time(0), b.memory_over_time(0)
    for k in ("index", "time_us", "allocated", "reserved", "oom"):
        assert list(ca[k]) == list(cb[k])
    ta = trace_from_snapshot(a.data, "a")
    tb = trace_from_snapshot(b.data, "b")
    assert ta.info == tb.info
    assert np.array_equal(ta.sizes, tb.sizes) and np.array_equal(ta.slots, tb.slots)
    pa = diff_tool.site_profile(a.data, 0, SiteKey("site"), top=3)
    pb = diff_tool.site_profile(b.data, 0, SiteKey("site"), top=3)
    assert pa == pb


def _cli(*args, env=None):
    e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mtia_alloc", *args], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=600)


def test_commands_read_big_files_through_the_columns(tmp_path, snap):
    path = str(_write(tmp_path, snap, 4))
    forced = {"MTIA_ALLOC_COLUMNAR_MIN_BYTES": "0"}
    for args in (["summary", path], ["fit", path, "--memory", "4GiB", "--skip-recorded-ooms", "--json"], ["diff", path, path, "--json"]):
        plain, col = _cli(*args), _cli(*args, env=forced)
        assert plain.returncode == col.returncode == 0, (plain.stderr, col.stderr)
        assert plain.stdout == col.stdout
    cut = tmp_path / "cut.pickle"
    cut.write_bytes(open(path, "rb").read()[:5000])
    r = _cli("summary", str(cut), env=forced)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("mtia_alloc: error: ")
    assert "truncated" in r.stderr


def test_summary_of_a_long_trace_reports_the_recorded_peaks(tmp_path, snap, monkeypatch):
    from mtia_alloc.viz import model
    monkeypatch.setattr(model, "REPLAY_MAX_EVENTS", 100)
    s = Snapshot(normalize(load(_write(tmp_path, snap, 4), columnar=True)))
    text = s.summary(notes=True)
    assert "as recorded in the trace" in text
    curves = s.memory_over_time(0)
    assert s.stats(0, replay=True)["requested_bytes.all.peak"] == max(int(np.max(curves["allocated"])),
                                                                      int(curves["allocated"][0]) - 0)


def test_damaged_pickles_fail_with_one_clear_error(tmp_path, snap):
    """Cut anywhere or with bytes changed, a pickle gives the plain reader's error (or reads,
    when the damage leaves valid data): never a crash or an unexpected exception."""
    import random
    data = pickle.dumps(synth_snapshot(300, seed=9, n_stacks=5, depth=4), protocol=4)
    rng = random.Random(0)
    path = tmp_path / "d.pickle"
    cases = [data[:k] for k in range(0, len(data), max(1, len(data) // 150))]
    for _ in range(300):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    for case in cases:
        path.write_bytes(case)
        try:
            load(path, columnar=True)
        except (ValueError, UnsafePickleError):
            pass
