"""Running out of memory: the per-process memory fraction, the malloc ladder's flush and
retry, garbage collection of cached blocks, the OOM message word for word, and OOM observers
(called once each, without the allocator lock; one that raises) (allocator_core.md
§15.17-18, §4.1, §4.4, §4.6; PyTorch's test_out_of_memory, test_out_of_memory_retry,
test_set_per_process_memory_fraction and test_notifies_oom).

Tests measure deltas of memory_stats() and free what they allocate (conftest.py).
"""
import threading

import pytest

import mtia_alloc as mtia
import mtia_alloc._C as _C
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import (DEVICES, OOM_COUNTERS, SLOW_BUSY_MS, GiB, MiB, Boom, delta, fmt, state_unchanged,
                     stats)


# ----------------------------------------------------------------------------- OOM observers

# OOM observers cannot be detached, so one module-level observer is attached once and records
# its calls into a list the `oom_calls` fixture clears for each test.
_OOM_CALLS = []
_observer_attached = False


def _record_oom(device, alloc_size, allowed_or_total, device_free):
    # Reading the stats here also shows the allocator lock is not held while observers run,
    # and that num_ooms was counted before the observers were called (§4.6 steps 4 and 6).
    num_ooms = mtia.memory_stats(device)["num_ooms"]
    _OOM_CALLS.append(dict(device=device, alloc_size=alloc_size,
                           allowed_or_total=allowed_or_total, device_free=device_free,
                           num_ooms=num_ooms))


# Two more observers for the "once each, without the lock" test: attached once like the one
# above, and inert (no call recorded, no thread started) unless the `two_observers` fixture arms them.
_TWO_OBSERVERS = {"armed": False, "first": [], "second": [], "other_thread": []}


def _first_observer(*args):
    if not _TWO_OBSERVERS["armed"]:
        return
    _TWO_OBSERVERS["first"].append(args)

    def allocate_on_the_same_device():  # blocks on the device lock if the caller still holds it
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4096, args[0]))

    t = threading.Thread(target=allocate_on_the_same_device, daemon=True)
    t.start()
    t.join(timeout=5)
    _TWO_OBSERVERS["other_thread"].append("blocked" if t.is_alive() else "finished")


def _second_observer(*args):
    if _TWO_OBSERVERS["armed"]:
        _TWO_OBSERVERS["second"].append(args)


@pytest.fixture
def two_observers(oom_calls):
    if not _TWO_OBSERVERS.get("attached"):
        mtia.attach_out_of_memory_observer(_first_observer)
        mtia.attach_out_of_memory_observer(_second_observer)
        _TWO_OBSERVERS["attached"] = True
    for key in ("first", "second", "other_thread"):
        _TWO_OBSERVERS[key].clear()
    _TWO_OBSERVERS["armed"] = True
    try:
        yield _TWO_OBSERVERS
    finally:
        _TWO_OBSERVERS["armed"] = False


@pytest.fixture
def oom_calls():
    global _observer_attached
    if not _observer_attached:
        for d in DEVICES:  # make sure every device allocator exists before attaching
            mtia.memory_stats(d)
        mtia.attach_out_of_memory_observer(_record_oom)
        _observer_attached = True
    _OOM_CALLS.clear()
    return _OOM_CALLS


# ----------------------------------------------------------------------------- memory fraction

