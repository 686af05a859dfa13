"""Races between user threads, stream workers and the allocator that a concurrency audit
found, one test each: memory given back to the device while queued work still used it,
kernels that waited for each other through the allocator, a half-initialised allocator
seen by another thread, events re-recorded while being timed, and daemon threads at exit.
Each scenario runs in its own process (its own device size, and a hang is a timeout)."""
import subprocess

import pytest

from helpers import run_code


def _run(script, timeout=60):
    try:
        proc = run_code(script, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("the scenario hung")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_empty_cache_waits_again_for_a_stream_that_got_work_while_it_waited():
    # empty_cache waits for s1 with the lock dropped; meanwhile s3 queues a kernel that
    # writes p and frees p in stream order. p's segment must not go back to the device
    # (and be handed out again) before that kernel has run: the device saw a malloc and a
    # free during the wait, so empty_cache waits again (now for s3) before it releases.
    out = _run("""
        import ctypes, threading, time
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        emulator.configure(memory_per_device="256MiB", runtime_reserved=0)
        s1, s3 = mtia.Stream(), mtia.Stream()
        N = 4 << 20
        keep = mtia.caching_allocator_alloc(N, stream=s1)
        # a whole free segment: empty_cache has something to release, so it waits (item 3)
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(32 << 20, stream=s1))
        emulator.sleep(400, stream=s1)
        t = threading.Thread(target=mtia.empty_cache)
        t.start()
        time.sleep(0.1)
        p = mtia.caching_allocator_alloc(N, stream=s3)
        emulator.sleep(700, stream=s3)
        emulator.launch(ctypes.memset, p, 7, N, stream=s3)
        mtia.caching_allocator_delete(p)
        t.join()
        print("s3 idle at release", s3.query())
        q = mtia.caching_allocator_alloc(N)
        ctypes.memset(q, 1, N)
        s3.synchronize()
        print("overwritten", N - bytes((ctypes.c_ubyte * N).from_address(q)).count(1))
        mtia.memory.check_invariants()
    """)
    assert "s3 idle at release True" in out
    assert "overwritten 0" in out


def test_a_stream_kept_busy_by_another_thread_does_not_pin_idle_cached_memory():
    # Kernels that touch no memory keep s2 busy; its cached segments predate the wait and
    # nothing was allocated or freed meanwhile, so the OOM flush releases them (PyTorch's
    # cudaFree would too) instead of raising OOM.
    out = _run("""
        import threading, time
        import mtia_alloc as mtia
        mtia.emulator.configure(device_count=1, memory_per_device="256MiB", runtime_reserved=0)
        s2 = mtia.Stream()
        MiB = 1 << 20
        for p in [mtia.caching_allocator_alloc(40 * MiB, stream=s2) for _ in range(5)]:
            mtia.caching_allocator_delete(p)
        s2.synchronize()
        stop = False
        def pump():
            while not stop:
                mtia.emulator.sleep(0.2, stream=s2)
                time.sleep(0.0001)
        t = threading.Thread(target=pump, daemon=True)
        t.start()
        time.sleep(0.1)
        p = mtia.caching_allocator_alloc(200 * MiB)
        print("allocated", mtia.memory_allocated() // MiB)
        stop = True
        t.join()
    """)
    assert "allocated 200" in out


@pytest.mark.parametrize("other_thread_in_pool", [False, True])
def test_graph_pool_is_released_only_after_its_replay_ran(other_thread_in_pool):
    # The replay runs on a stream that is not the capture stream; cudaFree would
    # synchronize the device. Another thread inside use_mem_pool used to skip the wait.
    out = _run(f"""
        import ctypes, threading
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        cap, run = mtia.Stream(), mtia.Stream()
        N = 4 << 20
        g = mtia.MTIAGraph()
        with mtia.graph(g, stream=cap):
            x = mtia.empty(N, dtype="uint8")
            emulator.fill_(x, 7)
            del x
        with mtia.stream(run):
            emulator.sleep(500)
            g.replay()
        g.reset()
        if {other_thread_in_pool}:
            ready, done = threading.Event(), threading.Event()
            def inside_pool():
                with mtia.use_mem_pool(mtia.MemPool()):
                    ready.set()
                    done.wait()
            th = threading.Thread(target=inside_pool)
            th.start()
            ready.wait()
        mtia.empty_cache()
        print("replay done", run.query())
        q = mtia.caching_allocator_alloc(N)
        ctypes.memset(q, 1, N)
        run.synchronize()
        print("overwritten", N - bytes((ctypes.c_ubyte * N).from_address(q)).count(1))
        if {other_thread_in_pool}:
            done.set()
            th.join()
    """)
    assert "replay done True" in out
    assert "overwritten 0" in out


def test_two_kernels_that_both_need_the_oom_flush_do_not_wait_for_each_other():
    out = _run("""
        import threading
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        emulator.configure(memory_per_device="64MiB", runtime_reserved=0)
        a, b = mtia.Stream(), mtia.Stream()
        pa = mtia.caching_allocator_alloc(24 << 20, stream=a)
        pb = mtia.caching_allocator_alloc(24 << 20, stream=b)
        barrier = threading.Barrier(2)
        results = []
        def kernel():
            barrier.wait()
            try:
                results.append(mtia.caching_allocator_alloc(24 << 20))
            except mtia.OutOfMemoryError:
                results.append("oom")
        emulator.launch(kernel, stream=a)
        emulator.launch(kernel, stream=b)
        a.synchronize()
        b.synchronize()
        print("results", len(results))
    """, timeout=30)
    assert "results 2" in out


def test_kernel_oom_flush_does_not_wait_for_a_stream_that_waits_for_it():
    out = _run("""
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        emulator.configure(memory_per_device="64MiB", runtime_reserved=0)
        a, b = mtia.Stream(), mtia.Stream()
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(40 << 20, stream=b))  # cached for b
        out = []
        def kernel():
            try:
                out.append(mtia.caching_allocator_alloc(40 << 20))
            except mtia.OutOfMemoryError:
                out.append("oom")
        emulator.launch(kernel, stream=a)
        b.wait_event(a.record_event())  # b waits for the kernel
        a.synchronize()
        b.synchronize()
        print("done", out)
    """, timeout=30)
    assert "done [" in out


def test_kernel_empty_cache_does_not_wait_for_a_stream_that_waits_for_it():
    out = _run("""
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        a, b = mtia.Stream(), mtia.Stream()
        p = mtia.caching_allocator_alloc(4 << 20, stream=a)
        q = mtia.caching_allocator_alloc(4 << 20, stream=b)
        mtia.record_stream(q, a)
        mtia.caching_allocator_delete(q)  # waits for an event on a
        emulator.launch(mtia.empty_cache, stream=a)
        b.wait_event(a.record_event())
        a.synchronize()
        b.synchronize()
        mtia.memory.check_invariants()
        print("finished")
    """, timeout=30)
    assert "finished" in out


def test_device_synchronize_from_a_kernel_raises_even_if_streams_wait_for_it():
    out = _run("""
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        a = mtia.Stream()
        emulator.launch(mtia.synchronize, stream=a)
        e = a.record_event()
        others = [mtia.Stream() for _ in range(3)]
        for b in others:
            b.wait_event(e)
        try:
            a.synchronize()
            print("no error")
        except Exception as ex:
            print("raised", "cannot wait for stream" in str(ex))
        for b in others:
            b.synchronize()
    """, timeout=30)
    assert "raised True" in out


def test_first_allocations_on_other_threads_do_not_break_initialisation():
    # Another thread's first allocation used to land between the allocator's creation and
    # the runtime reservation, which then failed (about half the runs).
    for _ in range(4):
        out = _run("""
            import sys, threading
            sys.setswitchinterval(1e-6)
            import mtia_alloc as mtia
            from mtia_alloc import _C
            errors = []
            def other():
                while not _C.is_initialized():
                    pass
                try:
                    mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096))
                except Exception as e:
                    errors.append(repr(e))
            t = threading.Thread(target=other)
            t.start()
            mtia.init()
            t.join()
            print("errors", errors)
            print("reserved", [mtia.emulator.runtime_reserved(d) for d in range(mtia.device_count())])
        """)
        assert "errors []" in out
        assert "reserved [0" not in out


def test_re_recording_an_event_while_another_thread_times_it():
    out = _run("""
        import threading, time
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        s = mtia.Stream()
        start, end = mtia.Event(enable_timing=True), mtia.Event(enable_timing=True)
        emulator.sleep(1, stream=s); start.record(s); emulator.sleep(1, stream=s); end.record(s)
        s.synchronize()
        stop = time.time() + 2
        bad = []
        def record():
            while time.time() < stop:
                emulator.sleep(0.01, stream=s)
                end.record(s)
                s.synchronize()  # so that readers also find end completed, between re-records
        reads = []
        def read():
            while time.time() < stop:
                try:
                    v = start.elapsed_time(end)
                except RuntimeError as e:  # end re-recorded and not yet completed
                    if "must be completed" not in str(e):
                        bad.append(str(e))
                    continue
                reads.append(v)
                if not 0 <= v < 1e5:
                    bad.append(v)
        ts = [threading.Thread(target=record), threading.Thread(target=read), threading.Thread(target=read)]
        for t in ts: t.start()
        for t in ts: t.join()
        print("bad", bad[:5], "reads", len(reads) > 0)
    """)
    assert "bad [] reads True" in out


def test_exit_runs_later_atexit_handlers_that_wait_for_a_daemon_thread_in_the_allocator():
    # The daemon thread holds a user lock while it waits for the device lock; an atexit
    # handler registered before the import (so it runs after mtia_alloc's) needs that lock.
    out = _run("""
        import atexit, ctypes, threading, time
        L = threading.Lock()
        def final():
            with L:
                print("final handler ran", flush=True)
        atexit.register(final)
        import mtia_alloc as mtia
        from mtia_alloc.memory import PythonAllocator, change_current_allocator
        bufs, slow = {}, threading.Event()
        def alloc_fn(size, device, stream):
            b = ctypes.create_string_buffer(size + 4096)
            addr = (ctypes.addressof(b) + 4095) & ~4095
            bufs[addr] = b
            return addr
        def free_fn(ptr, size, device, stream):
            if slow.is_set():
                time.sleep(0.6)  # holds the device lock
            bufs.pop(ptr, None)
        change_current_allocator(PythonAllocator(alloc_fn, free_fn))
        mtia.emulator.configure(device_count=1)
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4 << 20))
        q = mtia.caching_allocator_alloc(512)
        slow.set()
        def holder():
            mtia.empty_cache()
        def waiter():
            time.sleep(0.1)
            with L:
                mtia.caching_allocator_delete(q)
        threading.Thread(target=holder, daemon=True).start()
        threading.Thread(target=waiter, daemon=True).start()
        time.sleep(0.25)
    """, timeout=30)
    assert "final handler ran" in out


def test_exit_while_daemon_threads_contend_for_the_allocator():
    # Daemon threads blocked on the device lock at exit used to be unwound by CPython
    # through the core's noexcept frames: "terminate called without an active exception".
    script = """
        import threading, time
        import mtia_alloc as mtia
        mtia.init()
        def loop():
            while True:
                p = mtia.caching_allocator_alloc(3 << 20)
                mtia.caching_allocator_delete(p)
                mtia.empty_cache()
        for _ in range(3):
            threading.Thread(target=loop, daemon=True).start()
        time.sleep(0.2)
    """
    for _ in range(6):
        _run(script)
