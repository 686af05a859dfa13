"""Checks a snapshot against what PyTorch's memory visualizer needs (shared/memory_viz_format.md):
the Python renderers of torch.cuda._memory_viz and the pytorch.org/memory_viz page, whose
JavaScript we cannot run here. Used by the tests; torch is not needed.

    problems = check(snapshot_dict)           # [] when every renderer should load it
    problems = check_pickle(path_or_bytes)    # the encoding rules, then check() on the content
    assert_renders(snapshot_dict)             # AssertionError listing the problems

Rules (numbers refer to memory_viz_format.md):
* §1 schema: required keys and their types at every level; blocks listed in address order
  tile their segment exactly (`segsum` asserts it, the page recomputes addresses from it);
  `state` in the three-word domain; `requested_size` whenever a block has `frames`;
  complete frames; trace actions in the domain; `device_free` on `oom`, `addr` elsewhere.
* `device` equals the index into `device_traces` (there must be such a list).
* bug B3: if any trace entry has `category`, one must be "unknown".
* encoding: plain types only, str dict keys, ints below 2**53 in magnitude; pickle protocol
  2-4 with no globals, bytes or out-of-band buffers.
* "Allocator State History": starting from the final segments and undoing the trace
  backwards, every live block lies inside a segment at every event, every `free_requested`
  finds its block and every `segment_alloc`/`segment_map` finds its segment.

Owns: check, check_pickle, assert_renders. Relies on: nothing of mtia_alloc (it judges
plain dicts and pickle bytes, as the visualizer would).
"""
import bisect
import io
import json
import os
import pickle
import pickletools

ACTIONS = {"alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map",
           "segment_unmap", "oom", "snapshot", "free"}
STATES = {"active_allocated", "active_pending_free", "inactive"}
MAX_EXACT = 1 << 53
_PLAIN = (dict, list, tuple, str, int, float, bool, type(None))
_REFUSED_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "PERSID",
                    "BINPERSID", "EXT1", "EXT2", "EXT4", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
                    "NEXT_BUFFER", "READONLY_BUFFER", "EMPTY_SET", "ADDITEMS", "FROZENSET"}


def _is_int(v):
    return type(v) is int


def _check_plain(obj, path, problems, limit=20):
    """Plain types only, str keys, exact ints."""
    stack = [(obj, path)]
    while stack and len(problems) < limit:
        o, p = stack.pop()
        t = type(o)
        if t not in _PLAIN:
            problems.append(f"{p}: {t.__module__}.{t.__name__} is not a plain type (the page refuses it)")
        elif t is dict:
            for k, v in o.items():
                if type(k) is not str:
                    problems.append(f"{p}: dict key {k!r} is not a str")
                stack.append((v, f"{p}[{k!r}]"))
        elif t in (list, tuple):
            stack.extend((v, f"{p}[{i}]") for i, v in enumerate(o))
        elif t is int and not -MAX_EXACT < o < MAX_EXACT:
            problems.append(f"{p}: int {o} is not exact in JavaScript (|x| >= 2**53)")


def _check_frames(frames, where, problems):
    if not isinstance(frames, list):
        problems.append(f"{where}.frames: not a list")
        return
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict):
            problems.append(f"{where}.frames[{i}]: not a dict")
            continue
        for key, typ in (("filename", str), ("line", int), ("name", str)):
            if not isinstance(fr.get(key), typ) or (typ is int and isinstance(fr.get(key), bool)):
                problems.append(f"{where}.frames[{i}]: '{key}' missing or not a {typ.__name__}")


def _need_int(d, key, where, problems, required=True):
    if key not in d:
        if required:
            problems.append(f"{where}: missing '{key}'")
        return False
    if not _is_int(d[key]):
        problems.append(f"{where}: '{key}' is a {type(d[key]).__name__}, not an int")
        return False
    return True


