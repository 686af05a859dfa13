"""Replays for the snapshot view, each on a fresh emulated allocator in a separate process.

A replay needs an allocator of its own (its settings, its capacity, an empty cache), and
the allocator of the process holding a Snapshot may be in use: so the view runs the
command line (`python -m mtia_alloc fit|diff|ranks ... --json`) in a child process and
reads its JSON. The commands are the tools' (mtia_alloc.tools); this module only starts
them, so the view does not import the tools (they sit above it).

Owns: snapshot_file, run_json, replay_figures. Relies on: nothing of mtia_alloc but the
command line it starts (and a Snapshot's dump())."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile

__all__ = ["snapshot_file", "run_json", "replay_figures", "ToolError"]

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ToolError(RuntimeError):
    """The child command failed; the message is its one-line error."""


@contextlib.contextmanager
def snapshot_file(snap):
    """The path of a file holding `snap` (a Snapshot): its source file when it was read from
    one, else a temporary pickle removed afterwards."""
    src = getattr(snap, "source", None)
    if src and os.path.isfile(src):
        yield src
        return
    fd, path = tempfile.mkstemp(suffix=".pickle", prefix="mtia_snapshot_")
    os.close(fd)
    try:
        snap.dump(path)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def run_json(args, ok=(0,), timeout=600):
    """Runs `python -m mtia_alloc ARGS` (this package, a fresh interpreter) and returns its
    JSON output (one document). Exit statuses in `ok` are successes; any other raises
    ToolError with the command's error line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("MTIA_ALLOC_CONF", "MTIA_EMULATOR_MEMORY", "MTIA_EMULATOR_DEVICES"):
        env.pop(k, None)  # the command's own flags say what it runs on
    proc = subprocess.run([sys.executable, "-m", "mtia_alloc", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode not in ok:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise ToolError(lines[-1] if lines else f"exit status {proc.returncode}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise ToolError(f"unreadable output of `mtia_alloc {args[0]}`: {proc.stdout[:200]!r}") from None


def replay_figures(snap, device):
    """The fit command's figures for `device`'s trace on a device big enough for it (peaks
    and memory_stats() peaks from the rebuilt starting state on), under the settings the
    snapshot was recorded with (its allocator_settings string; the defaults, with a "note",
    if this allocator refuses them), or {"error": message}."""
    settings = snap.allocator_settings if isinstance(snap.allocator_settings, dict) else {}
    conf = settings.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    conf = conf if isinstance(conf, str) else ""
    # host (pinned memory) options do not change the device allocator: left out
    conf = ",".join(p for p in conf.split(",") if p.strip() and not p.strip().startswith("pinned_"))
    try:
        with snapshot_file(snap) as path:
            args = ["fit", path, "--device", str(device), "--memory", "auto", "--skip-recorded-ooms", "--json"]
            try:
                return run_json(args + ["--conf", conf], ok=(0, 3))
            except ToolError as e:
                if not conf or "refused" not in str(e):
                    raise
                out = run_json(args, ok=(0, 3))
                out["note"] = f"replayed with the default settings: the recorded {conf!r} was refused ({e})"
                return out
    except (ToolError, OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}
