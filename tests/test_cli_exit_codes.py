"""The command line's exit statuses (issue 19, items 9, 10 and 2's CLI part):

    0    done (a replay with no out-of-memory failure it did not expect)
    1    the replay ran out of memory where the trace did not, or could not rebuild a
         snapshot's starting state (--allow-oom: 0)
    2    usage or input error (one `mtia_alloc: error: ...` line on stderr)
    130  interrupted (Ctrl-C): one line on stderr, no traceback
    141  stdout closed early (`... | head -1`): quiet, no message

Every run is a subprocess with its own emulated device."""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtia_alloc.tools.bench_suite import random_trace
from mtia_alloc.tools.workload import write_csv

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 1 << 20, 1 << 30


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MTIA_ALLOC_CONF", None)
    env.pop("MTIA_EMULATOR_MEMORY", None)
    return env


def cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "mtia_alloc", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=timeout, **kw)


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("exit") / "random20k.csv"
    write_csv(random_trace(num=20000), path)
    return path


def _snapshot(path, entries, segments=()):
    path.write_bytes(pickle.dumps({"segments": list(segments), "device_traces": [list(entries)]}))
    return path


def _one_big_alloc(oom_recorded):
    entries = [{"action": "alloc", "addr": 1 << 40, "size": GiB, "stream": 0}]
    if oom_recorded:
        entries.append({"action": "oom", "device_free": 0, "size": GiB, "stream": 0})
    entries += [{"action": "alloc", "addr": 2 << 40, "size": 4096, "stream": 0},
                {"action": "free_completed", "addr": 2 << 40, "size": 4096, "stream": 0}]
    return entries


# ------------------------------------------------------------------ item 9: OOMs

def test_unexpected_ooms_exit_1_with_one_line_naming_them(big_csv):
    p = cli("replay", big_csv, "--memory", "1MiB")
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "num_ooms: 20000" in p.stdout  # the report is still printed in full
    err = p.stderr.strip()
    assert err.startswith("mtia_alloc: error: ") and "\n" not in err and "Traceback" not in err, err
    assert "20000 allocations failed" in err and "--allow-oom" in err and "--memory" in err


def test_unexpected_ooms_exit_1_in_json_mode_too(big_csv):
    p = cli("replay", big_csv, "--memory", "1MiB", "--json", "--repeat", 2)
    assert p.returncode == 1, p.stderr
    assert len(p.stdout.splitlines()) == 2 and "--allow-oom" in p.stderr


def test_allow_oom_keeps_the_old_status(big_csv):
    p = cli("replay", big_csv, "--memory", "1MiB", "--allow-oom")
    assert p.returncode == 0, p.stderr
    assert "num_ooms: 20000" in p.stdout and p.stderr == ""


def test_a_replay_that_fits_exits_0(big_csv):
    p = cli("replay", big_csv, "--memory", "8GiB")
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_injected_failures_are_expected(big_csv):
    p = cli("replay", big_csv, "--memory", "8GiB", "--fail-after", 0, "--fail-every", 1)
    assert p.returncode == 0, p.stderr
    assert "num_ooms: 0" not in p.stdout


def test_starting_state_that_does_not_fit_exits_1(tmp_path):
    seg = {"device": 0, "address": 1 << 44, "total_size": GiB, "stream": 0, "segment_type": "large",
           "blocks": [{"size": GiB, "requested_size": GiB, "state": "active_allocated"}]}
    entries = [{"action": "alloc", "addr": 2 << 40, "size": 4096, "stream": 0},
               {"action": "free_completed", "addr": 2 << 40, "size": 4096, "stream": 0}]
    path = _snapshot(tmp_path / "state.pickle", entries, [seg])
    p = cli("replay", path, "--memory", "256MiB")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "prefix_failure" in p.stdout
    err = p.stderr.strip()
    assert err.startswith("mtia_alloc: error: ") and "starting state" in err and "\n" not in err, err
    p = cli("replay", path, "--memory", "256MiB", "--allow-oom")
    assert p.returncode == 0 and "prefix_failure" in p.stdout, p.stderr
    assert cli("replay", path, "--memory", "4GiB").returncode == 0


def test_ooms_the_snapshot_recorded_are_expected(tmp_path):
    recorded = _snapshot(tmp_path / "recorded.pickle", _one_big_alloc(oom_recorded=True))
    p = cli("replay", recorded, "--memory", "256MiB")
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "num_ooms: 1" in p.stdout and "recorded" in p.stdout  # the report says why it is fine
    unrecorded = _snapshot(tmp_path / "unrecorded.pickle", _one_big_alloc(oom_recorded=False))
    p = cli("replay", unrecorded, "--memory", "256MiB")
    assert p.returncode == 1 and "1 allocation failed" in p.stderr, (p.stdout, p.stderr)


def test_more_ooms_than_the_snapshot_recorded_are_not(tmp_path):
    entries = _one_big_alloc(oom_recorded=True) + [{"action": "alloc", "addr": 3 << 40, "size": GiB, "stream": 0}]
    p = cli("replay", _snapshot(tmp_path / "more.pickle", entries), "--memory", "256MiB")
    assert p.returncode == 1 and "2 allocations failed" in p.stderr and "1 recorded" in p.stderr, p.stderr


