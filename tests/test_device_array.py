"""DeviceArray and the native kernels on it (API.md §3-§4, issue 3 items 1 and 5):
attributes, the zero-copy numpy view, DLPack, repr, argument checking, the block going back
to the cache with the last reference, copy_/fill_, and kernels keeping the arrays they use
alive until they have run."""
import gc
import threading
import weakref

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
import mtia_alloc.memory
from helpers import BUSY_MS, KiB, MiB, TorchDevice, block_state, run_code, view


# ----------------------------------------------------------------------------- attributes

@pytest.mark.parametrize("shape, dtype, nbytes", [
    ((4, 3), "float32", 48), (10, "int8", 10), ((2, 3, 4), np.float64, 192), ((), "int64", 8),
    ([5], np.dtype("uint16"), 10), ((0, 7), "float32", 0), (np.int64(6), "complex64", 48),
])
def test_attributes(shape, dtype, nbytes):
    a = mtia.empty(shape, dtype)
    expected_shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    assert a.shape == expected_shape
    assert a.dtype == np.dtype(dtype)
    assert a.nbytes == nbytes
    assert (a.data_ptr() != 0) == (nbytes > 0)
    assert a.device.type == "mtia" and a.device.index == 0
    assert a.stream == mtia.current_stream(0)
    view = a.numpy()
    assert view.shape == a.shape and view.dtype == a.dtype
    if nbytes:
        assert view.ctypes.data == a.data_ptr()


def test_default_dtype_is_float32():
    assert mtia.empty(3).dtype == np.float32
    assert mtia.empty(3, dtype=None).dtype == np.float32


@pytest.mark.parametrize("kwargs", [
    dict(device=1), dict(device="mtia:1"), dict(device=TorchDevice("mtia:1")), dict(stream="side"),
    dict(stream="side", device=1), dict(current=1),
])
def test_device_and_stream_arguments(kwargs):
    side = mtia.Stream(device=1)
    if kwargs.get("stream") == "side":
        kwargs["stream"] = side
    if "current" in kwargs:
        mtia.set_stream(side)  # current device 1, current stream side
        del kwargs["current"]
    a = mtia.empty((16,), "int32", **kwargs)
    assert a.device.index == 1
    expected = side if "stream" in kwargs or mtia.current_device() == 1 else mtia.current_stream(1)
    assert a.stream == expected
    assert mtia.memory.check_invariants(1) is None
    seg = [s for s in mtia.memory_snapshot() if s["device"] == 1 and
           s["address"] <= a.data_ptr() < s["address"] + s["total_size"]]
    assert seg and seg[0]["stream"] == expected.stream_id


def test_bad_arguments():
    for dtype in ("not_a_dtype", object, "O", "V0"):
        with pytest.raises(TypeError):
            mtia.empty(4, dtype)
    for shape in (2.5, "abc", True, (2, 1.5), (2, None), object()):
        with pytest.raises(TypeError):
            mtia.empty(shape)
    for shape in (-1, (3, -2)):
        with pytest.raises(ValueError):
            mtia.empty(shape)
    with pytest.raises(ValueError):
        mtia.empty(4, device=7)
    with pytest.raises(ValueError):
        mtia.empty(4, device=0, stream=mtia.Stream(device=1))
    with pytest.raises(TypeError):
        mtia.empty(4, stream="stream")
    with pytest.raises(mtia.OutOfMemoryError):
        mtia.empty(1 << 40, "float32")  # 4 TiB on a 16 GiB device
    mtia.memory.check_invariants()


def test_repr_and_len():
    a = mtia.empty((4, 3), "int16", device=1)
    text = repr(a)
    assert text.startswith("DeviceArray(")
    for part in ("shape=(4, 3)", "dtype=int16", "device='mtia:1'", "nbytes=24", f"{a.data_ptr():#x}"):
        assert part in text
    assert len(a) == 4
    with pytest.raises(TypeError):
        len(mtia.empty(()))


