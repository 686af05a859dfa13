"""Snapshots for the memory-debugging tests and benchmarks (diff, fit, sweep, ranks, frames).

Each is recorded from a real workload on mtia_alloc in a fresh interpreter
(`python tests/memdebug_snapshots.py OUT_DIR [STEPS]`), with live memory allocated before
the recording starts (weights), then rewritten into what PyTorch writes on a GPU: every
stack begins with the C++ unwinder's frames (`??:0 in torch::unwind::unwind()`), torch/c10
C++ frames and Python frames inside torch, before the user frames; the allocator settings
name PYTORCH_CUDA_ALLOC_CONF. Files written:

  base.pickle     a training loop: weights (before recording), per step activations
                  (forward), gradients (backward), optimizer state (allocated once)
  bigger.pickle   the same with 1.5x larger activations and a leaked buffer per step
  rank0..3.pickle four ranks; rank 2 keeps an extra cache (its peak is the highest)
  nostack.pickle  base's workload with history recorded without stacks
  oom.pickle      bigger's workload on a 200 MiB device: the trace ends with an `oom` entry
  segments.pickle a bare memory_snapshot() segment list (no trace)
"""
import os
import pickle
import random
import sys

MiB = 1 << 20

UNWIND = [{"filename": "??", "line": 0, "name": "torch::unwind::unwind()"},
          {"filename": "??", "line": 0, "name": "torch::CapturedTraceback::gather(bool, bool, bool)"},
          {"filename": "/opt/conda/lib/python3.11/site-packages/torch/lib/libc10_cuda.so", "line": 0,
           "name": "c10::cuda::CUDACachingAllocator::Native::DeviceCachingAllocator::malloc(signed char, "
                   "unsigned long, CUstream_st*)"},
          {"filename": "/pytorch/aten/src/ATen/native/cuda/EmptyTensor.cpp", "line": 41,
           "name": "at::detail::empty_cuda(c10::ArrayRef<long>, c10::ScalarType)"},
          {"filename": "/pytorch/aten/src/ATen/core/boxing/impl/make_boxed_from_unboxed_functor.h", "line": 468,
           "name": "c10::impl::wrap_kernel_functor_unboxed_"},
          {"filename": "Python/ceval.c", "line": 4181, "name": "_PyEval_EvalFrameDefault"},
          {"filename": "/opt/conda/lib/python3.11/site-packages/torch/nn/modules/linear.py", "line": 125,
           "name": "forward"},
          {"filename": "/opt/conda/lib/python3.11/site-packages/torch/nn/modules/module.py", "line": 1747,
           "name": "_call_impl"}]


def torchify(snap):
    """Rewrites an mtia_alloc snapshot's stacks as PyTorch's C++ unwinder writes them (shared
    lists stay shared) and names CUDA's settings variable."""
    memo = {}

    def conv(frames):
        if not frames:
            return frames
        k = id(frames)
        if k not in memo:
            user = [dict(fr) for fr in frames if "/mtia_alloc/" not in fr["filename"]]
            memo[k] = UNWIND + user
        return memo[k]

    for s in snap["segments"]:
        s["frames"] = conv(s.get("frames"))
        for b in s["blocks"]:
            b["frames"] = conv(b.get("frames"))
    for t in snap["device_traces"]:
        for e in t:
            if "frames" in e:
                e["frames"] = conv(e["frames"])
    return snap


def load_weights(mtia, n, size):
    return [mtia.caching_allocator_alloc(size) for _ in range(n)]


def forward(mtia, rng, scale):
    return [mtia.caching_allocator_alloc(int(rng.randint(64 << 10, 6 * MiB) * scale)) for _ in range(6)]


def backward(mtia, acts, rng):
    grads = [mtia.caching_allocator_alloc(rng.randint(4 << 10, 2 * MiB)) for _ in range(3)]
    for p in acts:
        mtia.caching_allocator_delete(p)
    return grads


def optimizer_state(mtia, size):
    return [mtia.caching_allocator_alloc(size) for _ in range(2)]


def leak(mtia, size):
    return mtia.caching_allocator_alloc(size)


def record(out, steps=40, scale=1.0, leak_size=0, cache=0, stacks=True, seed=1, memory=None):
    """Runs the workload in this (fresh) process and writes a torch-style snapshot. With
    `memory` (a device that small), the run ends at its first OOM, as a snapshot dumped by
    an OOM observer does."""
    import mtia_alloc as mtia
    rng = random.Random(seed)
    if memory:
        mtia.emulator.configure(memory_per_device=memory)
    mtia.init()
    weights = load_weights(mtia, 8, 12 * MiB)  # live before the recording window
    if stacks:
        mtia.record_memory_history(context="alloc")
    else:
        mtia.record_memory_history(context=None)
    state = None
    kept = []
    for _ in range(steps):
        try:
            acts = forward(mtia, rng, scale)
        except mtia.OutOfMemoryError:
            break
        grads = backward(mtia, acts, rng)
        if state is None:
            state = optimizer_state(mtia, 24 * MiB)
        for g in grads:
            mtia.caching_allocator_delete(g)
        if leak_size:
            kept.append(leak(mtia, leak_size))
        if cache and len(kept) < 4:
            kept.append(leak(mtia, cache))
    snap = mtia.snapshot()
    del weights
    with open(out, "wb") as f:
        pickle.dump(torchify(snap), f, protocol=4)


def main(out_dir, steps=40):
    import subprocess
    os.makedirs(out_dir, exist_ok=True)
    jobs = {"base": {}, "bigger": {"scale": 1.5, "leak_size": 3 * MiB // 2},
            "nostack": {"stacks": False},
            "rank0": {"seed": 10}, "rank1": {"seed": 11}, "rank2": {"seed": 12, "cache": 40 * MiB},
            "rank3": {"seed": 13},
            "oom": {"scale": 1.5, "leak_size": 3 * MiB // 2, "memory": "200MiB"}}
    procs = []
    for name, kw in jobs.items():
        code = (f"import sys; sys.path[:0] = [{os.path.dirname(os.path.abspath(__file__))!r}]; "
                f"import memdebug_snapshots as m; m.record({os.path.join(out_dir, name + '.pickle')!r}, "
                f"steps={steps}, **{kw!r})")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("recording a test snapshot failed")
    with open(os.path.join(out_dir, "base.pickle"), "rb") as f:
        base = pickle.load(f)
    with open(os.path.join(out_dir, "segments.pickle"), "wb") as f:
        pickle.dump(base["segments"], f, protocol=4)
    return out_dir


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)


_DIR = {}


def snapshots_dir(tmp_path_factory, steps=40):
    """The directory of the snapshots above, recorded once per test session."""
    if steps not in _DIR:
        _DIR[steps] = main(str(tmp_path_factory.mktemp(f"memdebug{steps}")), steps)
    return _DIR[steps]
