"""mtia_alloc as PyTorch's MTIA backend (issue 18): the five tests of PyTorch's
test/test_cpp_extensions_mtia_backend.py against real torch.mtia, one allocator shared by
torch and mtia_alloc, streams, events, errors, loading and packaging.

Needs torch 2.13 (skipped without it): python -m pip install 'torch==2.13.*'. The first
run compiles the backend (a minute or two, cached)."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.__version__.startswith("2.13."):
    pytest.skip(f"mtia_alloc.torch supports torch 2.13 only, found {torch.__version__}", allow_module_level=True)

import mtia_alloc  # noqa: E402
import mtia_alloc.torch  # noqa: E402,F401  (loads the backend before anything asks torch.mtia)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, env=None):
    """Runs `code` in a fresh interpreter (this one, from the repository root)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


# ------------------------------------------------------------------ PyTorch's MTIA backend tests


class TestCppExtensionMTIABackend:
    """test/test_cpp_extensions_mtia_backend.py, with mtia_alloc as the backend (PyTorch
    builds a fake mtia_extension.cpp there; here the real torch.mtia answers through ours)."""

    def test_get_device_module(self):
        device = torch.device("mtia:0")
        default_stream = torch.get_device_module(device).current_stream()
        assert default_stream.device_type == int(torch._C._autograd.DeviceType.MTIA)
        assert torch.get_device_module(device) is torch.mtia

    def test_stream_basic(self):
        default_stream = torch.mtia.current_stream()
        user_stream = torch.mtia.Stream()
        assert torch.mtia.current_stream() == default_stream
        assert default_stream != user_stream
        assert default_stream.stream_id == 0  # mtia_alloc's default stream has id 0 too
        assert user_stream.stream_id != 0
        with torch.mtia.stream(user_stream):
            assert torch.mtia.current_stream() == user_stream
        assert user_stream.query()
        default_stream.synchronize()
        assert default_stream.query()

    def test_stream_context(self):
        mtia_stream_0 = torch.mtia.Stream(device="mtia:0")
        mtia_stream_1 = torch.mtia.Stream(device="mtia:0")
        with torch.mtia.stream(mtia_stream_0):
            current_stream = torch.mtia.current_stream()
            assert current_stream == mtia_stream_0, f"current_stream {current_stream} should be {mtia_stream_0}"
        with torch.mtia.stream(mtia_stream_1):
            current_stream = torch.mtia.current_stream()
            assert current_stream == mtia_stream_1, f"current_stream {current_stream} should be {mtia_stream_1}"

    def test_stream_context_different_device(self):
        device_0 = torch.device("mtia:0")
        device_1 = torch.device("mtia:1")
        mtia_stream_0 = torch.mtia.Stream(device=device_0)
        mtia_stream_1 = torch.mtia.Stream(device=device_1)
        orig_current_device = torch.mtia.current_device()
        with torch.mtia.stream(mtia_stream_0):
            current_stream = torch.mtia.current_stream()
            assert torch.mtia.current_device() == device_0.index
            assert current_stream == mtia_stream_0
        assert torch.mtia.current_device() == orig_current_device
        with torch.mtia.stream(mtia_stream_1):
            current_stream = torch.mtia.current_stream()
            assert torch.mtia.current_device() == device_1.index
            assert current_stream == mtia_stream_1
        assert torch.mtia.current_device() == orig_current_device

    def test_device_context(self):
        device_0 = torch.device("mtia:0")
        device_1 = torch.device("mtia:1")
        with torch.mtia.device(device_0):
            assert torch.mtia.current_device() == device_0.index
        with torch.mtia.device(device_1):
            assert torch.mtia.current_device() == device_1.index


# ------------------------------------------------------------------ one allocator


def test_available_and_device_count_match_mtia_alloc():
    assert torch.mtia.is_available()
    assert torch.mtia.is_initialized() or torch.mtia.init() is None
    assert torch.mtia.device_count() == mtia_alloc.device_count() == 2
    assert torch.accelerator.current_accelerator().type == "mtia"


def test_tensor_memory_is_counted_by_both_apis():
    before = mtia_alloc.memory_allocated(0)
    x = torch.empty(1000, device="mtia")  # 4000 bytes -> one 4096-byte block
    assert x.device == torch.device("mtia:0")
    assert mtia_alloc.memory_allocated(0) - before == 4096
    assert torch.mtia.memory_stats(0)["allocated_bytes.all.current"] == mtia_alloc.memory_allocated(0)
    assert torch.accelerator.memory_allocated(0) == mtia_alloc.memory_allocated(0)
    assert torch.accelerator.memory_stats(0)["allocated_bytes.all.current"] == mtia_alloc.memory_allocated(0)
    assert mtia_alloc._C.device_of(x.data_ptr()) == 0
    del x
    assert mtia_alloc.memory_allocated(0) == before


