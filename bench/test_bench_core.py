"""pytest-benchmark: the allocator's hot paths, each next to its peer in the same run.
Run: python -m pytest bench/ --benchmark-only  (not part of the default test run).
Native loops report per-op figures in extra_info; the traces are bench's (../shared/traces
when present, else the shipped ones), and the PyTorch peer columns need its harness
(python -m mtia_alloc peer build)."""
import pytest

import mtia_alloc as mtia
from mtia_alloc import _C
from mtia_alloc.tools import replay as _replay
from mtia_alloc.tools.bench_suite import _find_peer, bench_traces, random_trace
from mtia_alloc.tools.workload import read_trace

PEER = _find_peer(None)
TRACES = [path for _, _, path in bench_traces(quick=True)[0] if path is not None]


@pytest.fixture(scope="module", autouse=True)
def allocator():
    _replay.setup_allocator(memory="80GiB")
    yield
    mtia.empty_cache()


def test_python_cached_pair(benchmark):
    alloc, free = mtia.caching_allocator_alloc, mtia.caching_allocator_delete
    benchmark(lambda: free(alloc(4096)))


def test_python_empty_release(benchmark):
    benchmark(lambda: mtia.empty(1024))


@pytest.mark.parametrize("impl", ["mtia", "glibc"])
def test_native_cached_pair(benchmark, impl):
    fn = (lambda: _C.native_pair(0, 4096, 100_000)) if impl == "mtia" else (lambda: _C.glibc_pair(4096, 100_000))
    wall, cpu = benchmark(fn)
    benchmark.extra_info["cpu_ns_per_pair"] = cpu


@pytest.mark.parametrize("cached", [1_000, 1_000_000], ids=["1k", "1M"])
def test_cache_size_independence(benchmark, cached):
    ns = benchmark.pedantic(lambda: _C.cached_blocks_pair(0, cached, 300_000), rounds=1, iterations=1)
    benchmark.extra_info["cpu_ns_per_pair"] = ns


@pytest.mark.parametrize("threads", [1, 2])
def test_two_device_scaling(benchmark, threads):
    rate = benchmark.pedantic(lambda: _C.threaded_pairs(threads, 4096, 1_000_000), rounds=1, iterations=1)
    benchmark.extra_info["pairs_per_second"] = rate
    # The host's own scaling for the same thread count (busy work sharing nothing).
    benchmark.extra_info["host_compute_rounds_per_second"] = _C.threaded_compute(threads, 100_000_000)


def _replay_warm(trace):
    mtia.empty_cache()
    return _replay.replay(trace, repeat=2)


@pytest.mark.parametrize("path", TRACES + ["generated"], ids=lambda p: getattr(p, "name", str(p)))
def test_trace_replay(benchmark, path, tmp_path):
    trace = random_trace() if path == "generated" else read_trace(path)
    cold, warm = benchmark.pedantic(lambda: _replay_warm(trace), rounds=1, iterations=1)
    benchmark.extra_info.update({"warm_cpu_ns_per_op": warm["thread_cpu_ns_per_op"],
                                 "peak_reserved_bytes": cold["peak_reserved_bytes"],
                                 "num_device_alloc": cold["num_device_alloc"]})
    if PEER and path != "generated":
        p_cold, p_warm = _replay.run_peer(PEER, path, 2, _C.mem_get_info(0)[1])
        benchmark.extra_info.update({"torch_warm_cpu_ns_per_op": p_warm["thread_cpu_ns_per_op"],
                                     "speedup": p_warm["thread_cpu_ns_per_op"] / warm["thread_cpu_ns_per_op"]})
        assert p_cold["peak_reserved_bytes"] == cold["peak_reserved_bytes"]
        assert p_cold["num_device_alloc"] == cold["num_device_alloc"]
