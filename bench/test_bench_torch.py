"""The PyTorch backend against PyTorch on CPU (issue 18): torch.empty(1024) + release on
device="mtia" vs on CPU, and a small model's training step on mtia vs on CPU.

    python -m pytest bench/test_bench_torch.py --benchmark-only   # pytest-benchmark
    python bench/test_bench_torch.py                              # the ratio table (README)

Needs torch 2.13 (skipped without it)."""
import os
import sys
import timeit

import pytest

torch = pytest.importorskip("torch")
if not torch.__version__.startswith("2.13."):
    pytest.skip(f"mtia_alloc.torch supports torch 2.13 only, found {torch.__version__}", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mtia_alloc.torch  # noqa: E402,F401

nn = torch.nn
DEVICES = ["cpu", "mtia"]
# One intra-op thread on both sides: on a small shared host, thread pools stall on each
# other and the figures become noise; the kernels are the same CPU kernels either way.
torch.set_num_threads(1)


def empty_release(device):
    empty = torch.empty
    return lambda: empty(1024, device=device)  # the tensor dies as the lambda returns


def training_step(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 16, 16).to(device)
    y = torch.randint(0, 10, (32,)).to(device)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


@pytest.mark.parametrize("device", DEVICES)
def test_empty_release(benchmark, device):
    fn = empty_release(device)
    fn()
    benchmark(fn)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step(benchmark, device):
    fn = training_step(device)
    fn()
    benchmark(fn)


def _best_ns_interleaved(fns, number, repeat=7):
    """Best time per call of each function, their rounds interleaved so that a busy
    moment of the host hits both sides alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timeit.timeit(fn, number=number))
    return [b / number * 1e9 for b in best]


def main():
    print(f"torch {torch.__version__}, mtia_alloc backend; 1 intra-op thread; best of 7 interleaved rounds")
    print(f"{'benchmark':34} {'cpu':>12} {'mtia':>12} {'mtia/cpu':>9}")
    for name, make, number in (("torch.empty(1024) + release", empty_release, 50_000),
                               ("small CNN training step", training_step, 20)):
        cpu, mtia = _best_ns_interleaved([make(d) for d in DEVICES], number)
        unit, div = ("ns", 1) if cpu < 1e5 else ("ms", 1e6)
        print(f"{name:34} {cpu / div:10.2f}{unit} {mtia / div:10.2f}{unit} {mtia / cpu:9.2f}")


if __name__ == "__main__":
    main()
