"""The allocator with several streams: record_stream defers a free until the recorded
streams' work is done (per-stream event queues, the allocation stream and null ignored, views
protecting their whole block, the OOM retry synchronising pending frees), blocks cached for
one stream never serve another, and segments go back to the device (empty_cache, garbage
collection, oversize release, flush) only once the streams that used them are idle
(allocator_core.md §15.12-13, pools_graphs_streams_api.md §4.1 and §6.16; PyTorch's
test_record_stream, test_record_stream_on_shifted_view and
test_caching_allocator_record_stream_oom).

"Busy" streams sleep BUSY_MS or SLOW_BUSY_MS: generous, and no test asserts a tight upper
bound on time. Tests measure deltas of memory_stats() and free what they allocate.
"""
import threading
import time

import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
import mtia_alloc.memory
from helpers import (BUSY_MS, DEVICES, SLOW_BUSY_MS, GiB, KiB, MiB, assert_all_is_small_plus_large, block_of,
                     delta, stats, view)


# ----------------------------------------------------------------------------- deferred frees

@pytest.mark.parametrize("device, reclaim", [(0, "malloc"), (DEVICES[-1], "empty_cache")],
                         ids=["dev0-reclaimed-by-malloc", "devlast-reclaimed-by-empty_cache"])
def test_record_stream_defers_the_free_until_the_event_completes(
        blocks, side_streams, device, reclaim):
    """Spec must-have 12 (allocator_core.md §15.12)."""
    side = side_streams[device]
    mtia.empty_cache()
    size = 4 * MiB
    ptr = blocks.alloc(size, device)  # on the default stream
    mtia.emulator.sleep(SLOW_BUSY_MS, stream=side)  # the side stream is busy...
    mtia.record_stream(ptr, side)  # ...and uses the block
    before = stats(device)
    blocks.free(ptr)
    d = delta(before, stats(device))
    assert d["allocation.all.current"] == -1
    assert d["allocated_bytes.all.current"] == -size
    assert d["active.all.current"] == 0
    assert d["active_bytes.all.current"] == 0
    assert d["requested_bytes.all.current"] == 0
    assert block_of(ptr)["state"] == "active_pending_free"

    # While the side stream is busy, the allocation stream must not get the block back.
    other = blocks.alloc(size, device)
    assert other != ptr
    assert block_of(ptr)["state"] == "active_pending_free"
    blocks.free(other)

    side.synchronize()
    if reclaim == "malloc":
        blocks.free(blocks.alloc(512, device))  # a malloc processes the completed event
    else:
        mtia.empty_cache()
    d = delta(before, stats(device))
    assert d["active.all.current"] == -1
    assert d["active_bytes.all.current"] == -size
    assert d["requested_bytes.all.current"] == -size
    if reclaim == "malloc":
        assert block_of(ptr)["state"] == "inactive"
        assert blocks.alloc(size, device) == ptr
    else:
        assert d["reserved_bytes.all.current"] == -20 * MiB


def test_active_stats_count_pending_frees_in_peaks_and_accumulated_counts(blocks, side_streams):
    """active = allocated + frees waiting for events: its peak can exceed allocated's, and
    its freed count grows when the wait ends, not when the user frees.

    Spec must-have 12 (allocator_core.md §15.12)."""
    side = side_streams[0]
    mtia.empty_cache()
    size = 4 * MiB
    first = blocks.alloc(size)
    mtia.emulator.sleep(SLOW_BUSY_MS, stream=side)
    mtia.record_stream(first, side)
    blocks.free(first)  # pending: still active
    mtia.reset_peak_memory_stats()
    mtia.reset_accumulated_memory_stats()
    second = blocks.alloc(size)
    s = stats()
    assert s["active_bytes.all.current"] == s["active_bytes.all.peak"] == 2 * size
    assert s["active_bytes.large_pool.peak"] == 2 * size
    assert s["active.all.peak"] == s["active.large_pool.peak"] == 2
    assert s["allocated_bytes.all.peak"] == size
    assert s["active.all.allocated"] == s["allocation.all.allocated"] == 1
    blocks.free(second)
    side.synchronize()
    blocks.free(blocks.alloc(512))  # processes the completed event
    s = stats()
    assert s["active_bytes.large_pool.current"] == 0
    assert s["active_bytes.all.peak"] == 2 * size  # the peak outlives the pending free
    assert s["active.large_pool.freed"] == 2  # the pending one and the second
    assert s["allocation.large_pool.freed"] == 1
    assert_all_is_small_plus_large(s)


