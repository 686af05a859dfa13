"""The emulated backend's devices and streams (API.md §1-§3, spec pools_graphs_streams_api.md
§4 and must-haves 27-35), kernels on streams, and the allocator with real streams (§4.1):

* PyTorch's test_cpp_extensions_mtia_backend.py tests (test_get_device_module,
  test_stream_basic, test_stream_context, test_stream_context_different_device,
  test_device_context) and test_cuda.py's test_streams, test_record_stream,
  test_record_stream_on_shifted_view and test_caching_allocator_record_stream_oom, re-expressed
  against mtia_alloc: `emulator.sleep(ms, stream=s)` keeps a stream busy (torch.cuda._sleep),
  raw pointers from caching_allocator_alloc stand in for tensors;
* device/stream context managers and their restore rules (must-haves 30-31);
* lazy initialisation (must-have 32), run in fresh subprocesses;
* device capability/properties, bf16 and the RNG functions (must-have 35);
* kernels: asynchronous FIFO execution, errors surfacing at synchronize().

Every test restores the current device and the current streams (fixture below) and frees
what it allocates. "Busy" streams sleep BUSY_MS: generous, and no test asserts a tight upper
bound on time.
"""
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import mtia_alloc as mtia
from conftest import TorchDevice
import mtia_alloc.emulator as emulator
import mtia_alloc.memory
import mtia_alloc.rng
from mtia_alloc.streams import KernelError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BUSY_MS = 200
MTIA_DEVICE_TYPE = 19
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_block(ptr, device=0):
    """The memory_snapshot() block that contains ptr (the 'storage' of a view)."""
    for seg in mtia.memory_snapshot():
        if seg["device"] == device and seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            for blk in seg["blocks"]:
                if blk["address"] <= ptr < blk["address"] + blk["size"]:
                    return blk
    raise AssertionError(f"no block holds {ptr:#x} on device {device}")


# ----------------------------------------------------------------------------- devices

def test_set_device_none_keeps_the_current_device():
    mtia.set_device(1)
    mtia.set_device(None)
    assert mtia.current_device() == 1
    mtia.set_device(0)


def test_device_count_and_is_available():
    assert mtia.is_available()
    assert mtia.device_count() == 2
    mtia.init()  # idempotent
    assert mtia.is_initialized()


def test_device_count_and_is_available_do_not_initialise():
    # as torch.mtia's: they only ask for the count, so emulator.configure() may still follow
    out = _run_fresh("""
        import mtia_alloc as mtia
        assert mtia.is_available() and mtia.device_count() == 2
        assert not mtia.is_initialized()
        mtia.emulator.configure(device_count=3)
        assert mtia.device_count() == 3 and not mtia.is_initialized()
        mtia.init()
        assert mtia.device_count() == 3
        print("ok")
    """)
    assert out.strip() == "ok"


def test_memory_functions_check_the_device_before_initialisation():
    # they answer 0 / {} before init (as torch's do) but still reject a bad device argument
    out = _run_fresh("""
        import mtia_alloc as mtia
        for f in (mtia.memory_allocated, mtia.max_memory_allocated, mtia.memory_reserved, mtia.max_memory_reserved,
                  mtia.memory_stats, mtia.memory_stats_as_nested_dict, mtia.reset_peak_memory_stats,
                  mtia.reset_accumulated_memory_stats):
            assert f(1) in (0, {}, None) and f("mtia:0") in (0, {}, None)
            for bad in ("cuda:0", 2, [0]):
                try:
                    f(bad)
                except ValueError:
                    pass
                else:
                    raise AssertionError((f.__name__, bad))
        assert not mtia.is_initialized()
        print("ok")
    """)
    assert out.strip() == "ok"


def test_device_context():
    """PyTorch test_cpp_extensions_mtia_backend.py: test_device_context."""
    device_0 = TorchDevice("mtia:0")
    device_1 = TorchDevice("mtia:1")
    with mtia.device(device_0):
        assert mtia.current_device() == device_0.index
    with mtia.device(device_1):
        assert mtia.current_device() == device_1.index


@pytest.mark.parametrize("arg", [1, "mtia:1", TorchDevice("mtia:1")], ids=["int", "str", "device-object"])
def test_device_context_restores_the_previous_device(arg):
    mtia.set_device(0)
    with mtia.device(arg) as ctx:
        assert isinstance(ctx, mtia.device)
        assert mtia.current_device() == 1
        with mtia.device(0):
            assert mtia.current_device() == 0
        assert mtia.current_device() == 1
    assert mtia.current_device() == 0


def test_device_context_restores_on_exception_and_propagates_it():
    mtia.set_device(0)
    with pytest.raises(KeyError, match="inside"):
        with mtia.device(1):
            raise KeyError("inside")
    assert mtia.current_device() == 0


