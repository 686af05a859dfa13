"""Kernel errors behave as asynchronous device errors (issue 19 item 4): the error of a
kernel that raised surfaces, once, at the first call that observes its stream past the
failed kernel (Stream.query/synchronize, mtia_alloc.synchronize, Event.query/synchronize of
an event recorded after it, DeviceArray.numpy); an event recorded before it does not raise;
an error nobody observes is printed as a warning at exit."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import mtia_alloc as mtia
import mtia_alloc.streams
from mtia_alloc import emulator
from mtia_alloc.streams import KernelError


def failing(message):
    raise ValueError(message)


def _gate():
    """A kernel that blocks its stream until the returned event is set."""
    ev = threading.Event()
    return ev, (lambda: ev.wait(30))


def _ran_failure(s):
    """Waits (without observing errors) until the stream has run everything queued."""
    enqueued, _ = mtia._C.stream_progress(s.device_index, s.stream_id)
    mtia._C.stream_synchronize(s.device_index, s.stream_id)
    return enqueued


def test_stream_query_raises_the_error_once():
    s = mtia.Stream()
    emulator.launch(failing, "query boom", stream=s)
    _ran_failure(s)
    with pytest.raises(KernelError, match="ValueError: query boom"):
        s.query()
    assert s.query() is True  # once
    s.synchronize()


def test_stream_query_raises_even_while_later_work_is_pending():
    s = mtia.Stream()
    gate, wait = _gate()
    emulator.launch(failing, "early boom", stream=s)
    emulator.launch(wait, stream=s)
    try:
        while mtia._C.stream_progress(s.device_index, s.stream_id)[1] < 1:
            pass  # the failed kernel has run; the gate still holds the stream
        with pytest.raises(KernelError, match="early boom"):
            s.query()
        assert s.query() is False
    finally:
        gate.set()
    s.synchronize()


def test_event_recorded_after_the_failed_kernel_raises_at_synchronize():
    s = mtia.Stream()
    emulator.launch(failing, "event boom", stream=s)
    e = s.record_event()
    with pytest.raises(KernelError, match="event boom"):
        e.synchronize()
    e.synchronize()  # once
    assert e.query()
    s.synchronize()  # already observed: nothing left


def test_event_recorded_after_the_failed_kernel_raises_at_query():
    s = mtia.Stream()
    emulator.launch(failing, "event query boom", stream=s)
    e = s.record_event()
    _ran_failure(s)
    with pytest.raises(KernelError, match="event query boom"):
        e.query()
    assert e.query() is True
    s.synchronize()


def test_timing_event_recorded_after_the_failed_kernel_raises():
    s = mtia.Stream()
    emulator.launch(failing, "timed boom", stream=s)
    e = mtia.Event(enable_timing=True)
    e.record(s)
    with pytest.raises(KernelError, match="timed boom"):
        e.synchronize()
    s.synchronize()


def test_event_recorded_before_the_failed_kernel_does_not_raise():
    s = mtia.Stream()
    gate, wait = _gate()
    emulator.launch(wait, stream=s)
    before = s.record_event()
    timed_before = mtia.Event(enable_timing=True)
    timed_before.record(s)
    emulator.launch(failing, "later boom", stream=s)
    after = s.record_event()
    gate.set()
    _ran_failure(s)
    before.synchronize()
    assert before.query() is True
    timed_before.synchronize()
    with pytest.raises(KernelError, match="later boom"):
        after.synchronize()


def test_error_is_kept_for_the_stream_when_an_earlier_event_is_observed():
    s = mtia.Stream()
    before = s.record_event()
    emulator.launch(failing, "kept boom", stream=s)
    _ran_failure(s)
    before.synchronize()
    assert before.query()
    with pytest.raises(KernelError, match="kept boom"):
        s.synchronize()


def test_device_synchronize_still_raises_and_consumes():
    s = mtia.Stream()
    emulator.launch(failing, "device boom", stream=s)
    with pytest.raises(KernelError, match="device boom"):
        mtia.synchronize()
    s.synchronize()
    assert s.query()


def test_numpy_observes_the_arrays_stream():
    s = mtia.Stream()
    a = mtia.empty(4, "int32", stream=s)
    emulator.launch(failing, "numpy boom", stream=s)
    with pytest.raises(KernelError, match="numpy boom"):
        a.numpy()
    assert a.numpy().shape == (4,)
    s.synchronize()


def _run(code):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(mtia.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_an_unobserved_error_is_a_warning_at_exit():
    proc = _run("""
        import mtia_alloc as mtia
        s = mtia.Stream()
        def kernel():
            raise ValueError("nobody looked")
        mtia.emulator.launch(kernel, stream=s)
        mtia._C.stream_synchronize(s.device_index, s.stream_id)  # it ran; no call observes it
        print("done")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "done" in proc.stdout
    assert "UnobservedKernelErrorWarning" in proc.stderr, proc.stderr
    assert mtia.streams.UnobservedKernelErrorWarning.__name__ in proc.stderr
    assert "ValueError: nobody looked" in proc.stderr
    assert "no synchronize() or query() observed it" in proc.stderr


def test_an_observed_error_is_not_reported_again_at_exit():
    proc = _run("""
        import mtia_alloc as mtia
        from mtia_alloc.streams import KernelError
        s = mtia.Stream()
        def kernel():
            raise ValueError("seen once")
        mtia.emulator.launch(kernel, stream=s)
        try:
            s.synchronize()
        except KernelError:
            print("caught")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "caught" in proc.stdout
    assert "Unobserved" not in proc.stderr and "seen once" not in proc.stderr, proc.stderr
