"""Ctrl-C during a blocking wait (issue 19, item 2): SIGINT raises KeyboardInterrupt promptly
from every wait of the main thread behind a long kernel (Stream/Event/device synchronize,
empty_cache waiting for a busy stream, the OOM path waiting for busy streams and for the
events of pending frees), the allocator stays consistent (check_invariants, later
allocations), and the process still exits promptly although the kernel runs on.

Each case runs in a child interpreter that the test interrupts with SIGINT; the child is
killed if it does not answer in time, so a wait that ignores Ctrl-C fails the test instead
of hanging the suite."""
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import PACKAGE_ROOT

MiB = 1 << 20

SCRIPT = """
import sys, time
import mtia_alloc as mtia
from mtia_alloc import emulator

kind = sys.argv[1]
s = mtia.Stream()
MiB = 1 << 20
LONG_MS = 600000

if kind == "stream":
    emulator.sleep(LONG_MS, stream=s)
    wait = s.synchronize
elif kind == "event":
    emulator.sleep(LONG_MS, stream=s)
    ev = s.record_event()
    wait = ev.synchronize
elif kind == "device":
    emulator.sleep(LONG_MS, stream=s)
    wait = mtia.synchronize
elif kind == "empty_cache":
    mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4 * MiB, stream=s))  # cached on s
    emulator.sleep(LONG_MS, stream=s)
    wait = mtia.empty_cache
elif kind == "oom_busy_stream":
    # 40 MiB cached on the busy stream; 40 MiB more do not fit in 64 MiB: the miss ladder
    # empties the cache, which first waits for the stream.
    mtia.caching_allocator_delete(mtia.caching_allocator_alloc(40 * MiB, stream=s))
    emulator.sleep(LONG_MS, stream=s)
    wait = lambda: mtia.caching_allocator_alloc(40 * MiB)
elif kind == "oom_pending_free":
    # A block used on the busy stream and freed: its free waits for the stream's event;
    # the miss ladder waits for that event before it empties the cache.
    p = mtia.caching_allocator_alloc(40 * MiB)
    mtia.record_stream(p, s)
    emulator.sleep(LONG_MS, stream=s)
    mtia.caching_allocator_delete(p)
    wait = lambda: mtia.caching_allocator_alloc(40 * MiB)
else:
    raise SystemExit("unknown kind " + kind)

allocated = mtia.memory_allocated()
print("ready", flush=True)
try:
    wait()
    print("returned", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
mtia.memory.check_invariants()
assert mtia.memory_allocated() == allocated, (mtia.memory_allocated(), allocated)
for size in (512, 4096, MiB):  # fit beside the 40 MiB the busy stream keeps (the OOM cases)
    q = mtia.caching_allocator_alloc(size)
    mtia.caching_allocator_delete(q)
a = mtia.empty(1000)
del a
mtia.memory.check_invariants()
print("ok", flush=True)
"""


class Child:
    def __init__(self, kind):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        env["MTIA_EMULATOR_MEMORY"] = "64MiB"
        env["MTIA_EMULATOR_DEVICES"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), kind], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def line(self, timeout):
        """The next line of output, or None after `timeout` seconds."""
        if self.sel.select(timeout):
            return self.proc.stdout.readline().strip()
        return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        out, err = self.proc.communicate()
        return err


@pytest.mark.parametrize("kind", ["stream", "event", "device", "empty_cache", "oom_busy_stream",
                                  "oom_pending_free"])
def test_ctrl_c_interrupts_a_wait_behind_a_long_kernel(kind):
    child = Child(kind)
    try:
        assert child.line(60) == "ready", child.kill()
        time.sleep(0.5)  # the wait has begun
        t0 = time.monotonic()
        child.proc.send_signal(signal.SIGINT)
        answer = child.line(5)
        elapsed = time.monotonic() - t0
        assert answer == "interrupted", f"{answer!r} after {elapsed:.1f} s: {child.kill()}"
        # About 100 ms (slices of the wait); generous for a loaded machine.
        assert elapsed < 0.6, elapsed
        assert child.line(30) == "ok", child.kill()
        t0 = time.monotonic()
        child.proc.wait(timeout=10)  # exits although its 10-minute kernel still runs
        assert time.monotonic() - t0 < 5
        assert child.proc.returncode == 0, child.kill()
    finally:
        child.kill()


def test_ctrl_c_in_a_python_signal_handler_that_does_not_raise_keeps_waiting():
    # A SIGINT handler that only notes the signal: the wait goes on and completes.
    code = textwrap.dedent("""
        import signal, time
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        seen = []
        signal.signal(signal.SIGINT, lambda *a: seen.append(time.monotonic()))
        s = mtia.Stream()
        emulator.sleep(1500, stream=s)
        print("ready", flush=True)
        t0 = time.monotonic()
        s.synchronize()
        print("done", round(time.monotonic() - t0, 1), len(seen), flush=True)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        words = out.split()
        assert words[0] == "done" and float(words[1]) >= 1.0 and words[2] == "1", out
    finally:
        if proc.poll() is None:
            proc.kill()