@pytest.mark.parametrize("arg", [-1, None, "mtia", TorchDevice("mtia")], ids=["negative", "None", "mtia", "no-index"])
def test_device_context_without_an_index_changes_nothing(arg):
    mtia.set_device(1)
    with mtia.device(arg):
        assert mtia.current_device() == 1
    assert mtia.current_device() == 1


def test_set_device():
    mtia.set_device(1)
    assert mtia.current_device() == 1
    mtia.set_device(-1)  # negative indices are ignored
    assert mtia.current_device() == 1
    mtia.set_device("mtia:0")
    assert mtia.current_device() == 0
    mtia.set_device(TorchDevice("mtia:1"))
    assert mtia.current_device() == 1
    for bad in (2, "mtia:7", "cuda:0", TorchDevice("cuda:0"), 1.0):
        with pytest.raises(ValueError):
            mtia.set_device(bad)
    assert mtia.current_device() == 1


def test_synchronize_waits_for_every_stream_of_the_device():
    a, b = mtia.Stream(device=1), mtia.Stream(device=1)
    other = mtia.Stream(device=0)
    emulator.sleep(BUSY_MS, stream=a)
    emulator.sleep(BUSY_MS, stream=b)
    emulator.sleep(BUSY_MS, stream=mtia.default_stream(1))
    assert not a.query() and not b.query()
    mtia.synchronize(1)
    assert a.query() and b.query() and mtia.default_stream(1).query()
    emulator.sleep(BUSY_MS, stream=other)
    mtia.synchronize("mtia:1")  # another device's work is not waited for
    assert not other.query()
    with mtia.device(0):
        mtia.synchronize()  # the current device
    assert other.query()


def test_get_device_capability_properties_and_bf16():
    cap = mtia.get_device_capability()
    assert isinstance(cap, tuple) and len(cap) == 2 and all(isinstance(x, int) for x in cap)
    assert mtia.get_device_capability(1) == cap
    for d in (None, 0, 1, "mtia:1", TorchDevice("mtia:0")):
        props = mtia.get_device_properties(d)
        assert isinstance(props, dict)
        assert isinstance(props["name"], str) and props["name"]
        assert props["total_memory"] == mtia.memory.mem_get_info(d)[1] > 0
    assert mtia.is_bf16_supported() is True
    assert mtia.is_bf16_supported(including_emulation=False) is True
    with pytest.raises(ValueError):
        mtia.get_device_properties(5)


# ----------------------------------------------------------------------------- streams

def test_get_device_module():
    """PyTorch test_get_device_module: the current stream's device_type is
    int(torch._C._autograd.DeviceType.MTIA), which is 19 (checked against torch 2.13)."""
    default_stream = mtia.current_stream(TorchDevice("mtia:0"))
    assert default_stream.device_type == MTIA_DEVICE_TYPE
    assert mtia.Stream(device=TorchDevice("mtia:1")).device_type == MTIA_DEVICE_TYPE


def _default_and_user_stream():
    """The checks test_stream_basic and test_streams share; returns both streams."""
    default_stream = mtia.current_stream()
    user_stream = mtia.Stream()
    assert mtia.current_stream() == default_stream
    assert default_stream != user_stream
    assert default_stream.stream_id == 0
    assert user_stream.stream_id != 0
    with mtia.stream(user_stream):
        assert mtia.current_stream() == user_stream
    assert user_stream.query()
    return default_stream, user_stream


def test_stream_basic():
    """PyTorch test_cpp_extensions_mtia_backend.py: test_stream_basic."""
    default_stream, _ = _default_and_user_stream()
    default_stream.synchronize()
    assert default_stream.query()


def test_streams():
    """PyTorch test_cuda.py: test_streams (cuda_stream -> stream_id)."""
    default_stream, _ = _default_and_user_stream()
    emulator.sleep(50, stream=default_stream)
    default_stream.synchronize()
    assert default_stream.query()


def test_stream_context():
    """PyTorch test_cpp_extensions_mtia_backend.py: test_stream_context."""
    mtia_stream_0 = mtia.Stream(device="mtia:0")
    mtia_stream_1 = mtia.Stream(device="mtia:0")
    with mtia.stream(mtia_stream_0):
        current_stream = mtia.current_stream()
        assert current_stream == mtia_stream_0, f"current_stream {current_stream} should be {mtia_stream_0}"
    with mtia.stream(mtia_stream_1):
        current_stream = mtia.current_stream()
        assert current_stream == mtia_stream_1, f"current_stream {current_stream} should be {mtia_stream_1}"