def test_empty_cache_is_the_same_call():
    x = torch.empty(3 << 20, dtype=torch.uint8, device="mtia:1")
    del x
    assert mtia_alloc.memory_reserved(1) > 0
    torch.mtia.empty_cache()
    assert mtia_alloc.memory_reserved(1) == 0
    y = torch.empty(3 << 20, dtype=torch.uint8, device="mtia:1")
    del y
    assert torch.mtia.memory_stats(1)["reserved_bytes.all.current"] > 0
    mtia_alloc.empty_cache()
    assert torch.mtia.memory_stats(1)["reserved_bytes.all.current"] == 0


def test_tensor_allocated_on_the_current_stream_of_its_device():
    s = torch.mtia.Stream(device="mtia:1")
    with torch.mtia.stream(s):
        x = torch.empty(256, device="mtia:1")
    seg = [g for g in mtia_alloc.memory_snapshot() if any(b["address"] == x.data_ptr() for b in g["blocks"])]
    assert seg and seg[0]["stream"] == s.stream_id and seg[0]["device"] == 1


def test_current_stream_shared_with_mtia_alloc():
    s = torch.mtia.Stream()
    with torch.mtia.stream(s):
        assert mtia_alloc.current_stream().stream_id == s.stream_id
    ours = mtia_alloc.Stream(device=1)
    with mtia_alloc.stream(ours):
        cur = torch.mtia.current_stream(1)
        assert (cur.stream_id, cur.device_index) == (ours.stream_id, 1)
        assert torch.mtia.current_device() == 1
    assert torch.mtia.current_stream(1).stream_id == 0


def test_copies_between_cpu_and_devices():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    d0 = a.to("mtia:0")
    d1 = d0.to("mtia:1")
    assert d1.device == torch.device("mtia:1")
    assert d1.data_ptr() != d0.data_ptr()
    assert torch.equal(d1.cpu(), a)
    back = torch.empty(4, 3, device="mtia:0")
    back.copy_(d1.t())  # strided, cross-device
    assert torch.equal(back.cpu(), a.t())
    assert torch.equal(d0.double().cpu(), a.double())  # dtype conversion on the device
    assert d0[1, 2].item() == 6.0


def test_views_share_memory():
    x = torch.zeros(4, 4, device="mtia")
    v = x.view(16)[3:7]
    v.fill_(5)
    assert v.data_ptr() == x.data_ptr() + 3 * 4
    assert x.cpu().view(16)[3:7].tolist() == [5.0] * 4
    t = x.t()
    assert t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert x.unfold(0, 2, 1).shape == (3, 4, 2)


def test_resize_and_set():
    z = torch.empty(0, device="mtia")
    z.resize_(10)
    assert z.shape == (10,) and z.untyped_storage().nbytes() == 40
    z.fill_(2)
    z.resize_(1000)
    assert z[:10].cpu().tolist() == [2.0] * 10  # growing keeps the contents
    w = torch.empty(0, device="mtia")
    w.set_(z)
    assert w.data_ptr() == z.data_ptr() and w.shape == z.shape
    out = torch.empty(0, device="mtia")
    torch.add(torch.ones(5, device="mtia"), 1, out=out)  # out= resized by the CPU kernel
    assert out.device.type == "mtia" and out.cpu().tolist() == [2.0] * 5


def test_record_stream_reaches_the_allocator():
    s = torch.mtia.Stream()
    x = torch.empty(1024, device="mtia")
    x.record_stream(s)
    ptr = x.data_ptr()
    ours = mtia_alloc.Stream(stream_id=s.stream_id, device_index=s.device_index)  # the same stream
    mtia_alloc.emulator.sleep(300, stream=ours)  # s busy: the block must not be reused yet
    del x
    y = torch.empty(1024, device="mtia")
    assert y.data_ptr() != ptr
    s.synchronize()


def test_events():
    start = torch.mtia.Event(enable_timing=True)
    end = torch.mtia.Event(enable_timing=True)
    s = torch.mtia.current_stream()
    start.record(s)
    mtia_alloc.emulator.sleep(20, stream=mtia_alloc.current_stream())
    end.record(s)
    end.synchronize()
    assert end.query()
    assert start.elapsed_time(end) >= 15
    other = torch.mtia.Stream()
    e = torch.mtia.Event()
    e.record(s)
    other.wait_event(e)
    e.synchronize()
    with pytest.raises(ValueError, match="enable_timing"):
        torch.mtia.Event().elapsed_time(torch.mtia.Event())


