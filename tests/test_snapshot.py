"""snapshot() / memory_snapshot() in PyTorch's schema (allocator_core.md §8, must-haves
§15.23-24), and the REPL view mtia_alloc.memory.Snapshot with the summary/plot CLI functions,
on our snapshots and on hand-built PyTorch-format pickles."""
import gzip
import importlib
import json
import os
import pickle
import time
from types import SimpleNamespace

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import DEVICES, POOL_STATS, MiB, fresh_python
from mtia_alloc.memory import Snapshot

# The package attribute mtia_alloc.snapshot is the snapshot() function; the view is mtia_alloc.viz
# and its summary/plot commands are in mtia_alloc.tools.snapshot_cli:
snapmod = SimpleNamespace(**{**vars(importlib.import_module("mtia_alloc.viz")),
                            **vars(importlib.import_module("mtia_alloc.tools.snapshot_cli"))})

SEGMENT_KEYS = {"device", "address", "total_size", "allocated_size", "active_size", "requested_size", "stream",
                "segment_type", "segment_pool_id", "is_expandable", "frames", "blocks"}
BLOCK_KEYS = {"address", "size", "requested_size", "state", "frames"}
STATES = {"active_allocated", "active_pending_free", "inactive"}


@pytest.fixture
def mixed_state(blocks):
    """Small and large blocks on two devices, split segments with holes, a private pool."""
    mtia.record_memory_history(None)
    mtia.empty_cache()
    ptrs = [blocks.alloc(n) for n in (100, 1000, 512, 5 * MiB, 3 * MiB, 4 * MiB, 25 * MiB)]
    blocks.free(ptrs[1])
    blocks.free(ptrs[4])
    if len(DEVICES) > 1:
        blocks.alloc(2 * MiB + 1, DEVICES[-1])
    pool = mtia.MemPool()
    with mtia.use_mem_pool(pool):
        pool_ptr = blocks.alloc(6 * MiB)
    yield {"pool": pool, "pool_ptr": pool_ptr, "ptrs": ptrs}
    blocks.free(pool_ptr)
    del pool






def walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk(v)


# ----------------------------------------------------------------------------- schema

def test_snapshot_schema_is_pytorchs(mixed_state):
    snap = mtia.snapshot()
    assert set(snap) == {"segments", "device_traces", "allocator_settings", "external_annotations"}
    assert len(snap["device_traces"]) == len(DEVICES) and snap["external_annotations"] == []
    last = {}
    for seg in snap["segments"]:
        assert set(seg) == SEGMENT_KEYS
        assert seg["address"] > last.get(seg["device"], -1), "segments sorted by address per device"
        last[seg["device"]] = seg["address"]
        assert seg["segment_type"] in ("small", "large") and type(seg["is_expandable"]) is bool
        assert type(seg["segment_pool_id"]) is tuple and len(seg["segment_pool_id"]) == 2
        addr = seg["address"]
        for b in seg["blocks"]:
            assert set(b) == BLOCK_KEYS and b["state"] in STATES and b["address"] == addr
            addr += b["size"]
        assert addr == seg["address"] + seg["total_size"], "blocks tile the segment"
        active = [b for b in seg["blocks"] if b["state"] != "inactive"]
        assert seg["allocated_size"] == sum(b["size"] for b in seg["blocks"] if b["state"] == "active_allocated")
        assert seg["active_size"] == sum(b["size"] for b in active)
        assert seg["requested_size"] == sum(b["requested_size"] for b in active)
    for x in walk(snap):
        assert type(x) in (dict, list, tuple, str, int, float, bool, type(None)), type(x)
        if type(x) is int:
            assert abs(x) < 2 ** 53
    pool_segs = [s for s in snap["segments"] if s["segment_pool_id"] == mixed_state["pool"].id]
    assert any(s["address"] <= mixed_state["pool_ptr"] < s["address"] + s["total_size"] for s in pool_segs)


def test_memory_snapshot_and_pool_filter(mixed_state):
    pool = mixed_state["pool"]
    assert mtia.memory_snapshot() == mtia.snapshot()["segments"]
    mine = mtia.memory_snapshot(pool.id)
    assert mine and all(s["segment_pool_id"] == pool.id for s in mine)
    assert mine == pool.snapshot() == mtia.memory_snapshot(pool)
    assert [s for s in mtia.memory_snapshot() if s["segment_pool_id"] == pool.id] == mine
    with pytest.raises(TypeError):
        mtia.memory_snapshot("pool")


