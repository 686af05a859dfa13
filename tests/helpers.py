"""Helpers shared by the test modules: constants, memory_stats() arithmetic, snapshot lookups,
kernels that compute on device memory by address, a Python raw allocator over host buffers,
the bad-input state check, and a runner for fresh interpreters. Fixtures are in conftest.py
(which also puts this directory on sys.path, so `from helpers import ...` works under any
pytest import mode and from any working directory)."""
import contextlib
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc._C as _C
import mtia_alloc.emulator
import mtia_alloc.memory

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEVICES = list(range(mtia.device_count()))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mtia.__file__)))  # holds the mtia_alloc under test

# PyTorch's allocator constants (c10/cuda/CUDACachingAllocator.cpp)
kSmallSize = MiB  # largest request served by the small pool
kSmallBuffer = 2 * MiB  # small-pool segment size
kLargeBuffer = 20 * MiB  # segment size of mid-size large requests
kMinLargeAlloc = 10 * MiB  # from here on, a large request gets a segment of its own size
kRoundLarge = 2 * MiB  # such segments are rounded up to this
NELEM_1MB = MiB // 4  # float32 elements in 1 MiB

BUSY_MS = 200  # how long a stream is kept busy where a test needs it busy
SLOW_BUSY_MS = 300  # the same where it must stay busy across several allocator calls
MTIA_DEVICE_TYPE = 19  # int(torch._C._autograd.DeviceType.MTIA)

fmt = mtia.memory.format_size
round_size = mtia.memory._round_size

# ----------------------------------------------------------------------------- memory_stats()

# allocator_core.md §7.2: the 122 baseline keys of memory_stats().
POOL_STATS = ["active", "active_bytes", "allocated_bytes", "allocation", "inactive_split",
              "inactive_split_bytes", "requested_bytes", "reserved_bytes", "segment"]
POOLS = ["all", "large_pool", "small_pool"]
METRICS = ["allocated", "current", "freed", "peak"]
SCALARS = ["max_split_size", "num_alloc_retries", "num_device_alloc", "num_device_free",
           "num_ooms", "num_sync_all_streams"]
STAT_KEYS = ([f"{s}.{p}.{m}" for s in POOL_STATS for p in POOLS for m in METRICS]
             + [f"oversize_{s}.{m}" for s in ("allocations", "segments") for m in METRICS])
BASELINE_KEYS = sorted(STAT_KEYS + SCALARS)
OOM_COUNTERS = ("num_ooms", "num_alloc_retries", "num_sync_all_streams")


def stats(device=0):
    return mtia.memory_stats(device)


def delta(before, after):
    """after - before for every numeric key of two memory_stats() dicts."""
    return {k: after[k] - before[k] for k in after if k != "dram"}


def assert_all_is_small_plus_large(s):
    """§15.20: all == small_pool + large_pool. Exact for current, allocated and freed; the peak
    of the sum is only bounded by the pool peaks, which may be reached at different times."""
    for stat in POOL_STATS:
        for m in ("current", "allocated", "freed"):
            assert s[f"{stat}.all.{m}"] == (s[f"{stat}.small_pool.{m}"]
                                            + s[f"{stat}.large_pool.{m}"]), (stat, m)
        small, large = s[f"{stat}.small_pool.peak"], s[f"{stat}.large_pool.peak"]
        assert max(small, large) <= s[f"{stat}.all.peak"] <= small + large, stat


# ----------------------------------------------------------------------------- snapshots and pools

def segments(pool_id=None, device=None):
    """Segments of one pool (all pools if None) on `device` (all devices if None)."""
    segs = mtia.memory_snapshot(pool_id) if pool_id is not None else mtia.memory_snapshot()
    return [s for s in segs if device is None or s["device"] == device]


def segment_of(ptr):
    """The memory_snapshot() segment that holds ptr (devices' address ranges never overlap)."""
    for s in mtia.memory_snapshot():
        if s["address"] <= ptr < s["address"] + s["total_size"]:
            return s
    raise AssertionError(f"no segment holds {ptr:#x}")


def block_of(ptr):
    """The memory_snapshot() block that holds ptr (for a view: its storage's block)."""
    for b in segment_of(ptr)["blocks"]:
        if b["address"] <= ptr < b["address"] + b["size"]:
            return b
    raise AssertionError(f"no block holds {ptr:#x}")