# ----------------------------------------------------------------------------- host views, DLPack, lifetime

def test_numpy_is_a_zero_copy_view_and_writes_are_seen_by_kernels():
    a = mtia.empty((8, 4), "float32")
    b = mtia.empty((8, 4), "float32")
    view = a.numpy()
    view[:] = np.arange(32, dtype=np.float32).reshape(8, 4)
    assert a.numpy()[3, 2] == 14  # a second view sees the write
    emulator.copy_(b, a)
    mtia.synchronize()
    assert np.array_equal(b.numpy(), view)
    emulator.fill_(a, -2.5)  # a kernel's write is seen through the earlier view
    mtia.current_stream().synchronize()
    assert (view == -2.5).all()


def test_numpy_view_keeps_the_array_alive():
    before = mtia.memory_allocated(0)
    a = mtia.empty(MiB // 4, "float32")
    ptr = a.data_ptr()
    assert mtia.memory_allocated(0) == before + MiB
    view = a.numpy()[10:]
    view[:] = 7
    del a
    gc.collect()
    assert mtia.memory_allocated(0) == before + MiB  # the view still uses the block
    assert block_state(ptr) == "active_allocated"
    assert (view == 7).all()
    del view
    gc.collect()
    assert mtia.memory_allocated(0) == before
    assert block_state(ptr) == "inactive"


def test_block_returns_to_the_cache_when_the_last_reference_dies():
    s = mtia.Stream()
    before = mtia.memory_allocated(0)
    a = mtia.empty((256, 1024), "float32", stream=s)  # 1 MiB
    ptr = a.data_ptr()
    ref = weakref.ref(a)
    other = a
    assert mtia.memory_allocated(0) == before + MiB
    del a
    assert mtia.memory_allocated(0) == before + MiB
    del other
    assert ref() is None
    assert mtia.memory_allocated(0) == before
    assert block_state(ptr) == "inactive"  # cached, not released
    b = mtia.empty(MiB, "uint8", stream=s)
    assert b.data_ptr() == ptr  # and reused on its stream


def test_dlpack_numpy():
    a = mtia.empty((3, 5), "int32")
    emulator.sleep(BUSY_MS, stream=a.stream)
    emulator.fill_(a, 42)  # queued behind the sleep: __dlpack__ waits for the array's stream
    assert a.__dlpack_device__() == (1, 0)  # kDLCPU: emulated memory is host-addressable
    x = np.from_dlpack(a)
    assert x.shape == (3, 5) and x.dtype == np.int32
    assert (x == 42).all()
    assert x.ctypes.data == a.data_ptr()  # zero-copy
    x[1, 1] = -1
    assert a.numpy()[1, 1] == -1
    ptr = a.data_ptr()
    before = mtia.memory_allocated(0)
    del a
    gc.collect()
    assert mtia.memory_allocated(0) == before  # the DLPack consumer keeps the block alive
    assert (x[0] == 42).all()
    del x
    gc.collect()
    assert block_state(ptr) == "inactive"


def test_dlpack_torch():
    torch = pytest.importorskip("torch")
    a = mtia.empty((2, 3), "float32", device=1)
    emulator.fill_(a, 1.5, stream=a.stream)
    t = torch.from_dlpack(a)
    assert t.shape == (2, 3) and t.dtype == torch.float32
    assert bool((t == 1.5).all())
    assert t.data_ptr() == a.data_ptr()
    t[0, 0] = 3.0
    assert a.numpy()[0, 0] == 3.0
    # torch.device objects work as device arguments.
    b = mtia.empty(4, device=torch.device("mtia:1"))
    assert b.device.index == 1
    assert mtia.current_stream(torch.device("mtia:0")).device_type == int(torch._C._autograd.DeviceType.MTIA)


# ----------------------------------------------------------------------------- copy_ / fill_

@pytest.mark.parametrize("dtype, value", [
    ("float32", 3.25), ("float64", -1e300), ("int8", -1), ("uint8", 255), ("int16", 12345),
    ("int64", -(1 << 40)), ("bool", True), ("complex64", 1 + 2j),
])
def test_fill_(dtype, value):
    s = mtia.Stream()
    a = mtia.empty((7, 13), dtype, stream=s)
    emulator.fill_(a, value, stream=s)
    s.synchronize()
    assert (a.numpy() == np.array(value, dtype=dtype)).all()


def test_structured_dtype_view_and_fill():
    dt = np.dtype([("x", "f4"), ("y", "i4")])
    a = mtia.empty(3, dt)
    emulator.fill_(a, (1.5, 7))
    mtia.synchronize()
    view = a.numpy()
    assert view.dtype == dt
    assert view["x"].tolist() == [1.5] * 3 and view["y"].tolist() == [7] * 3


def test_copy_between_streams_and_devices():
    s0, s1 = mtia.Stream(device=0), mtia.Stream(device=1)
    src = mtia.empty(1000, "int32", stream=s0)
    dst = mtia.empty(1000, "int32", stream=s1)
    src.numpy()[:] = np.arange(1000)
    emulator.sleep(BUSY_MS, stream=s0)
    emulator.fill_(src, 5, stream=s0)  # after the sleep
    s1.wait_stream(s0)
    emulator.copy_(dst, src, stream=s1)  # ordered after the fill
    s1.synchronize()
    assert (dst.numpy() == 5).all()
    # Same byte count, other dtype: a byte copy.
    raw = mtia.empty(4000, "uint8", device=1)
    emulator.sleep(BUSY_MS, stream=mtia.default_stream(1))
    emulator.copy_(raw, dst)  # no stream: the current stream of dst's device, not device 0's
    assert mtia.current_device() == 0 and mtia.default_stream(0).query()
    mtia.synchronize(1)
    assert np.array_equal(raw.numpy().view(np.int32), dst.numpy())


def test_copy_and_fill_reject_bad_arguments():
    a, b = mtia.empty(4, "float32"), mtia.empty(5, "float32")
    with pytest.raises(ValueError):
        emulator.copy_(a, b)
    with pytest.raises(TypeError):
        emulator.copy_(a, a.numpy())
    with pytest.raises(TypeError):
        emulator.fill_(a.numpy(), 1)
    with pytest.raises(TypeError):
        emulator.fill_(mtia.empty(3, "int32"), "seven")
    with pytest.raises(TypeError):
        emulator.fill_(a, 1, stream=0)


def test_zero_size_kernels():
    a, b = mtia.empty(0, "int32"), mtia.empty((0, 3), "int32")
    emulator.fill_(a, 1)
    emulator.copy_(a, b)
    mtia.synchronize()


# ----------------------------------------------------------------------------- lifetime under pending kernels

@pytest.mark.parametrize("kernel", ["fill_", "copy_", "launch"])
def test_array_used_by_a_pending_kernel_stays_alive_until_the_kernel_ran(kernel):
    s = mtia.Stream()
    size = 64 * KiB
    before = mtia.memory_allocated(0)
    # The stream is busy until the test opens the gate (a sleep could run out on a loaded
    # machine before the checks below, which need the kernels to be still pending).
    gate = threading.Event()
    emulator.launch(gate.wait, 30.0, stream=s)
    try:
        _pending_kernel_checks(s, size, kernel, gate)
    finally:
        gate.set()
        s.synchronize()
    assert mtia.memory_allocated(0) == before
    mtia.memory.check_invariants()


def _pending_kernel_checks(s, size, kernel, gate):
    a = mtia.empty(size // 4, "int32", stream=s)
    ptr = a.data_ptr()
    if kernel == "fill_":
        emulator.fill_(a, 9, stream=s)
    elif kernel == "copy_":
        src = mtia.empty(size // 4, "int32", stream=s)
        src.numpy()[:] = 9
        emulator.copy_(a, src, stream=s)
        del src
    else:
        emulator.launch(lambda arr: arr.numpy().fill(9), a, stream=s)
    seen = []  # what the block holds right after the kernel (read through the raw address)
    emulator.launch(lambda: seen.append(bool((view(ptr, size // 4, "int32") == 9).all())), stream=s)
    ref = weakref.ref(a)
    del a  # right after launching: the kernel holds the array
    assert ref() is not None
    assert not s.query()
    assert block_state(ptr) == "active_allocated"
    # The memory is not handed out while the kernel is pending.
    b = mtia.empty(size // 4, "int32", stream=s)
    assert b.data_ptr() != ptr
    gate.set()
    s.synchronize()
    assert seen == [True]  # the kernel wrote the block, nobody else did
    assert ref() is None
    assert block_state(ptr) == "inactive"
    c = mtia.empty(size // 4, "int32", stream=s)
    assert c.data_ptr() == ptr  # free again once the kernel ran


def test_record_stream_on_a_device_array():
    alloc_stream, user = mtia.Stream(), mtia.Stream()
    a = mtia.empty(4096, "uint8", stream=alloc_stream)
    ptr = a.data_ptr()
    emulator.sleep(BUSY_MS, stream=user)
    a.record_stream(user)
    mtia.empty(0).record_stream(user)  # a null array: no-op
    del a
    assert block_state(ptr) == "active_pending_free"
    b = mtia.empty(4096, "uint8", stream=alloc_stream)
    assert b.data_ptr() != ptr
    user.synchronize()
    c = mtia.empty(4096, "uint8", stream=alloc_stream)  # processes the completed event...
    assert c.data_ptr() == ptr  # ...and gets the block back
    del b, c


def test_array_freed_by_a_kernel_or_at_module_level_with_memory_history_on():
    proc = run_code("""
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        mtia.record_memory_history("all", context="all", stacks="python")
        s = mtia.Stream()
        emulator.sleep(50, stream=s)
        a = mtia.empty(1024, stream=s)   # module level: a shallow stack
        emulator.fill_(a, 1, stream=s)
        del a                            # freed by the stream worker after the fill
        s.synchronize()
        b = mtia.empty(1024)
        del b                            # freed at module level
        assert mtia.memory_allocated(0) == 0, mtia.memory_allocated(0)
        print("ok")
    """)
    assert proc.returncode == 0 and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


def test_copy_gives_a_new_block_with_the_data_and_pickle_is_refused():
    # A copy sharing the block would free it twice (and hand it to a third array meanwhile).
    import copy
    import pickle
    s = mtia.Stream()
    a = mtia.empty((4, 256), "uint8", stream=s)
    emulator.fill_(a, 7, stream=s)
    b, (c, c_again) = copy.copy(a), copy.deepcopy([a, a])
    assert c is c_again  # deepcopy's memo
    s.synchronize()
    for x in (b, c):
        assert x.data_ptr() not in (0, a.data_ptr())
        assert (x.shape, x.dtype, x.stream) == (a.shape, a.dtype, s)
        assert x.numpy().sum() == 7 * 1024
    allocated = mtia.memory_allocated()
    del a, b, c, c_again, x  # three blocks, each freed once
    assert mtia.memory_allocated() == allocated - 3 * 1024
    assert copy.copy(mtia.empty(0)).shape == (0,)
    with pytest.raises(TypeError, match="cannot pickle a DeviceArray"):
        pickle.dumps(mtia.empty(16))
    mtia.memory.check_invariants()


def test_the_fields_native_kernels_trust_are_read_only():
    a = mtia.empty(4, "uint8")
    for name, value in [("nbytes", 64 << 20), ("shape", (64 << 20,)), ("_ptr", 8), ("dtype", np.dtype("f8")),
                        ("_device", 1), ("_stream_id", 3)]:
        with pytest.raises(AttributeError, match="not writable"):
            setattr(a, name, value)
    assert (a.nbytes, a.shape) == (4, (4,))


def test_dtype_none_means_float32():
    a = mtia.empty(4, dtype=None)
    assert a.dtype == np.float32 and a.nbytes == 16
    del a