@pytest.mark.parametrize("recorded, status", [(True, 0), (False, 1)])
def test_an_rmm_logs_allocate_failures_make_as_many_ooms_expected(tmp_path, recorded, status):
    lines = ["Thread,Time,Action,Pointer,Size,Stream", f"1,0.1,allocate,0x10,{GiB},0x0"]
    if recorded:
        lines.append(f"1,0.2,allocate failure,0x20,{GiB},0x0")
    lines += ["1,0.3,allocate,0x30,4096,0x0", "1,0.4,free,0x30,4096,0x0"]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    p = cli("replay", path, "--memory", "256MiB")
    assert p.returncode == status and "num_ooms: 1" in p.stdout, (p.stdout, p.stderr)
    assert ("recorded OOMs: 1" in p.stdout) == recorded


# ------------------------------------------------------------------ item 10: pipes

def _closed_pipe_run(args):
    """Runs the CLI with stdout a pipe whose reading end is already closed (what
    `... | head -1` leaves once head has exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "mtia_alloc", *map(str, args)], stdout=w,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(), timeout=300)
    finally:
        os.close(w)
    return p


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_a_closed_stdout_ends_quietly(big_csv, extra):
    p = _closed_pipe_run(["replay", big_csv, "--memory", "8GiB", *extra])
    assert p.returncode == 141, (p.returncode, p.stderr)
    assert p.stderr == "", p.stderr


def test_a_closed_stdout_ends_quietly_for_help_and_summary(tmp_path):
    p = _closed_pipe_run(["--help"])  # argparse swallows the write error itself: 0 is fine, quietly
    assert p.returncode in (0, 141) and p.stderr == "", p.stderr
    snap = tmp_path / "s.pickle"
    snap.write_bytes(pickle.dumps({"segments": [], "device_traces": [[]]}))
    p = _closed_pipe_run(["summary", snap])
    assert p.returncode == 141 and p.stderr == "", p.stderr


def test_head_in_a_shell_pipeline_sees_no_error(big_csv):
    cmd = f"{sys.executable} -m mtia_alloc replay {big_csv} --memory 8GiB --repeat 3 --latency | head -c 1"
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, cwd=ROOT,
                       env=_env(), timeout=300)
    assert "Broken pipe" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert p.returncode in (0, 141), p.returncode


# ------------------------------------------------------------------ item 10: one form for input errors

@pytest.mark.parametrize("argv", [
    ["replay", "/no/such/trace.csv"],
    ["summary", "/no/such/snapshot.pickle"],
    ["plot", "/no/such/snapshot.pickle", "-o", "/tmp/never_written_h2.html"],
    ["plot", "<snap>", "-o", "/tmp/x.png"],
    ["bench", "--traces", "/no/such/dir"],
    ["replay", "<csv>", "--memory", "-5GiB"],
    ["replay", "<csv>", "--memory", "lots"],
    ["replay", "<csv>", "--repeat", "0"],
    ["replay", "<csv>", "--streams", "sideways"],
    ["replay"],
    ["nonsense"],
    [],
])
def test_input_errors_are_one_line_and_exit_2(tmp_path, big_csv, argv):
    snap = tmp_path / "s.pickle"
    snap.write_bytes(pickle.dumps({"segments": [], "device_traces": [[]]}))
    argv = [str(big_csv) if a == "<csv>" else str(snap) if a == "<snap>" else a for a in argv]
    p = cli(*argv)
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert err.startswith("mtia_alloc: error: ") and "\n" not in err, err
    assert "Traceback" not in err and "usage:" not in err and p.stdout == ""


def test_negative_memory_is_refused_as_a_value():
    p = cli("replay", "/dev/null", "--memory", "-5GiB")
    assert p.returncode == 2 and "--memory: '-5GiB'" in p.stderr, p.stderr


# ------------------------------------------------------------------ Ctrl-C

def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _interrupt(args, cpu_before_signal):
    """Starts the CLI, waits until it has used `cpu_before_signal` seconds of CPU (its
    imports are done by then), sends SIGINT and returns (status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "mtia_alloc", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    try:
        deadline = time.monotonic() + 120
        while _cpu_seconds(proc.pid) < cpu_before_signal:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never got busy"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_ctrl_c_during_a_long_replay_exits_130_with_one_line(big_csv):
    status, out, err = _interrupt(["replay", big_csv, "--memory", "8GiB", "--repeat", 100000], 2.0)
    assert status == 130, (status, err)
    assert err.strip() == "mtia_alloc: interrupted", err
    assert "Traceback" not in err


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_ctrl_c_during_bench_exits_130_with_one_line():
    # the full bench (tens of seconds even where no traces are found), interrupted early
    status, out, err = _interrupt(["bench", "--traces", ROOT], 1.0)
    assert status == 130, (status, err)
    assert err.strip() == "mtia_alloc: interrupted", err