def block_state(ptr):
    """State of the block that holds ptr: active_allocated, active_pending_free or inactive."""
    return block_of(ptr)["state"]


def use_count(pool_id, device=0):
    """References to a private pool (MemPool objects, use_mem_pool contexts, graphs)."""
    return _C.pool_use_count(device, pool_id)


# ----------------------------------------------------------------------------- kernels

# Torch ops become `emulator.launch` kernels that compute on numpy views of device memory:
# `add(t, val)` allocates its output on the current stream (so inside a capture it comes from the
# graph's pool, inside use_mem_pool from that pool) and queues a kernel that writes it. Like a
# CUDA graph's, a kernel refers to its operands by address only, so a DeviceArray that dies during
# a capture gives its block back to the pool at once. Nothing runs during a capture; results are
# read with `.numpy()` after a synchronize (total, host), so the data is checked numerically.

class _Raw:
    """numpy view of raw (emulated device) memory at an address, holding no DeviceArray."""

    __slots__ = ("__array_interface__",)

    def __init__(self, ptr, n, dtype):
        self.__array_interface__ = {"data": (ptr, False), "shape": (n,), "typestr": np.dtype(dtype).str,
                                    "version": 3}


def view(ptr, n, dtype="float32"):
    """n elements of device memory at ptr as a numpy array. Kernels use this to compute on
    device memory by address (no array reference kept, as a CUDA graph's kernel)."""
    return np.asarray(_Raw(ptr, n, dtype))


def _operands(*arrays):
    return [(a.data_ptr(), a.size, a.dtype) for a in arrays]


def fill(t, value):
    """Kernel on the current stream: every element of t = value."""
    ((p, n, dt),) = _operands(t)
    mtia.emulator.launch(lambda: view(p, n, dt).fill(value))


def fill_arange(t, start=0):
    """Kernel on the current stream: t = start, start + 1, ..."""
    ((p, n, dt),) = _operands(t)
    mtia.emulator.launch(lambda: np.copyto(view(p, n, dt), np.arange(start, start + n, dtype=dt)))


def full(n, value, dtype="float32"):
    """A new array on the current stream, filled by a kernel."""
    out = mtia.empty(n, dtype)
    fill(out, value)
    return out


def clone(t):
    out = mtia.empty(t.shape, t.dtype)
    (pi, n, dt), (po, _, _) = _operands(t, out)
    mtia.emulator.launch(lambda: np.copyto(view(po, n, dt), view(pi, n, dt)))
    return out


def add(t, val):
    """t + val (a scalar) into a new array."""
    out = mtia.empty(t.shape, t.dtype)
    (pi, n, dt), (po, _, _) = _operands(t, out)
    mtia.emulator.launch(lambda: np.add(view(pi, n, dt), val, out=view(po, n, dt)))
    return out


def add2(x, y):
    """x + y (arrays) into a new array."""
    out = mtia.empty(x.shape, x.dtype)
    (px, n, dt), (py, _, _), (po, _, _) = _operands(x, y, out)
    mtia.emulator.launch(lambda: np.add(view(px, n, dt), view(py, n, dt), out=view(po, n, dt)))
    return out


def counter_kernel(log, tag):
    """A kernel that only records that it ran."""
    mtia.emulator.launch(lambda: log.append(tag))


def total(t):
    """t.sum() once every stream of the device is idle."""
    mtia.synchronize()
    return float(t.numpy().sum(dtype=np.float64))


def host(t):
    """t's contents after all queued work on the current device is done."""
    mtia.synchronize()
    return t.numpy().copy()


# ----------------------------------------------------------------------------- raw allocators

class Boom(Exception):
    """What the raising observers and raw allocators of the tests raise."""


class HostAllocator:
    """alloc_fn/free_fn of a PythonAllocator: 512-aligned numpy host buffers (the emulated
    device memory is host memory), calls counted; either may be made to raise Boom."""

    def __init__(self):
        self.buffers = {}  # ptr -> (numpy buffer, size)
        self.alloc_calls = 0
        self.free_calls = 0
        self.alloc_raises = self.free_raises = False
        self.lock = threading.Lock()

    def alloc(self, size, device, stream):
        if self.alloc_raises:
            raise Boom(f"alloc_fn refused {size} bytes")
        buf = np.empty(size + 512, dtype=np.uint8)
        ptr = (buf.ctypes.data + 511) & ~511
        with self.lock:
            self.buffers[ptr] = (buf, size)
            self.alloc_calls += 1
        return ptr

    def free(self, ptr, size, device, stream):
        with self.lock:
            _, expected = self.buffers.pop(ptr)
            self.free_calls += 1
        if self.free_raises:
            raise Boom(f"free_fn failed on {ptr:#x}")
        assert size == expected, (size, expected)

    def owns(self, ptr):
        return any(p <= ptr < p + size for p, (_, size) in self.buffers.items())

    def python_allocator(self):
        return mtia.memory.PythonAllocator(self.alloc, self.free)


