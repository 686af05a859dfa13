"""Trace replay for the CLI and the benchmarks: configure a fresh allocator, replay a
trace natively (mtia_alloc._C.replay, no Python per event), and optionally run
PyTorch's allocator (the peer harness of shared/peers/torch_caching_allocator) on the
same input for side-by-side figures."""
import json
import os
import subprocess

import numpy as np

from . import _C
from ._state import lazy_init

RESULT_KEYS = ("events", "ns_per_op", "thread_cpu_ns_per_op", "peak_requested_bytes", "peak_allocated_bytes",
               "peak_reserved_bytes", "num_device_alloc", "num_device_free", "num_alloc_retries", "num_ooms")

DEFAULT_REPLAY_MEMORY = "80GiB"  # the peer harness's default device capacity


def setup_allocator(memory=None, conf=None):
    """Initialises mtia_alloc for a replay (before any other use in this process)."""
    from . import emulator
    if conf is not None:
        os.environ["MTIA_ALLOC_CONF"] = conf
    if not _C.is_initialized():
        emulator.configure(memory_per_device=memory or os.environ.get("MTIA_EMULATOR_MEMORY")
                           or DEFAULT_REPLAY_MEMORY)
    lazy_init()


def replay(trace, repeat=1, latency=False, device=0, merge_streams=False):
    """Replays `trace` `repeat` times without emptying the cache between passes
    (pass 1 cold, later passes warm). Returns one result dict per pass."""
    lazy_init()
    if merge_streams:
        stream_ids = [0]
        streams = np.zeros_like(trace.streams)
    else:
        stream_ids = [0 if v == 0 else _C.new_stream(device, 0) for v in trace.stream_values]
        if 0 not in trace.stream_values:
            stream_ids = [_C.new_stream(device, 0) for _ in trace.stream_values]
        streams = trace.streams
    out = []
    for i in range(repeat):
        r = _C.replay(device, trace.sizes, trace.slots, streams, trace.nslots, stream_ids, latency)
        r["mode"] = f"pass{i + 1}"
        if latency:
            for kind in ("alloc", "free"):
                lat = np.asarray(r.pop(f"{kind}_latency_ns"), dtype=np.float64)
                if len(lat):
                    r[f"{kind}_latency_p50_ns"] = float(np.percentile(lat, 50))
                    r[f"{kind}_latency_p99_ns"] = float(np.percentile(lat, 99))
        out.append(r)
    return out


def run_peer(build_dir, path, repeat=1, memory_bytes=None, conf=None, timeout=1800):
    """Runs PyTorch's allocator (peer harness) on the trace file; returns its RESULT dicts,
    or raises RuntimeError saying why it could not run."""
    harness = os.path.join(build_dir, "bin", "harness")
    if not os.access(harness, os.X_OK):
        raise RuntimeError(f"no peer harness at {harness}: build it with "
                           f"shared/peers/torch_caching_allocator/setup.sh {build_dir}")
    env = dict(os.environ)
    if memory_bytes:
        env["FAKE_CUDA_MEM_BYTES"] = str(memory_bytes)
    if conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = conf
    proc = subprocess.run([harness, "trace", str(path), "--repeat", str(repeat)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"peer harness failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return results


def fmt_bytes(n):
    from .memory import format_size
    return format_size(int(n))