# ----------------------------------------------------------------------------- Snapshot view

def test_snapshot_stats_match_memory_stats(mixed_state):
    snap = Snapshot()
    for d in DEVICES:
        ours, real = snap.stats(d), mtia.memory_stats(d)
        for stat in POOL_STATS:
            for pool in ("all", "small_pool", "large_pool"):
                key = f"{stat}.{pool}.current"
                assert ours[key] == real[key], key
        for key in ("all", "small_pool", "large_pool"):
            assert ours[f"largest_free_block_bytes.{key}"] == real[f"largest_free_block_bytes.{key}"]
    assert snap.reserved == sum(mtia.memory_reserved(d) for d in DEVICES)
    assert snap.allocated == sum(mtia.memory_allocated(d) for d in DEVICES)


def test_summary_cur_usage_column_matches_memory_summary(mixed_state):
    def cur_column(table):  # the 27 pool rows; the oversize rows depend on past max_split_size settings
        return [line.split("|")[2] for line in table.splitlines()
                if line.count("|") == 6 and "Metric" not in line][:27]

    snap = Snapshot()
    for d in DEVICES:
        ours, real = snap.summary(d), mtia.memory_summary(d)
        assert ours.count("\n") == real.count("\n")
        assert cur_column(ours) == cur_column(real)
    assert snap.summary().count("memory summary, device ID") == len(snap.devices)
    assert "Allocated memory" in snap.summary(abbreviated=True)


def test_memory_summary_has_pytorch_rows_with_device_wording():
    # torch.cuda.memory_summary's rows; API.md: read "Device" where PyTorch says "GPU"
    table = mtia.memory_summary(0)
    for label in ("PyTorch MTIA memory summary, device ID 0", "MTIA OOMs", "Allocated memory", "Active memory",
                  "Requested memory", "Device reserved memory", "Non-releasable memory", "Allocations",
                  "Active allocs", "Device reserved segments", "Non-releasable allocs", "Oversize allocations",
                  "Oversize Device segments", "from large pool", "from small pool"):
        assert label in table, label
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # a rectangle
    assert len(lines) == 6 + 9 * 4 + 2 * 2 + 1
    assert len(mtia.memory_summary(0, abbreviated=True).splitlines()) == 6 + 9 * 2 + 2 * 2 + 1


def test_repr_segments_and_blocks(mixed_state):
    mtia.record_memory_history(context="state")
    try:
        p = mtia.caching_allocator_alloc(777)
        snap = Snapshot()
    finally:
        mtia.record_memory_history(None)
    r = repr(snap)
    for word in ("devices=", "segments=", "reserved=", "allocated=", "largest_free_block=", "fragmentation="):
        assert word in r
    assert len(r) < 300
    assert len(snap) == len(snap.segments) == len(mtia.memory_snapshot())
    seg = snap.segments[0]
    assert repr(seg).startswith("Segment(device ") and f"{seg.address:#x}" in repr(seg)
    blk = next(b for b in snap.blocks if b.address == p)
    assert blk.is_allocated and blk.requested_size == 777 and blk.size == 1024
    assert repr(blk).startswith(f"Block({p:#x}, 1.00 KiB, active_allocated, requested 777 bytes")
    assert "test_snapshot.py" in repr(blk) and "test_repr_segments_and_blocks" in blk.where
    assert sum(len(s.blocks) for s in snap.segments) == len(snap.blocks)
    mtia.caching_allocator_delete(p)


