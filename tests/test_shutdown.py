"""Interpreter shutdown with live arrays, live graphs, pools and running streams exits
cleanly: no crash, no hang (issue 7)."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
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
""")


def test_exit_with_live_state_is_clean():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout
    assert "Fatal" not in proc.stderr and "Segmentation" not in proc.stderr


def test_exit_while_a_python_kernel_runs_is_clean():
    script = ("import time, mtia_alloc as mtia\n"
              "s = mtia.Stream()\n"
              "mtia.emulator.launch(time.sleep, 0.5, stream=s)\n"
              "mtia.emulator.launch(time.sleep, 5.0, stream=s)  # dropped at exit\n"
              "time.sleep(0.1)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
