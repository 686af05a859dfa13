"""`python -m mtia_alloc replay` end to end (issue 6): the shared CSV, RMM's log CSV and
snapshot pickles (with and without state that predates the trace), --json, --repeat,
--latency, --streams, --fail-after, --plot, and bad inputs. Every run is a subprocess
with its own emulated device (--memory 4GiB)."""
import json
import os
import pickle
import re

import pytest

from helpers import fresh_python
from mtia_alloc.tools.workload import read_trace
from mtia_alloc.tools.workload import write_csv as write_trace_csv
from mtia_alloc.tools.bench_suite import random_trace

# the keys of the peer harness's RESULT line (shared/peers/torch_caching_allocator/harness.cpp)
RESULT_KEYS = ["mode", "events", "total_ns", "ns_per_op", "thread_cpu_ns_per_op", "peak_requested_bytes",
               "peak_allocated_bytes", "peak_reserved_bytes", "num_device_alloc", "num_device_free",
               "num_alloc_retries", "num_ooms", "ooms_caught"]


def replay(*args, memory="4GiB"):
    cmd = ["-m", "mtia_alloc", "replay", *map(str, args)]
    if memory:
        cmd += ["--memory", memory]
    return fresh_python(*cmd)


def ok(*args):
    p = replay(*args)
    assert p.returncode == 0, p.stderr
    return p.stdout


def figure(out, key, label="pass1"):
    m = re.search(rf"^{label}\.{key}: (-?\d+)", out, re.M)
    assert m, f"no {label}.{key} in:\n{out}"
    return int(m.group(1))


def header(out, key):
    m = re.search(rf"{key}: (\d+)", out)
    assert m, f"no {key!r} in:\n{out}"
    return int(m.group(1))


# ------------------------------------------------------------------ inputs

@pytest.fixture(scope="module")
def csv_trace(tmp_path_factory):
    trace = random_trace(num=1500, max_size=24 << 20, max_live=512 << 20, streams=2, seed=3)
    path = tmp_path_factory.mktemp("replay") / "random.csv"
    write_trace_csv(trace, path)
    return path, trace


SNAPSHOT_SCRIPT = r"""
import random, sys
import mtia_alloc as mtia
from mtia_alloc import emulator, memory
emulator.configure(memory_per_device="4GiB")
mtia.init()
cold_path, warm_path = sys.argv[1], sys.argv[2]
rng = random.Random(11)
streams = [None, mtia.Stream()]
live = []

def steps(n, empty_every=0):
    for i in range(n):
        if live and rng.random() < 0.45:
            mtia.caching_allocator_delete(live.pop(rng.randrange(len(live))))
        else:
            size = rng.choice([rng.randint(1, 4096), rng.randint(4096, 1 << 20), rng.randint(1 << 20, 12 << 20),
                               rng.randint(12 << 20, 40 << 20)])
            live.append(mtia.caching_allocator_alloc(size, stream=rng.choice(streams)))
        if empty_every and i % empty_every == empty_every - 1:
            mtia.empty_cache()

# no state before the trace: history from the first allocation on
memory.record_memory_history("all", context=None)
steps(250)
memory._dump_snapshot(cold_path)
# state before the trace: warm up with history off, then record the rest
memory.record_memory_history(None)
steps(200)
memory.record_memory_history("all", context=None)
steps(400, empty_every=90)
memory._dump_snapshot(warm_path)
"""


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    d = tmp_path_factory.mktemp("snapshots")
    cold, warm = d / "cold.pickle", d / "warm.pickle"
    p = fresh_python("-c", SNAPSHOT_SCRIPT, str(cold), str(warm))
    assert p.returncode == 0, p.stderr
    return cold, warm


def trace_facts(path):
    """Counts in the snapshot's trace of device 0: segment_alloc, segment_free, alloc,
    free_completed, and frees of blocks allocated before the trace began."""
    with open(path, "rb") as f:
        entries = pickle.load(f)["device_traces"][0]
    seen, facts = set(), dict.fromkeys(("segment_alloc", "segment_free", "alloc", "free_completed"), 0)
    facts["preexisting_frees"] = 0
    for e in entries:
        a = e["action"]
        if a in facts:
            facts[a] += 1
        if a == "alloc":
            seen.add(e["addr"])
        elif a == "free_completed" and e["addr"] not in seen:
            facts["preexisting_frees"] += 1
    return facts


