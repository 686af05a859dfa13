"""Cost of recording the memory history (issue 21 items 4 and 5), against history off, in
the same run:

    python -m pytest bench/test_bench_history_cost.py -s -p no:cacheprovider

* the Python caching_allocator_alloc + caching_allocator_delete pair: history off; on with
  context=None (ring buffer; streamed to a .mtrace too); on with Python stacks (context
  "all": a stack at alloc and at free; ring, and streamed);
* the native replay (no Python per event) of a generated trace: ns per op, off and on with
  context=None (ring; streamed).

Times are the process's CPU time (all its threads: the .mtrace writer's work counts;
on a shared machine wall time mostly measures the neighbours), per pair or per replayed
event (for the replay this includes converting the event arrays, a few ns per event in
every mode). Modes are measured in interleaved rounds (best of ROUNDS each); each round first runs the
loop WARM times, so the ring buffer (100k entries; without stacks a free's two records
share one slot, so 20k pairs fill 40k slots) has grown to its size and wrapped, and is
measured in its steady state. Each test prints its table; the targets (ratios to history off) are
printed next to the figures. DEPTH extra Python frames sit above the calls, as in
bench/test_bench_history.py."""
import os
import tempfile
import time

import numpy as np

import mtia_alloc as mtia
import mtia_alloc.memory
from mtia_alloc import _C

from bench_helpers import DEPTH, at_depth

PAIRS = 20_000
ROUNDS = 7
WARM = 3  # runs before each measured one: the ring has grown and wrapped
REPLAY_EVENTS = 400_000


def _pairs(n):
    alloc, free = mtia.caching_allocator_alloc, mtia.caching_allocator_delete
    t = time.process_time_ns()
    for _ in range(n):
        free(alloc(512))
    return (time.process_time_ns() - t) / n


def _set(mode, path):
    mtia.memory._record_memory_history(None)
    if mode == "off":
        return
    context = None if "None" in mode else "all"
    mtia.memory._record_memory_history("all", context=context, max_entries=100_000,
                                       path=path if "file" in mode else None)


def _measure(modes, run, rounds=ROUNDS):
    best = {m: float("inf") for m in modes}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.mtrace")
        try:
            for _ in range(rounds):
                for m in modes:
                    _set(m, path)
                    for _ in range(WARM):  # segments, interned stacks, the ring's pages (it wraps)
                        run()
                    best[m] = min(best[m], run())
        finally:
            mtia.memory._record_memory_history(None)
            mtia.empty_cache()
    return best


def _table(title, best, unit, targets):
    off = best["off"]
    print(f"\n{title}")
    for m, v in best.items():
        target = targets.get(m, "")
        print(f"  {m:<22} {v:8.1f} {unit}   x{v / off:5.2f} of off   {target}")


def test_python_pair_cost():
    mtia.init()
    modes = ["off", "context=None", "context=None+file", "stacks", "stacks+file"]
    best = _measure(modes, lambda: at_depth(DEPTH, _pairs, PAIRS))
    _table(f"alloc+free pair from Python (CPU ns, best of {ROUNDS} x {PAIRS}, {DEPTH} extra frames)", best, "ns/pair",
           {"context=None": "target <= x1.15", "stacks": "target <= x2.0",
            "context=None+file": f"x{best['context=None+file'] / best['context=None']:.2f} of ring (target <= 1.3)",
            "stacks+file": f"x{best['stacks+file'] / best['stacks']:.2f} of ring (target <= 1.3)"})


def _generated_trace(n, live=64, seed=1):
    """Alternating alloc/free over a window of `live` slots, sizes 512 B .. 64 KiB."""
    rng = np.random.default_rng(seed)
    sizes = np.zeros(n, dtype=np.uint64)
    slots = np.zeros(n, dtype=np.uint32)
    free_slots = list(range(live))
    used = []
    for i in range(n):
        if used and (not free_slots or rng.random() < 0.5):
            s = used.pop(int(rng.integers(len(used))))
            free_slots.append(s)
            slots[i] = s
        else:
            s = free_slots.pop()
            used.append(s)
            sizes[i] = int(rng.choice([512, 4096, 8192, 65536, 1000, 20000]))
            slots[i] = s
    return sizes, slots, np.zeros(n, dtype=np.uint32)


def test_native_replay_cost():
    mtia.init()
    sizes, slots, streams = _generated_trace(REPLAY_EVENTS)
    dev = mtia.current_device()

    def run():
        t = time.process_time_ns()
        _C.replay(dev, sizes, slots, streams, 64, [0])
        return (time.process_time_ns() - t) / len(sizes)

    modes = ["off", "context=None", "context=None+file"]
    best = _measure(modes, run)
    _table(f"native replay of {REPLAY_EVENTS} generated events (CPU ns, best of {ROUNDS})", best, "ns/op",
           {"context=None": f"+{best['context=None'] - best['off']:.1f} ns/op (target <= +3)",
            "context=None+file": f"x{best['context=None+file'] / best['context=None']:.2f} of ring (target <= 1.3)"})
