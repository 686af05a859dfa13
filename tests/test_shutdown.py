"""Interpreter shutdown with live arrays, live graphs, pools and running streams exits
cleanly: no crash, no hang (issue 7)."""
from helpers import run_code

SCRIPT = """
    import mtia_alloc as mtia
    s = mtia.Stream()
    arrays = [mtia.empty(1000, stream=s) for _ in range(10)]
    for a in arrays:
        mtia.emulator.fill_(a, 1.0, stream=s)
    mtia.emulator.sleep(300, stream=s)                   # still running at exit
    mtia.emulator.launch(print, "kernel after the sleep", stream=s)
    pool = mtia.MemPool()
    with mtia.use_mem_pool(pool):
        kept = mtia.empty(100)
    g = mtia.MTIAGraph()
    with mtia.graph(g, stream=mtia.Stream()):
        x = mtia.empty(10)
        mtia.emulator.fill_(x, 2.0)
    g.replay()
    mtia.record_memory_history()
    print("exiting")
"""


def test_exit_with_live_state_is_clean():
    proc = run_code(SCRIPT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout
    assert "Fatal" not in proc.stderr and "Segmentation" not in proc.stderr


def test_exit_while_a_python_kernel_runs_is_clean():
    script = ("import time, mtia_alloc as mtia\n"
              "s = mtia.Stream()\n"
              "mtia.emulator.launch(time.sleep, 0.5, stream=s)\n"
              "mtia.emulator.launch(time.sleep, 5.0, stream=s)  # dropped at exit\n"
              "time.sleep(0.1)\n")
    proc = run_code(script, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _run(script, timeout=60):
    proc = run_code(script, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_exit_does_not_wait_out_a_long_native_sleep():
    # Interpreter exit stops the streams: a running sleep ends early, and so does a stream
    # waiting for the sleeping one (every stream is told to stop before any is joined).
    proc = _run("""
        import time, mtia_alloc as mtia
        a, b = mtia.Stream(), mtia.Stream()
        mtia.emulator.sleep(600_000, stream=a)           # ten minutes
        b.wait_event(a.record_event())
        mtia.emulator.sleep(10, stream=b)
        time.sleep(0.1)
        print("exiting", time.monotonic(), flush=True)
    """, timeout=30)
    assert "exiting" in proc.stdout


def test_a_kernel_cannot_wait_for_its_own_stream():
    # A kernel that synchronizes its own stream (or the device, or an event recorded after
    # it on that stream) would wait for itself: RuntimeError, surfacing as a KernelError.
    proc = _run("""
        import mtia_alloc as mtia
        from mtia_alloc.streams import KernelError
        s = mtia.Stream()
        for wait in (s.synchronize, mtia.synchronize, lambda: e.synchronize()):
            mtia.emulator.sleep(20, stream=s)            # e is recorded while this runs
            e = s.record_event()
            mtia.emulator.launch(wait, stream=s)
            e = s.record_event()
            try:
                s.synchronize()
            except KernelError as err:
                assert isinstance(err.__cause__, RuntimeError), err
                assert "from one of its own kernels" in str(err.__cause__), err
            else:
                raise AssertionError("no error")
        ran = []
        mtia.emulator.launch(ran.append, 1, stream=s)    # the stream still works
        s.synchronize()
        assert ran == [1]
        other = mtia.Stream()                            # waiting for another stream is fine
        mtia.emulator.sleep(20, stream=other)
        mtia.emulator.launch(other.synchronize, stream=s)
        s.synchronize()
        print("ok")
    """)
    assert "ok" in proc.stdout


def test_a_kernel_whose_allocation_needs_its_own_pending_free_gets_oom_not_a_hang():
    # The OOM retry waits for pending frees' events, but not for those on the kernel's own
    # stream: they complete only after the kernel. The allocation fails instead.
    proc = _run("""
        import time, mtia_alloc as mtia
        from mtia_alloc import emulator
        from mtia_alloc.streams import KernelError
        emulator.configure(memory_per_device="64MiB", runtime_reserved=0)
        s = mtia.Stream()
        def kernel():
            time.sleep(0.2)
            mtia.caching_allocator_alloc(40 << 20)       # only the pending 40 MiB would fit
        emulator.launch(kernel, stream=s)
        p = mtia.caching_allocator_alloc(40 << 20)
        mtia.record_stream(p, s)
        mtia.caching_allocator_delete(p)                 # pending until s passes the kernel
        try:
            s.synchronize()
        except KernelError as err:
            assert isinstance(err.__cause__, mtia.OutOfMemoryError), err
        else:
            raise AssertionError("no error")
        q = mtia.caching_allocator_alloc(40 << 20)       # the free completed meanwhile
        mtia.caching_allocator_delete(q)
        mtia.memory.check_invariants()
        print("ok")
    """)
    assert "ok" in proc.stdout


def test_empty_cache_from_a_kernel_keeps_its_own_streams_expandable_pages():
    # Kernels queued after this one on the same stream may still use those pages, and the
    # stream cannot be waited for from inside it: they stay mapped until a later empty_cache.
    proc = _run("""
        import os
        os.environ["MTIA_ALLOC_CONF"] = "expandable_segments:True"
        import mtia_alloc as mtia
        s = mtia.Stream()
        with mtia.stream(s):
            p = mtia.caching_allocator_alloc(4 << 20)
        mtia.caching_allocator_delete(p)
        reserved = mtia.memory_reserved()
        mtia.emulator.launch(mtia.empty_cache, stream=s)
        s.synchronize()
        assert mtia.memory_reserved() == reserved > 0
        mtia.empty_cache()                               # from the host: released
        assert mtia.memory_reserved() == 0
        mtia.memory.check_invariants()
        print("ok")
    """)
    assert "ok" in proc.stdout
