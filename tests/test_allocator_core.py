"""Must-have behaviours of the caching allocator core: spec/allocator_core.md §15, items 1-24
and 29-30 (items 25-28 and 31, history traces and expandable segments, are tested elsewhere),
followed by PyTorch's allocator tests from test_cuda.py re-expressed with raw pointers
(test_memory_allocation, test_out_of_memory, test_out_of_memory_retry,
test_set_per_process_memory_fraction, test_notifies_oom).

Tests are named test_mhNN_* after the must-have they check. Other tests run in the same
process, so every test measures DELTAS of memory_stats(), and frees what it allocates (the
`blocks` fixture of conftest.py frees what is still live at teardown). Tests that need an empty
cache call mtia.empty_cache() first: with nothing else live, that releases every segment.
Sizes are realistic: an emulated device has 16 GiB reserved virtually, so big blocks cost nothing.
"""
import itertools
import random
import threading
import time

import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator
import mtia_alloc.memory

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEVICES = list(range(mtia.device_count()))
SLEEP_MS = 300  # how long a side stream is kept busy in the record_stream tests

fmt = mtia.memory.format_size
round_size = mtia.memory._round_size

# §7.2: the 122 baseline keys of memory_stats().
POOL_STATS = ["active", "active_bytes", "allocated_bytes", "allocation", "inactive_split",
              "inactive_split_bytes", "requested_bytes", "reserved_bytes", "segment"]
POOLS = ["all", "large_pool", "small_pool"]
METRICS = ["allocated", "current", "freed", "peak"]
SCALARS = ["max_split_size", "num_alloc_retries", "num_device_alloc", "num_device_free",
           "num_ooms", "num_sync_all_streams"]
STAT_KEYS = ([f"{s}.{p}.{m}" for s in POOL_STATS for p in POOLS for m in METRICS]
             + [f"oversize_{s}.{m}" for s in ("allocations", "segments") for m in METRICS])
BASELINE_KEYS = sorted(STAT_KEYS + SCALARS)


# ----------------------------------------------------------------------------- helpers

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


def find_segment(ptr, device=0):
    """The memory_snapshot() segment dict that contains ptr."""
    for seg in mtia.memory_snapshot():
        if seg["device"] == device and seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return seg
    raise AssertionError(f"no segment holds {ptr:#x} on device {device}")


def find_block(ptr, device=0):
    """The memory_snapshot() block dict that starts at ptr."""
    for blk in find_segment(ptr, device)["blocks"]:
        if blk["address"] == ptr:
            return blk
    raise AssertionError(f"no block starts at {ptr:#x} on device {device}")


@pytest.fixture(scope="module")
def side_streams():
    """One non-default stream per device, shared by the tests of this module."""
    return {d: mtia.Stream(device=d) for d in DEVICES}


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


# ----------------------------------------------------------------------------- §15.1 rounding

@pytest.mark.parametrize("size, expected", [
    (1, 512), (511, 512), (512, 512), (513, 1024), (1000, 1024), (1024, 1024),
    (MiB, MiB), (MiB + 1, MiB + 512), (12_345_678, 12_345_856),
], ids=lambda v: str(v))
def test_mh01_round_size_default(size, expected):
    assert round_size(size) == expected


def test_mh01_every_rounded_size_is_a_multiple_of_512():
    sizes = itertools.chain(range(1, 5000, 7),
                            (2 ** k + j for k in range(10, 36) for j in (-1, 0, 1)))
    for n in sizes:
        r = round_size(n)
        assert r % 512 == 0 and n <= r < n + 512, (n, r)


@pytest.mark.parametrize("size", [1, 513, 5000, 3 * MiB + 1], ids=str)
def test_mh01_allocated_bytes_count_the_rounded_size(blocks, size):
    before = stats()
    blocks.alloc(size)
    d = delta(before, stats())
    assert d["allocated_bytes.all.current"] == round_size(size)
    assert d["requested_bytes.all.current"] == size


# ----------------------------------------------------------------------------- §15.2 power-2 divisions

DIV4 = "roundup_power2_divisions:4"
DIV_LIST = "roundup_power2_divisions:[256:1,512:2,1024:4,>:8]"