@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_memory_fraction_caps_reserved_memory(blocks, oom_calls, device):
    """Spec must-have 17 (allocator_core.md §15.17)."""
    mtia.empty_cache()
    total = mtia.mem_get_info(device)[1]
    fraction = 0.25
    allowed = int(fraction * total)
    mtia.set_per_process_memory_fraction(fraction, device)
    assert mtia.get_per_process_memory_fraction(device) == pytest.approx(fraction)

    first = blocks.alloc(allowed // 4 * 3, device)
    before = stats(device)
    with pytest.raises(mtia.OutOfMemoryError) as info:
        blocks.alloc(allowed // 2, device)
    d = delta(before, stats(device))
    assert f"{fmt(allowed)} allowed; " in str(info.value)
    assert d["num_ooms"] == 1
    assert d["num_alloc_retries"] == 1
    assert d["allocated_bytes.all.current"] == 0
    assert [c["allowed_or_total"] for c in oom_calls] == [allowed]

    # Cached memory counts against the limit too: a request that fits only once the cached
    # block is released succeeds through the flush-and-retry step, without an OOM.
    blocks.free(first)
    before = stats(device)
    blocks.alloc(allowed // 10 * 9, device)
    d = delta(before, stats(device))
    assert d["num_alloc_retries"] == 1
    assert d["num_ooms"] == 0
    assert d["num_device_free"] == 1
    assert stats(device)["reserved_bytes.all.current"] <= allowed


def test_a_fraction_of_zero_allows_zero_bytes_and_get_reads_allowed_over_total(oom_calls):
    # allowed = (size_t)(fraction * total); get returns allowed / total (spec 4.3).
    total = mtia.mem_get_info(0)[1]
    mtia.set_per_process_memory_fraction(0.3, 0)
    assert mtia.get_per_process_memory_fraction(0) == int(0.3 * total) / total
    mtia.set_per_process_memory_fraction(0.0, 0)
    assert mtia.get_per_process_memory_fraction(0) == 0.0
    with pytest.raises(mtia.OutOfMemoryError, match="is free. 0 bytes allowed; "):
        mtia.caching_allocator_alloc(100, 0, mtia.Stream(0))
    assert oom_calls[-1]["allowed_or_total"] == 0
    mtia.set_per_process_memory_fraction(1.0, 0)
    assert mtia.get_per_process_memory_fraction(0) == 1.0


def test_set_per_process_memory_fraction(blocks):
    """PyTorch test_cuda.py: test_set_per_process_memory_fraction."""
    assert mtia.get_per_process_memory_fraction(0) == 1.0
    with pytest.raises(TypeError, match="Invalid type"):
        mtia.set_per_process_memory_fraction(1)
    with pytest.raises(ValueError, match="Invalid fraction value"):
        mtia.set_per_process_memory_fraction(-0.1)
    with pytest.raises(ValueError, match="Invalid fraction value"):
        mtia.set_per_process_memory_fraction(2.0)

    keep = blocks.alloc(4096, 0)
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    mtia.reset_peak_memory_stats(0)
    mtia.set_per_process_memory_fraction(0.5, 0)
    assert mtia.get_per_process_memory_fraction(0) == pytest.approx(0.5)

    # 0.499 of the device, minus what is already reserved, fits.
    application = int(total * 0.499) - mtia.max_memory_reserved(0)
    blocks.free(blocks.alloc(application, 0))
    mtia.empty_cache()
    # Half of the device does not.
    with pytest.raises(mtia.OutOfMemoryError, match="out of memory"):
        blocks.alloc(int(total * 0.5), 0)
    # The OOM does not disturb later work.
    blocks.free(keep)
    blocks.free(blocks.alloc(4096, 0))


# ----------------------------------------------------------------------------- the OOM message and observers

@pytest.mark.parametrize("case", ["tiny-request-under-fraction", "1TiB-request"])
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_oom_message_and_observer_arguments(blocks, side_streams, oom_calls, device, case):
    """Spec must-have 18 (allocator_core.md §15.18)."""
    total = mtia.mem_get_info(device)[1]
    stream = side_streams[device]  # nothing is cached for this stream
    mtia.empty_cache()
    if case == "tiny-request-under-fraction":
        fraction = 1e-4  # allowed is below one 2 MiB small segment
        mtia.set_per_process_memory_fraction(fraction, device)
        size, alloc_size, limit = 100, 2 * MiB, int(fraction * total)
    else:
        size = alloc_size = 1 << 40
        limit = total
    before = stats(device)
    with pytest.raises(mtia.OutOfMemoryError) as info:
        blocks.alloc(size, device, stream)
    after = stats(device)
    free = mtia.mem_get_info(device)[0]
    msg = str(info.value)
    allocated = after["allocated_bytes.all.current"]
    reserved = after["reserved_bytes.all.current"]
    assert msg.startswith(f"MTIA out of memory. Tried to allocate {fmt(alloc_size)}. ")
    assert (f"Device {device} has a total capacity of {fmt(total)} "
            f"of which {fmt(free)} is free. ") in msg
    assert (f"Of the allocated memory {fmt(allocated)} is allocated by PyTorch, and "
            f"{fmt(reserved - allocated)} is reserved by PyTorch but unallocated.") in msg
    allowed_info = f"{fmt(limit)} allowed; " if case == "tiny-request-under-fraction" else ""
    assert msg == (  # §4.6's text, word for word but for MTIA, Device and MTIA_ALLOC_CONF
        f"MTIA out of memory. Tried to allocate {fmt(alloc_size)}. Device {device} has a total capacity of "
        f"{fmt(total)} of which {fmt(free)} is free. {allowed_info}Of the allocated memory {fmt(allocated)} is "
        f"allocated by PyTorch, and {fmt(reserved - allocated)} is reserved by PyTorch but unallocated. If "
        "reserved but unallocated memory is large try setting MTIA_ALLOC_CONF=expandable_segments:True to avoid "
        "fragmentation.  See documentation for Memory Management  (https://docs.pytorch.org/docs/stable/notes/"
        "cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)")
    assert delta(before, after)["num_ooms"] == 1
    assert oom_calls == [dict(device=device, alloc_size=alloc_size, allowed_or_total=limit,
                              device_free=free, num_ooms=before["num_ooms"] + 1)]


def test_every_oom_observer_is_called_once_without_the_allocator_lock(blocks, oom_calls, two_observers):
    """Spec must-have 18 (allocator_core.md §15.18)."""
    # §15.18, §4.6 step 6: every observer is called once, with the lock released (another thread allocates)
    mtia.empty_cache()
    free, total = mtia.mem_get_info(0)
    with pytest.raises(mtia.OutOfMemoryError):
        blocks.alloc(1 << 40, 0)
    call = (0, 1 << 40, total, free)
    assert two_observers["first"] == [call]
    assert two_observers["second"] == [call]
    assert [(c["device"], c["alloc_size"], c["allowed_or_total"], c["device_free"]) for c in oom_calls] == [call]
    assert two_observers["other_thread"] == ["finished"]


def test_notifies_oom(blocks, oom_calls):
    """PyTorch test_cuda.py: test_notifies_oom."""
    with pytest.raises(mtia.OutOfMemoryError):
        blocks.alloc(1024 * 1024 * 1024 * 1024, 0)
    assert len(oom_calls) == 1


_raising_observer = {"armed": False, "calls": []}


def _observer(device, alloc_size, total, free):
    _raising_observer["calls"].append((device, alloc_size))
    if _raising_observer["armed"]:
        raise Boom(f"observer refused {alloc_size} bytes on device {device}")


_raising_observer_attached = []


@pytest.fixture
def raising_observer():
    """An OOM observer that raises while the test runs. Observers cannot be detached: it is
    attached once and disarmed after the test, so later tests never see it raise."""
    if not _raising_observer_attached:
        mtia.attach_out_of_memory_observer(_observer)
        _raising_observer_attached.append(True)
    _raising_observer["calls"].clear()
    _raising_observer["armed"] = True
    try:
        yield _raising_observer["calls"]
    finally:
        _raising_observer["armed"] = False


def _too_big(device=0):
    return _C.mem_get_info(device)[1] + (1 << 30)


def test_oom_observer_that_raises_propagates_and_leaves_the_allocator_usable(raising_observer):
    mtia.synchronize()
    mtia.empty_cache()
    with state_unchanged(allow=OOM_COUNTERS):
        ooms = mtia.memory_stats(0)["num_ooms"]
        with pytest.raises(Boom, match="observer refused") as info:
            mtia.caching_allocator_alloc(_too_big(0), 0)
        assert isinstance(info.value.__context__, mtia.OutOfMemoryError)  # raised while handling the OOM
        assert mtia.memory_stats(0)["num_ooms"] == ooms + 1
        assert raising_observer == [(0, _too_big(0))]
        with pytest.raises(Boom):
            mtia.empty(_too_big(0) // 4)  # the same through empty()
    ptr = mtia.caching_allocator_alloc(1 << 20, 0)  # still usable
    mtia.caching_allocator_delete(ptr)
    mtia.memory.check_invariants()


# ----------------------------------------------------------------------------- flush, retry and garbage collection

def test_flush_is_followed_by_a_device_retry_not_a_cache_lookup(blocks, side_streams):
    # §4.1 step 4e: after the full flush comes alloc_block(isRetry=true), as in PyTorch, even
    # when the event sync freed a cached block that would fit (it sits in a split segment,
    # so the flush cannot release it): the request fails, and the retry is counted.
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    side = side_streams[0]
    a = blocks.alloc(5 * MiB)                        # one 20 MiB segment: [a 5 | free 15]
    b = blocks.alloc(5 * MiB)                        # [a 5 | b 5 | free 10]
    mtia.emulator.sleep(SLOW_BUSY_MS, stream=side)
    mtia.record_stream(b, side)
    blocks.free(b)                                   # pending until the side stream is idle
    mtia.set_per_process_memory_fraction(30 * MiB / total, 0)  # no room for a second segment
    before = stats()
    with pytest.raises(mtia.OutOfMemoryError):
        blocks.alloc(12 * MiB)                       # the 15 MiB that appears after the sync is not looked at
    d = delta(before, stats())
    assert (d["num_sync_all_streams"], d["num_alloc_retries"], d["num_ooms"], d["num_device_alloc"]) == (1, 1, 1, 0)
    assert a


def test_garbage_collection_pass_releases_every_block_at_least_the_mean_age(blocks):
    # §4.4: a GC pass releases every unsplit cached large block whose age is >= the mean, and
    # does not stop once the target is reached (PyTorch: so that GC does not run again at once).
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    mtia.memory._set_allocator_settings("garbage_collection_threshold:0.5")
    mtia.set_per_process_memory_fraction(200 * MiB / total, 0)  # allowed 200 MiB: GC above 100 MiB
    first, second = blocks.alloc(60 * MiB), blocks.alloc(60 * MiB)
    blocks.free(first)
    blocks.free(second)                              # two cached 60 MiB segments of the same age
    before = stats()
    blocks.alloc(70 * MiB)                           # no fit; 120 MiB reserved > 100: GC, target 20 MiB
    d = delta(before, stats())
    assert d["num_device_free"] == 2                 # both, though one would have met the target
    assert stats()["reserved_bytes.all.current"] == 70 * MiB
    assert d["num_alloc_retries"] == 0


def test_garbage_collection_keeps_the_younger_blocks(blocks, side_streams):
    # §4.4: a block's age counts the pool's get_free_block calls since it was cached; blocks
    # younger than the mean survive a pass that reaches its target.
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    mtia.memory._set_allocator_settings("garbage_collection_threshold:0.5")
    mtia.set_per_process_memory_fraction(150 * MiB / total, 0)  # GC above 75 MiB reserved
    old, young = blocks.alloc(40 * MiB), blocks.alloc(30 * MiB)
    blocks.free(old)                                 # cached first
    for _ in range(4):                               # lookups on another stream age it (one 20 MiB segment)
        blocks.free(blocks.alloc(8 * MiB, 0, side_streams[0]))
    blocks.free(young)
    before = stats()
    blocks.alloc(50 * MiB)                           # no fit; 90 MiB reserved: ages 5, 1, 1, mean 2.3
    d = delta(before, stats())
    assert d["num_device_free"] == 1
    assert d["reserved_bytes.all.freed"] == 40 * MiB


def test_garbage_collection_ages_count_frees_made_while_no_fraction_was_set(blocks, side_streams):
    # A block freed while the fraction is off still gets the GC clock's time as its base
    # (PyTorch writes it on every insert into the pool): once the clock has started, frees
    # take the path that writes it.
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    mtia.memory._set_allocator_settings("garbage_collection_threshold:0.5")
    mtia.set_per_process_memory_fraction(150 * MiB / total, 0)  # GC above 75 MiB reserved
    old, young = blocks.alloc(40 * MiB), blocks.alloc(30 * MiB)  # clock 2
    blocks.free(old)                                 # base 2
    for _ in range(4):                               # lookups on another stream age it (one 20 MiB segment)
        blocks.free(blocks.alloc(8 * MiB, 0, side_streams[0]))
    mtia.set_per_process_memory_fraction(1.0, 0)    # no fraction: the clock stays at 6, no GC
    blocks.free(young)                               # base 6 (0 would make it the oldest)
    mtia.set_per_process_memory_fraction(150 * MiB / total, 0)
    before = stats()
    blocks.alloc(50 * MiB)                           # no fit; 90 MiB reserved: ages 5, 1, 1, mean 2.3
    d = delta(before, stats())
    assert d["num_device_free"] == 1
    assert d["reserved_bytes.all.freed"] == 40 * MiB  # the old block, not the young one


def test_out_of_memory(blocks):
    """PyTorch test_cuda.py: test_out_of_memory."""
    assert issubclass(mtia.OutOfMemoryError, RuntimeError)
    with pytest.raises(mtia.OutOfMemoryError,
                       match=r"Tried to allocate 800000000\.00 GiB\. "
                             r"Device 0 has a total capacity of"):
        blocks.alloc(800_000_000 * GiB, 0)
    with pytest.raises(mtia.OutOfMemoryError, match="Tried to allocate more than 1EB memory"):
        blocks.alloc(8_000_000_000 * GiB, 0)
    # The device keeps working afterwards.
    blocks.free(blocks.alloc(4096, 0))


def test_out_of_memory_retry(blocks):
    """PyTorch test_cuda.py: test_out_of_memory_retry."""
    mtia.empty_cache()
    total = mtia.get_device_properties(0)["total_memory"]
    size = int(total * 0.5)  # as PyTorch's test: the runtime's share makes the second half not fit
    first = blocks.alloc(size, 0)
    with pytest.raises(mtia.OutOfMemoryError, match="Tried to allocate"):
        blocks.alloc(size, 0)
    blocks.free(first)
    blocks.free(blocks.alloc(size, 0))  # the cached block serves it
    # A bigger request fits only after the cached block is released: flush and retry.
    before = stats(0)
    blocks.free(blocks.alloc(int(total * 0.8), 0))
    d = delta(before, stats(0))
    assert d["num_alloc_retries"] == 1
    assert d["num_ooms"] == 0
    mtia.empty_cache()
    mtia.reset_peak_memory_stats()
