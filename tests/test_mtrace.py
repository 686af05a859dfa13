"""Recording that never loses history (issue 21 item 5): record_memory_history(path=...)
streams every event to a .mtrace file, which `convert` turns (whole, or a window) into a
snapshot the visualizer loads, and replay/fit/diff read directly. A kill while recording
leaves a file that reads up to its last complete event; bad input is one error line and
exit status 2; a write error stops the file with a warning, never allocation."""
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from mtia_alloc import mtrace
from mtia_alloc.tools.viz_check import check, check_pickle

from helpers import PACKAGE_ROOT, run_code

BLOCK_ACTIONS = ("alloc", "free_requested", "free_completed")


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MTIA_ALLOC_CONF", None)
    return subprocess.run([sys.executable, "-m", "mtia_alloc", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def one_error(p, *needles):
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert err.startswith("mtia_alloc: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def history():
    mtia.init()
    yield
    mtia.memory._record_memory_history(None)


def work(n, blocks):
    def inner():
        for i in range(n):
            blocks.free(blocks.alloc(4096 * (1 + i % 3), device=0))
    inner()


def recorded(tmp_path, blocks, n):
    """A whole .mtrace recording (stacks on) of work(n): its path."""
    path = tmp_path / "run.mtrace"
    mtia.memory._record_memory_history("all", path=path, clear_history=True)
    work(n, blocks)
    mtia.memory._record_memory_history(None)
    return path


def test_the_file_keeps_every_event_the_ring_buffer_drops(history, blocks, tmp_path):
    path = tmp_path / "run.mtrace"
    mtia.memory._record_memory_history("all", max_entries=10, path=path, clear_history=True)
    work(200, blocks)
    keep = blocks.alloc(1 << 20, device=0)
    ring = mtia.snapshot()["device_traces"][0]
    mtia.memory._record_memory_history(None)
    assert len(ring) == 10
    rec = mtrace.read(path)
    assert rec.partial_bytes == 0
    snap = rec.to_snapshot()
    trace = [e for e in snap["device_traces"][0] if e["action"] in BLOCK_ACTIONS]
    assert len(trace) == 601
    assert [e["action"] for e in trace[:3]] == ["alloc", "free_requested", "free_completed"]
    # the ring's last entries are the file's last ones, stack and time included
    everything = snap["device_traces"][0]
    assert everything[-1]["action"] == "snapshot"  # recorded by the snapshot() that read the ring
    tail = everything[-len(ring) - 1:-1]
    assert [(e["action"], e["addr"], e["size"]) for e in tail] == [(e["action"], e["addr"], e["size"]) for e in ring]
    assert all(abs(a["time_us"] - b["time_us"]) < 2000 for a, b in zip(tail, ring))
    assert tail[-1]["frames"][1:] == ring[-1]["frames"][1:] and any("work" in f["name"] or "inner" in f["name"]
                                                             for f in trace[0]["frames"])
    # the live block is in the rebuilt segments
    blocks_ = [b for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated"]
    assert keep in [b["address"] for b in blocks_]
    assert check(snap) == []


def test_the_file_and_the_ring_have_the_same_stacks(history, blocks, tmp_path):
    # context "all": a free's request and completion share a ring slot, and its stack
    path = tmp_path / "run.mtrace"
    mtia.memory._record_memory_history("all", max_entries=100_000, path=path, clear_history=True)
    work(300, blocks)
    ring = mtia.snapshot()["device_traces"][0]
    mtia.memory._record_memory_history(None)
    streamed = mtrace.read(path).to_snapshot()["device_traces"][0]

    def key(e):
        return e["action"], e.get("addr"), e["size"], [(f["filename"], f["line"], f["name"]) for f in e.get("frames", [])]
    ring = [key(e) for e in ring if e["action"] != "snapshot"]
    assert [key(e) for e in streamed if e["action"] != "snapshot"] == ring
    frees = [e for e in ring if e[0].startswith("free")]
    assert len(frees) == 600 and all(e[3][0][2] == "free" and e[3][1][2] == "inner" for e in frees)


def test_stacks_are_stored_once(history, blocks, tmp_path):
    path = recorded(tmp_path, blocks, 300)
    rec = mtrace.read(path)
    # one call site in a loop: a handful of distinct stacks, however many events
    assert len(rec.events) >= 900
    used = {e[2] for e in rec.events} - {0}
    assert len(used) <= 6, len(used)
    assert used <= set(rec.stacks)  # every stack an event names is defined in the file
    trace = rec.to_snapshot()["device_traces"][0]
    allocs = [e for e in trace if e["action"] == "alloc"]
    assert allocs[0]["frames"] is allocs[-1]["frames"]  # one list per stack


def test_metadata_skip_actions_and_context_none(history, blocks, tmp_path):
    path = tmp_path / "run.mtrace"
    mtia.memory._set_memory_metadata("step 1")
    try:
        mtia.memory._record_memory_history("all", context=None, skip_actions=["free_requested"], path=path,
                                           clear_history=True)
        work(5, blocks)
    finally:
        mtia.memory._set_memory_metadata("")
    mtia.memory._record_memory_history(None)
    trace = mtrace.read(path).to_snapshot()["device_traces"][0]
    acts = [e["action"] for e in trace if e["action"] in BLOCK_ACTIONS]
    assert acts == ["alloc", "free_completed"] * 5
    assert all(e["user_metadata"] == "step 1" for e in trace)
    assert all("frames" not in e for e in trace)


def test_convert_whole_and_a_window(history, blocks, tmp_path):
    path = recorded(tmp_path, blocks, 50)
    out = tmp_path / "snap.pickle"
    p = cli("convert", path, "-o", out)
    assert p.returncode == 0, p.stderr
    assert check_pickle(str(out)) == []
    total = sum(len(t) for t in pickle.loads(out.read_bytes())["device_traces"])
    p = cli("convert", path, "-o", out, "--from", 10, "--to", 40)
    assert p.returncode == 0, p.stderr
    snap = pickle.loads(out.read_bytes())
    assert sum(len(t) for t in snap["device_traces"]) == 30 and check(snap) == []
    p = cli("convert", path, "-o", out, "--from", "0s", "--to", "10s")
    assert p.returncode == 0, p.stderr
    assert sum(len(t) for t in pickle.loads(out.read_bytes())["device_traces"]) == total
    # summary reads the converted snapshot; replay, fit and diff read the recording itself
    assert cli("summary", out).returncode == 0
    p = cli("replay", path, "--memory", "1GiB")
    assert p.returncode == 0, p.stderr
    p = cli("fit", path, "--memory", "1GiB")
    assert p.returncode in (0, 3), p.stderr
    p = cli("diff", path, out)
    assert p.returncode == 0, p.stderr


def test_bad_input_is_one_line(history, blocks, tmp_path):
    path = recorded(tmp_path, blocks, 5)
    out = tmp_path / "snap.pickle"
    short = tmp_path / "short.mtrace"
    short.write_bytes(path.read_bytes()[:5])
    one_error(cli("convert", short, "-o", out), "truncated .mtrace", "header")
    notrace = tmp_path / "x.mtrace"
    notrace.write_text("hello")
    one_error(cli("convert", notrace, "-o", out), "not a .mtrace")
    one_error(cli("convert", tmp_path / "missing.mtrace", "-o", out), "no such file")
    one_error(cli("convert", path, "-o", out, "--from", 10_000), "past the end of the recording")
    one_error(cli("convert", path, "-o", out, "--from", 5, "--to", 5), "holds no event")
    one_error(cli("convert", path, "-o", out, "--to", "soon"), "expected an event index")
    one_error(cli("convert", path, "-o", tmp_path / "no" / "dir" / "snap.pickle"), "cannot write")
    one_error(cli("convert", path, "-o", "/dev/full"), "cannot write /dev/full", "No space left on device")
    one_error(cli("replay", short, "--memory", "1GiB"), "truncated .mtrace")
    with pytest.raises(OSError, match="cannot write .*: No such file or directory"):
        mtia.memory._record_memory_history("all", path=tmp_path / "no" / "dir" / "run.mtrace")
    with pytest.raises(OSError, match="cannot write /dev/full: No space left on device"):
        mtia.memory._record_memory_history("all", path="/dev/full")
    with pytest.raises(ValueError, match="needs enabled"):
        mtia.memory._record_memory_history(None, path=path)
    mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))  # allocation still works


def test_a_partial_last_record_reads_up_to_the_last_complete_event(history, blocks, tmp_path):
    path = recorded(tmp_path, blocks, 20)
    whole = mtrace.read(path)
    cut = tmp_path / "cut.mtrace"
    data = path.read_bytes()
    cut.write_bytes(data[:len(data) - 40])  # inside the last records
    rec = mtrace.read(cut)
    assert 0 < rec.partial_bytes < 69 and len(rec.events) < len(whole.events)
    assert rec.events == whole.events[:len(rec.events)]
    p = cli("convert", cut, "-o", tmp_path / "s.pickle")
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith("mtia_alloc: warning: ") and "cut short" in p.stderr


def test_an_idle_device_reaches_the_file_while_recording_and_devices_merge_by_time(history, blocks, tmp_path):
    # A device's records go to the file a chunk at a time; the writer pulls the records of
    # a device that went idle every tick, so they are in the file without stopping.
    if mtia.device_count() < 2:
        pytest.skip("needs two devices")
    path = tmp_path / "two.mtrace"
    mtia.memory._record_memory_history("all", context=None, path=path, clear_history=True)
    blocks.free(blocks.alloc(8192, device=1))  # three events on device 1, which then idles
    for i in range(5000):
        blocks.free(blocks.alloc(4096 * (1 + i % 3), device=0))
    deadline = time.monotonic() + 10
    while True:
        rec = mtrace.read(path)
        on = [sum(1 for e in rec.events if e[1] == d and mtrace.ACTIONS[e[0]] in BLOCK_ACTIONS) for d in (0, 1)]
        if on == [15000, 3] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert on == [15000, 3]
    ticks = [e[4] for e in rec.events]
    assert ticks == sorted(ticks)
    d1 = [mtrace.ACTIONS[e[0]] for e in rec.events if e[1] == 1 and mtrace.ACTIONS[e[0]] in BLOCK_ACTIONS]
    assert d1 == ["alloc", "free_requested", "free_completed"]
    mtia.memory._record_memory_history(None)
    assert len(mtrace.read(path).events) >= 15003
    data, pos, kinds = path.read_bytes(), len(mtrace.MAGIC), set()
    while pos < len(data):  # whole records: this version writes its events as 'Y' batches
        kinds.add(chr(data[pos]))
        pos += 5 + int.from_bytes(data[pos + 1:pos + 5], "little")
    assert pos == len(data) and "Y" in kinds and not kinds & {"Z", "E"}


def test_sigkill_while_recording_leaves_a_readable_file(tmp_path):
    path = tmp_path / "killed.mtrace"
    code = f"""
        import sys, time
        import mtia_alloc as mtia, mtia_alloc.memory
        mtia.memory._record_memory_history("all", path={str(path)!r})
        n = 0
        while True:
            mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096 + n % 7 * 512))
            n += 1
            if n == 20000:
                print("ready", flush=True)
    """
    import textwrap
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    env["PYTHONPATH"] = str(PACKAGE_ROOT)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(0.3)  # several writer flushes
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    rec = mtrace.read(path)
    assert len(rec.events) >= 20000 * 3 * 0.5
    acts = [mtrace.ACTIONS[e[0]] for e in rec.events]
    assert set(acts) <= {"alloc", "free_requested", "free_completed", "segment_alloc"}
    snap = rec.to_snapshot()
    assert check(snap) == []
    p = cli("convert", path, "-o", tmp_path / "k.pickle")
    assert p.returncode == 0, p.stderr


def test_a_write_error_stops_the_recording_with_a_warning_not_allocation(tmp_path):
    # The file may grow to 64 KiB only (RLIMIT_FSIZE: a full disk's ENOSPC as EFBIG).
    path = tmp_path / "full.mtrace"
    p = run_code(f"""
        import resource, signal, warnings
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
        import time
        import mtia_alloc as mtia, mtia_alloc.memory
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            mtia.memory._record_memory_history("all", path={str(path)!r})
            t = time.time()
            n = 0
            while time.time() - t < 1.5:
                mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))
                n += 1
            mtia.memory._record_memory_history(None)
        msgs = [str(w.message) for w in caught]
        print(n, len(mtia.snapshot()["device_traces"][0]))
        print("\\n".join(msgs))
    """)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert int(lines[0].split()[0]) > 10000
    assert any("history recording" in m and "stopped" in m and "File too large" in m for m in lines[1:]), p.stdout
    rec = mtrace.read(path)
    assert os.path.getsize(path) <= 64 << 10 and len(rec.events) > 0


def test_record_to_and_stop_recording(history, blocks, tmp_path):
    from mtia_alloc import history as hist
    path = tmp_path / "r.mtrace"
    hist.record_to(path, context=None)
    work(3, blocks)
    hist.stop_recording()  # the file is complete; history stays on in memory
    work(3, blocks)
    assert mtia.memory._record_memory_history is not None
    rec = mtrace.read(path)
    assert [mtrace.ACTIONS[e[0]] for e in rec.events if mtrace.ACTIONS[e[0]] in BLOCK_ACTIONS] == \
        ["alloc", "free_requested", "free_completed"] * 3
    assert len([e for e in mtia.snapshot()["device_traces"][0] if e["action"] == "alloc"]) == 6


def test_a_forked_child_does_not_stream_into_the_parents_file(tmp_path):
    path = tmp_path / "fork.mtrace"
    p = run_code(f"""
        import os, sys
        import mtia_alloc as mtia, mtia_alloc.memory
        from mtia_alloc import mtrace
        mtia.memory._record_memory_history("all", context=None, path={str(path)!r})
        for _ in range(10):
            mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))
        pid = os.fork()
        if pid == 0:
            # the child cannot allocate (the bad-fork error, tests/test_fork.py), writes
            # nothing to the parent's file, and exits normally (atexit handlers and C++
            # static destructors included) without hanging on the inherited stream
            try:
                mtia.caching_allocator_alloc(4096)
                code = 1
            except RuntimeError as e:
                code = 0 if "forked subprocess" in str(e) else 2
            mtia.history.stop_recording()
            sys.exit(code)
        _, status = os.waitpid(pid, 0)
        mtia.memory._record_memory_history(None)
        blocks = [e for e in mtrace.read({str(path)!r}).events if e[0] in (0, 1, 2)]
        print(status, len(blocks))
    """, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0", "30"]