def test_fragmentation_figures():
    mtia.record_memory_history(None)
    mtia.empty_cache()
    ptrs = [mtia.caching_allocator_alloc(4 * MiB) for _ in range(4)]  # one 20 MiB segment: 4 x 4 MiB + tail
    try:
        mtia.caching_allocator_delete(ptrs[1])
        mtia.caching_allocator_delete(ptrs[3])  # merges with the 4 MiB tail
        snap = Snapshot()
        seg = next(s for s in snap.segments if s.address == ptrs[0])
        f = snapmod.Fragmentation([seg])
        assert (f.reserved, f.free, f.free_in_partly_used, f.releasable) == (20 * MiB, 12 * MiB, 12 * MiB, 0)
        assert f.largest_free_block == {"all": 8 * MiB, "small_pool": 0, "large_pool": 8 * MiB}
        assert f.partly_used_segments == 1 and f.ratio == pytest.approx(0.6)
        # torch's viewer's terms (issue 20): free = internal (rounding) + external (free blocks)
        assert (f.external, f.internal, f.requested) == (12 * MiB, 0, 8 * MiB) and f.fragmentation == f.ratio
        assert f.largest_free_block_by_pool == {(0, 0): 8 * MiB}
        whole = snap.fragmentation(0)
        stats = mtia.memory_stats(0)
        assert whole.largest_free_block["large_pool"] == stats["largest_free_block_bytes.large_pool"]
        assert whole.free_in_partly_used == stats["inactive_split_bytes.all.current"]
        assert "60.0%" in repr(f) and "8.00 MiB" in str(f)
        assert set(f.as_dict()) >= {"ratio", "largest_free_block", "releasable"}
    finally:
        for p in (ptrs[0], ptrs[2]):
            mtia.caching_allocator_delete(p)


def test_memory_over_time_ends_at_the_snapshot_state(blocks):
    mtia.record_memory_history(None)
    mtia.empty_cache()
    before = Snapshot()  # other tests may hold blocks: the curves start from that state
    mtia.record_memory_history()
    try:
        big = 37 * MiB + 5  # a fresh 38 MiB segment of its own
        blocks.free(blocks.alloc(big))
        mtia.empty_cache()
        snap = Snapshot()
    finally:
        mtia.record_memory_history(None)
    curves = snap.memory_over_time(0)
    assert len(curves["allocated"]) == len(snap.device_traces[0])
    assert curves["allocated"][-1] == sum(s.requested_size for s in snap.segments if s.device == 0)
    assert curves["reserved"][-1] == sum(s.total_size for s in snap.segments if s.device == 0)
    start_alloc = sum(s.requested_size for s in before.segments if s.device == 0)
    start_res = sum(s.total_size for s in before.segments if s.device == 0)
    assert curves["reserved"][0] == start_res + 38 * MiB  # the first entry is the segment_alloc
    assert max(curves["allocated"]) == start_alloc + big
    assert curves["allocated"][-1] == start_alloc and curves["reserved"][-1] == start_res


def test_plot_writes_self_contained_html(blocks, tmp_path):
    mtia.record_memory_history(None)
    mtia.empty_cache()
    mtia.record_memory_history()
    try:
        ptrs = [blocks.alloc(n) for n in (100, 3 * MiB, 5000, 30 * MiB)]
        blocks.free(ptrs[1])
        snap = Snapshot()
    finally:
        mtia.record_memory_history(None)
    out = tmp_path / "s.html"
    assert snap.plot(out) == out
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert text.count("<svg") >= 2 and "<polyline" in text and 'class="a"' in text
    assert "http" not in text and "<script" not in text  # no network, no JavaScript
    assert "memory summary, device ID 0" in text
    snap.plot(tmp_path / "one.html", device=0)
    assert "Device 1" not in (tmp_path / "one.html").read_text()


def test_dump_round_trip_protocol_4(mixed_state, tmp_path):
    snap = Snapshot()
    path = tmp_path / "s.pickle"
    snap.dump(path)
    assert path.read_bytes()[:2] == b"\x80\x04"
    again = Snapshot(path)
    assert again.data == snap.data and again.source == str(path)
    assert repr(again) == repr(snap)
    # numpy scalars in a hand-made dict are written as plain ints
    d = snap.to_dict()
    d["segments"][0]["address"] = np.int64(d["segments"][0]["address"])
    Snapshot(d).dump(path)
    assert type(pickle.loads(path.read_bytes())["segments"][0]["address"]) is int


# ----------------------------------------------------------------------------- other inputs