def test_stream_context_different_device():
    """PyTorch test_cpp_extensions_mtia_backend.py: test_stream_context_different_device."""
    device_0 = TorchDevice("mtia:0")
    device_1 = TorchDevice("mtia:1")
    mtia_stream_0 = mtia.Stream(device=device_0)
    mtia_stream_1 = mtia.Stream(device=device_1)
    orig_current_device = mtia.current_device()
    with mtia.stream(mtia_stream_0):
        current_stream = mtia.current_stream()
        assert mtia.current_device() == device_0.index
        assert current_stream == mtia_stream_0, f"current_stream {current_stream} should be {mtia_stream_0}"
    assert mtia.current_device() == orig_current_device
    with mtia.stream(mtia_stream_1):
        current_stream = mtia.current_stream()
        assert mtia.current_device() == device_1.index
        assert current_stream == mtia_stream_1, f"current_stream {current_stream} should be {mtia_stream_1}"
    assert mtia.current_device() == orig_current_device


def test_stream_rebuilt_from_positional_ids():
    # torch.Stream(stream_id, device_index, device_type), as test_generic_stream_event rebuilds one
    s = mtia.Stream(1)
    t = mtia.Stream(s.stream_id, s.device_index, s.device_type)
    assert t == s and hash(t) == hash(s)
    with pytest.raises(TypeError, match="not a mix"):
        mtia.Stream(s.stream_id, s.device_index)
    with pytest.raises(ValueError, match="device_type must be 19"):
        mtia.Stream(s.stream_id, s.device_index, 1)
    with pytest.raises(ValueError, match="unknown stream"):
        mtia.Stream(1 << 40, 0, 19)


def test_stream_ids_equality_hash_and_repr():
    default0, default1 = mtia.default_stream(0), mtia.default_stream(1)
    assert default0.stream_id == default1.stream_id == 0
    assert default0 != default1  # same id, other device
    made = [mtia.Stream(device=d) for d in (0, 1, 0, 1)]
    ids = [s.stream_id for s in made]
    assert all(i > 0 for i in ids) and len(set(ids)) == 4  # unique across devices
    s = made[1]
    assert (s.device_index, s.device_type) == (1, MTIA_DEVICE_TYPE)
    assert s.device.type == "mtia" and s.device.index == 1
    handle = mtia.Stream(stream_id=s.stream_id, device_index=1, device_type=MTIA_DEVICE_TYPE)
    assert handle == s and hash(handle) == hash(s) and handle is not s
    assert len({s, handle, made[0]}) == 2
    assert s != made[3] and s != None  # noqa: E711
    assert mtia.Stream(stream_id=0, device_index=0, device_type=MTIA_DEVICE_TYPE) == default0
    assert repr(s) == f"torch.Stream device_type=mtia, device_index=1, stream_id={s.stream_id}"
    with pytest.raises(ValueError):
        mtia.Stream(stream_id=10 ** 9, device_index=0, device_type=MTIA_DEVICE_TYPE)
    with pytest.raises(ValueError):
        mtia.Stream(stream_id=s.stream_id, device_index=1, device_type=1)  # CUDA's type


def test_current_and_default_stream_follow_the_current_device():
    mtia.set_device(1)
    assert mtia.current_stream() == mtia.default_stream() == mtia.default_stream(1)
    s = mtia.Stream()
    assert s.device_index == 1
    mtia.set_stream(s)
    assert mtia.current_stream() == s == mtia.current_stream("mtia:1")
    assert mtia.current_stream(0) == mtia.default_stream(0)


def test_set_stream_switches_the_device():
    s1 = mtia.Stream(device=1)
    mtia.set_device(0)
    mtia.set_stream(None)  # no-op
    assert mtia.current_device() == 0
    mtia.set_stream(s1)
    assert mtia.current_device() == 1
    assert mtia.current_stream() == s1
    assert mtia.current_stream(0) == mtia.default_stream(0)
    with pytest.raises(TypeError):
        mtia.set_stream("not a stream")


def test_stream_context_restores_both_devices_streams_and_the_device():
    """spec §4.5 / must-have 30."""
    x0, y1, z1 = mtia.Stream(device=0), mtia.Stream(device=1), mtia.Stream(device=1)
    mtia.set_stream(y1)
    mtia.set_stream(x0)  # current device 0, current streams: x0 on 0, y1 on 1
    with mtia.stream(z1):
        assert mtia.current_device() == 1
        assert mtia.current_stream() == z1
        assert mtia.current_stream(0) == x0
    assert mtia.current_device() == 0
    assert mtia.current_stream(0) == x0
    assert mtia.current_stream(1) == y1
    # The same after an exception, which propagates.
    with pytest.raises(RuntimeError, match="raised inside"):
        with mtia.StreamContext(z1):
            mtia.set_stream(mtia.Stream(device=0))  # mess with both devices inside
            raise RuntimeError("raised inside")
    assert mtia.current_device() == 0
    assert mtia.current_stream(0) == x0
    assert mtia.current_stream(1) == y1


