"""What the command line says (issue 19, items 10 and 11): input errors say what the input
should have been (no Python internals), one form for every subcommand, --version, and the
bench table names what it ran and what it left out."""
import gzip
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mtia_alloc
from mtia_alloc.tools import bench_suite
from mtia_alloc.tools import cli as cli_module
from mtia_alloc.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
INTERNALS = ("list index out of range", "UnpicklingError", "Memo value", "invalid literal for int",
             "Ran out of input", "Traceback", "KeyError", "IndexError")


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MTIA_ALLOC_CONF", None)
    return subprocess.run([sys.executable, "-m", "mtia_alloc", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def replay_error(path):
    p = cli("replay", path, "--memory", "1GiB")
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert err.startswith("mtia_alloc: error: ") and "\n" not in err, err
    for internal in INTERNALS:
        assert internal not in err, err
    return err


@pytest.mark.parametrize("text, line, says", [
    ("hello world\nnot a trace\n", 1, "expected 'op,id,size_bytes[,stream]'"),
    ("op,id,size_bytes,stream\na,0,512,0\na,1\n", 3, "expected 'op,id,size_bytes[,stream]'"),
    ("op,id,size_bytes,stream\na,0,512,0\nx,0,512,0\n", 3, "unknown op 'x' (expected 'a' to allocate or 'f' to free)"),
    ("op,id,size_bytes,stream\na,0,lots,0\n", 2, "size_bytes 'lots' is not a whole number"),
    ("op,id,size_bytes,stream\na,0,512,s1\n", 2, "stream 's1' is not a whole number"),
])
def test_csv_errors_name_the_line_and_the_expected_form(tmp_path, text, line, says):
    path = tmp_path / "t.csv"
    path.write_text(text)
    err = replay_error(path)
    assert f"{path}:{line}:" in err and says in err, err
    assert "cannot parse trace line" in err  # the old wording stays, for scripts that grep it


def test_a_first_line_that_is_no_known_format_lists_the_formats(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n")
    err = replay_error(path)
    assert "RMM log" in err and "snapshot" in err, err


def test_rmm_errors_name_the_expected_columns(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("Thread,Time,Action,Pointer,Size,Stream\n1,0.1,allocate,0x10\n")
    err = replay_error(path)
    assert f"{path}:2:" in err and "Thread,Time,Action,Pointer,Size[,Stream]" in err, err


@pytest.mark.parametrize("cut", [20, 60])
def test_a_truncated_pickle_says_so(tmp_path, cut):
    data = pickle.dumps({"segments": [], "device_traces": [[{"action": "alloc", "addr": i, "size": 512}
                                                             for i in range(20)]] * 3}, protocol=4)
    path = tmp_path / "t.pickle"
    path.write_bytes(data[:cut])
    err = replay_error(path)
    assert "not a snapshot pickle" in err and "truncated or corrupt" in err, err
    p = cli("summary", path)
    assert p.returncode == 2 and "truncated or corrupt" in p.stderr and "Memo" not in p.stderr, p.stderr


def test_a_truncated_gzip_trace_says_so(tmp_path):
    path = tmp_path / "t.csv.gz"
    data = gzip.compress(b"op,id,size_bytes,stream\n" + b"".join(b"a,%d,512,0\nf,%d,512,0\n" % (i, i)
                                                                  for i in range(20000)))
    path.write_bytes(data[:len(data) // 2])
    err = replay_error(path)
    assert "truncated" in err, err


def test_summary_and_plot_errors_have_the_replay_form_and_status(tmp_path):
    path = tmp_path / "ints.pickle"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    for argv in (["summary", path], ["plot", path, "-o", tmp_path / "o.html"], ["replay", path]):
        p = cli(*argv)
        err = p.stderr.strip()
        assert p.returncode == 2 and err.startswith("mtia_alloc: error: ") and "\n" not in err, (argv, p.stderr)


def test_plot_write_failure_is_exit_2_like_replays_plot_check(tmp_path, capsys):
    snap = tmp_path / "s.pickle"
    snap.write_bytes(pickle.dumps({"segments": [], "device_traces": [[]]}))
    out = tmp_path / "ro"
    out.mkdir()
    os.chmod(out, 0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert main(["plot", str(snap), "-o", str(out / "x.html")]) == 2
    finally:
        os.chmod(out, 0o700)
    assert capsys.readouterr().err.startswith("mtia_alloc: error: cannot write")


def test_usage_errors_are_one_line_with_a_pointer_to_help(capsys):
    assert main(["replay", "x.csv", "--memory", "-5GiB", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mtia_alloc: error: ") and "--help" in err, err


def test_version():
    p = cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"mtia_alloc {cli_module.package_version()}", p
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", cli_module.package_version())
    text = (ROOT / "pyproject.toml").read_text()
    assert cli_module.package_version() == re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)[1] == mtia_alloc.__version__


def test_help_documents_the_exit_statuses():
    p = cli("--help")
    assert p.returncode == 0
    for code in ("0 ", "1 ", "2 ", "130", "141", "--allow-oom"):
        assert code in p.stdout, code
    p = cli("replay", "--help")
    assert "--allow-oom" in p.stdout and "130" in p.stdout


# ------------------------------------------------------------------ item 11: bench

def test_bench_labels_the_generated_workload_by_its_size():
    quick, _ = bench_suite.bench_traces(quick=True, traces_dir=None, search=())
    full, _ = bench_suite.bench_traces(quick=False, traces_dir=None, search=())
    assert quick[0][0] == "generated random 5k" and full[0][0] == "generated random 20k"
    assert quick[0][1].events == 2 * 5000 and full[0][1].events == 2 * 20000


def test_bench_says_when_it_found_no_shared_traces(tmp_path):
    missing = tmp_path / "nowhere"
    rows, note = bench_suite.bench_traces(quick=True, traces_dir=None, search=(missing,))
    assert len(rows) == 1 and "not found" in note and str(missing) in note and "--traces" in note, note
    empty = tmp_path / "empty"
    empty.mkdir()
    rows, note = bench_suite.bench_traces(quick=True, traces_dir=empty, search=())
    assert len(rows) == 1 and f"none in {empty}" in note, note
    (empty / "a.csv.gz").write_bytes(gzip.compress(b"op,id,size_bytes,stream\na,1,512,0\nf,1,512,0\n"))
    rows, note = bench_suite.bench_traces(quick=True, traces_dir=empty, search=())
    assert [r[0] for r in rows] == ["generated random 5k", "a"] and "1 from" in note, note


def test_bench_quick_prints_the_traces_note_and_the_real_label(tmp_path):
    p = cli("bench", "--quick", "--traces", tmp_path)
    assert p.returncode == 0, p.stderr
    assert re.search(rf"^traces: none in {re.escape(str(tmp_path))}", p.stdout, re.M), p.stdout
    assert "generated random 5k" in p.stdout and "generated random 20k" not in p.stdout