@pytest.mark.parametrize("conf, size, expected", [
    pytest.param(DIV4, 1200, 1536, id="div4-1200-not-above-2048-uses-512-rounding"),
    pytest.param(DIV4, 2048, 2048, id="div4-2048-boundary"),
    pytest.param(DIV4, 4097, 5120, id="div4-4097"),
    pytest.param(DIV4, MiB + 1, MiB + MiB // 4, id="div4-1MiB+1"),
    pytest.param(DIV4, 2 * MiB, 2 * MiB, id="div4-power-of-two-unchanged"),
    pytest.param(DIV_LIST, 1200, 1536, id="list-first-entry-fills-lower-intervals"),
    pytest.param(DIV_LIST, 300 * MiB + 1, 300 * MiB + 512, id="list-256MiB-interval-div1"),
    pytest.param(DIV_LIST, 600 * MiB + 1, 768 * MiB, id="list-512MiB-interval-div2"),
    pytest.param(DIV_LIST, 1536 * MiB + 1, 1792 * MiB, id="list-1GiB-interval-div4"),
    pytest.param(DIV_LIST, 3 * GiB + 1, 3 * GiB + 256 * MiB, id="list-greater-than-div8"),
])
def test_mh02_roundup_power2_divisions(conf, size, expected):
    mtia.memory._set_allocator_settings(conf)
    assert round_size(size) == expected


def test_mh02_allocation_uses_power2_rounding(blocks):
    mtia.memory._set_allocator_settings(DIV4)
    before = stats()
    blocks.alloc(MiB + 1)
    d = delta(before, stats())
    assert d["allocated_bytes.large_pool.current"] == MiB + MiB // 4
    assert d["requested_bytes.large_pool.current"] == MiB + 1


# ----------------------------------------------------------------------------- §15.3-6 pools, segments, splits

@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
@pytest.mark.parametrize("size, pool, segment_size", [
    pytest.param(1, "small_pool", 2 * MiB, id="1B-small"),
    pytest.param(4096, "small_pool", 2 * MiB, id="4KiB-small"),
    pytest.param(MiB, "small_pool", 2 * MiB, id="1MiB-small"),
    pytest.param(MiB + 1, "large_pool", 20 * MiB, id="1MiB+1-large"),
])
def test_mh03_pool_choice_and_one_new_segment(blocks, device, size, pool, segment_size):
    mtia.empty_cache()
    other = "large_pool" if pool == "small_pool" else "small_pool"
    before = stats(device)
    blocks.alloc(size, device)
    d = delta(before, stats(device))
    assert d[f"reserved_bytes.{pool}.current"] == segment_size
    assert d[f"segment.{pool}.current"] == 1
    assert d[f"reserved_bytes.{other}.current"] == 0
    assert d[f"segment.{other}.current"] == 0
    assert d["num_device_alloc"] == 1
    assert d[f"allocated_bytes.{pool}.current"] == round_size(size)


def test_mh03_next_small_request_is_carved_from_the_same_segment(blocks):
    mtia.empty_cache()
    first = blocks.alloc(1000)
    before = stats()
    second = blocks.alloc(3000)
    d = delta(before, stats())
    assert d["num_device_alloc"] == 0
    assert d["segment.small_pool.current"] == 0
    assert second == first + 1024  # the allocated piece is the lower part of the free remainder


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
@pytest.mark.parametrize("size", [5 * MiB, MiB + 1, 10 * MiB - 512],
                         ids=["5MiB", "1MiB+1", "10MiB-512"])
def test_mh04_mid_size_request_splits_a_20MiB_segment(blocks, device, size):
    mtia.empty_cache()
    before = stats(device)
    ptr = blocks.alloc(size, device)
    d = delta(before, stats(device))
    rounded = round_size(size)
    assert d["allocated_bytes.all.current"] == rounded
    assert d["reserved_bytes.all.current"] == 20 * MiB
    assert d["segment.large_pool.current"] == 1
    assert d["inactive_split.large_pool.current"] == 1
    assert d["inactive_split_bytes.large_pool.current"] == 20 * MiB - rounded
    assert d["inactive_split_bytes.small_pool.current"] == 0
    seg = find_segment(ptr, device)
    assert seg["address"] == ptr
    assert [b["size"] for b in seg["blocks"]] == [rounded, 20 * MiB - rounded]


@pytest.mark.parametrize("size, reserved, split_bytes", [
    pytest.param(12 * MiB, 12 * MiB, 0, id="12MiB-exact-segment"),
    pytest.param(12 * MiB + MiB // 2, 14 * MiB, MiB + MiB // 2, id="12.5MiB-in-14MiB-splits"),
    pytest.param(10 * MiB, 10 * MiB, 0, id="10MiB-own-segment"),
    pytest.param(64 * MiB + 512, 66 * MiB, 2 * MiB - 512, id="64MiB+512-in-66MiB-splits"),
])
def test_mh05_large_request_segment_is_rounded_to_2MiB(blocks, size, reserved, split_bytes):
    mtia.empty_cache()
    before = stats()
    blocks.alloc(size)
    d = delta(before, stats())
    assert d["reserved_bytes.large_pool.current"] == reserved
    assert d["segment.large_pool.current"] == 1
    assert d["allocated_bytes.large_pool.current"] == size
    assert d["inactive_split.large_pool.current"] == (1 if split_bytes else 0)
    assert d["inactive_split_bytes.large_pool.current"] == split_bytes


@pytest.mark.parametrize("size, block_size", [
    pytest.param(11 * MiB, 12 * MiB, id="11MiB-remainder-exactly-1MiB"),
    pytest.param(11 * MiB + 512, 12 * MiB, id="11MiB+512"),
    pytest.param(13 * MiB, 14 * MiB, id="13MiB"),
    pytest.param(19 * MiB + MiB // 2, 20 * MiB, id="19.5MiB"),
])
def test_mh06_large_remainder_of_at_most_1MiB_is_not_split(blocks, size, block_size):
    mtia.empty_cache()
    before = stats()
    ptr = blocks.alloc(size)
    d = delta(before, stats())
    assert d["allocated_bytes.large_pool.current"] == block_size  # the slack counts too
    assert d["requested_bytes.large_pool.current"] == size
    assert d["inactive_split.large_pool.current"] == 0
    blk = find_block(ptr)
    assert blk["size"] == block_size
    assert blk["requested_size"] == size
    assert len(find_segment(ptr)["blocks"]) == 1


# ----------------------------------------------------------------------------- §15.7-10 reuse, streams, best fit, merge

@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
@pytest.mark.parametrize("size", [1000, 5 * MiB, 12 * MiB, 64 * MiB],
                         ids=["1000B", "5MiB", "12MiB", "64MiB"])
def test_mh07_free_then_malloc_same_size_reuses_the_address(blocks, device, size):
    mtia.empty_cache()
    ptr = blocks.alloc(size, device)
    blocks.free(ptr)
    before = stats(device)
    again = blocks.alloc(size, device)
    d = delta(before, stats(device))
    assert again == ptr
    assert d["num_device_alloc"] == 0
    assert d["reserved_bytes.all.current"] == 0


@pytest.mark.parametrize("size", [1000, 5 * MiB, 12 * MiB], ids=["1000B", "5MiB", "12MiB"])
def test_mh08_block_freed_on_one_stream_never_serves_another(blocks, side_streams, size):
    side = side_streams[0]
    mtia.empty_cache()
    ptr = blocks.alloc(size)
    blocks.free(ptr)  # cached on the default stream
    before = stats()
    other = blocks.alloc(size, 0, side)
    d = delta(before, stats())
    assert d["num_device_alloc"] == 1  # a new segment, not the cached block
    seg_default, seg_side = find_segment(ptr), find_segment(other)
    assert seg_side["address"] != seg_default["address"]
    assert seg_side["stream"] != seg_default["stream"]
    blocks.free(other)
    # Each stream gets its own cached block back.
    assert blocks.alloc(size) == ptr
    assert blocks.alloc(size, 0, side) == other


def test_mh09_best_fit_takes_the_smallest_cached_block_that_fits(blocks):
    mtia.empty_cache()
    # One 20 MiB segment tiled as  a:4 | keep1:2 | c:8 | keep2:6  (MiB).
    a = blocks.alloc(4 * MiB)
    keep1 = blocks.alloc(2 * MiB)
    c = blocks.alloc(8 * MiB)
    keep2 = blocks.alloc(6 * MiB)
    assert (keep1, c, keep2) == (a + 4 * MiB, a + 6 * MiB, a + 14 * MiB)
    blocks.free(a)
    blocks.free(c)  # free, unreleasable pieces of 4 and 8 MiB between live neighbours
    before = stats()
    assert before["inactive_split.large_pool.current"] >= 2

    three = blocks.alloc(3 * MiB)
    d = delta(before, stats())
    assert three == a  # the 4 MiB block, not the 8 MiB one
    assert d["allocated_bytes.large_pool.current"] == 4 * MiB  # 1 MiB remainder: not split
    assert d["inactive_split.large_pool.current"] == -1
    assert d["num_device_alloc"] == 0

    five = blocks.alloc(5 * MiB)
    d = delta(before, stats())
    assert five == c  # the 8 MiB block, split: 3 MiB remainder > 1 MiB
    assert d["allocated_bytes.large_pool.current"] == 9 * MiB
    assert d["inactive_split_bytes.large_pool.current"] == -9 * MiB
    assert d["num_device_alloc"] == 0


def _merged_layout(pieces):
    """Merge runs of free pieces: [(size, is_free), ...] -> the segment's expected blocks."""
    out = []
    for size, is_free in pieces:
        if is_free and out and out[-1][1]:
            out[-1] = (out[-1][0] + size, True)
        else:
            out.append((size, is_free))
    return out


@pytest.mark.parametrize("order", list(itertools.permutations("abc")), ids="".join)
def test_mh10_freeing_neighbours_merges_them(blocks, order):
    mtia.empty_cache()
    before = stats()
    # One 20 MiB segment:  a:4 | b:4 | c:4 | tail:8 (free)  (MiB).
    ptrs = {name: blocks.alloc(4 * MiB) for name in "abc"}
    assert ptrs["b"] == ptrs["a"] + 4 * MiB and ptrs["c"] == ptrs["a"] + 8 * MiB
    free = {"a": False, "b": False, "c": False}
    for name in order:
        blocks.free(ptrs[name])
        free[name] = True
        layout = _merged_layout([(4 * MiB, free["a"]), (4 * MiB, free["b"]),
                                 (4 * MiB, free["c"]), (8 * MiB, True)])
        seg = find_segment(ptrs["a"])
        assert [(b["size"], b["state"] == "inactive") for b in seg["blocks"]] == layout
        d = delta(before, stats())
        split = len(layout) > 1
        assert d["inactive_split.large_pool.current"] == (
            sum(is_free for _, is_free in layout) if split else 0)
        assert d["inactive_split_bytes.large_pool.current"] == (
            sum(size for size, is_free in layout if is_free) if split else 0)
    seg = find_segment(ptrs["a"])
    assert [(b["size"], b["state"]) for b in seg["blocks"]] == [(20 * MiB, "inactive")]
    assert delta(before, stats())["reserved_bytes.all.current"] == 20 * MiB


# ----------------------------------------------------------------------------- §15.11 empty_cache

def test_mh11_empty_cache_releases_only_fully_free_segments(blocks, side_streams):
    mtia.empty_cache()
    kept_small = blocks.alloc(1000)  # its 2 MiB segment must stay
    kept_large = blocks.alloc(5 * MiB)  # its 20 MiB segment (15 MiB free) must stay
    blocks.free(blocks.alloc(64 * MiB))  # a wholly free 64 MiB segment
    blocks.free(blocks.alloc(1000, 0, side_streams[0]))  # a wholly free 2 MiB segment
    before = stats()
    mtia.empty_cache()
    d = delta(before, stats())
    assert d["reserved_bytes.all.current"] == -66 * MiB
    assert d["reserved_bytes.large_pool.current"] == -64 * MiB
    assert d["segment.all.current"] == -2
    assert d["segment.all.freed"] == 2
    assert d["num_device_free"] == 2
    assert d["num_sync_all_streams"] == 1
    assert d["allocated_bytes.all.current"] == 0
    assert d["inactive_split_bytes.all.current"] == 0
    assert find_segment(kept_large)["total_size"] == 20 * MiB
    assert find_segment(kept_small)["total_size"] == 2 * MiB

    before = stats()
    blocks.free(kept_small)
    blocks.free(kept_large)
    mtia.empty_cache()
    d = delta(before, stats())
    assert d["reserved_bytes.all.current"] == -22 * MiB
    assert d["num_device_free"] == 2
    assert d["inactive_split.all.current"] == -2  # both free tails merged back, then released


# ----------------------------------------------------------------------------- §15.12-13 record_stream

@pytest.mark.parametrize("device, reclaim", [(0, "malloc"), (DEVICES[-1], "empty_cache")],
                         ids=["dev0-reclaimed-by-malloc", "devlast-reclaimed-by-empty_cache"])
def test_mh12_record_stream_defers_the_free_until_the_event_completes(
        blocks, side_streams, device, reclaim):
    side = side_streams[device]
    mtia.empty_cache()
    size = 4 * MiB
    ptr = blocks.alloc(size, device)  # on the default stream
    mtia.emulator.sleep(SLEEP_MS, stream=side)  # the side stream is busy...
    mtia.record_stream(ptr, side)  # ...and uses the block
    before = stats(device)
    blocks.free(ptr)
    d = delta(before, stats(device))
    assert d["allocation.all.current"] == -1
    assert d["allocated_bytes.all.current"] == -size
    assert d["active.all.current"] == 0
    assert d["active_bytes.all.current"] == 0
    assert d["requested_bytes.all.current"] == 0
    assert find_block(ptr, device)["state"] == "active_pending_free"

    # While the side stream is busy, the allocation stream must not get the block back.
    other = blocks.alloc(size, device)
    assert other != ptr
    assert find_block(ptr, device)["state"] == "active_pending_free"
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
        assert find_block(ptr, device)["state"] == "inactive"
        assert blocks.alloc(size, device) == ptr
    else:
        assert d["reserved_bytes.all.current"] == -20 * MiB


def test_mh12_active_stats_count_pending_frees_in_peaks_and_accumulated_counts(blocks, side_streams):
    """active = allocated + frees waiting for events: its peak can exceed allocated's, and
    its freed count grows when the wait ends, not when the user frees."""
    side = side_streams[0]
    mtia.empty_cache()
    size = 4 * MiB
    first = blocks.alloc(size)
    mtia.emulator.sleep(SLEEP_MS, stream=side)
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


def test_mh13_record_stream_on_the_allocation_stream_is_ignored(blocks):
    mtia.empty_cache()
    own = mtia.current_stream(0)
    ptr = blocks.alloc(4 * MiB)
    # Keep the allocation stream busy: an event recorded on it would not complete yet.
    mtia.emulator.sleep(SLEEP_MS, stream=own)
    try:
        mtia.record_stream(ptr, own)
        before = stats()
        blocks.free(ptr)
        d = delta(before, stats())
        assert d["allocation.all.current"] == -1
        assert d["active.all.current"] == -1  # freed at once
        assert d["active_bytes.all.current"] == -4 * MiB
        assert find_block(ptr)["state"] == "inactive"
        assert blocks.alloc(4 * MiB) == ptr
    finally:
        own.synchronize()


# ----------------------------------------------------------------------------- §15.14-16 max_split_size_mb and config

@pytest.mark.parametrize("cached_mb, request_mb, reused", [
    pytest.param(120, 50, False, id="normal-request-skips-oversize-block"),
    pytest.param(100, 50, False, id="normal-request-skips-block-equal-to-M"),
    pytest.param(80, 50, True, id="normal-request-splits-block-below-M"),
    pytest.param(210, 200, True, id="oversize-request-takes-block-10MiB-larger"),
    pytest.param(218, 200, True, id="oversize-request-takes-block-18MiB-larger"),
    pytest.param(220, 200, False, id="oversize-request-skips-block-20MiB-larger"),
])
def test_mh14_max_split_size_reuse_rules(blocks, cached_mb, request_mb, reused):
    mtia.memory._set_allocator_settings("max_split_size_mb:100")
    mtia.empty_cache()
    cached = blocks.alloc(cached_mb * MiB)
    blocks.free(cached)
    before = stats()
    ptr = blocks.alloc(request_mb * MiB)
    d = delta(before, stats())
    if not reused:
        assert ptr != cached
        assert d["num_device_alloc"] == 1
        assert d["reserved_bytes.all.current"] == request_mb * MiB
        return
    assert ptr == cached
    assert d["num_device_alloc"] == 0
    if request_mb >= 100:  # an oversize allocation is never split
        assert d["allocated_bytes.all.current"] == cached_mb * MiB
        assert d["inactive_split.all.current"] == 0
        assert len(find_segment(ptr)["blocks"]) == 1
    else:
        assert d["allocated_bytes.all.current"] == request_mb * MiB
        assert d["inactive_split.large_pool.current"] == 1
        assert d["inactive_split_bytes.large_pool.current"] == (cached_mb - request_mb) * MiB


def test_mh14_oversize_stats(blocks):
    mtia.memory._set_allocator_settings("max_split_size_mb:100")
    mtia.empty_cache()
    before = stats()
    blocks.alloc(50 * MiB)
    d = delta(before, stats())
    assert d["oversize_allocations.current"] == 0
    assert d["oversize_segments.current"] == 0

    big = blocks.alloc(150 * MiB)
    d = delta(before, stats())
    assert d["oversize_allocations.current"] == 1
    assert d["oversize_allocations.allocated"] == 1
    assert d["oversize_segments.current"] == 1
    blocks.free(big)
    d = delta(before, stats())
    assert d["oversize_allocations.current"] == 0
    assert d["oversize_allocations.freed"] == 1
    assert d["oversize_segments.current"] == 1  # still cached
    mtia.empty_cache()
    d = delta(before, stats())
    assert d["oversize_segments.current"] == 0
    assert d["oversize_segments.freed"] == 1


@pytest.mark.parametrize("conf, message", [
    pytest.param("max_split_size_mb:19", "max_split_size_mb too small, must be >= 20",
                 id="max_split_19"),
    pytest.param("garbage_collection_threshold:1.0",
                 r"garbage_collect_threshold is invalid, set it in \(0\.0, 1\.0\)", id="gc_1.0"),
    pytest.param("garbage_collection_threshold:0",
                 r"garbage_collect_threshold is invalid, set it in \(0\.0, 1\.0\)", id="gc_0"),
    pytest.param("expandable_segments:true", "Expected 'True' or 'False'",
                 id="expandable_lowercase"),
    pytest.param("not_an_option:1", "Unrecognized key 'not_an_option'", id="unknown_key"),
])
def test_mh15_invalid_settings_are_rejected(conf, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        mtia.memory._set_allocator_settings(conf)


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_mh16_max_split_size_stat_is_minus_one_by_default(device):
    assert stats(device)["max_split_size"] == -1


# ----------------------------------------------------------------------------- §15.17-18 fraction and OOM

@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_mh17_memory_fraction_caps_reserved_memory(blocks, oom_calls, device):
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


@pytest.mark.parametrize("case", ["tiny-request-under-fraction", "1TiB-request"])
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_mh18_oom_message_and_observers(blocks, side_streams, oom_calls, device, case):
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


def test_mh18_every_observer_is_called_once_without_the_allocator_lock(blocks, oom_calls, two_observers):
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


def test_oversize_cached_blocks_are_released_before_the_full_flush(blocks):
    # §4.1 step 4d, §4.5: a cached oversize block is released before the full flush (no retry, no sync)
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    mtia.memory._set_allocator_settings("max_split_size_mb:100")
    mtia.set_per_process_memory_fraction(280 * MiB / total, 0)
    blocks.alloc(5 * MiB)                            # a 20 MiB segment that stays
    blocks.free(blocks.alloc(150 * MiB))             # a cached oversize block
    before = stats()
    blocks.alloc(125 * MiB)                          # 150 >= 125 + 20: no reuse; 20 + 150 + 126 > 280
    d = delta(before, stats())
    assert (d["num_device_free"], d["num_device_alloc"]) == (1, 1)
    assert (d["num_alloc_retries"], d["num_sync_all_streams"], d["num_ooms"]) == (0, 0, 0)
    assert stats()["reserved_bytes.all.current"] == (20 + 126) * MiB


def test_lowering_max_split_size_at_run_time_never_releases_a_split_segment(blocks, side_streams):
    # A 40 MiB remainder of a split 90 MiB segment becomes "oversize" when max_split_size_mb
    # drops to 40 at run time. The oversize release (§4.5) must not give that segment back
    # to the device while its other block is live: the request fails with OOM instead, and
    # no address is handed out twice.
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    mtia.set_per_process_memory_fraction(128 * MiB / total, 0)
    blocks.free(blocks.alloc(90 * MiB))
    a = blocks.alloc(50 * MiB)                       # [a 50 | free 40] in the 90 MiB segment
    blocks.alloc(36 * MiB, 0, side_streams[0])       # another stream's segment: 126 of 128 MiB reserved
    mtia.memory._set_allocator_settings("max_split_size_mb:40")
    before = stats()
    with pytest.raises(mtia.OutOfMemoryError):
        blocks.alloc(3 * MiB)                        # may not take the oversize remainder; no room
    d = delta(before, stats())
    assert (d["num_device_free"], d["num_device_alloc"]) == (0, 0)
    assert stats()["reserved_bytes.all.current"] == 126 * MiB
    mtia.memory.check_invariants()
    blocks.free(a)                                   # the segment is whole again and can go
    blocks.alloc(3 * MiB)
    mtia.memory.check_invariants()


def test_flush_is_followed_by_a_device_retry_not_a_cache_lookup(blocks, side_streams):
    # §4.1 step 4e: after the full flush comes alloc_block(isRetry=true), as in PyTorch, even
    # when the event sync freed a cached block that would fit (it sits in a split segment,
    # so the flush cannot release it): the request fails, and the retry is counted.
    mtia.empty_cache()
    total = mtia.mem_get_info(0)[1]
    side = side_streams[0]
    a = blocks.alloc(5 * MiB)                        # one 20 MiB segment: [a 5 | free 15]
    b = blocks.alloc(5 * MiB)                        # [a 5 | b 5 | free 10]
    mtia.emulator.sleep(SLEEP_MS, stream=side)
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


# ----------------------------------------------------------------------------- §15.19 format_size

@pytest.mark.parametrize("n, text", [
    (0, "0 bytes"), (1024, "1024 bytes"), (1025, "1.00 KiB"), (1536, "1.50 KiB"),
    (MiB, "1024.00 KiB"), (MiB + 1, "1.00 MiB"), (2 * MiB, "2.00 MiB"), (GiB, "1024.00 MiB"),
    (3 << 30, "3.00 GiB"), (800_000_000 * GiB, "800000000.00 GiB"),
], ids=lambda v: str(v))
def test_mh19_format_size(n, text):
    assert fmt(n) == text


# ----------------------------------------------------------------------------- §15.20-22 stats

def _churn(blocks, device):
    """Some allocations in both pools, some freed, some kept live."""
    keep = [blocks.alloc(s, device) for s in (700, 300 * KiB, 3 * MiB, 12 * MiB + 512)]
    for s in (5000, 2 * MiB, 40 * MiB):
        blocks.free(blocks.alloc(s, device))
    return keep


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_mh20_stats_keys_and_consistency(blocks, device):
    before = stats(device)
    _churn(blocks, device)
    after = stats(device)
    assert list(after) == sorted(after)  # every key, "dram" included
    keys = [k for k in after if k != "dram"]
    assert set(BASELINE_KEYS) <= set(keys)
    assert len(BASELINE_KEYS) == 122
    assert_all_is_small_plus_large(after)
    d = delta(before, after)
    for key in STAT_KEYS:
        if key.endswith(".current"):
            stem = key[: -len("current")]
            assert d[key] == d[stem + "allocated"] - d[stem + "freed"], key
    nested = mtia.memory_stats_as_nested_dict(device)
    assert nested["allocation"]["all"]["current"] == after["allocation.all.current"]
    assert nested["reserved_bytes"]["large_pool"]["peak"] == after["reserved_bytes.large_pool.peak"]
    assert nested["num_device_alloc"] == after["num_device_alloc"]


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_mh21_reset_peak_and_accumulated_stats(blocks, device):
    _churn(blocks, device)
    mtia.reset_peak_memory_stats(device)
    s = stats(device)
    for key in STAT_KEYS:
        if key.endswith(".peak"):
            assert s[key] == s[key[: -len("peak")] + "current"], key

    blocks.free(blocks.alloc(64 * MiB, device))  # moves peaks and accumulated counts again
    other = [d for d in DEVICES if d != device]
    others_before = {d: stats(d) for d in other}
    before = stats(device)
    mtia.reset_accumulated_memory_stats(device)
    s = stats(device)
    for key in STAT_KEYS:
        if key.endswith((".allocated", ".freed")):
            assert s[key] == 0, key
        else:
            assert s[key] == before[key], key  # current and peak unchanged
    for key in ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc",
                "num_device_free"):
        assert s[key] == 0, key
    assert s["max_split_size"] == before["max_split_size"]
    for d in other:  # other devices are untouched
        assert stats(d) == others_before[d]


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"dev{d}")
def test_mh22_memory_helpers_match_stats(blocks, device):
    _churn(blocks, device)
    s = stats(device)
    assert mtia.memory_allocated(device) == s["allocated_bytes.all.current"]
    assert mtia.max_memory_allocated(device) == s["allocated_bytes.all.peak"]
    assert mtia.memory_reserved(device) == s["reserved_bytes.all.current"]
    assert mtia.max_memory_reserved(device) == s["reserved_bytes.all.peak"]
    assert s["dram"] == {"allocated_bytes": s["allocated_bytes.all.current"],
                         "peak_bytes": s["allocated_bytes.all.peak"],
                         "reserved_bytes": s["reserved_bytes.all.current"],
                         "peak_reserved_bytes": s["reserved_bytes.all.peak"]}
    with mtia.device(device):  # device=None means the current device
        assert mtia.memory_allocated() == s["allocated_bytes.all.current"]
        assert mtia.memory_stats() == s


# ----------------------------------------------------------------------------- §15.23-24 snapshot

@pytest.fixture
def mixed_state(blocks, side_streams):
    """Live, freed and split blocks in both pools, on two streams and every device."""
    mtia.empty_cache()
    for device in DEVICES:
        _churn(blocks, device)
        blocks.alloc(3 * MiB, device, side_streams[device])
        blocks.free(blocks.alloc(600, device, side_streams[device]))
    return blocks


def test_mh23_snapshot_segments_tile_and_add_up(mixed_state):
    segments = mtia.memory_snapshot()
    for device in DEVICES:
        mine = [s for s in segments if s["device"] == device]
        addresses = [s["address"] for s in mine]
        assert addresses == sorted(addresses)
        assert sum(s["total_size"] for s in mine) == stats(device)["reserved_bytes.all.current"]
    for seg in segments:
        blks = seg["blocks"]
        assert sum(b["size"] for b in blks) == seg["total_size"]
        address = seg["address"]
        for b in blks:
            assert b["address"] == address
            address += b["size"]
        active = [b for b in blks if b["state"] != "inactive"]
        assert seg["allocated_size"] == sum(b["size"] for b in blks
                                            if b["state"] == "active_allocated")
        assert seg["active_size"] == sum(b["size"] for b in active)
        assert seg["requested_size"] == sum(b["requested_size"] for b in active)
        assert seg["allocated_size"] <= seg["active_size"] <= seg["total_size"]


def test_mh24_snapshot_states_types_and_pool_ids(mixed_state, side_streams):
    segments = mtia.memory_snapshot()
    assert segments
    for seg in segments:
        assert seg["segment_type"] in ("small", "large")
        assert (seg["segment_type"] == "small") == (seg["total_size"] == 2 * MiB)
        assert seg["segment_pool_id"] == (0, 0)
        assert seg["is_expandable"] is False
        assert isinstance(seg["frames"], list)
        assert isinstance(seg["stream"], int)
        for b in seg["blocks"]:
            assert b["state"] in ("active_allocated", "active_pending_free", "inactive")
            assert isinstance(b["frames"], list)
    streams = {seg["stream"] for seg in segments if seg["device"] == 0}
    assert 0 in streams and len(streams) == 2  # default stream and the side stream


# ----------------------------------------------------------------------------- §15.29 threads, complexity

def test_mh29_concurrent_malloc_free_keeps_stats_consistent():
    n_threads, n_ops = 8, 300
    streams = [None] * (n_threads // 2) + [mtia.Stream(device=0) for _ in range(n_threads // 2)]
    live_ranges, lock, errors = {}, threading.Lock(), []
    before = stats(0)

    def worker(seed, stream):
        rng = random.Random(seed)
        mine = []
        try:
            for _ in range(n_ops):
                if mine and (len(mine) > 20 or rng.random() < 0.45):
                    ptr = mine.pop(rng.randrange(len(mine)))
                    with lock:
                        del live_ranges[ptr]
                    mtia.caching_allocator_delete(ptr)
                else:
                    size = rng.choice([rng.randint(1, 4096), rng.randint(1, MiB),
                                       rng.randint(1, 30 * MiB)])
                    ptr = mtia.caching_allocator_alloc(size, 0, stream)
                    mine.append(ptr)
                    with lock:  # no live block may overlap another one
                        for start, end in live_ranges.items():
                            assert ptr + size <= start or end <= ptr, "overlapping blocks"
                        live_ranges[ptr] = ptr + size
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            for ptr in mine:
                with lock:
                    live_ranges.pop(ptr, None)
                mtia.caching_allocator_delete(ptr)

    threads = [threading.Thread(target=worker, args=(i, streams[i])) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    mtia.memory.check_invariants(0)
    d = delta(before, stats(0))
    for key in ("allocation", "allocated_bytes", "active", "active_bytes", "requested_bytes"):
        for pool in POOLS:
            assert d[f"{key}.{pool}.current"] == 0, (key, pool)
    assert_all_is_small_plus_large(stats(0))
    for key in STAT_KEYS:
        if key.endswith(".current"):
            stem = key[: -len("current")]
            assert d[key] == d[stem + "allocated"] - d[stem + "freed"], key


def _cost_per_pair(stream, size=1024, pairs=2000, repeats=5):
    """Best-of-`repeats` seconds per alloc/free pair of `size` bytes on `stream`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(pairs):
            mtia.caching_allocator_delete(mtia.caching_allocator_alloc(size, 0, stream))
        best = min(best, time.perf_counter() - start)
    return best / pairs


def _fragmented_cost(stream, n_free):
    """Leave n_free cached 512-byte blocks that cannot merge, then time 1 KiB pairs."""
    live = []
    try:
        for _ in range(2 * n_free):
            live.append(mtia.caching_allocator_alloc(512, 0, stream))
        holes, live = live[::2], live[1::2]
        for ptr in holes:
            mtia.caching_allocator_delete(ptr)
        return _cost_per_pair(stream)
    finally:
        for ptr in live:
            mtia.caching_allocator_delete(ptr)
        mtia.empty_cache()


def test_mh29_malloc_free_cost_does_not_grow_linearly_with_cached_blocks(side_streams):
    stream = side_streams[0]
    mtia.empty_cache()
    few = _fragmented_cost(stream, 100)
    many = _fragmented_cost(stream, 10_000)
    # O(log n) (or O(1)) lookups: 100x more cached blocks costs far less than 100x the time.
    assert many < 4 * few, (few, many)


# ----------------------------------------------------------------------------- §15.30 edge cases

def test_mh30_null_zero_unknown_and_huge():
    before = stats()
    mtia.caching_allocator_delete(0)  # free(nullptr) is a no-op
    assert mtia.caching_allocator_alloc(0) == 0  # allocate(0) is a null pointer...
    assert stats() == before  # ...and neither changes any stat
    with pytest.raises(RuntimeError, match="invalid device pointer"):
        mtia.caching_allocator_delete(0x7F00_DEAD_0000)
    with pytest.raises(mtia.OutOfMemoryError, match="Tried to allocate more than 1EB memory"):
        mtia.caching_allocator_alloc(1 << 60)
    assert stats() == before


# ----------------------------------------------------------------------------- PyTorch's tests, re-expressed

def test_memory_allocation(blocks):
    mtia.empty_cache()
    prev = mtia.memory_allocated()
    ptr = blocks.alloc(1)
    assert mtia.memory_allocated() > prev
    blocks.free(ptr)
    assert mtia.memory_allocated() == prev


def test_out_of_memory(blocks):
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


def test_set_per_process_memory_fraction(blocks):
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


def test_notifies_oom(blocks, oom_calls):
    with pytest.raises(mtia.OutOfMemoryError):
        blocks.alloc(1024 * 1024 * 1024 * 1024, 0)
    assert len(oom_calls) == 1
