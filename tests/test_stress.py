"""Concurrency stress (issue 7): four Python threads plus the stream workers, on two
devices, interleave alloc, free, record_stream, use_mem_pool, empty_cache, snapshot and
graph capture/replay for a bounded time. Every live DeviceArray must keep its fill
pattern, and every invariant must hold at the end. MTIA_STRESS_SECONDS sets the length
(CI runs it again on the sanitizer build)."""
import os
import random
import threading
import time

import numpy as np

import mtia_alloc as mtia

SECONDS = float(os.environ.get("MTIA_STRESS_SECONDS", "4"))


def _worker(tid, deadline, errors, counts):
    rng = random.Random(tid)
    device = tid % mtia.device_count()
    mtia.set_device(device)
    side = mtia.Stream(device)
    pool = mtia.MemPool()
    graph_stream = mtia.Stream(device)
    live = []  # (array, value)
    ops = 0
    try:
        while time.monotonic() < deadline:
            op = rng.random()
            if op < 0.35 or not live:
                n = rng.choice([16, 1000, 70_000, 400_000])
                stream = side if rng.random() < 0.3 else None
                a = mtia.empty(n, dtype="int32", stream=stream)
                value = rng.randrange(1 << 30)
                mtia.emulator.fill_(a, value, stream=stream)
                if stream is not None:
                    stream.synchronize()
                else:
                    mtia.synchronize(device)
                live.append((a, value))
            elif op < 0.65:
                a, value = live.pop(rng.randrange(len(live)))
                view = a.numpy()
                if view.size and not (view[0] == value and view[-1] == value and view[view.size // 2] == value):
                    errors.append(f"thread {tid}: array {a!r} lost its fill {value}")
                if rng.random() < 0.3:
                    mtia.emulator.sleep(rng.random() * 2, stream=side)
                    a.record_stream(side)
                del a, view
            elif op < 0.72:
                with mtia.use_mem_pool(pool):
                    b = mtia.empty(rng.choice([100, 50_000]), dtype="uint8")
                    mtia.emulator.fill_(b, 7)
                mtia.synchronize(device)
                if not (b.numpy() == 7).all():
                    errors.append(f"thread {tid}: pool array lost its fill")
                del b
            elif op < 0.76:
                mtia.empty_cache()
            elif op < 0.80:
                segs = mtia.memory_snapshot()
                for s in segs:
                    if sum(b["size"] for b in s["blocks"]) != s["total_size"]:
                        errors.append(f"thread {tid}: snapshot blocks do not tile a segment")
            elif op < 0.85:
                g = mtia.MTIAGraph()
                with mtia.stream(graph_stream):
                    g.capture_begin()
                    x = mtia.empty(256, dtype="float32")
                    mtia.emulator.fill_(x, 2.0)
                    mtia.emulator.launch(lambda arr: np.multiply(arr.numpy(), 3, out=arr.numpy()), x)
                    g.capture_end()
                g.replay()
                mtia.synchronize(device)
                if not (x.numpy() == 6.0).all():
                    errors.append(f"thread {tid}: graph replay computed {x.numpy()[:3]}")
                del x
                g.reset()
            else:
                ptr = mtia.caching_allocator_alloc(rng.randrange(1, 3 << 20), device=device)
                if rng.random() < 0.5:
                    mtia.record_stream(ptr, side)
                mtia.caching_allocator_delete(ptr)
            ops += 1
    except Exception as e:  # reported by the main thread
        errors.append(f"thread {tid}: {type(e).__name__}: {e}")
    finally:
        for a, value in live:
            view = a.numpy()
            if view.size and view[0] != value:
                errors.append(f"thread {tid}: array lost its fill at the end")
        live.clear()
        side.synchronize()
        del pool
        counts[tid] = ops


def test_four_threads_two_devices_stress():
    threads, errors, counts = 4, [], {}
    deadline = time.monotonic() + SECONDS
    workers = [threading.Thread(target=_worker, args=(t, deadline, errors, counts)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=SECONDS + 120)
        assert not w.is_alive(), "a stress thread hung"
    assert not errors, errors[:5]
    for d in range(mtia.device_count()):
        mtia.synchronize(d)
    mtia.empty_cache()
    mtia.memory.check_invariants()
    total = sum(counts.values())
    print(f"stress: {threads} threads, {total} operations in {SECONDS:.0f} s")
    assert total > 100