# ------------------------------------------------------------------ shared CSV

def test_csv_replay_reports_every_figure(csv_trace):
    path, trace = csv_trace
    out = ok(path)
    assert f"events: {trace.events}" in out.splitlines()[0]
    assert figure(out, "events") == trace.events
    assert figure(out, "peak_requested_bytes") == trace.peak_live_bytes()
    assert figure(out, "peak_allocated_bytes") >= figure(out, "peak_requested_bytes")
    assert figure(out, "peak_reserved_bytes") >= figure(out, "peak_allocated_bytes")
    assert figure(out, "num_device_alloc") > 0
    assert "reserved_over_allocated" in out and "ns_per_op" in out and "first_failing_event" not in out


def test_json_has_the_peer_harness_keys_one_object_per_pass(csv_trace):
    path, trace = csv_trace
    lines = ok(path, "--json", "--repeat", 3).splitlines()
    assert len(lines) == 3
    objs = [json.loads(line) for line in lines]
    for i, o in enumerate(objs):
        assert list(o) == RESULT_KEYS
        assert o["mode"] == f"pass{i + 1}" and o["events"] == trace.events
        assert o["peak_requested_bytes"] == trace.peak_live_bytes()
    assert objs[0]["num_device_alloc"] > 0
    assert objs[1]["num_device_alloc"] == objs[2]["num_device_alloc"] == 0  # warm passes reuse the cache


def test_latency_and_merged_streams(csv_trace):
    path, _ = csv_trace
    out = ok(path, "--latency", "--streams", "merge")
    assert "streams: 2 (merge)" in out
    assert re.search(r"^pass1\.alloc_latency_ns: p50 \d+  p99 \d+$", out, re.M)
    assert re.search(r"^pass1\.free_latency_ns: p50 \d+  p99 \d+$", out, re.M)
    assert "streams: 2 (merge)" in ok(path, "--merge-streams")


def test_fail_after_reports_the_first_failing_event(csv_trace):
    path, trace = csv_trace
    out = ok(path, "--fail-after", 0, "--fail-every", 1)
    # every device allocation fails: the very first allocation is the first failing event
    assert re.search(r"^pass1\.first_failing_event: 0 \(allocation of (\d+) bytes", out, re.M)
    assert int(re.search(r"allocation of (\d+) bytes", out).group(1)) == int(trace.sizes[0])
    assert figure(out, "num_device_alloc") == 0 and re.search(r"num_ooms: [1-9]", out)
    out = ok(path, "--fail-after", 3, "--fail-every", 1)
    k = figure(out, "first_failing_event")
    assert k > 0 and trace.sizes[k] > 0
    assert figure(out, "num_device_alloc") == 3
    assert figure(out, "skipped_frees") > 0  # the frees of the failed allocations
    out = ok(path, "--fail-after", 10 ** 6)
    assert "first_failing_event" not in out


def test_plot_writes_self_contained_html_with_svg(csv_trace, tmp_path):
    path, trace = csv_trace
    html_path = tmp_path / "replay.html"
    out = ok(path, "--plot", html_path)
    assert f"plot: wrote {html_path}" in out
    text = html_path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert text.count("<svg") == 1 and "</svg>" in text and text.count("<polyline") == 3
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert f"{trace.events} trace events" in text


# ------------------------------------------------------------------ RMM log CSV

