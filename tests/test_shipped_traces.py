"""The traces shipped with mtia_alloc (issue 22, item 1): they are package data, they read,
`bench` falls back to them when no shared traces folder is found and says so in its note
line, and `replay` takes one by name. Nothing here needs /work/shared."""
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from mtia_alloc.tools import bench_suite
from mtia_alloc.tools.shipped_traces import SHIPPED_DIR, resolve_trace, shipped_traces
from mtia_alloc.tools.workload import read_trace

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["gpt2_generate", "gpt2_train", "resnet50_train", "rmm_random_100k_1MiB_2streams", "rmm_random_100k_4MiB"]


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MTIA_ALLOC_CONF", None)
    return subprocess.run([sys.executable, "-m", "mtia_alloc", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_the_five_traces_are_shipped_with_their_meta_files():
    found = shipped_traces()
    assert sorted(found) == NAMES
    for name, path in found.items():
        assert path.parent == SHIPPED_DIR and path.stat().st_size > 10_000
        meta = json.loads((SHIPPED_DIR / f"{name}.meta.json").read_text())
        assert meta.get("file", f"{name}.csv.gz") == f"{name}.csv.gz"


def test_packaging_lists_the_traces_and_the_peer_sources():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"traces/*.csv.gz", "traces/*.meta.json"' in pyproject and '"peer/*.cpp"' in pyproject
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "mtia_alloc/tools/traces" in manifest and "mtia_alloc/tools/peer" in manifest


@pytest.mark.parametrize("name", ["gpt2_train", "resnet50_train"])
def test_a_shipped_trace_reads_whole(name):
    path = shipped_traces()[name]
    trace = read_trace(path)
    meta = json.loads((SHIPPED_DIR / f"{name}.meta.json").read_text())
    with gzip.open(path, "rt") as f:
        assert f.readline().strip() == "op,id,size_bytes,stream"
    assert trace.events == meta["stats"]["events"] and trace.skipped == 0
    assert trace.peak_live_bytes() == meta["stats"]["peak_live_bytes"]


def test_resolve_trace_by_name():
    assert resolve_trace("gpt2_train") == str(SHIPPED_DIR / "gpt2_train.csv.gz")
    assert resolve_trace("gpt2_train.csv.gz") == str(SHIPPED_DIR / "gpt2_train.csv.gz")
    assert resolve_trace("no_such_trace") == "no_such_trace"  # left for replay's own error
    assert resolve_trace("./gpt2_train") == "./gpt2_train"  # a path is never a name


def test_resolve_trace_prefers_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2_train").write_text("op,id,size_bytes\na,1,512\nf,1,512\n")
    assert resolve_trace("gpt2_train") == "gpt2_train"


def test_bench_falls_back_to_the_shipped_traces_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_suite, "default_trace_dirs", lambda: [tmp_path / "no_shared_traces"])
    rows, note = bench_suite.bench_traces(quick=True)
    assert [r[0] for r in rows[1:]] == NAMES
    assert note.startswith("traces: 5 shipped with mtia_alloc") and str(SHIPPED_DIR) in note, note


def test_bench_names_the_shared_folder_when_it_uses_it(monkeypatch, tmp_path):
    shared = tmp_path / "shared" / "traces"
    shared.mkdir(parents=True)
    (shared / "t.csv.gz").write_bytes(gzip.compress(b"op,id,size_bytes,stream\na,1,512,0\nf,1,512,0\n"))
    monkeypatch.setattr(bench_suite, "default_trace_dirs", lambda: [shared])
    rows, note = bench_suite.bench_traces(quick=True)
    assert [r[0] for r in rows[1:]] == ["t"]
    assert note == f"traces: 1 from {shared} (the shared traces folder)", note


def test_bench_prints_where_the_traces_come_from():
    """The note line of a real `bench` run names the shared folder or the shipped traces
    (whichever this machine has); --traces DIR names DIR."""
    code = ("import sys; from mtia_alloc.tools import bench_suite as b; rows, note = b.bench_traces(quick=True); "
            "print(note)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.match(r"traces: 5 (from .* \(the shared traces folder\)|shipped with mtia_alloc)", out.stdout), out.stdout


def test_replay_takes_a_shipped_trace_by_name():
    p = cli("replay", "gpt2_train", "--json")
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout.splitlines()[0])
    assert row["events"] == 20626 and row["peak_requested_bytes"] == 5164797528


def test_replay_of_an_unknown_name_is_one_error_line():
    p = cli("replay", "no_such_trace")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("mtia_alloc: error: "), p.stderr