def test_stream_context_with_none_is_a_no_op():
    s = mtia.Stream(device=1)
    mtia.set_stream(s)
    mtia.set_device(0)
    with mtia.stream(None):
        assert mtia.current_device() == 0
        assert mtia.current_stream() == mtia.default_stream(0)
    assert mtia.current_device() == 0
    assert mtia.current_stream(1) == s


def test_nested_stream_contexts_and_stream_as_context_manager():
    a, b, c = mtia.Stream(device=0), mtia.Stream(device=1), mtia.Stream(device=0)
    with a:
        assert mtia.current_stream() == a
        with b:
            assert mtia.current_device() == 1 and mtia.current_stream() == b
            with mtia.stream(c):
                assert mtia.current_device() == 0 and mtia.current_stream() == c
                assert mtia.current_stream(1) == b
            assert mtia.current_device() == 1 and mtia.current_stream() == b
        assert mtia.current_device() == 0 and mtia.current_stream() == a
        with a:  # re-entering the same stream nests too
            assert mtia.current_stream() == a
        assert mtia.current_stream() == a
    assert mtia.current_stream() == mtia.default_stream(0)
    assert mtia.current_stream(1) == mtia.default_stream(1)


# ----------------------------------------------------------------------------- kernels

def test_kernels_run_asynchronously_in_fifo_order():
    s = mtia.Stream()
    ran = []
    emulator.sleep(BUSY_MS, stream=s)
    for i in range(200):
        emulator.launch(ran.append, i, stream=s)
    # launch returned at once: nothing ran yet, the stream is busy.
    assert ran == []
    assert not s.query()
    s.synchronize()
    assert s.query()
    assert ran == list(range(200))


def test_launch_uses_the_current_stream():
    s = mtia.Stream(device=1)
    seen = []
    with mtia.stream(s):
        emulator.sleep(BUSY_MS)
        emulator.launch(lambda: seen.append(threading.current_thread().ident))
    assert not s.query()
    assert mtia.default_stream(1).query()
    s.synchronize()
    assert len(seen) == 1 and seen[0] != threading.get_ident()  # ran on the stream's worker


def test_streams_run_concurrently_and_independently():
    slow, fast = mtia.Stream(), mtia.Stream()
    done = []
    emulator.sleep(BUSY_MS, stream=slow)
    emulator.launch(done.append, "slow", stream=slow)
    emulator.launch(done.append, "fast", stream=fast)
    fast.synchronize()  # does not wait for the other stream
    assert done == ["fast"]
    assert not slow.query()
    slow.synchronize()
    assert done == ["fast", "slow"]


def failing_kernel(message):
    raise ValueError(message)


def test_kernel_error_surfaces_at_the_stream_synchronize_and_the_stream_keeps_working():
    s = mtia.Stream()
    ran = []
    emulator.sleep(50, stream=s)
    emulator.launch(failing_kernel, "kernel boom", stream=s)
    emulator.launch(ran.append, "after", stream=s)  # later kernels still run
    with pytest.raises(KernelError) as info:
        s.synchronize()
    assert isinstance(info.value, RuntimeError)
    text = str(info.value)
    assert "ValueError: kernel boom" in text
    assert "failing_kernel" in text and "Kernel traceback" in text  # the kernel's traceback
    assert isinstance(info.value.__cause__, ValueError)
    assert ran == ["after"]
    s.synchronize()  # reported once
    emulator.launch(ran.append, "again", stream=s)
    s.synchronize()
    assert ran == ["after", "again"]
    assert s.query()


def test_kernel_error_surfaces_at_the_device_synchronize():
    s = mtia.Stream(device=1)
    emulator.launch(failing_kernel, "first", stream=s)
    emulator.launch(failing_kernel, "second", stream=mtia.default_stream(1))
    mtia.synchronize(0)  # another device: nothing to report
    with pytest.raises(KernelError, match=r"first|second") as info:
        mtia.synchronize(1)
    assert "1 more kernel error" in str(info.value)
    mtia.synchronize(1)
    s.synchronize()
    mtia.default_stream(1).synchronize()


def test_failed_kernel_does_not_keep_its_arguments_alive():
    s = mtia.Stream()
    before = mtia.memory_allocated(0)
    a = mtia.empty(MiB, "uint8", stream=s)
    emulator.launch(failing_kernel_with_array, a, stream=s)
    del a
    s.record_event().synchronize()  # the kernel ran; its error is not collected yet
    gc.collect()
    assert mtia.memory_allocated(0) == before
    with pytest.raises(KernelError, match="array kernel boom"):
        s.synchronize()


def failing_kernel_with_array(array):
    raise OSError("array kernel boom")


def test_launch_and_sleep_reject_bad_arguments():
    with pytest.raises(TypeError):
        emulator.launch("not callable")
    with pytest.raises(TypeError):
        emulator.launch(print, stream="stream")
    with pytest.raises(TypeError):
        emulator.sleep("10")
    with pytest.raises(ValueError):
        emulator.sleep(-1)
    with pytest.raises(RuntimeError):
        emulator.configure(device_count=3)  # only before init