def pytorch_snapshot():
    """A snapshot as torch.cuda.memory._snapshot() writes it (torch 2.x), with the fields our
    allocator does not produce: legacy `history` blocks, a missing segment_type, categories,
    forward_frames, a pending-free block, an oom entry, a second device without history."""
    A, B = 0x7F0000000000, 0x7F0000200000
    fr = [{"filename": "/work/train.py", "line": 12, "name": "step"}]
    return {
        "segments": [
            {"device": 0, "address": A, "total_size": 2 * MiB, "allocated_size": 1024, "active_size": 1536,
             "requested_size": 1500, "stream": 0, "segment_type": "small", "segment_pool_id": (0, 0),
             "is_expandable": False, "frames": fr,
             "blocks": [{"address": A, "size": 1024, "requested_size": 1000, "state": "active_allocated",
                         "frames": fr, "forward_frames": ["fw"]},
                        {"address": A + 1024, "size": 512, "requested_size": 500, "state": "active_pending_free",
                         "frames": []},
                        {"address": A + 1536, "size": 2 * MiB - 1536, "requested_size": 0, "state": "inactive",
                         "frames": []}]},
            {"device": 0, "address": B, "total_size": 20 * MiB, "stream": 140000000000,
             "blocks": [{"size": 8 * MiB, "state": "active_allocated",
                         "history": [{"addr": B, "real_size": 8000000, "frames": fr}]},
                        {"size": 12 * MiB, "state": "inactive"}]},
        ],
        "device_traces": [
            [{"action": "segment_alloc", "addr": B, "size": 20 * MiB, "stream": 140000000000, "time_us": 1},
             {"action": "alloc", "addr": B, "size": 8000000, "stream": 140000000000, "time_us": 2,
              "category": "activation", "frames": fr},
             {"action": "oom", "device_free": 1024, "size": 64 * MiB, "stream": 0, "time_us": 3},
             {"action": "snapshot", "addr": 0, "size": 0, "stream": 0, "time_us": 4}],
            [],
        ],
        "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "", "max_split_size": -1},
        "external_annotations": [{"name": "fwd", "stage": "START", "device": 0, "time_us": 1}],
    }


def test_pytorch_format_snapshot(tmp_path):
    snap = Snapshot(pytorch_snapshot())
    assert snap.devices == [0]
    assert snap.reserved == 22 * MiB and snap.allocated == 1024 + 8 * MiB
    legacy = snap.segments[1]
    assert legacy.segment_type == "large" and legacy.blocks[0].requested_size == 8000000
    assert legacy.blocks[0].where == "train.py:12 in step"
    assert snap.stats(0)["active_bytes.all.current"] == 1536 + 8 * MiB
    assert snap.stats(0)["num_ooms"] == 1
    assert snap.fragmentation().pending_free == 512
    curves = snap.memory_over_time(0)
    assert curves["oom"] == [2] and curves["reserved"] == [22 * MiB] * 4
    snap.plot(tmp_path / "t.html")
    assert "oom at trace entry 2" in (tmp_path / "t.html").read_text()


@pytest.mark.parametrize("fmt", ["pickle5", "pickle2", "json", "gzip", "segment-list"])
def test_load_formats(tmp_path, fmt):
    data = pytorch_snapshot()
    path = tmp_path / "snap"
    if fmt == "pickle5":
        path.write_bytes(pickle.dumps(data, protocol=5))
    elif fmt == "pickle2":
        path.write_bytes(pickle.dumps(data, protocol=2))
    elif fmt == "json":
        path.write_text(json.dumps(data))
    elif fmt == "gzip":
        path.write_bytes(gzip.compress(pickle.dumps(data)))
    else:
        path.write_bytes(pickle.dumps(data["segments"]))
    snap = Snapshot(str(path))
    assert snap.reserved == 22 * MiB and len(snap.blocks) == 5
    assert snap.device_traces == ([[]] if fmt == "segment-list" else json.loads(json.dumps(data["device_traces"])))


def test_loading_refuses_code_and_junk(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"segments": [], "x": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        Snapshot(evil)
    junk = tmp_path / "junk.pickle"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError):
        Snapshot(junk)
    with pytest.raises(ValueError, match="no 'segments'"):
        Snapshot({"device_traces": []})
    with pytest.raises(TypeError):
        Snapshot(42)