def test_rmm_log_csv(tmp_path):
    path = tmp_path / "rmm_log.csv"
    path.write_text(
        "Thread,Time,Action,Pointer,Size,Stream\n"
        "1,00:00:00.000001,allocate,0x7f0000000000,3000000,0x0\n"
        "1,00:00:00.000002,allocate,0x7f0000400000,100,0x0\n"
        "1,00:00:00.000003,allocate failure,0x0,99999999999999,0x0\n"
        "2,00:00:00.000004,allocate,0x7f0000800000,5000000,0x1234\n"
        "1,00:00:00.000005,free,0x7f0000000000,3000000,0x0\n"
        "1,00:00:00.000006,free,0x7f00deadbeef,64,0x0\n"  # unknown pointer: skipped
        "2,00:00:00.000007,allocate,0x7f0000000000,2000000,0x1234\n"
        "2,00:00:00.000008,free,0x7f0000800000,5000000,0x1234\n"
        "1,00:00:00.000009,free,0x7f0000400000,100,0x0\n"
        "2,00:00:00.000010,free,0x7f0000000000,2000000,0x1234\n")
    trace = read_trace(path)
    # 4 allocations, at most 3 live at once: the 2 MB one reuses the freed 3 MB one's slot
    assert (trace.events, trace.nslots, trace.skipped, trace.stream_values) == (8, 3, 1, [0, 0x1234])
    assert trace.slots[4] == trace.slots[0] and trace.sizes[4] == 2000000
    out = ok(path)
    assert "(rmm)" in out and "events: 8  allocations: 4  streams: 2" in out and "skipped lines: 1" in out
    assert figure(out, "peak_requested_bytes") == 3000000 + 100 + 5000000
    assert figure(out, "num_device_alloc") == 3  # small pool, a large segment per stream


# ------------------------------------------------------------------ snapshots

def test_snapshot_with_state_before_the_trace(snapshots):
    _, warm = snapshots
    facts = trace_facts(warm)
    assert facts["preexisting_frees"] > 0 and facts["segment_free"] > 0  # the input exercises both
    out = ok(warm)
    assert "(snapshot, device 0" in out and "skipped lines: 0" in out
    assert re.search(r"^starting state \(rebuilt from the snapshot\): [1-9]\d* segments", out, re.M)
    assert f"events: {facts['alloc'] + facts['free_completed'] + header(out, 'cache flushes')}" in out
    # the default-config replay makes exactly the device allocations the recorded run made
    assert figure(out, "num_device_alloc") == facts["segment_alloc"]
    assert header(out, "num_device_free") == facts["segment_free"]
    assert f"pass1.snapshot_segment_alloc: {facts['segment_alloc']}  (replay num_device_alloc " \
           f"{facts['segment_alloc']}: same)" in out
    assert re.search(r"^pass1\.snapshot_peak_reserved_bytes: .*replay same\)$", out, re.M)
    assert re.search(r"^pass1\.snapshot_peak_requested_bytes: .*replay same\)$", out, re.M)
    assert "skipped_frees" not in out and "num_alloc_retries: 0  num_ooms: 0" in out
    # without the rebuilt state, the frees of blocks older than the trace find nothing
    out = ok(warm, "--no-rebuild", "--no-flush")
    assert f"skipped lines: {facts['preexisting_frees']}" in out


def test_snapshot_without_state_before_the_trace(snapshots):
    cold, _ = snapshots
    facts = trace_facts(cold)
    assert facts["preexisting_frees"] == 0 and facts["segment_free"] == 0
    out = ok(cold)
    assert "starting state: empty" in out and "skipped lines: 0" in out
    assert figure(out, "events") == facts["alloc"] + facts["free_completed"]
    assert figure(out, "num_device_alloc") == facts["segment_alloc"]


def test_snapshot_json_repeat_latency_and_plot(snapshots, tmp_path):
    _, warm = snapshots
    facts = trace_facts(warm)
    html_path = tmp_path / "snap.html"
    p = replay(warm, "--json", "--repeat", 2, "--latency", "--plot", html_path)
    assert p.returncode == 0, p.stderr
    objs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [list(o) for o in objs] == [RESULT_KEYS, RESULT_KEYS]
    # every pass starts from the rebuilt state: the same device allocations each time
    assert [o["num_device_alloc"] for o in objs] == [facts["segment_alloc"]] * 2
    assert objs[0]["peak_reserved_bytes"] == objs[1]["peak_reserved_bytes"]
    text = html_path.read_text()
    assert "<svg" in text and "starting state (rebuilt from the snapshot)" in text