def test_generators():
    torch.mtia.manual_seed(7)
    a = torch.randn(5, device="mtia")
    torch.mtia.manual_seed(7)
    b = torch.randn(5, device="mtia")
    assert torch.equal(a.cpu(), b.cpu())
    state = torch.mtia.get_rng_state()
    c = torch.rand(3, device="mtia")
    torch.mtia.set_rng_state(state)
    assert torch.equal(torch.rand(3, device="mtia").cpu(), c.cpu())
    g = torch.Generator(device="mtia")
    g.manual_seed(1)
    assert torch.rand(2, device="mtia", generator=g).device.type == "mtia"


# ------------------------------------------------------------------ bad inputs


def test_out_of_memory_then_normal_allocation():
    seen = []
    torch.mtia.attach_out_of_memory_observer(lambda *args: seen.append(args))
    before = mtia_alloc.memory_stats(0)
    with pytest.raises(torch.OutOfMemoryError, match="MTIA out of memory. Tried to allocate 1024.00 GiB"):
        torch.empty(1 << 40, dtype=torch.uint8, device="mtia:0")
    assert seen and seen[-1][0] == 0 and seen[-1][1] == 1 << 40
    after = mtia_alloc.memory_stats(0)
    assert after["num_ooms"] == before["num_ooms"] + 1
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
    mtia_alloc.memory.check_invariants(0)  # raises if any invariant is broken
    x = torch.ones(100, device="mtia:0")
    assert x.sum().item() == 100


def test_invalid_device_index():
    with pytest.raises(ValueError, match=r"Invalid device index 7 .*valid range is \[0, 1\]"):
        torch.empty(3, device="mtia:7")
    with pytest.raises(ValueError, match="Invalid device index 9"):
        torch.mtia.set_device(9)
    with pytest.raises(ValueError, match="Invalid device index 5"):
        torch.mtia.Stream(device="mtia:5")
    assert torch.ones(2, device="mtia").sum().item() == 2


def test_tensor_and_stream_of_different_devices():
    x = torch.ones(4, device="mtia:0")
    s1 = torch.mtia.Stream(device="mtia:1")
    with pytest.raises(ValueError, match="tensor is on mtia:0 but the stream is on mtia:1"):
        x.record_stream(s1)
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(4, device="mtia:1")
    assert (x + 1).sum().item() == 8


def test_op_without_cpu_kernel_raises_not_implemented_naming_it():
    x = torch.ones(4, device="mtia")
    with pytest.raises(NotImplementedError, match="_cudnn_rnn_flatten_weight"):
        torch._cudnn_rnn_flatten_weight([x], 1, 4, 0, 4, 0, 1, False, False)