def test_cli_summary_and_plot_on_a_pytorch_pickle(tmp_path, capsys):
    path = tmp_path / "torch_snapshot.pickle"
    with open(path, "wb") as f:
        pickle.dump(pytorch_snapshot(), f)  # the default protocol, as torch's _dump_snapshot
    assert snapmod.summary_main(str(path)) == 0
    out = capsys.readouterr().out
    assert out.startswith("Snapshot(devices=[0], segments=2")
    assert "largest free block" in out and "memory summary, device ID 0" in out
    html_path = tmp_path / "out.html"
    assert snapmod.plot_main(str(path), str(html_path)) == 0
    assert html_path.read_text().count("<svg") >= 2
    assert snapmod.summary_main(str(tmp_path / "missing.pickle")) == 2
    assert "cannot read snapshot" in capsys.readouterr().err
    assert snapmod.plot_main(str(path), str(tmp_path / "no" / "such" / "dir.html")) == 2
    capsys.readouterr()
    assert snapmod.plot_main(str(path), str(tmp_path / "out.png")) == 2  # not HTML under a .png name
    assert "name it .html" in capsys.readouterr().err and not (tmp_path / "out.png").exists()


def test_cli_on_our_dump(mixed_state, tmp_path, capsys):
    path = tmp_path / "ours.pickle"
    mtia.memory._dump_snapshot(str(path))
    assert snapmod.summary_main(str(path)) == 0
    assert capsys.readouterr().out.count("memory summary, device ID") == len(Snapshot(path).devices)


def test_big_snapshot_is_fast_and_its_plot_small(tmp_path):
    """10k blocks (the 100k figure is in bench/): snapshot, view and plot stay quick."""
    mtia.record_memory_history(None)
    mtia.empty_cache()
    ptrs = [mtia.caching_allocator_alloc(512) for _ in range(10_000)]
    try:
        for p in ptrs[::2]:
            mtia.caching_allocator_delete(p)
        t0 = time.perf_counter()
        raw = mtia.snapshot()
        t1 = time.perf_counter()
        snap = Snapshot(raw)
        repr(snap)
        snap.plot(tmp_path / "big.html")
        t2 = time.perf_counter()
        assert len(snap.blocks) >= 10_000
        assert t1 - t0 < 1.0 and t2 - t1 < 5.0
        assert (tmp_path / "big.html").stat().st_size < 3_000_000
        assert 'class="m"' in (tmp_path / "big.html").read_text()  # every cell half allocated
    finally:
        for p in ptrs[1::2]:
            mtia.caching_allocator_delete(p)



# ----------------------------------------------------------------------------- bad snapshots

def _seg(**kw):
    """A valid 2 MiB segment with one free block; keyword arguments replace its keys."""
    d = {"device": 0, "address": 0x7F0000000000, "total_size": 2 * MiB, "stream": 0,
         "blocks": [{"size": 2 * MiB, "state": "inactive"}]}
    d.update(kw)
    return d