# ------------------------------------------------------------------ bad inputs

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.bin").write_bytes(bytes(range(256)) * 8)
    (d / "garbage.txt").write_text("hello world\nnot a trace\n")
    (d / "empty.csv").write_text("")
    (d / "list.pickle").write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    (d / "truncated.pickle").write_bytes(pickle.dumps({"segments": [], "device_traces": [[]] * 3}, protocol=4)[:20])
    (d / "bad.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (d / "bad_op.csv").write_text("op,id,size_bytes,stream\na,0,512,0\nx,0,512,0\n")
    (d / "huge.csv").write_text("op,id,size_bytes,stream\na,0,18446744073709551616,0\nf,0,0,0\n")
    (d / "huge.rmm.csv").write_text("Thread,Time,Action,Pointer,Size,Stream\n1,0.1,allocate,0x10,%d,0x0\n" % 2**64)
    (d / "huge.pickle").write_bytes(pickle.dumps(
        {"segments": [], "device_traces": [[{"action": "alloc", "addr": 1, "size": 2**64, "stream": 0}]]}))
    (d / "inf.json").write_text('{"segments": [], "device_traces": [[{"action": "alloc", "addr": 1, '
                                '"size": 1e30, "stream": 0}]]}')
    (d / "only_bad.csv").write_text("op,id,size_bytes,stream\na,0,-5,0\nf,1,512,0\n")
    return d


@pytest.mark.parametrize("name, extra, message", [
    ("missing.csv", [], "cannot read the trace"),
    ("garbage.bin", [], "not a trace"),
    ("garbage.txt", [], "cannot parse trace line"),
    ("empty.csv", [], "no allocation events"),
    ("list.pickle", [], "not a snapshot with device_traces"),
    ("truncated.pickle", [], "not a snapshot pickle"),
    ("bad.csv.gz", [], "not a readable gzip file"),
    ("bad_op.csv", [], "unknown op 'x'"),
    ("huge.csv", [], "does not fit in 64 bits"),
    ("huge.rmm.csv", [], "does not fit in 64 bits"),
    ("huge.pickle", [], "does not fit in 64 bits"),
    ("inf.json", [], "does not fit in 64 bits"),
    ("only_bad.csv", [], "no allocation events to replay (2 events skipped"),
    ("<csv>", ["--repeat", "0"], "--repeat must be between 1 and 100000"),
    ("<csv>", ["--repeat", "99999999999999999999"], "--repeat must be between 1 and 100000"),
    ("<csv>", ["--fail-after", "-2"], "--fail-after must be between 0 and"),
    ("<csv>", ["--fail-after", str(2**64)], "--fail-after must be between 0 and"),
    ("<csv>", ["--conf", "no_such_option:1"], "--conf 'no_such_option:1'"),
    ("<csv>", ["--plot", "/tmp"], "--plot: /tmp is a directory"),
    ("<csv>", ["--fail-every", "2"], "--fail-every needs --fail-after"),
    ("<csv>", ["--conf", "no_such_option:1"], "no_such_option"),
    ("<csv>", ["--device", "1"], "--device applies to snapshot inputs only"),
    ("<csv>", ["--plot", "/no/such/dir/x.html"], "--plot: cannot write /no/such/dir/x.html: no directory /no/such/dir"),
    ("<csv>", ["--plot", "/tmp/x.png"], "name it .html"),
    ("<csv>", ["--streams", "sideways"], "invalid choice"),
    ("<csv>", ["--no-such-option"], "unrecognized arguments"),
])
def test_bad_inputs_exit_2_with_a_message(bad_files, csv_trace, name, extra, message):
    path = csv_trace[0] if name == "<csv>" else bad_files / name
    p = replay(path, *extra)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr and p.stdout == ""
    assert "Traceback" not in p.stderr


def test_bad_memory_size(csv_trace):
    p = replay(csv_trace[0], "--memory", "lots", memory=None)
    assert p.returncode == 2 and "--memory: cannot parse 'lots'" in p.stderr
    p = replay(csv_trace[0], "--memory", "0", memory=None)
    assert p.returncode == 2 and "--memory: '0' is out of range" in p.stderr


def test_errors_name_the_environment_variable_the_bad_value_came_from(csv_trace):
    env = dict(MTIA_EMULATOR_MEMORY="garbage", MTIA_ALLOC_CONF="foo:1")
    p = fresh_python("-m", "mtia_alloc", "replay", str(csv_trace[0]), env=env)
    assert p.returncode == 2 and "MTIA_EMULATOR_MEMORY: cannot parse 'garbage'" in p.stderr
    env["MTIA_EMULATOR_MEMORY"] = "4GiB"
    p = fresh_python("-m", "mtia_alloc", "replay", str(csv_trace[0]), env=env)
    assert p.returncode == 2 and "MTIA_ALLOC_CONF='foo:1'" in p.stderr


def test_old_pickle_protocols_bom_and_skipped_events_are_handled(tmp_path):
    snap = {"segments": [], "device_traces": [[{"action": "alloc", "addr": 4096, "size": 512, "stream": 0},
                                               {"action": "free_completed", "addr": 4096, "size": 512,
                                                "stream": 0}]]}
    for protocol in (0, 1):
        path = tmp_path / f"p{protocol}.pickle"
        path.write_bytes(pickle.dumps(snap, protocol=protocol))
        assert figure(ok(path), "events") == 2
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffop,id,size_bytes,stream\na,0,512,0\nf,0,512,0\n".encode())
    assert figure(ok(bom), "events") == 2
    skipped = tmp_path / "skipped.csv"
    skipped.write_text("op,id,size_bytes,stream\na,0,512,0\na,1,-5,0\nf,7,512,0\nf,0,512,0\n")
    p = replay(skipped, "--json")
    assert p.returncode == 0 and "warning: 2 events skipped" in p.stderr
    assert json.loads(p.stdout)["events"] == 2


def test_bench_refuses_paths_that_do_not_exist():
    for flag in ("--traces", "--torch-build"):
        p = fresh_python("-m", "mtia_alloc", "bench", "--quick", flag, "/no/such/dir")
        assert p.returncode == 2 and f"{flag}: no directory /no/such/dir" in p.stderr


def test_compare_torch_json(csv_trace):
    build = next((b for b in (os.environ.get("MTIA_TORCH_PEER"), "/tmp/torch_caching_allocator_peer", "/tmp/tcap")
                  if b and os.access(os.path.join(b, "bin", "harness"), os.X_OK)), None)
    if build is None:
        pytest.skip("no peer harness built")
    lines = ok(csv_trace[0], "--json", "--compare-torch", build).splitlines()
    ours, torch = (json.loads(line) for line in lines)
    assert list(ours) == list(torch) == RESULT_KEYS and torch["mode"] == "torch.pass1"
    assert (ours["peak_reserved_bytes"], ours["num_device_alloc"]) == \
           (torch["peak_reserved_bytes"], torch["num_device_alloc"])


def test_snapshot_on_a_device_too_small_for_its_starting_state(snapshots):
    _, warm = snapshots
    p = replay(warm, memory="256MiB")  # the starting state alone needs more
    assert p.returncode == 1, p.stderr  # a starting state that does not fit is a failure
    assert "pass1.prefix_failure: rebuilding the starting state ran out of memory" in p.stdout
    assert re.search(r"num_ooms: [1-9]", p.stdout)


# Small traces where a differential run against PyTorch's allocator (the peer harness of
# shared/peers, on the same capacity and settings) once disagreed with ours; the figures
# are the peer's. Each ran out of memory on a small device.
DIFFERENTIAL = [
    pytest.param(  # the device's addresses fragmented: a real cudaMalloc counts bytes only
        "a,0,31457280,0 a,1,14680064,0 a,2,31457280,0 f,1,14680064,0 a,3,461373440,0 f,3,0,0 f,0,0,0 f,2,0,0",
        "512MiB", "", (524288000, 4, 0), id="address-fragmentation"),
    pytest.param(  # the fraction is checked on the request in alloc_block, not on the mapped pages
        "a,0,136314880,0 a,1,12582912,1 f,1,12582912,1 f,0,136314880,0",
        "256MiB", "expandable_segments:True,per_process_memory_fraction:0.6", (167772160, 2, 0),
        id="expandable-fraction"),
    pytest.param(  # the reserved range is 1.125 x the capacity rounded up to whole pages
        "a,0,147849216,0 a,1,157286400,0 a,2,31457280,0 f,2,0,0 f,0,0,0",
        "256MiB", "expandable_segments:True", (188743680, 2, 1), id="expandable-range-size"),
]


@pytest.mark.parametrize("events, memory, conf, expected", DIFFERENTIAL)
def test_traces_where_we_once_differed_from_pytorch(tmp_path, events, memory, conf, expected):
    path = tmp_path / "t.csv"
    path.write_text("op,id,size_bytes,stream\n" + "\n".join(events.split()) + "\n")
    out = replay(path, "--json", "--allow-oom", "--conf", conf, memory=memory)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["peak_reserved_bytes"], r["num_device_alloc"], r["num_ooms"]) == expected
