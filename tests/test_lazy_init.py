"""Lazy initialisation (pools_graphs_streams_api.md must-have 32), each case in a fresh
interpreter: device_count/is_available and the memory functions do not initialise (the latter
still check their device argument), calls queued before init run once at init (deferred,
idempotent, thread-safe, not in a forked child), stream functions initialise, and a failing
queued call raises DeferredMtiaCallError.
"""
import mtia_alloc as mtia
import mtia_alloc.rng
from helpers import run_code


def _run_fresh(code):
    """Runs code in a fresh interpreter (mtia_alloc not initialised yet); returns stdout."""
    proc = run_code(code)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_device_count_and_is_available_do_not_initialise():
    # as torch.mtia's: they only ask for the count, so emulator.configure() may still follow
    out = _run_fresh("""
        import mtia_alloc as mtia
        assert mtia.is_available() and mtia.device_count() == 2
        assert not mtia.is_initialized()
        mtia.emulator.configure(device_count=3)
        assert mtia.device_count() == 3 and not mtia.is_initialized()
        mtia.init()
        assert mtia.device_count() == 3
        print("ok")
    """)
    assert out.strip() == "ok"


def test_memory_functions_check_the_device_before_initialisation():
    # they answer 0 / {} before init (as torch's do) but still reject a bad device argument
    out = _run_fresh("""
        import mtia_alloc as mtia
        for f in (mtia.memory_allocated, mtia.max_memory_allocated, mtia.memory_reserved, mtia.max_memory_reserved,
                  mtia.memory_stats, mtia.memory_stats_as_nested_dict, mtia.reset_peak_memory_stats,
                  mtia.reset_accumulated_memory_stats):
            assert f(1) in (0, {}, None) and f("mtia:0") in (0, {}, None)
            for bad in ("cuda:0", 2, [0]):
                try:
                    f(bad)
                except ValueError:
                    pass
                else:
                    raise AssertionError((f.__name__, bad))
        assert not mtia.is_initialized()
        print("ok")
    """)
    assert out.strip() == "ok"


def test_lazy_init_is_deferred_idempotent_and_thread_safe():
    mtia.manual_seed_all(4321)
    state = mtia.get_rng_state(1)
    expected = mtia.rng.generator(1).random(3)
    out = _run_fresh(f"""
        import os, threading
        import numpy as np
        import mtia_alloc as mtia
        from mtia_alloc import _lazy_init as _state

        assert not mtia.is_initialized()
        # The memory functions do not initialise.
        assert mtia.memory_stats() == {{}}
        assert mtia.memory_allocated() == 0 and mtia.max_memory_allocated() == 0
        mtia.reset_peak_memory_stats()
        mtia.record_memory_history("all")
        mtia.empty_cache()
        assert not mtia.is_initialized()

        ran = []
        _state.lazy_call(lambda: ran.append("first"))
        _state.lazy_call(lambda: ran.append(mtia.device_count()))  # re-enters init: no deadlock
        mtia.manual_seed(1234)
        state = np.frombuffer(bytes.fromhex("{state.tobytes().hex()}"), dtype=np.uint8).copy()
        mtia.set_rng_state(state, "mtia:1")
        state[:] = 0  # the queued call kept a copy
        assert ran == [] and not mtia.is_initialized()

        barrier = threading.Barrier(8)
        errors = []
        def init():
            try:
                barrier.wait()
                mtia.init()
                assert mtia.is_initialized()
            except BaseException as e:
                errors.append(e)
        threads = [threading.Thread(target=init) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors
        assert ran == ["first", 2], ran  # every queued call ran exactly once
        mtia.init()
        assert ran == ["first", 2]
        assert mtia.initial_seed() == 1234
        draws = mtia.rng.generator(1).random(3)
        assert np.array_equal(draws, np.array({expected.tolist()!r})), draws
        _state.lazy_call(lambda: ran.append("now"))  # after init: runs at once
        assert ran[-1] == "now"
        assert "dram" in mtia.memory_stats()

        # A forked child of an initialised process is not initialised and cannot re-init.
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if mtia.is_initialized():
                    code = 3
                try:
                    _state.lazy_init()
                    code = 4
                except RuntimeError as e:
                    if "Cannot re-initialize MTIA in forked subprocess" not in str(e):
                        code = 5
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)
        assert mtia.is_initialized()
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_stream_functions_trigger_lazy_init():
    out = _run_fresh("""
        import mtia_alloc as mtia
        assert not mtia.is_initialized()
        s = mtia.current_stream()
        assert mtia.is_initialized() and s.stream_id == 0
        print("ok")
    """)
    assert out.strip() == "ok"


def test_failing_deferred_call_raises_DeferredMtiaCallError():
    out = _run_fresh("""
        import mtia_alloc as mtia
        from mtia_alloc import _lazy_init as _state

        ran = []
        def failing_call():
            raise ValueError("deferred boom")
        def queue_failing_call():
            _state.lazy_call(failing_call)
        _state.lazy_call(lambda: ran.append(1))
        queue_failing_call()
        try:
            mtia.init()
        except mtia.DeferredMtiaCallError as e:
            text = str(e)
            assert not isinstance(e, RuntimeError)
            assert "deferred boom" in text, text
            assert "queue_failing_call" in text, text  # the traceback of the queueing site
            assert isinstance(e.__cause__, ValueError)
            assert ran == [1]
            print("ok")
        else:
            raise AssertionError("no DeferredMtiaCallError")
    """)
    assert out.strip() == "ok"
