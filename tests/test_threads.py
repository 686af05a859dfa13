"""Threads on the emulated backend (issue 3 item 6, API.md §1): the current device and the
current streams are thread-local; several Python threads allocate, free and launch kernels at
once on two devices; and a data-integrity fuzz in the spirit of PyTorch's test_allocator_fuzz
where every live DeviceArray keeps its fill value through thousands of random alloc/free/fill
steps on several streams. Each ends with mtia_alloc.memory.check_invariants()."""
import random
import threading

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
import mtia_alloc.memory
from helpers import KiB, MiB


def run_threads(target, n, *args):
    """Runs target(i, *args) in n threads started together; re-raises the first error."""
    errors = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait()
            target(i, *args)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------- thread-local state

def test_a_new_thread_starts_on_device_0_with_the_default_streams():
    mtia.set_stream(mtia.Stream(device=1))
    mtia.set_stream(mtia.Stream(device=0))
    mtia.set_device(1)
    main_state = (mtia.current_device(), mtia.current_stream(0), mtia.current_stream(1))
    seen = {}

    def look(i):
        seen["device"] = mtia.current_device()
        seen["streams"] = [mtia.current_stream(d) for d in range(2)]

    run_threads(look, 1)
    assert seen["device"] == 0
    assert seen["streams"] == [mtia.default_stream(0), mtia.default_stream(1)]
    assert (mtia.current_device(), mtia.current_stream(0), mtia.current_stream(1)) == main_state


def test_current_device_and_streams_are_thread_local():
    n = 4
    streams = [mtia.Stream(device=i % 2) for i in range(n)]
    barrier = threading.Barrier(n)

    def worker(i):
        d = i % 2
        mtia.set_device(d)
        mtia.set_stream(streams[i])
        barrier.wait()  # every thread has set its own device and stream
        for _ in range(200):
            assert mtia.current_device() == d
            assert mtia.current_stream() == streams[i]
            assert mtia.current_stream(1 - d) == mtia.default_stream(1 - d)
            with mtia.device(1 - d):
                assert mtia.current_device() == 1 - d
            with mtia.stream(streams[(i + 1) % n]):
                assert mtia.current_stream() == streams[(i + 1) % n]
        # Allocations without arguments go to this thread's device and stream.
        a = mtia.empty(1024, "uint8")
        assert a.device.index == d and a.stream == streams[i]

    mtia.set_device(0)
    run_threads(worker, n)
    assert mtia.current_device() == 0
    assert mtia.current_stream(0) == mtia.default_stream(0)
    assert mtia.current_stream(1) == mtia.default_stream(1)


# ----------------------------------------------------------------------------- concurrent work

