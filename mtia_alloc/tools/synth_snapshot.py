"""Synthetic PyTorch memory snapshots for tests and the scale benchmark, laid out as
torch's _dump_snapshot lays them out: every distinct frame dict is one object (the pickle
stores it once and refers to it), each trace entry has a frames list of its own, a live
block's frames list is the same object as its alloc entry's, frees are free_requested +
free_completed pairs, and the recording starts mid-run (segments and blocks predate the
trace). The allocator model is simple but consistent: segments of 16 slots, one block per
slot (the rounded request, then the slot's free rest), segment_alloc when no slot is
free, segment_free of empty segments now and then (empty_cache), one oom entry.

    python -m mtia_alloc.tools.synth_snapshot OUT.pickle --entries 5000000 [--protocol 4]

Owns: synth_snapshot, main. Relies on nothing of mtia_alloc."""
import argparse
import pickle
import random
import sys

__all__ = ["synth_snapshot", "main"]

SLOT = 2 << 20
SLOTS = 16
BASE = 0x7F0000000000
T0_US = 1_765_000_000_000_000


def _frames_pool(rng, n_stacks, depth):
    cxx = [{"filename": "??", "line": 0, "name": "torch::unwind::unwind()"},
           {"filename": "??", "line": 0, "name": "torch::CapturedTraceback::gather(bool, bool, bool)"},
           {"filename": "/pytorch/c10/cuda/CUDACachingAllocator.cpp", "line": 1210,
            "name": "c10::cuda::CUDACachingAllocator::Native::DeviceCachingAllocator::malloc"}]
    user = [{"filename": f"/home/user/project/model/layer{i % 37}.py", "line": 10 + i, "name": f"forward_{i}"}
            for i in range(max(8, n_stacks))]
    torchpy = [{"filename": "/usr/lib/python3/site-packages/torch/nn/modules/module.py", "line": 1500 + i,
                "name": "_call_impl"} for i in range(4)]
    stacks = []
    for _ in range(n_stacks):
        body = [rng.choice(user if rng.random() < 0.6 else torchpy) for _ in range(max(1, depth - len(cxx)))]
        stacks.append(cxx + body)
    return stacks


def synth_snapshot(entries=20000, seed=0, n_stacks=300, depth=30, warmup=2000, max_live=400):
    """A snapshot dict with about `entries` trace entries on device 0."""
    rng = random.Random(seed)
    stacks = _frames_pool(rng, n_stacks, depth)
    segs = {}         # address -> [free slot list, live count]
    live = {}         # block address -> (seg, size, frames list)
    trace = []
    t = T0_US
    next_seg = BASE
    recording = False
    n_events = 0
    oom_at = entries // 2

    def add(e):
        if recording:
            trace.append(e)

    while len(trace) < entries:
        n_events += 1
        if not recording and n_events > warmup:
            recording = True
        t += rng.randint(1, 40)
        stream = 0 if rng.random() < 0.9 else 7
        if recording and len(trace) >= oom_at >= 0:
            add({"action": "oom", "size": 80 << 30, "device_free": 123 << 20, "stream": 0, "time_us": t,
                 "frames": list(rng.choice(stacks))})
            oom_at = -1
            continue
        if live and (len(live) >= max_live or rng.random() < 0.5):
            addr = rng.choice(list(live)) if len(live) < 64 else next(iter(live))
            seg, size, frames = live.pop(addr)
            segs[seg][0].append(addr)
            segs[seg][1] -= 1
            add({"action": "free_requested", "addr": addr, "size": size, "stream": stream, "time_us": t,
                 "frames": list(frames)})
            add({"action": "free_completed", "addr": addr, "size": size, "stream": stream, "time_us": t,
                 "frames": list(frames)})
            if rng.random() < 0.002:  # empty_cache(): release the segments without live blocks
                for a in [a for a, s in segs.items() if s[1] == 0]:
                    del segs[a]
                    add({"action": "segment_free", "addr": a, "size": SLOT * SLOTS, "stream": 0, "time_us": t,
                         "frames": list(rng.choice(stacks))})
            continue
        size = rng.choice((rng.randint(1, 4096), rng.randint(1, SLOT), rng.randint(SLOT // 2, SLOT)))
        seg = next((a for a, s in segs.items() if s[0]), None)
        if seg is None:
            seg = next_seg
            next_seg += SLOT * SLOTS
            segs[seg] = [[seg + i * SLOT for i in range(SLOTS - 1, -1, -1)], 0]
            add({"action": "segment_alloc", "addr": seg, "size": SLOT * SLOTS, "stream": stream, "time_us": t,
                 "frames": list(rng.choice(stacks))})
        addr = segs[seg][0].pop()
        segs[seg][1] += 1
        frames = list(rng.choice(stacks))
        live[addr] = (seg, size, frames)
        add({"action": "alloc", "addr": addr, "size": size, "stream": stream, "time_us": t, "frames": frames})
    segments = []
    for seg in sorted(segs):
        blocks = []
        for i in range(SLOTS):
            a = seg + i * SLOT
            if a in live:
                _, size, frames = live[a]
                rounded = -(-size // 512) * 512
                blocks.append({"address": a, "size": rounded, "requested_size": size, "state": "active_allocated",
                               "frames": frames})
                rest = SLOT - rounded
            else:
                rest = SLOT
            if rest:
                if blocks and blocks[-1]["state"] == "inactive":
                    blocks[-1]["size"] += rest
                else:
                    blocks.append({"address": a + SLOT - rest, "size": rest, "requested_size": 0,
                                   "state": "inactive", "frames": []})
        allocated = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
        segments.append({"device": 0, "address": seg, "total_size": SLOT * SLOTS, "allocated_size": allocated,
                         "active_size": allocated,
                         "requested_size": sum(b["requested_size"] for b in blocks if b["state"] != "inactive"),
                         "stream": 0, "segment_type": "large", "segment_pool_id": (0, 0), "is_expandable": False,
                         "frames": [], "blocks": blocks})
    return {"segments": segments, "device_traces": [trace], "allocator_settings": {},
            "external_annotations": []}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mtia_alloc.tools.synth_snapshot")
    p.add_argument("output")
    p.add_argument("--entries", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", type=int, default=pickle.DEFAULT_PROTOCOL)
    args = p.parse_args(argv)
    snap = synth_snapshot(args.entries, args.seed)
    with open(args.output, "wb") as f:
        pickle.dump(snap, f, protocol=args.protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