def test_native_sleep_keeps_the_stream_busy_for_at_least_ms():
    s = mtia.Stream()
    start = time.perf_counter()
    emulator.sleep(BUSY_MS, stream=s)
    assert not s.query()
    s.synchronize()
    assert time.perf_counter() - start >= BUSY_MS / 1000 * 0.999


# ----------------------------------------------------------------------------- allocator with real streams

def test_record_stream(blocks):
    """PyTorch test_record_stream: a block allocated on a side stream and recorded on a busy main
    stream is not reused by the side stream until the main stream's work is done."""
    main = mtia.current_stream()
    stream = mtia.Stream()
    t = mtia.empty(4, "float32")  # the "pinned host" source
    t.numpy()[:] = [1, 2, 3, 4]
    result = mtia.empty(4, "float32")
    ptr = [None]

    def perform_copy():
        with mtia.stream(stream):
            tmp = blocks.alloc(t.nbytes)
            ptr[0] = tmp
            emulator.launch(lambda: np.copyto(_host(tmp, 4), t.numpy()))  # t.cuda(non_blocking=True)
        main.wait_stream(stream)
        mtia.record_stream(tmp, main)
        emulator.sleep(BUSY_MS, stream=main)  # delay the copy
        emulator.launch(lambda: np.copyto(result.numpy(), _host(tmp, 4)), stream=main)  # result.copy_(tmp)
        blocks.free(tmp)  # tmp goes out of scope

    perform_copy()
    with mtia.stream(stream):
        tmp2 = blocks.alloc(t.nbytes)
        emulator.launch(lambda: _host(tmp2, 4).fill(0))  # tmp2.zero_() on the side stream
        assert tmp2 != ptr[0], "allocation re-used too soon"

    main.synchronize()
    assert result.numpy().tolist() == [1, 2, 3, 4]

    # tmp's side-stream block is reused on the side stream once the main stream's copy finished.
    main.synchronize()
    with mtia.stream(stream):
        tmp3 = blocks.alloc(t.nbytes)
        assert tmp3 == ptr[0], "allocation not re-used"


