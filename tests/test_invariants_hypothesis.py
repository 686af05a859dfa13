"""Random operation sequences keep the allocator consistent (hypothesis stateful test).

Operations: alloc (sizes mixed from 1..4096 bytes, up to 1 MiB and up to 30 MiB), free,
empty_cache and record_stream (with a short kernel on the recording stream, so frees after
record_stream stay pending across later allocations), over every device and two streams
per device (the default stream and one side stream). After every step, on every device:
  * mtia_alloc.memory.check_invariants() passes;
  * allocation.all.current rose by exactly the number of live blocks;
  * allocated_bytes >= the rounded sizes of the live blocks, active >= allocated,
    reserved >= active;
  * requested_bytes.all.current rose by exactly the live requested sizes, whenever no block
    freed after a record_stream may still be pending;
and live blocks never overlap. At teardown everything is freed and, after empty_cache, the
current stats are back to where the example started.

A second machine runs device 0 under a memory limit and changing allocator settings, so the
rest of the malloc ladder (garbage collection, oversize release, flush and retry, OOM) runs.
"""
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mtia_alloc as mtia
import mtia_alloc.emulator
import mtia_alloc.memory
from helpers import POOL_STATS, POOLS, MiB

DEVICES = list(range(min(2, mtia.device_count())))
SIZES = st.one_of(st.integers(1, 4096), st.integers(1, MiB), st.integers(1, 30 * MiB))
CURRENT_KEYS = [f"{s}.{p}.current" for s in POOL_STATS for p in POOLS]

_side_streams = {}  # one side stream per device for the whole module, not per example


def streams_of(device):
    if device not in _side_streams:
        _side_streams[device] = mtia.Stream(device=device)
    return [mtia.current_stream(device), _side_streams[device]]


@dataclass
class Live:
    device: int
    stream: int  # index into streams_of(device)
    size: int
    recorded: bool = False


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        mtia.empty_cache()
        for d in DEVICES:  # peaks from here on, so check_invariants' "peak >= current" bites
            mtia.reset_peak_memory_stats(d)
        self.live = {}  # ptr -> Live
        self.maybe_pending = {d: False for d in DEVICES}
        self.base = {d: mtia.memory_stats(d) for d in DEVICES}

    def pick(self, data):
        return data.draw(st.sampled_from(sorted(self.live)), label="ptr")

    @rule(size=SIZES, device=st.sampled_from(DEVICES), stream=st.sampled_from([0, 1]))
    def alloc(self, size, device, stream):
        ptr = mtia.caching_allocator_alloc(size, device, streams_of(device)[stream])
        for other_ptr, other in self.live.items():
            if other.device == device:
                assert ptr + size <= other_ptr or other_ptr + other.size <= ptr, \
                    f"block {ptr:#x}+{size} overlaps live block {other_ptr:#x}+{other.size}"
        self.live[ptr] = Live(device, stream, size)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        ptr = self.pick(data)
        block = self.live.pop(ptr)
        mtia.caching_allocator_delete(ptr)
        if block.recorded:
            self.maybe_pending[block.device] = True

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def record_stream(self, data):
        ptr = self.pick(data)
        block = self.live[ptr]
        other_stream = streams_of(block.device)[1 - block.stream]
        mtia.emulator.sleep(5, stream=other_stream)  # a kernel there uses the block for a while
        mtia.record_stream(ptr, other_stream)
        block.recorded = True

    @rule()
    def empty_cache(self):
        mtia.empty_cache()  # waits for every outstanding event: nothing is pending any more
        self.maybe_pending = {d: False for d in DEVICES}

    @invariant()
    def stats_match_live_blocks(self):
        for d in DEVICES:
            mtia.memory.check_invariants(d)
            s, base = mtia.memory_stats(d), self.base[d]
            mine = [b for b in self.live.values() if b.device == d]

            def grew(key):
                return s[key] - base[key]

            assert grew("allocation.all.current") == len(mine)
            assert grew("allocated_bytes.all.current") >= sum(
                mtia.memory._round_size(b.size) for b in mine)
            assert s["allocated_bytes.all.current"] <= s["active_bytes.all.current"]
            assert s["active_bytes.all.current"] <= s["reserved_bytes.all.current"]
            if not self.maybe_pending[d]:
                assert grew("requested_bytes.all.current") == sum(b.size for b in mine)
                assert grew("active.all.current") == len(mine)

    def teardown(self):
        try:
            for ptr in list(self.live):
                del self.live[ptr]
                mtia.caching_allocator_delete(ptr)
        finally:
            mtia.empty_cache()
        for d in DEVICES:
            mtia.memory.check_invariants(d)
            s = mtia.memory_stats(d)
            for key in CURRENT_KEYS:
                assert s[key] == self.base[d][key], (d, key)


AllocatorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    database=None,  # write nothing outside the test run
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorInvariants = AllocatorMachine.TestCase


# Under a memory limit the malloc ladder's other steps run: garbage collection, the release
# of oversize blocks, the full flush and retry, OOMs (64-256 MiB allowed against requests
# of up to 60 MiB). check_invariants after every step, and no malloc takes reserved memory past
# the allowed share.
LIMITED_CONFS = ["", "garbage_collection_threshold:0.5", "garbage_collection_threshold:0.8,max_split_size_mb:40",
                 "max_split_size_mb:20", "garbage_collection_threshold:0.6,expandable_segments:True"]


class LimitedAllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.total = mtia.mem_get_info(0)[1]
        mtia.memory._set_allocator_settings("expandable_segments:False")  # "" would keep it
        mtia.set_per_process_memory_fraction(1.0, 0)
        mtia.empty_cache()
        self.live = []
        self.sizes = {}  # live ptr -> requested size

    @rule(conf=st.sampled_from(LIMITED_CONFS), allowed_mib=st.sampled_from([64, 128, 256]))
    def configure(self, conf, allowed_mib):
        mtia.memory._set_allocator_settings(conf)
        mtia.set_per_process_memory_fraction(allowed_mib * MiB / self.total, 0)

    @rule(size=st.one_of(st.integers(1, 4096), st.integers(1, 2 * MiB), st.integers(8 * MiB, 60 * MiB)),
          stream=st.sampled_from([0, 1]))
    def alloc(self, size, stream):
        before = mtia.memory_reserved(0)
        try:
            ptr = mtia.caching_allocator_alloc(size, 0, streams_of(0)[stream])
        except mtia.OutOfMemoryError:
            pass
        else:
            for other, other_size in self.sizes.items():  # never memory that is handed out already
                assert ptr + size <= other or other + other_size <= ptr, "overlapping blocks"
            self.live.append(ptr)
            self.sizes[ptr] = size
        # a lowered limit frees nothing by itself (as in PyTorch), but no malloc grows past it,
        # except that expandable segments map whole pages (20 MiB at most) after the request's
        # own size passed the check, as PyTorch's map_block does
        allowed = mtia.get_per_process_memory_fraction(0) * self.total
        assert mtia.memory_reserved(0) <= max(before, allowed + 20 * MiB)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), record=st.booleans())
    def free(self, data, record):
        ptr = self.live.pop(data.draw(st.integers(0, len(self.live) - 1), label="index"))
        del self.sizes[ptr]
        if record:
            mtia.emulator.sleep(1, stream=streams_of(0)[1])
            mtia.record_stream(ptr, streams_of(0)[1])
        mtia.caching_allocator_delete(ptr)

    @rule()
    def empty_cache(self):
        mtia.empty_cache()

    @invariant()
    def consistent(self):
        mtia.memory.check_invariants(0)

    def teardown(self):
        try:
            for ptr in self.live:
                mtia.caching_allocator_delete(ptr)
        finally:
            mtia.memory._set_allocator_settings("expandable_segments:False")  # "" would keep it
            mtia.set_per_process_memory_fraction(1.0, 0)
            mtia.empty_cache()
        mtia.memory.check_invariants(0)
        assert mtia.memory_reserved(0) == 0


LimitedAllocatorMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLimitedAllocatorInvariants = LimitedAllocatorMachine.TestCase