def test_threads_allocate_free_and_launch_on_two_devices():
    n_threads, n_steps = 6, 300
    before = [mtia.memory_allocated(d) for d in range(2)]
    failures = []

    def check(arr, value, where):
        if not (arr.numpy() == value).all():
            failures.append((where, value, arr.numpy()[:4].tolist()))

    def worker(i):
        d = i % 2
        rng = random.Random(1000 + i)
        mtia.set_device(d)
        own = mtia.Stream()
        streams = [own, mtia.default_stream(d)]  # the default stream is shared by threads
        live = []
        for step in range(n_steps):
            assert mtia.current_device() == d
            r = rng.random()
            if live and (len(live) > 24 or r < 0.4):
                arr, value = live.pop(rng.randrange(len(live)))
                emulator.launch(check, arr, value, (i, step), stream=arr.stream)  # then drop it
            elif r < 0.45:
                raw = mtia.caching_allocator_alloc(rng.randint(1, 3 * MiB), stream=rng.choice(streams))
                mtia.caching_allocator_delete(raw)
            elif r < 0.47:
                mtia.empty_cache()
            elif r < 0.49:
                rng.choice(streams).synchronize()
            else:
                n = rng.choice([rng.randint(1, 512), rng.randint(512, 64 * KiB), rng.randint(MiB // 4 + 1, 320 * KiB)])
                s = rng.choice(streams)
                arr = mtia.empty(n, "int32", stream=s)
                value = i * 100_000 + step
                emulator.fill_(arr, value, stream=s)
                live.append((arr, value))
        for arr, value in live:
            emulator.launch(check, arr, value, (i, "end"), stream=arr.stream)
        live.clear()
        own.synchronize()

    run_threads(worker, n_threads)
    for d in range(2):
        mtia.synchronize(d)
    assert not failures, failures[:5]
    assert [mtia.memory_allocated(d) for d in range(2)] == before
    mtia.memory.check_invariants()


def test_allocator_fuzz_with_streams():
    """PyTorch test_allocator_fuzz with streams and kernels: random alloc / free / empty_cache
    steps plus fills on other streams (with wait_stream + record_stream). Every array is filled
    with its own value by a kernel; a checking kernel verifies the value right before the array
    is dropped, and every array still alive at the end is checked on the host. Small arrays keep
    it at a few seconds."""
    rng = random.Random(123)
    n_steps = 4000
    streams = [mtia.default_stream(0)] + [mtia.Stream(device=0) for _ in range(3)]
    before = mtia.memory_allocated(0)
    mem = []  # (value, array)
    total = 0
    counter = 0
    failures = []

    def check(arr, value):
        if not (arr.numpy() == value).all():
            failures.append((value, arr.numpy()[:4].tolist(), hex(arr.data_ptr())))

    def alloc():
        nonlocal total, counter
        # Mostly small-pool sizes; one in five just over 1 MiB, from the large pool.
        n = rng.choice([rng.randint(1, 256), rng.randint(1, 256), rng.randint(256, 16 * KiB),
                        rng.randint(256, 16 * KiB), rng.randint(MiB // 4 + 1, 320 * KiB)])
        s = rng.choice(streams)
        arr = mtia.empty(n, "int32", stream=s)
        emulator.fill_(arr, counter, stream=s)
        mem.append((counter, arr))
        counter += 1
        total += n

    def free():
        nonlocal total
        value, arr = mem.pop(rng.randrange(len(mem)))
        emulator.launch(check, arr, value, stream=arr.stream)
        total -= arr.size

    def refill_on_other_stream():
        """Use an array on another stream, as user code must: order after its stream's work,
        record the use, and make its own stream wait before the next use there."""
        nonlocal counter
        idx = rng.randrange(len(mem))
        _, arr = mem[idx]
        other = rng.choice([s for s in streams if s != arr.stream])
        other.wait_stream(arr.stream)
        emulator.fill_(arr, counter, stream=other)
        arr.record_stream(other)
        arr.stream.wait_stream(other)
        mem[idx] = (counter, arr)
        counter += 1

    for _ in range(n_steps):
        while total >= 4 * MiB:  # keep the live set small
            free()
        action = rng.choices(["alloc", "free", "refill", "empty_cache", "sleep"],
                             weights=[1, 1 if mem else 0, 0.3 if mem else 0, 0.05, 0.02])[0]
        if action == "alloc":
            alloc()
        elif action == "free":
            free()
        elif action == "refill":
            refill_on_other_stream()
        elif action == "empty_cache":
            mtia.empty_cache()
        else:
            emulator.sleep(1, stream=rng.choice(streams))  # let work pile up behind a stream

    mtia.synchronize(0)
    assert not failures, failures[:5]
    for value, arr in mem:  # every live array still holds its value
        assert (arr.numpy() == value).all(), (value, arr)
    del arr
    mem.clear()
    mtia.synchronize(0)
    assert mtia.memory_allocated(0) == before
    mtia.memory.check_invariants()


def test_threads_share_streams_and_events():
    """Producers on several threads feed one consumer stream through events."""
    consumer = mtia.Stream(device=1)
    out = mtia.empty(8, "int64", device=1, stream=consumer)
    emulator.fill_(out, 0, stream=consumer)
    lock = threading.Lock()

    def producer(i):
        mtia.set_device(1)
        s = mtia.Stream()
        for step in range(50):
            emulator.sleep(0.2, stream=s)
            e = s.record_event()
            with lock:  # the order of the increments on the consumer stream is the lock's
                e.wait(consumer)
                emulator.launch(np.add.at, out.numpy(), i, 1, stream=consumer)
        s.synchronize()

    run_threads(producer, 8)
    consumer.synchronize()
    assert out.numpy().tolist() == [50] * 8