def _check_segments(snap, problems):
    traces = snap.get("device_traces")
    n_traces = len(traces) if isinstance(traces, list) else 0
    last_end = {}
    for si, seg in enumerate(snap["segments"]):
        w = f"segments[{si}]"
        if not isinstance(seg, dict):
            problems.append(f"{w}: not a dict")
            continue
        if _need_int(seg, "device", w, problems) and not 0 <= seg["device"] < n_traces:
            problems.append(f"{w}: device {seg['device']} has no device_traces[{seg['device']}] list "
                            f"(the page needs device == index into device_traces)")
        ok = _need_int(seg, "address", w, problems) & _need_int(seg, "total_size", w, problems)
        _need_int(seg, "stream", w, problems)
        for key in ("allocated_size", "active_size", "requested_size"):
            _need_int(seg, key, w, problems, required=False)
        if "segment_type" in seg and seg["segment_type"] not in ("small", "large"):
            problems.append(f"{w}: segment_type {seg['segment_type']!r} is not 'small' or 'large'")
        pool = seg.get("segment_pool_id", (0, 0))
        if not (isinstance(pool, (tuple, list)) and len(pool) == 2 and all(_is_int(x) for x in pool)):
            problems.append(f"{w}: segment_pool_id {pool!r} is not a pair of ints")
        if "is_expandable" in seg and not isinstance(seg["is_expandable"], bool):
            problems.append(f"{w}: is_expandable is not a bool")
        if "frames" in seg:
            _check_frames(seg["frames"], w, problems)
        blocks = seg.get("blocks")
        if not isinstance(blocks, list):
            problems.append(f"{w}: 'blocks' missing or not a list")
            continue
        if not ok:
            continue
        dev = seg.get("device")
        if seg["address"] < last_end.get(dev, -1):
            problems.append(f"{w}: segment {seg['address']:#x} is out of address order or overlaps the previous "
                            f"segment of device {dev}")
        last_end[dev] = seg["address"] + seg["total_size"]
        addr = seg["address"]
        allocated = active = requested = 0
        for bi, b in enumerate(blocks):
            bw = f"{w}.blocks[{bi}]"
            if not isinstance(b, dict):
                problems.append(f"{bw}: not a dict")
                continue
            if not _need_int(b, "size", bw, problems):
                continue
            if b["size"] <= 0:
                problems.append(f"{bw}: size {b['size']} is not positive")
            state = b.get("state")
            if state not in STATES:
                problems.append(f"{bw}: state {state!r} is not one of {sorted(STATES)} (the page treats it as free)")
            if "frames" in b:
                _check_frames(b["frames"], bw, problems)
                if "requested_size" not in b:
                    problems.append(f"{bw}: has 'frames' but no 'requested_size' (torch _block_extra KeyError)")
            if _need_int(b, "requested_size", bw, problems, required=False) and state in STATES - {"inactive"}:
                if not 0 <= b["requested_size"] <= b["size"]:
                    problems.append(f"{bw}: requested_size {b['requested_size']} not in [0, size {b['size']}]")
            if "address" in b and b["address"] != addr:
                problems.append(f"{bw}: address {b['address']:#x} but the blocks before it end at {addr:#x}")
            if state == "active_allocated":
                allocated += b["size"]
            if state in ("active_allocated", "active_pending_free"):
                active += b["size"]
                requested += b.get("requested_size", b["size"]) if _is_int(b.get("requested_size")) else 0
            addr += b["size"]
        if addr - seg["address"] != seg["total_size"]:
            problems.append(f"{w}: blocks add up to {addr - seg['address']} bytes, total_size is {seg['total_size']} "
                            f"(segsum asserts they tile the segment)")
        for key, val in (("allocated_size", allocated), ("active_size", active), ("requested_size", requested)):
            if _is_int(seg.get(key)) and seg[key] != val:
                problems.append(f"{w}: {key} {seg[key]} but its blocks add up to {val}")


