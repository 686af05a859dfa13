"""DeviceArray.numpy() waits for the work queued on the array's stream, as torch's .cpu()
does (issue 19 item 6), and __dlpack__ still does; inside a kernel it does not wait."""
import threading

import numpy as np

import mtia_alloc as mtia
from mtia_alloc import emulator


def test_numpy_after_a_queued_fill_sees_the_fill():
    s = mtia.Stream()
    a = mtia.empty(1 << 16, "int32", stream=s)
    emulator.fill_(a, 0, stream=s)
    s.synchronize()
    gate = threading.Event()
    emulator.launch(lambda: gate.wait(30), stream=s)  # the fill below is queued behind this
    emulator.fill_(a, 7, stream=s)
    threading.Timer(0.2, gate.set).start()
    view = a.numpy()  # waits for the gate and the fill
    assert (view == 7).all()
    del view, a


def test_numpy_after_a_queued_copy_on_the_current_stream():
    src = mtia.empty(1000, "float32")
    dst = mtia.empty(1000, "float32")
    emulator.fill_(src, 2.5)
    emulator.sleep(50)
    emulator.copy_(dst, src)
    assert (dst.numpy() == 2.5).all()


def test_numpy_inside_a_kernel_does_not_wait_for_its_own_stream():
    s = mtia.Stream()
    a = mtia.empty(8, "int64", stream=s)
    emulator.fill_(a, 3, stream=s)
    seen = []
    emulator.launch(lambda: seen.append(a.numpy().copy()), stream=s)
    s.synchronize()  # no KernelError: the kernel did not wait for itself
    assert np.array_equal(seen[0], np.full(8, 3))


def test_numpy_docstring_says_it_waits():
    doc = mtia.DeviceArray.numpy.__doc__
    assert "waits for the work queued on the array's stream" in doc


def test_dlpack_still_waits():
    s = mtia.Stream()
    a = mtia.empty(64, "uint8", stream=s)
    emulator.sleep(50, stream=s)
    emulator.fill_(a, 9, stream=s)
    assert (np.from_dlpack(a) == 9).all()


def test_numpy_in_a_forked_child_does_not_wait_for_the_parents_streams():
    import os
    if not hasattr(os, "fork"):
        return
    s = mtia.Stream()
    a = mtia.empty(4, "int32", stream=s)
    emulator.fill_(a, 5, stream=s)
    s.synchronize()
    gate = threading.Event()
    emulator.launch(lambda: gate.wait(30), stream=s)  # the parent's stream is busy at the fork
    pid = os.fork()
    if pid == 0:
        try:
            ok = (a.numpy() == 5).all()  # the child has no worker for s: waiting would hang
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    gate.set()
    import signal, time
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("numpy() in the forked child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    s.synchronize()