def _host(ptr, n, dtype=np.float32):
    """A numpy view of n elements of raw device memory at ptr (emulation: host-addressable)."""
    import ctypes
    buf = (ctypes.c_char * (n * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype)


@pytest.mark.parametrize("how", ["block-pointer", "device-array"])
def test_record_stream_on_shifted_view(blocks, how):
    """PyTorch test_record_stream_on_shifted_view: record_stream on a view at a non-zero offset
    protects the whole block. The view is a pointer into the block; recording goes through the
    view's storage (the block containing it) or through the DeviceArray owning it."""
    stream_alloc = mtia.Stream()  # isolated: no other free blocks on this stream
    if how == "block-pointer":
        with mtia.stream(stream_alloc):
            base = blocks.alloc(10 * 10 * 4)
        view = base + 5 * 10 * 4  # base[5:]
    else:
        with mtia.stream(stream_alloc):
            base_array = mtia.empty((10, 10), "float32")
        base = base_array.data_ptr()
        view_array = base_array.numpy()[5:]
        view = view_array.ctypes.data
    assert view > base  # storage_offset() > 0

    stream_record = mtia.Stream()
    with mtia.stream(stream_record):
        emulator.sleep(BUSY_MS)

    storage = find_block(view)["address"]  # the view's storage
    assert storage == base
    if how == "block-pointer":
        mtia.record_stream(storage, stream_record)
    else:
        base_array.record_stream(stream_record)

    # Delete base and view to make the block free soon.
    data_ptr = base
    if how == "block-pointer":
        blocks.free(base)
    else:
        del base_array, view_array
    assert find_block(data_ptr)["state"] == "active_pending_free"

    # A new allocation must not get the block above.
    stream_alloc.synchronize()
    with mtia.stream(stream_alloc):
        try_realloc = blocks.alloc(10 * 10 * 4)
    assert try_realloc != data_ptr

    stream_record.synchronize()
    with mtia.stream(stream_alloc):
        assert blocks.alloc(10 * 10 * 4) == data_ptr  # free again once the recorded work is done


def test_caching_allocator_record_stream_oom(blocks):
    """PyTorch test_caching_allocator_record_stream_oom: allocations delayed by record_stream are
    still freed by the OOM retry, which synchronises their events. 40 x 1 GiB go through a 16 GiB
    device while every freed block waits for a busy side stream. The side stream is kept busy by
    a kernel that blocks until the allocator starts synchronising (deterministic on a loaded
    machine); without the retry's synchronisation the 17th request would fail."""
    mtia.empty_cache()
    device_total = mtia.memory.mem_get_info(0)[1]
    size = GiB
    iterations = 40
    assert iterations * size > 2 * device_total
    stream = mtia.Stream()
    before = mtia.memory_stats(0)
    gate = threading.Event()
    emulator.launch(gate.wait, 30.0, stream=stream)  # the side stream is busy until the gate opens

    def open_gate_when_the_allocator_synchronizes():
        while not gate.is_set():
            if mtia.memory_stats(0)["num_sync_all_streams"] > before["num_sync_all_streams"]:
                gate.set()
            time.sleep(0.001)

    watcher = threading.Thread(target=open_gate_when_the_allocator_synchronizes)
    watcher.start()
    try:
        with mtia.stream(stream):
            y = blocks.alloc(size)
        for _ in range(iterations):
            x = blocks.alloc(size)
            emulator.launch(lambda a, b: None, y, x, stream=stream)  # y += x on the side stream
            mtia.record_stream(x, stream)  # delays reuse of x until the side stream's work is done
            blocks.free(x)
    finally:
        gate.set()
        watcher.join()
        stream.synchronize()
    after = mtia.memory_stats(0)
    assert after["num_ooms"] == before["num_ooms"]
    assert after["num_alloc_retries"] > before["num_alloc_retries"]
    assert after["num_sync_all_streams"] > before["num_sync_all_streams"]
    assert after["reserved_bytes.all.peak"] <= device_total
    blocks.free_all()
    mtia.empty_cache()
    assert mtia.memory_reserved(0) == before["reserved_bytes.all.current"]


def test_record_stream_block_is_pending_until_the_stream_is_done_and_a_malloc_processes_it(blocks):
    """§4.1: record_stream + free leaves the block active_pending_free until the recorded
    stream's work completes and a later malloc processes the event."""
    alloc_stream, user = mtia.Stream(), mtia.Stream()
    ptr = blocks.alloc(3 * MiB, stream=alloc_stream)
    emulator.sleep(BUSY_MS, stream=user)
    mtia.record_stream(ptr, user)
    blocks.free(ptr)
    assert find_block(ptr)["state"] == "active_pending_free"
    other = blocks.alloc(3 * MiB, stream=alloc_stream)  # processes events; user is still busy
    assert other != ptr
    assert find_block(ptr)["state"] == "active_pending_free"
    user.synchronize()
    assert find_block(ptr)["state"] == "active_pending_free"  # nothing processed the event yet
    blocks.free(blocks.alloc(512))  # any malloc on the device processes completed events
    assert find_block(ptr)["state"] == "inactive"
    assert blocks.alloc(3 * MiB, stream=alloc_stream) == ptr


def test_mh16_pending_frees_wait_per_stream_and_for_every_recorded_stream(blocks):
    # §4.1 process_events, §6.16: per-stream FIFOs (slow does not block fast); two streams: wait for both
    slow, fast = mtia.Stream(), mtia.Stream()
    a, b, c, d = (blocks.alloc(4 * MiB) for _ in range(4))
    emulator.sleep(3 * BUSY_MS, stream=slow)
    emulator.sleep(10, stream=fast)
    mtia.record_stream(a, slow)
    mtia.record_stream(b, fast)
    mtia.record_stream(c, slow)
    mtia.record_stream(c, fast)
    mtia.record_stream(d, fast)
    mtia.record_stream(d, slow)
    for ptr in (a, b, c, d):  # a's event is queued first
        blocks.free(ptr)
    fast.synchronize()
    blocks.free(blocks.alloc(512))  # processes the completed events
    assert [find_block(p)["state"] for p in (a, b, c, d)] == [
        "active_pending_free", "inactive", "active_pending_free", "active_pending_free"]
    slow.synchronize()
    blocks.free(blocks.alloc(512))
    assert [find_block(p)["state"] for p in (a, b, c, d)] == ["inactive"] * 4


def test_record_stream_on_the_allocation_stream_or_null_is_a_no_op(blocks):
    s = mtia.Stream()
    ptr = blocks.alloc(KiB, stream=s)
    emulator.sleep(BUSY_MS, stream=s)
    mtia.record_stream(ptr, s)
    mtia.record_stream(0, s)
    blocks.free(ptr)
    assert find_block(ptr)["state"] == "inactive"
    s.synchronize()


def test_record_stream_rejects_bad_arguments(blocks):
    ptr = blocks.alloc(KiB)
    with pytest.raises(TypeError):
        mtia.record_stream(ptr, "stream")
    with pytest.raises(ValueError, match="device"):
        mtia.record_stream(ptr, mtia.Stream(device=1))  # a stream of another device
    with pytest.raises(RuntimeError, match="invalid device pointer"):
        mtia.record_stream(12345, mtia.current_stream())


@pytest.mark.parametrize("size", [4 * KiB, 8 * MiB], ids=["small", "large"])
def test_block_freed_on_one_stream_is_never_reused_on_another(blocks, size):
    a, b = mtia.Stream(), mtia.Stream()
    ptr = blocks.alloc(size, stream=a)
    blocks.free(ptr)
    assert find_block(ptr)["state"] == "inactive"  # cached
    on_b = [blocks.alloc(size, stream=b) for _ in range(3)]
    assert ptr not in on_b
    assert blocks.alloc(size, stream=a) == ptr


# ----------------------------------------------------------------------------- RNG (must-have 35)

def test_rng_state_round_trip_per_device():
    state0 = mtia.get_rng_state()
    assert isinstance(state0, np.ndarray) and state0.dtype == np.uint8 and state0.ndim == 1
    first = mtia.rng.generator(0).random(5)
    mtia.set_rng_state(state0)
    assert np.array_equal(mtia.rng.generator(0).random(5), first)

    state1 = mtia.get_rng_state("mtia:1")
    draws1 = mtia.rng.generator(1).integers(0, 1 << 30, size=7)
    mtia.rng.generator(0).random(3)  # devices are independent
    mtia.set_rng_state(state1, device=1)
    assert np.array_equal(mtia.rng.generator(1).integers(0, 1 << 30, size=7), draws1)
    assert np.array_equal(mtia.get_rng_state(TorchDevice("mtia:1")), mtia.get_rng_state(1))


def test_rng_state_is_data_and_is_validated():
    state = mtia.get_rng_state(0)
    with pytest.raises(ValueError):
        mtia.set_rng_state(state[:-1])
    with pytest.raises(TypeError):
        mtia.set_rng_state(state.astype(np.int64))
    with pytest.raises(TypeError):
        mtia.set_rng_state(b"\x80\x04not-a-state")
    assert np.array_equal(mtia.get_rng_state(0), state)  # unchanged by the failed calls


def test_manual_seed_seed_and_initial_seed():
    mtia.set_device(1)
    mtia.manual_seed(1234)
    assert mtia.initial_seed() == 1234
    a = mtia.rng.generator(1).random(4)
    mtia.manual_seed(1234)
    assert np.array_equal(mtia.rng.generator(1).random(4), a)
    mtia.manual_seed_all(99)
    assert mtia.initial_seed() == 99
    mtia.set_device(0)
    assert mtia.initial_seed() == 99
    assert np.array_equal(mtia.rng.generator(0).random(4), mtia.rng.generator(1).random(4))
    mtia.seed()
    first = mtia.initial_seed()
    mtia.seed_all()
    assert mtia.initial_seed() != first or mtia.initial_seed() != 99
    with pytest.raises(TypeError):
        mtia.manual_seed("7")


def test_rng_functions_take_the_api_md_keywords():
    # API.md: manual_seed(seed), manual_seed_all(seed), set_rng_state(state, device); torch.mtia's
    # new_state= keyword works too
    mtia.manual_seed(seed=5)
    assert mtia.initial_seed() == 5
    mtia.manual_seed_all(seed=6)
    assert mtia.initial_seed() == 6
    state = mtia.get_rng_state(device=0)
    draws = mtia.rng.generator(0).random(3)
    mtia.set_rng_state(state=state, device=0)
    assert np.array_equal(mtia.rng.generator(0).random(3), draws)
    mtia.set_rng_state(new_state=state, device="mtia:0")
    assert np.array_equal(mtia.rng.generator(0).random(3), draws)
    with pytest.raises(TypeError, match="got the state twice"):
        mtia.set_rng_state(state, new_state=state)
    with pytest.raises(TypeError, match="RNG state must be a uint8 array"):
        mtia.set_rng_state(None)


# ----------------------------------------------------------------------------- lazy init (must-have 32)

def _run_fresh(code):
    """Runs code in a fresh interpreter (mtia_alloc not initialised yet); returns stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_lazy_init_is_deferred_idempotent_and_thread_safe():
    mtia.manual_seed_all(4321)
    state = mtia.get_rng_state(1)
    expected = mtia.rng.generator(1).random(3)
    out = _run_fresh(f"""
        import os, threading
        import numpy as np
        import mtia_alloc as mtia
        from mtia_alloc import _lazy_init as _state

        assert not mtia.is_initialized()
        # The memory functions do not initialise.
        assert mtia.memory_stats() == {{}}
        assert mtia.memory_allocated() == 0 and mtia.max_memory_allocated() == 0
        mtia.reset_peak_memory_stats()
        mtia.record_memory_history("all")
        mtia.empty_cache()
        assert not mtia.is_initialized()

        ran = []
        _state.lazy_call(lambda: ran.append("first"))
        _state.lazy_call(lambda: ran.append(mtia.device_count()))  # re-enters init: no deadlock
        mtia.manual_seed(1234)
        state = np.frombuffer(bytes.fromhex("{state.tobytes().hex()}"), dtype=np.uint8).copy()
        mtia.set_rng_state(state, "mtia:1")
        state[:] = 0  # the queued call kept a copy
        assert ran == [] and not mtia.is_initialized()

        barrier = threading.Barrier(8)
        errors = []
        def init():
            try:
                barrier.wait()
                mtia.init()
                assert mtia.is_initialized()
            except BaseException as e:
                errors.append(e)
        threads = [threading.Thread(target=init) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors
        assert ran == ["first", 2], ran  # every queued call ran exactly once
        mtia.init()
        assert ran == ["first", 2]
        assert mtia.initial_seed() == 1234
        draws = mtia.rng.generator(1).random(3)
        assert np.array_equal(draws, np.array({expected.tolist()!r})), draws
        _state.lazy_call(lambda: ran.append("now"))  # after init: runs at once
        assert ran[-1] == "now"
        assert "dram" in mtia.memory_stats()

        # A forked child of an initialised process is not initialised and cannot re-init.
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if mtia.is_initialized():
                    code = 3
                try:
                    _state.lazy_init()
                    code = 4
                except RuntimeError as e:
                    if "Cannot re-initialize MTIA in forked subprocess" not in str(e):
                        code = 5
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)
        assert mtia.is_initialized()
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_stream_functions_trigger_lazy_init():
    out = _run_fresh("""
        import mtia_alloc as mtia
        assert not mtia.is_initialized()
        s = mtia.current_stream()
        assert mtia.is_initialized() and s.stream_id == 0
        print("ok")
    """)
    assert out.strip() == "ok"


def test_failing_deferred_call_raises_DeferredMtiaCallError():
    out = _run_fresh("""
        import mtia_alloc as mtia
        from mtia_alloc import _lazy_init as _state

        ran = []
        def failing_call():
            raise ValueError("deferred boom")
        def queue_failing_call():
            _state.lazy_call(failing_call)
        _state.lazy_call(lambda: ran.append(1))
        queue_failing_call()
        try:
            mtia.init()
        except mtia.DeferredMtiaCallError as e:
            text = str(e)
            assert not isinstance(e, RuntimeError)
            assert "deferred boom" in text, text
            assert "queue_failing_call" in text, text  # the traceback of the queueing site
            assert isinstance(e.__cause__, ValueError)
            assert ran == [1]
            print("ok")
        else:
            raise AssertionError("no DeferredMtiaCallError")
    """)
    assert out.strip() == "ok"


def test_empty_cache_waits_for_the_streams_that_own_the_memory_it_gives_back():
    # As cudaFree synchronizes the device: a block freed in stream order may still be used
    # by a kernel queued before the free, so its segment goes back to the device only once
    # that stream is idle.
    s = mtia.Stream()
    done = []
    for size in (1 << 20, 30 << 20):                     # a small-pool and a large-pool segment
        p = mtia.caching_allocator_alloc(size, stream=s)
        emulator.sleep(BUSY_MS, stream=s)                # "the kernel using p"
        emulator.launch(done.append, size, stream=s)
        mtia.caching_allocator_delete(p)                 # legal: later work on s is ordered after it
        mtia.empty_cache()
        assert done[-1:] == [size]                       # the kernel finished before the release
        assert mtia.memory_reserved() == 0


@pytest.mark.parametrize("conf, size, same_stream", [
    ("max_split_size_mb:100", 125 * MiB, True),            # oversize release, step 4d
    ("garbage_collection_threshold:0.5", 140 * MiB, False),  # garbage collection, step 4a
    ("", 140 * MiB, False),                                 # the full flush, step 4e
])
def test_the_malloc_ladder_releases_a_segment_only_once_its_stream_is_idle(conf, size, same_stream):
    # The oversize release (§4.5), the garbage collector (§4.4) and the flush give segments
    # back to the device like empty_cache: after the owning stream's queued kernels have run.
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    s = mtia.Stream()
    mtia.memory._set_allocator_settings(conf)
    mtia.set_per_process_memory_fraction(280 * MiB / total, 0)
    done = []
    keep = mtia.caching_allocator_alloc(5 * MiB)        # a 20 MiB segment that stays
    p = mtia.caching_allocator_alloc(150 * MiB, stream=s)
    emulator.sleep(BUSY_MS, stream=s)                    # "the kernel using p"
    emulator.launch(done.append, 1, stream=s)
    mtia.caching_allocator_delete(p)                     # cached, in stream order
    before = mtia.memory_stats(0)["num_device_free"]
    q = mtia.caching_allocator_alloc(size, stream=s if same_stream else None)  # p's segment must go
    try:
        assert mtia.memory_stats(0)["num_device_free"] == before + 1
        assert done == [1]                               # ... but only after the kernel ran
    finally:
        mtia.caching_allocator_delete(q)
        mtia.caching_allocator_delete(keep)