def _check_trace_entries(snap, problems):
    traces = snap["device_traces"]
    has_category = has_unknown = False
    for d, trace in enumerate(traces):
        if not isinstance(trace, list):
            problems.append(f"device_traces[{d}]: not a list")
            continue
        for i, e in enumerate(trace):
            w = f"device_traces[{d}][{i}]"
            if not isinstance(e, dict):
                problems.append(f"{w}: not a dict")
                continue
            action = e.get("action")
            if action not in ACTIONS:
                problems.append(f"{w}: action {action!r} is not a known action")
            if action == "oom":
                _need_int(e, "device_free", w, problems)
            else:
                _need_int(e, "addr", w, problems)
            _need_int(e, "size", w, problems)
            _need_int(e, "stream", w, problems, required=False)
            _need_int(e, "time_us", w, problems, required=False)
            if "frames" in e:
                _check_frames(e["frames"], w, problems)
            if "compile_context" in e and not isinstance(e["compile_context"], str):
                problems.append(f"{w}: compile_context is not a str")
            if "user_metadata" in e and not isinstance(e["user_metadata"], (str, dict)):
                problems.append(f"{w}: user_metadata is not a str or dict")
            if "category" in e:
                has_category = True
                has_unknown |= e["category"] == "unknown"
    if has_category and not has_unknown:
        problems.append("trace entries carry 'category' but none is 'unknown': the page crashes (bug B3)")


class _Segments:
    """The page's l_segments: address-sorted, non-overlapping (addr, size) pairs."""

    def __init__(self, pairs):
        self.addrs, self.sizes = [], []
        for a, s in sorted(pairs):
            self.addrs.append(a)
            self.sizes.append(s)

    def find(self, addr):
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i >= 0 and addr < self.addrs[i] + self.sizes[i]:
            return i
        return -1

    def insert(self, addr, size):
        i = bisect.bisect_left(self.addrs, addr)
        self.addrs.insert(i, addr)
        self.sizes.insert(i, size)

    def remove_at(self, i):
        del self.addrs[i]
        del self.sizes[i]


def _simulate_history(snap, device, problems, limit=20):
    """The page's simulate_memory(idx) for every idx: undo the trace from the end."""
    trace = snap["device_traces"][device]
    segs_final, live = [], {}
    for seg in snap["segments"]:
        if seg.get("device") != device:
            continue
        segs_final.append((seg["address"], seg["total_size"]))
        addr = seg["address"]
        for b in seg["blocks"]:
            if b.get("state") in ("active_allocated", "active_pending_free"):
                live[addr] = b["size"]
            addr += b["size"]
    segments = _Segments(segs_final)
    before = len(problems)

    def report(msg):
        problems.append(f"device_traces[{device}]: {msg}")

    def check_block(addr, i):
        if segments.find(addr) < 0:
            report(f"before entry {i}, live block {addr:#x} lies in no segment (page: Cannot read properties "
                   f"of null (reading 'occupied'))")
            return False
        return True

    # live blocks are checked when they appear (undoing a free) and when their segment goes
    # away (undoing a segment_alloc); a per-segment count avoids rescanning all blocks.
    count = {}
    for a in live:
        i = segments.find(a)
        count[segments.addrs[i]] = count.get(segments.addrs[i], 0) + 1
    pending_pairs = set()  # free_requested immediately followed by free_completed: the page merges them
    for i in range(1, len(trace)):
        p, e = trace[i - 1], trace[i]
        if (e.get("action") == "free_completed" and p.get("action") == "free_requested"
                and e.get("addr") == p.get("addr")):
            pending_pairs.add(i - 1)
    for i in range(len(trace) - 1, -1, -1):
        if len(problems) - before >= limit:
            break
        e = trace[i]
        action, addr, size = e.get("action"), e.get("addr"), e.get("size", 0)
        if action in ("free_completed", "free"):
            if addr not in live and check_block(addr, i):
                j = segments.find(addr)
                count[segments.addrs[j]] = count.get(segments.addrs[j], 0) + 1
            live[addr] = size
        elif action == "free_requested":
            if i in pending_pairs:
                continue  # merged into one 'free' event with the following free_completed
            if addr not in live:
                report(f"entry {i} free_requested {addr:#x}: no live block there when undone "
                       f"(page: TypeError setting free_requested of undefined)")
        elif action == "alloc":
            if addr in live:
                del live[addr]
                j = segments.find(addr)
                if j >= 0:
                    count[segments.addrs[j]] -= 1
        elif action in ("segment_free", "segment_unmap"):
            if action == "segment_unmap" and segments.find(addr) >= 0:
                continue  # merged into an existing mapped range by the page
            segments.insert(addr, size)
        elif action in ("segment_alloc", "segment_map"):
            j = segments.find(addr)
            if j < 0 or (action == "segment_alloc" and segments.addrs[j] != addr):
                report(f"entry {i} {action} {addr:#x}: the segment is not present when undone")
                continue
            if action == "segment_map" and (segments.addrs[j] != addr or segments.sizes[j] != size):
                continue  # partial unmapping of a larger range: sizes only, blocks stay inside
            if count.get(addr, 0) > 0:
                report(f"before entry {i} ({action} {addr:#x}), {count[addr]} live block(s) lie in that "
                       f"segment, which does not exist yet")
            count.pop(addr, None)
            segments.remove_at(j)