def test_load_after_torch_mtia_was_queried_is_a_clear_error():
    r = run_python("import torch\ntorch.mtia.device_count()\nimport mtia_alloc.torch", {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert r.returncode != 0
    assert "torch.mtia was used in this process before mtia_alloc.torch was loaded" in r.stderr


def test_wrong_torch_version_is_a_clear_import_error():
    r = run_python("import torch\ntorch.__version__ = '2.12.1'\nimport mtia_alloc.torch", {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert r.returncode != 0
    assert "ImportError: mtia_alloc.torch supports torch 2.13.* only" in r.stderr
    assert "torch 2.12.1 is installed" in r.stderr


def test_explicit_load_in_a_fresh_process():
    r = run_python("import mtia_alloc.torch, torch\nx = torch.ones(3, device='mtia')\n"
                   "print(torch.mtia.is_available(), x.sum().item(), torch.mtia.memory_allocated())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "3.0", "512"]


def test_autoload_entry_point_when_installed():
    try:
        dist = importlib.metadata.distribution("mtia_alloc")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mtia_alloc is not pip-installed here: its entry points do not exist")
    eps = [ep for ep in dist.entry_points if ep.group == "torch.backends"]
    assert [ep.value for ep in eps] == ["mtia_alloc._torch_autoload:load"]
    r = run_python("import torch\nprint(torch.mtia.is_available(), torch.ones(2, device='mtia').device)",
                   {"TORCH_DEVICE_BACKEND_AUTOLOAD": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "mtia:0"]


def test_readme_pytorch_example_runs_and_keeps_its_promise():
    import re
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Use it from PyTorch", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    lines = ["import mtia_alloc.torch  # the entry point does this once installed"]
    for line in block.splitlines():
        m = re.match(r"^(?P<code>[^#]+?)\s+#\s*(?P<value>\d+)$", line)
        lines.append(f"assert ({m['code'].strip()}) == {m['value']}" if m else line)
    r = run_python("\n".join(lines))
    assert r.returncode == 0, r.stderr


def test_private_pools_route_torch_allocations():
    pool = mtia_alloc.MemPool()
    with mtia_alloc.use_mem_pool(pool):
        x = torch.empty(100, device="mtia")
    y = torch.empty(100, device="mtia")
    pools = {seg["segment_pool_id"] for seg in mtia_alloc.memory_snapshot()
             for b in seg["blocks"] if b["address"] == x.data_ptr()}
    assert pools == {pool.id}
    assert all(seg["segment_pool_id"] == (0, 0) for seg in mtia_alloc.memory_snapshot()
               if seg["address"] <= y.data_ptr() < seg["address"] + seg["total_size"])
    del x, y, pool
    torch.mtia.empty_cache()


def test_accelerator_api_reaches_the_allocator():
    x = torch.empty(3 << 20, dtype=torch.uint8, device="mtia:0")
    assert torch.accelerator.memory_reserved(0) == mtia_alloc.memory_reserved(0) > 0
    free, total = torch.accelerator.get_memory_info(0)
    assert (free, total) == mtia_alloc.mem_get_info(0)
    del x
    torch.accelerator.reset_peak_memory_stats(0)
    assert torch.accelerator.max_memory_allocated(0) == mtia_alloc.memory_allocated(0)
    torch.accelerator.empty_cache()
    assert mtia_alloc.memory_reserved(0) == 0
    assert torch.mtia.get_device_capability() == (1, 0)
    assert torch.mtia.get_device_properties(1)["total_memory"] == mtia_alloc.get_device_properties(1)["total_memory"]
    assert torch._C._mtia_getCurrentRawStream(0) == mtia_alloc.current_stream(0).stream_id
    torch.mtia.synchronize()


def test_ops_run_after_the_work_queued_on_their_stream():
    import ctypes
    import struct
    x = torch.zeros(4, device="mtia")
    ptr, data = x.data_ptr(), struct.pack("4f", 1, 2, 3, 4)
    stream = mtia_alloc.current_stream()
    mtia_alloc.emulator.sleep(30, stream=stream)
    mtia_alloc.emulator.launch(lambda: ctypes.memmove(ptr, data, len(data)), stream=stream)
    assert (x * 1).cpu().tolist() == [1.0, 2.0, 3.0, 4.0]  # waited for the sleep and the write
    mtia_alloc.emulator.launch(lambda: ctypes.memmove(ptr, struct.pack("4f", 0, 0, 0, 9), 16), stream=stream)
    assert x[3].item() == 9.0


def test_autoload_with_a_wrong_torch_version_warns_instead_of_breaking_import_torch():
    r = run_python("import warnings, torch\ntorch.__version__ = '2.14.0'\nfrom mtia_alloc._torch_autoload import load\n"
                   "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n    load()\n"
                   "print(w[0].message)\nprint(torch.mtia.is_available())", {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert r.returncode == 0, r.stderr
    assert "the PyTorch MTIA backend was not loaded: ImportError: mtia_alloc.torch supports torch 2.13.* only" in r.stdout
    assert r.stdout.split()[-1] == "False"


def test_memory_fraction_set_through_mtia_alloc_limits_torch():
    mtia_alloc.set_per_process_memory_fraction(0.001, 0)  # ~17 MB of 16 GiB (conftest restores 1.0)
    with pytest.raises(torch.OutOfMemoryError, match="MTIA out of memory"):
        torch.empty(32 << 20, dtype=torch.uint8, device="mtia:0")
    small = torch.ones(1000, device="mtia:0")
    assert small.sum().item() == 1000
    mtia_alloc.set_per_process_memory_fraction(1.0, 0)
    big = torch.empty(32 << 20, dtype=torch.uint8, device="mtia:0")
    assert big.numel() == 32 << 20


def test_no_python_runs_on_the_allocation_path():
    torch.empty(1024, device="mtia")  # warm: initialised, stream known
    calls = []

    def profiler(frame, event, arg):
        if event == "call":  # a Python function was entered
            calls.append(frame.f_code.co_qualname if hasattr(frame.f_code, "co_qualname") else frame.f_code.co_name)
    sys.setprofile(profiler)
    try:
        for _ in range(100):
            x = torch.empty(1024, device="mtia")
            del x
    finally:
        sys.setprofile(None)
    assert calls == [], calls[:10]