BAD_SNAPSHOTS = {  # name: (snapshot, what the message must say)
    "list-of-ints": ([1, 2, 3], r"segment 0: must be a dict, got int"),
    "segment-not-dict": ({"segments": [5, "x"]}, r"segment 0: must be a dict"),
    "segments-not-list": ({"segments": "abc"}, r"'segments' must be a list"),
    "traces-str": ({"segments": [], "device_traces": "abc"}, r"'device_traces' must be a list"),
    "traces-dict": ({"segments": [_seg()], "device_traces": {"0": []}}, r"'device_traces' must be a list"),
    "trace-not-list": ({"segments": [], "device_traces": ["abc"]}, r"device_traces\[0\] must be a list"),
    "trace-entry-not-dict": ({"segments": [], "device_traces": [[{"action": "alloc", "size": 1}, 7]]},
                             r"device_traces\[0\]\[1\] must be a dict"),
    "trace-alloc-no-size": ({"segments": [], "device_traces": [[{"action": "alloc", "addr": 0}]]},
                            r"device_traces\[0\]\[0\] \(alloc\): no 'size'"),
    "trace-size-str": ({"segments": [], "device_traces": [[{"action": "segment_alloc", "size": "2MiB"}]]},
                       r"device_traces\[0\]\[0\] \(segment_alloc\): 'size' must be an integer"),
    "no-address": ({"segments": [{"total_size": 2 * MiB, "blocks": []}]}, r"segment 0: no 'address'"),
    "no-total-size": ({"segments": [_seg(), {"address": 0, "blocks": []}]}, r"segment 1: no 'total_size'"),
    "block-no-size": ({"segments": [_seg(blocks=[{"state": "inactive"}])]}, r"segment 0 block 0: no 'size'"),
    "block-not-dict": ({"segments": [_seg(blocks=[None])]}, r"segment 0 block 0: must be a dict"),
    "blocks-not-list": ({"segments": [_seg(blocks=5)]}, r"segment 0: 'blocks' must be a list"),
    "active-block-overflows": ({"segments": [_seg(blocks=[{"size": 8 * MiB, "state": "active_allocated"}])]},
                               r"segment 0: its blocks hold 8388608 bytes, more than its total_size 2097152"),
    "free-block-overflows": ({"segments": [_seg(blocks=[{"size": 8 * MiB, "state": "inactive"}])]},
                             r"its blocks hold"),
    "negative-total-size": ({"segments": [_seg(total_size=-2 * MiB, blocks=[])]},
                            r"segment 0: 'total_size' is negative \(-2097152\)"),
    "negative-block-size": ({"segments": [_seg(blocks=[{"size": -5, "state": "inactive"}])]},
                            r"segment 0 block 0: 'size' is negative \(-5\)"),
    "negative-requested": ({"segments": [_seg(blocks=[{"size": 2 * MiB, "requested_size": -1,
                                                       "state": "active_allocated"}])]},
                           r"'requested_size' is negative"),
    "size-str": ({"segments": [_seg(total_size="2097152")]}, r"'total_size' must be an integer, got str"),
    "size-bool": ({"segments": [_seg(total_size=True, blocks=[])]}, r"'total_size' must be an integer, got bool"),
    "total-size-2**64": ({"segments": [_seg(total_size=2 ** 64, blocks=[])]}, r"'total_size' is \d+: out of range"),
    "address-2**64": ({"segments": [_seg(address=2 ** 70)]}, r"'address' is \d+: out of range"),
    "size-1e30": ({"segments": [_seg(blocks=[{"size": 1e30, "state": "inactive"}])]}, r"'size' is \d+: out of range"),
    "total-size-inf": ({"segments": [_seg(total_size=float("inf"))]}, r"'total_size' is inf, not a finite number"),
    "address-nan": ({"segments": [_seg(address=float("nan"))]}, r"'address' is nan, not a finite number"),
    "size-fraction": ({"segments": [_seg(blocks=[{"size": 0.5, "state": "inactive"}])]}, r"not a whole number"),
    "device-negative": ({"segments": [_seg(device=-1)]}, r"'device' is negative"),
    "device-huge": ({"segments": [_seg(device=10 ** 9)]}, r"'device' is 1000000000: out of range"),
}


@pytest.mark.parametrize("name", list(BAD_SNAPSHOTS))
def test_bad_snapshot_is_refused_when_built(name):
    """Validated once in Snapshot(): a clear ValueError/TypeError naming the key and the segment,
    never an AttributeError/KeyError/IndexError later, nor impossible figures from summary/plot."""
    bad, message = BAD_SNAPSHOTS[name]
    with pytest.raises((ValueError, TypeError), match=message):
        Snapshot(bad)


@pytest.mark.parametrize("good", [
    {"segments": [_seg(total_size=2 * MiB + 0.0, blocks=[{"size": float(2 * MiB), "state": "inactive"}])]},
    {"segments": [_seg(address=np.uint64(4096), total_size=np.int64(2 * MiB))]},
    {"segments": [{"address": 0, "total_size": 0}]},  # no device, stream or blocks
    {"segments": [_seg(stream=-5, frames="not frames", blocks=[{"size": MiB, "state": "active_allocated",
                                                                 "frames": [7]}, {"size": MiB}])]},
    {"segments": [], "device_traces": [[{"action": "oom", "time_us": 1}, {"action": "user_defined"}]]},
    [_seg(), _seg(device=1, address=0x7F0000200000)],
], ids=["integral-floats", "numpy-ints", "minimal-segment", "odd-optional-keys", "unsized-trace-entries",
        "segment-list"])
def test_unusual_but_valid_snapshots_still_load(good, tmp_path):
    snap = Snapshot(good)
    repr(snap), snap.summary(), snap.fragmentation(), [repr(b) for b in snap.blocks]
    snap.plot(tmp_path / "ok.html")