def check(snapshot, simulate=True):
    """Every problem that would stop torch.cuda._memory_viz or the memory_viz page from
    rendering `snapshot` (a dict, or a bare segment list), as a list of strings."""
    problems = []
    if isinstance(snapshot, list):  # a bare segment list: what Snapshot(list).dump() writes
        devices = [s.get("device") for s in snapshot if isinstance(s, dict) and type(s.get("device")) is int]
        snapshot = {"segments": snapshot, "device_traces": [[] for _ in range(max(devices, default=0) + 1)]}
    if not isinstance(snapshot, dict):
        return [f"top level is a {type(snapshot).__name__}, not a dict"]
    _check_plain(snapshot, "snapshot", problems)
    if not isinstance(snapshot.get("segments"), list):
        return problems + ["'segments' missing or not a list"]
    traces = snapshot.get("device_traces")
    if not isinstance(traces, list) or not all(isinstance(t, list) for t in traces):
        return problems + ["'device_traces' missing or not a list of lists (use [[]] without history)"]
    if "allocator_settings" in snapshot:
        try:
            json.dumps(snapshot["allocator_settings"])
        except (TypeError, ValueError) as e:
            problems.append(f"allocator_settings is not JSON-serialisable: {e}")
    ann = snapshot.get("external_annotations", [])
    if not isinstance(ann, list) or not all(isinstance(a, dict) for a in ann):
        problems.append("external_annotations is not a list of dicts")
    _check_segments(snapshot, problems)
    _check_trace_entries(snapshot, problems)
    if simulate and not problems:
        for d in range(len(traces)):
            _simulate_history(snapshot, d, problems)
    return problems


def check_pickle(path_or_bytes, simulate=True):
    """check() on a pickle file (or its bytes), after the page's encoding rules: protocol 2-4,
    and only the opcodes of plain data (no globals, no bytes, no out-of-band buffers)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
    else:
        with open(os.fspath(path_or_bytes), "rb") as f:
            data = f.read()
    problems = []
    if data[:1] != b"\x80" or len(data) < 2:
        problems.append("no PROTO opcode: protocol 0/1 pickles are not read by the page")
    elif not 2 <= data[1] <= 4:
        problems.append(f"pickle protocol {data[1]}: the page reads protocols 2-4 only (Unhandled version)")
    try:
        refused = sorted({op.name for op, _, _ in pickletools.genops(data) if op.name in _REFUSED_OPCODES})
    except Exception as e:
        return problems + [f"not a valid pickle: {e}"]
    if refused:
        problems.append(f"pickle uses opcodes the page cannot read: {refused}")
    if problems:
        return problems
    return check(pickle.load(io.BytesIO(data)), simulate=simulate)


def assert_renders(snapshot):
    problems = check(snapshot)
    if problems:
        raise AssertionError("snapshot would not render in memory_viz:\n  " + "\n  ".join(problems[:30]))
