"""Reading and summarising big snapshots (issue 21): our `summary` against PyTorch's
`python -m torch.cuda._memory_viz stats` (pickle.load, then segsum) on the same file, peak
RSS and time side by side. The target: peak RSS at most 2x the file size, under 60 s.

    python -m pytest bench/test_bench_snapshot_scale.py -s -p no:cacheprovider          # ~30 MB file
    MTIA_BENCH_BIG_SNAPSHOT=1 python -m pytest bench/test_bench_snapshot_scale.py -s   # ~1 GiB file

The heavy case is opt-in: it writes a ~1 GiB synthetic snapshot (7M trace entries with
30-frame stacks, torch's layout: tools/synth_snapshot.py; about 2 minutes and 5 GB of RAM to
generate) to $MTIA_BENCH_BIG_PATH (default /tmp/mtia_big_snapshot.pickle, kept for later
runs; never commit it). PyTorch's side runs when a Python with torch is found:
$MTIA_BENCH_TORCH_PYTHON, else /work/venv-torch/bin/python if present. Each command runs
under /usr/bin/time -v when available (peak RSS of the process; the summary's child
processes are not counted, and with a trace of more than 1M events it starts none)."""
import os
import re
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
BIG = os.environ.get("MTIA_BENCH_BIG_SNAPSHOT") == "1"
ENTRIES = 7_000_000 if BIG else 200_000
PATH = os.environ.get("MTIA_BENCH_BIG_PATH", "/tmp/mtia_big_snapshot.pickle" if BIG else "")


def _torch_python():
    for p in (os.environ.get("MTIA_BENCH_TORCH_PYTHON"), "/work/venv-torch/bin/python"):
        if p and os.path.exists(p):
            return p
    return None


def _measure(cmd, env=None):
    """(wall seconds, peak RSS bytes or None, CPU seconds or None, stdout)."""
    timer = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
    e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    t0 = time.perf_counter()
    proc = subprocess.run(timer + cmd, capture_output=True, text=True, env=e, cwd=ROOT)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    user = re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr)
    system = re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr)
    cpu = float(user.group(1)) + float(system.group(1)) if user and system else None
    return wall, int(rss.group(1)) * 1024 if rss else None, cpu, proc.stdout


@pytest.fixture(scope="module")
def snapshot_path(tmp_path_factory):
    path = PATH or str(tmp_path_factory.mktemp("scale") / "snapshot.pickle")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "mtia_alloc.tools.synth_snapshot", path, "--entries", str(ENTRIES)],
                       check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    return path


def test_summary_scale_against_torch(snapshot_path):
    size = os.path.getsize(snapshot_path)
    ours = _measure([sys.executable, "-m", "mtia_alloc", "summary", snapshot_path],
                    env={"MTIA_ALLOC_COLUMNAR_MIN_BYTES": "0"})
    rows = [("mtia_alloc summary", ours)]
    torch_py = _torch_python()
    if torch_py:
        rows.append(("torch.cuda._memory_viz stats", _measure([torch_py, "-m", "torch.cuda._memory_viz", "stats",
                                                              snapshot_path])))
    print(f"\nsnapshot {snapshot_path}: {size / 2**30:.3f} GiB, {ENTRIES} trace entries; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'command':32} {'wall s':>8} {'cpu s':>8} {'peak RSS':>10} {'RSS/file':>9}")
    for name, (wall, rss, cpu, _) in rows:
        rss_text = f"{rss / 2**30:.2f} GiB" if rss else "n/a"
        ratio = f"{rss / size:.2f}x" if rss else "n/a"
        print(f"{name:32} {wall:8.1f} {cpu if cpu is not None else float('nan'):8.1f} {rss_text:>10} {ratio:>9}")
    wall, rss, cpu, out = ours
    assert "Peak Usage" in out
    if rss is not None:
        assert rss <= 2 * size + (200 << 20)  # 2x the file (plus the interpreter and numpy, for small files)
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    assert (cpu if busy and cpu is not None else wall) < 60