# ----------------------------------------------------------------------------- devices

class TorchDevice:
    """A torch.device look-alike (.type/.index), so tests do not need torch:
    TorchDevice("mtia:1"), TorchDevice("mtia") or TorchDevice("cuda", 0)."""

    def __init__(self, text, index=None):
        if index is None:
            text, _, index = text.partition(":")
            index = int(index) if index else None
        self.type, self.index = text, index

    def __repr__(self):
        return f"device(type={self.type!r}, index={self.index})"


# ----------------------------------------------------------------------------- bad input

def _state(allow=()):
    stats = {}
    for d in DEVICES:
        s = mtia.memory_stats(d)
        stats[d] = {k: v for k, v in s.items() if k not in allow}
    return {
        "stats": stats,
        "device_bytes": [_C.mem_get_info(d) for d in DEVICES],
        "settings": _C.allocator_settings(),
        "device": mtia.current_device(),
        "streams": [mtia.current_stream(d).stream_id for d in DEVICES],
        "fractions": [mtia.get_per_process_memory_fraction(d) for d in DEVICES],
        "rng": [bytes(mtia.get_rng_state(d)) for d in DEVICES],
        "history": _C.record_level(),
        "capturing": mtia.is_current_stream_capturing(),
    }


@contextlib.contextmanager
def state_unchanged(allow=()):
    """The block leaves the state as it found it: memory_stats() of every device (keys in
    `allow` may change), the device bytes in use, the allocator settings, the current device
    and streams, the memory fractions, the RNG states, the history level and capturing; and
    the invariants hold on every device."""
    before = _state(allow)
    yield
    after = _state(allow)
    for key in before:
        assert after[key] == before[key], key
    for d in DEVICES:
        mtia.memory.check_invariants(d)


def check_bad_call(resources, call, exc, message):
    """call(resources) raises exc with a message matching `message`, and changes nothing."""
    mtia.synchronize()
    mtia.empty_cache()
    with state_unchanged(), pytest.raises(exc, match=message):
        call(resources)
    assert not mtia.is_current_stream_capturing()


def other_device():
    if len(DEVICES) < 2:
        pytest.skip("needs two devices")
    return 1


class Resources:
    """Objects the bad-input cases use, made once per module (outside every state check)."""

    def __init__(self):
        self.side0 = mtia.Stream(device=0)
        self.side1 = mtia.Stream(device=1) if len(DEVICES) > 1 else None
        self.a4 = mtia.empty(4)                 # float32, 16 bytes
        self.a8 = mtia.empty(8)                 # float32, 32 bytes
        self.u8 = mtia.empty(4, "uint8")
        self.ptr = mtia.caching_allocator_alloc(4096, 0)
        self.pool = mtia.memory.MemPool()
        self.rng_state = mtia.get_rng_state(0)
        self.captured = mtia.MTIAGraph()        # keep_graph=False: instantiated by capture_end
        with mtia.stream(self.side0):
            self.captured.capture_begin()
            mtia.emulator.sleep(0)
            self.captured.capture_end()
        mtia.synchronize()

    def close(self):
        self.captured.reset()
        mtia.caching_allocator_delete(self.ptr)
        del self.a4, self.a8, self.u8, self.pool, self.captured


# ----------------------------------------------------------------------------- fresh interpreters

def fresh_python(*argv, env=None, cwd=None, timeout=120):
    """Runs `python *argv` in a fresh interpreter that imports the mtia_alloc these tests import
    (its directory first on PYTHONPATH), inheriting no MTIA_* variable; `env` adds variables.
    Returns the CompletedProcess, output captured as text."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_code(code, *flags, env=None, cwd=None, timeout=120):
    """fresh_python(*flags, "-c", code), code dedented."""
    return fresh_python(*flags, "-c", textwrap.dedent(code), env=env, cwd=cwd, timeout=timeout)