def test_record_stream_block_is_pending_until_the_stream_is_done_and_a_malloc_processes_it(blocks):
    """§4.1: record_stream + free leaves the block active_pending_free until the recorded
    stream's work completes and a later malloc processes the event."""
    alloc_stream, user = mtia.Stream(), mtia.Stream()
    ptr = blocks.alloc(3 * MiB, stream=alloc_stream)
    emulator.sleep(BUSY_MS, stream=user)
    mtia.record_stream(ptr, user)
    blocks.free(ptr)
    assert block_of(ptr)["state"] == "active_pending_free"
    other = blocks.alloc(3 * MiB, stream=alloc_stream)  # processes events; user is still busy
    assert other != ptr
    assert block_of(ptr)["state"] == "active_pending_free"
    user.synchronize()
    assert block_of(ptr)["state"] == "active_pending_free"  # nothing processed the event yet
    blocks.free(blocks.alloc(512))  # any malloc on the device processes completed events
    assert block_of(ptr)["state"] == "inactive"
    assert blocks.alloc(3 * MiB, stream=alloc_stream) == ptr


def test_pending_frees_wait_per_stream_and_for_every_recorded_stream(blocks):
    """Spec must-have 16 (pools_graphs_streams_api.md §6.16)."""
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
    assert [block_of(p)["state"] for p in (a, b, c, d)] == [
        "active_pending_free", "inactive", "active_pending_free", "active_pending_free"]
    slow.synchronize()
    blocks.free(blocks.alloc(512))
    assert [block_of(p)["state"] for p in (a, b, c, d)] == ["inactive"] * 4


def test_record_stream_on_the_allocation_stream_is_ignored(blocks):
    """Spec must-have 13 (allocator_core.md §15.13)."""
    mtia.empty_cache()
    own = mtia.current_stream(0)
    ptr = blocks.alloc(4 * MiB)
    # Keep the allocation stream busy: an event recorded on it would not complete yet.
    mtia.emulator.sleep(SLOW_BUSY_MS, stream=own)
    try:
        mtia.record_stream(ptr, own)
        before = stats()
        blocks.free(ptr)
        d = delta(before, stats())
        assert d["allocation.all.current"] == -1
        assert d["active.all.current"] == -1  # freed at once
        assert d["active_bytes.all.current"] == -4 * MiB
        assert block_of(ptr)["state"] == "inactive"
        assert blocks.alloc(4 * MiB) == ptr
    finally:
        own.synchronize()


def test_record_stream_on_the_allocation_stream_or_null_is_a_no_op(blocks):
    s = mtia.Stream()
    ptr = blocks.alloc(KiB, stream=s)
    emulator.sleep(BUSY_MS, stream=s)
    mtia.record_stream(ptr, s)
    mtia.record_stream(0, s)
    blocks.free(ptr)
    assert block_of(ptr)["state"] == "inactive"
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
    assert block_of(ptr)["state"] == "inactive"  # cached
    on_b = [blocks.alloc(size, stream=b) for _ in range(3)]
    assert ptr not in on_b
    assert blocks.alloc(size, stream=a) == ptr


# ----------------------------------------------------------------------------- PyTorch's record_stream tests

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
            emulator.launch(lambda: np.copyto(view(tmp, 4), t.numpy()))  # t.cuda(non_blocking=True)
        main.wait_stream(stream)
        mtia.record_stream(tmp, main)
        emulator.sleep(BUSY_MS, stream=main)  # delay the copy
        emulator.launch(lambda: np.copyto(result.numpy(), view(tmp, 4)), stream=main)  # result.copy_(tmp)
        blocks.free(tmp)  # tmp goes out of scope

    perform_copy()
    with mtia.stream(stream):
        tmp2 = blocks.alloc(t.nbytes)
        emulator.launch(lambda: view(tmp2, 4).fill(0))  # tmp2.zero_() on the side stream
        assert tmp2 != ptr[0], "allocation re-used too soon"

    main.synchronize()
    assert result.numpy().tolist() == [1, 2, 3, 4]

    # tmp's side-stream block is reused on the side stream once the main stream's copy finished.
    main.synchronize()
    with mtia.stream(stream):
        tmp3 = blocks.alloc(t.nbytes)
        assert tmp3 == ptr[0], "allocation not re-used"


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

    storage = block_of(view)["address"]  # the view's storage
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
    assert block_of(data_ptr)["state"] == "active_pending_free"

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


# ----------------------------------------------------------------------------- releases wait for idle streams

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
