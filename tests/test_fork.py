"""A process forked after initialisation (issue 19, item 1): as in PyTorch, every device and
allocator call of the child raises RuntimeError("Cannot re-initialize MTIA in forked
subprocess. ...") instead of using the parent's allocator copy (whose stream workers do
not exist in the child, and whose device lock another thread may have held at the fork);
nothing in the child hangs, its exit included; the parent is unaffected; a 'spawn' child
works normally, and so does a child forked before initialisation.

Every fork happens in a fresh interpreter run with a timeout (helpers.fresh_python), and
the parent kills a child that does not finish in time, so a hang fails the test instead of
hanging the suite."""
import json
import textwrap

from helpers import fresh_python, run_code

FORK_MESSAGE = ("Cannot re-initialize MTIA in forked subprocess. To use MTIA with multiprocessing, "
                "you must use the 'spawn' start method")

# Waits for a forked child with a deadline; a child still running then is killed.
WAIT_CHILD = """
import os, signal, time
def wait_child(pid, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.01)
"""


def _run(code, timeout=90):
    r = run_code(WAIT_CHILD + textwrap.dedent(code), timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_every_call_in_a_child_forked_after_init_raises_and_nothing_hangs():
    out = _run(f"""
        import json, sys
        import mtia_alloc as mtia
        from mtia_alloc import emulator

        MESSAGE = {FORK_MESSAGE!r}
        p = mtia.caching_allocator_alloc(4096)
        x = mtia.empty(1024)
        s = mtia.Stream()
        ev = mtia.Event()
        emulator.sleep(5000, stream=s)  # busy at the fork: its worker does not exist in the child
        ev.record(s)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            results = {{}}
            def attempt(name, fn):
                os.write(w, (name + "\\n").encode())  # where a hang happened
                try:
                    fn()
                    results[name] = "returned"
                except RuntimeError as e:
                    results[name] = "fork error" if str(e) == MESSAGE else repr(e)
                except BaseException as e:
                    results[name] = repr(e)
            attempt("empty", lambda: mtia.empty(16))
            attempt("empty_general", lambda: mtia.empty((2, 3), "int64"))
            attempt("caching_allocator_alloc", lambda: mtia.caching_allocator_alloc(4096))
            attempt("caching_allocator_delete", lambda: mtia.caching_allocator_delete(p))
            attempt("Stream.synchronize", s.synchronize)
            attempt("Stream.query", s.query)
            attempt("Stream()", mtia.Stream)
            attempt("Event.synchronize", ev.synchronize)
            attempt("Event.query", ev.query)
            attempt("Event.record", lambda: ev.record(s))
            attempt("synchronize", mtia.synchronize)
            attempt("current_device", mtia.current_device)
            attempt("current_stream", mtia.current_stream)
            attempt("record_stream", lambda: mtia.record_stream(p, s))
            attempt("emulator.sleep", lambda: emulator.sleep(1, stream=s))
            attempt("init", mtia.init)
            results["is_initialized"] = mtia.is_initialized()
            os.write(w, (json.dumps(results) + "\\n").encode())
            del x  # an inherited array dies: it leaves the parent's copy alone
            sys.exit(0)  # a normal exit (atexit handlers, the workers' shutdown): must not hang
        os.close(w)
        code = wait_child(pid)
        with os.fdopen(r) as f:
            lines = f.read().splitlines()
        print(json.dumps({{"code": code, "lines": lines}}))
        # The parent is unaffected.
        assert mtia.is_initialized()
        s.synchronize()
        ev.synchronize()
        mtia.caching_allocator_delete(p)
        del x
        q = mtia.caching_allocator_alloc(4096)
        mtia.caching_allocator_delete(q)
        mtia.memory.check_invariants()
        assert mtia.memory_allocated() == 0
        print("parent ok")
    """)
    lines = out.splitlines()
    assert lines[-1] == "parent ok", out
    child = json.loads(lines[-2])
    assert child["code"] == 0, f"the child exited with {child['code']} after: {child['lines']}"
    results = json.loads(child["lines"][-1])
    assert results.pop("is_initialized") is False
    assert results == {name: "fork error" for name in results}, results


def test_fork_while_another_thread_holds_the_device_lock():
    # A Python raw allocator runs under the device lock; it blocks there while the main
    # thread forks. The child must not wait for that lock (nor for the thread, which does
    # not exist in the child).
    out = _run(f"""
        import sys
        import threading
        import mtia_alloc as mtia
        from mtia_alloc.memory import PythonAllocator, change_current_allocator

        MESSAGE = {FORK_MESSAGE!r}
        inside, release = threading.Event(), threading.Event()
        blocks = {{}}
        def alloc(size, device, stream):
            if blocks:  # the first segment comes at once; the second waits inside the lock
                inside.set()
                release.wait(30)
            import ctypes
            buf = ctypes.create_string_buffer(size + 512)
            ptr = (ctypes.addressof(buf) + 511) // 512 * 512
            blocks[ptr] = buf
            return ptr
        def free(ptr, size, device, stream):
            blocks.pop(ptr, None)
        change_current_allocator(PythonAllocator(alloc, free))
        p = mtia.caching_allocator_alloc(4 << 20)
        t = threading.Thread(target=lambda: mtia.caching_allocator_delete(mtia.caching_allocator_alloc(32 << 20)))
        t.start()
        assert inside.wait(30)
        pid = os.fork()
        if pid == 0:
            try:
                mtia.caching_allocator_alloc(1 << 20)
                code = 1
            except RuntimeError as e:
                code = 0 if str(e) == MESSAGE else 2
            sys.exit(code)
        code = wait_child(pid)
        release.set()
        t.join()
        mtia.caching_allocator_delete(p)
        mtia.memory.check_invariants()
        print("child", code)
    """)
    assert out.split()[-2:] == ["child", "0"], out


def test_a_child_forked_before_init_initialises_normally():
    out = _run("""
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        assert not mtia.is_initialized()
        pid = os.fork()
        if pid == 0:
            import sys
            a = mtia.empty(256, "int32")
            s = mtia.Stream()
            emulator.fill_(a, 7, stream=mtia.current_stream())
            emulator.sleep(20, stream=s)
            s.synchronize()
            ok = mtia.is_initialized() and (a.numpy() == 7).all()
            del a
            mtia.memory.check_invariants()
            sys.exit(0 if ok else 1)
        print("child", wait_child(pid))
        assert not mtia.is_initialized()
    """)
    assert out.split()[-2:] == ["child", "0"], out


MP_SCRIPT = """
import multiprocessing as mp
import sys

import mtia_alloc as mtia
from mtia_alloc import emulator


def child(queue):
    steps = []
    def step(name, fn):
        try:
            fn()
            steps.append([name, "ok"])
        except BaseException as e:
            steps.append([name, type(e).__name__, str(e)])
    state = {}
    step("caching_allocator_alloc", lambda: state.update(p=mtia.caching_allocator_alloc(1 << 20)))
    step("caching_allocator_delete", lambda: mtia.caching_allocator_delete(state.get("p", 1 << 40)))
    step("empty", lambda: state.update(a=mtia.empty(1024, "float32")))
    step("Stream", lambda: state.update(s=mtia.Stream()))
    step("fill_", lambda: emulator.fill_(state["a"], 3, stream=mtia.current_stream()))
    step("sleep", lambda: emulator.sleep(20, stream=state["s"]))
    step("synchronize", lambda: state["s"].synchronize())
    step("numpy", lambda: state.update(ok=bool((state["a"].numpy() == 3).all())))
    queue.put([steps, state.get("ok"), mtia.is_initialized()])


if __name__ == "__main__":
    p = mtia.caching_allocator_alloc(4096)  # the parent is initialised
    s = mtia.Stream()
    emulator.sleep(300, stream=s)
    results = {}
    for method in sys.argv[1:]:
        ctx = mp.get_context(method)
        q = ctx.Queue()
        proc = ctx.Process(target=child, args=(q,))
        proc.start()
        try:
            results[method] = list(q.get(timeout=60))
        except Exception as e:
            results[method] = ["no answer", repr(e)]
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            results[method].append("hung")
    s.synchronize()
    mtia.caching_allocator_delete(p)
    mtia.memory.check_invariants()
    import json
    print(json.dumps(results))
"""


def test_multiprocessing_spawn_child_works_and_fork_child_raises(tmp_path):
    script = tmp_path / "mp_child.py"
    script.write_text(MP_SCRIPT)
    r = fresh_python(str(script), "spawn", "fork", cwd=str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(r.stdout.splitlines()[-1])
    steps, ok, initialized = results["spawn"]
    assert all(len(st) == 2 for st in steps) and ok and initialized, results["spawn"]
    steps, ok, initialized = results["fork"]
    assert all(st[1:] == ["RuntimeError", FORK_MESSAGE] for st in steps[:4]), steps
    assert not initialized


def test_the_c_api_in_a_child_forked_after_init_fails_instead_of_hanging():
    # The capsule C API (what the PyTorch backend calls) in the child: the parent's event
    # on a busy stream is not waited for, allocations and stream calls fail with the
    # bad-fork message; in the parent the same calls work.
    out = _run(f"""
        import ctypes
        import mtia_alloc as mtia
        from mtia_alloc import _C, emulator

        NAMES = ["ensure_init", "is_initialized", "device_count", "last_error", "last_oom", "current_device",
                 "set_current_device", "current_stream", "set_current_stream", "malloc", "free",
                 "record_stream", "device_of", "notify_oom", "stream_exists", "new_stream", "stream_query",
                 "stream_synchronize", "device_synchronize", "mem_get_info", "event_create", "event_destroy",
                 "event_record", "event_query", "event_synchronize", "event_wait", "event_elapsed_ms",
                 "event_recorded", "record_level"]
        class Table(ctypes.Structure):
            _fields_ = [("version", ctypes.c_int), ("struct_size", ctypes.c_int)] + [(n, ctypes.c_void_p) for n in NAMES]
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        t = Table.from_address(get(_C._capi_capsule(), b"mtia_alloc._C._capi"))
        I, P, U, L = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
        fn = lambda name, res, *args: ctypes.CFUNCTYPE(res, *args)(getattr(t, name))
        last_error = fn("last_error", ctypes.c_char_p)
        malloc = fn("malloc", I, I, U, L, ctypes.POINTER(ctypes.c_uint64))
        event_create, event_record = fn("event_create", P, I), fn("event_record", I, P, I, L)
        event_synchronize, event_query = fn("event_synchronize", I, P), fn("event_query", I, P)
        stream_synchronize = fn("stream_synchronize", I, I, L)

        s = mtia.Stream()
        emulator.sleep(5000, stream=s)
        ev = event_create(0)
        assert event_record(ev, 0, s.stream_id) == 0
        assert event_query(ev) == 0
        pid = os.fork()
        if pid == 0:
            out = ctypes.c_uint64()
            results = [event_synchronize(ev)]
            message = last_error().decode()
            results += [event_query(ev), malloc(0, 4096, 0, ctypes.byref(out)), stream_synchronize(0, s.stream_id)]
            ok = results == [-1] * 4 and {FORK_MESSAGE!r} in message
            if not ok:
                print(results, message, flush=True)
            os._exit(0 if ok else 1)
        print("child", wait_child(pid))
        assert event_synchronize(ev) == 0 and event_query(ev) == 1
        out = ctypes.c_uint64()
        assert malloc(0, 4096, 0, ctypes.byref(out)) == 0 and out.value
        mtia.caching_allocator_delete(out.value)
        print("parent ok")
    """)
    assert out.split()[-4:] == ["child", "0", "parent", "ok"], out