def test_json_snapshot_with_utf8_bom(tmp_path):
    path = tmp_path / "snap.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(pytorch_snapshot()).encode())
    assert snapmod.load(path)["segments"][0]["total_size"] == 2 * MiB
    assert Snapshot(str(path)).reserved == 22 * MiB


def test_device_not_in_the_snapshot_is_refused(tmp_path):
    snap = Snapshot(pytorch_snapshot())  # device 0 with segments, device 1 with an empty trace
    assert "device ID 0" in snap.summary() and "device ID 1" in snap.summary(device=1)
    for call in (lambda d: snap.summary(device=d), snap.stats, snap.fragmentation, snap.memory_over_time,
                 lambda d: snap.plot(tmp_path / "d.html", device=d)):
        for device in (-1, 2):
            with pytest.raises(ValueError, match=rf"device {device} is not in this snapshot \(devices: \[0, 1\]\)"):
                call(device)
    with pytest.raises(TypeError, match="device must be an integer"):
        snap.summary(device="0")
    assert not (tmp_path / "d.html").exists()
    assert "device ID 0" in Snapshot({"segments": []}).summary(device=0)  # as summary() of an empty snapshot


def test_plot_refuses_a_non_html_name(tmp_path):
    snap = Snapshot(pytorch_snapshot())
    with pytest.raises(ValueError, match=r"name it \.html, not '.*x\.png'"):
        snap.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


CLI_BAD_FILES = {  # file name: contents (JSON text, or data to pickle)
    "ints.pickle": [1, 2, 3],
    "ints.json": "[1, 2, 3]",
    "segments.pickle": {"segments": [5, "x"]},
    "traces-str.json": '{"segments": [], "device_traces": "abc"}',
    "no-address.pickle": BAD_SNAPSHOTS["no-address"][0],
    "traces-dict.pickle": BAD_SNAPSHOTS["traces-dict"][0],
    "overflow.pickle": BAD_SNAPSHOTS["active-block-overflows"][0],
    "negative.pickle": BAD_SNAPSHOTS["negative-total-size"][0],
    "too-big-block.pickle": BAD_SNAPSHOTS["free-block-overflows"][0],
    "huge.pickle": BAD_SNAPSHOTS["total-size-2**64"][0],
    "inf.json": '{"segments": [{"address": 0, "total_size": Infinity, "blocks": []}]}',
    "nan.json": '{"segments": [{"address": NaN, "total_size": 4096, "blocks": []}]}',
    "1e30.json": '{"segments": [{"address": 0, "total_size": 4096, "blocks": [{"size": 1e30}]}]}',
}


def _write_bad(tmp_path, name):
    data, path = CLI_BAD_FILES[name], tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(pickle.dumps(data))
    return str(path)


@pytest.mark.parametrize("command", ["summary", "plot"])
@pytest.mark.parametrize("name", list(CLI_BAD_FILES))
def test_cli_on_a_bad_snapshot_fails_with_one_line(tmp_path, capsys, name, command):
    from mtia_alloc.__main__ import main
    path, out = _write_bad(tmp_path, name), tmp_path / "out.html"
    argv = ["summary", path] if command == "summary" else ["plot", path, "-o", str(out)]
    assert main(argv) != 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("mtia_alloc: ") and "\n" not in err and "Traceback" not in err, err
    assert "segment" in err or "device_traces" in err  # names what was wrong
    assert not out.exists() and "reserved" not in captured.out


def test_cli_bad_snapshot_in_a_fresh_interpreter(tmp_path):
    """The real command line: non-zero exit, one `mtia_alloc:` line, no traceback."""
    for name, argv in (("ints.pickle", ["summary"]), ("traces-str.json", ["plot", "-o", str(tmp_path / "o.html")]),
                       ("inf.json", ["summary"]), ("overflow.pickle", ["plot", "-o", str(tmp_path / "o.html")])):
        path = _write_bad(tmp_path, name)
        r = fresh_python("-m", "mtia_alloc", argv[0], path, *argv[1:])
        err = r.stderr.strip()
        assert r.returncode != 0 and err.startswith("mtia_alloc: ") and "\n" not in err, (name, r.stderr)
        assert not (tmp_path / "o.html").exists()
