"""Bad input to streams, events, record_stream and the emulator's kernels and configure():
unknown or mistyped stream ids and handles, wrong argument types of wait/record methods and
stream contexts, elapsed_time misuse, events recorded on another device, record_stream with a
wrong stream or pointer, launch/sleep/copy_/fill_/fail_device_allocations arguments, and
configure() after initialisation (a bad-input matrix over ../shared/API.md).

Each case names the call, the exception type and a message fragment, and must change nothing
(helpers.check_bad_call and state_unchanged); the cases get the `resources` fixture.
"""
import numpy as np
import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
from helpers import check_bad_call, other_device


def _elapsed(start_timed, end_timed, record_start, record_end):
    start = mtia.Event(enable_timing=start_timed)
    end = mtia.Event(enable_timing=end_timed)
    if record_start:
        start.record()
    if record_end:
        end.record()
    start.synchronize()
    end.synchronize()
    return start.elapsed_time(end)


def _record_on_other_device(r):
    e = mtia.Event(device=0)
    e.record(mtia.current_stream(0))
    e.synchronize()
    e.record(mtia.current_stream(other_device()))


def _unknown_stream_on_other_device(r):
    return mtia.Stream(stream_id=r.side0.stream_id, device_index=other_device())


def _record_stream_other_device(r):
    mtia.record_stream(r.ptr, mtia.current_stream(other_device()))


CASES = [
    # ------------------------------------------------------------ streams
    pytest.param(lambda r: mtia.Stream(stream_id=12345, device_index=0), ValueError,
                 r"unknown stream 12345 on device 0", id="Stream-unknown-id"),
    pytest.param(lambda r: mtia.Stream(stream_id=-3, device_index=0), ValueError,
                 r"unknown stream -3 on device 0", id="Stream-negative-id"),
    pytest.param(lambda r: mtia.Stream(stream_id=1 << 70, device_index=0), ValueError,
                 r"unknown stream 1180591620717411303424 on device 0", id="Stream-id-beyond-int64"),
    pytest.param(_unknown_stream_on_other_device, ValueError, r"unknown stream \d+ on device 1",
                 id="Stream-id-of-another-device"),
    pytest.param(lambda r: mtia.Stream(stream_id="0", device_index=0), TypeError,
                 r"stream_id must be an int, got str", id="Stream-id-str"),
    pytest.param(lambda r: mtia.Stream(stream_id=0.0, device_index=0), TypeError,
                 r"stream_id must be an int, got float", id="Stream-id-float"),
    pytest.param(lambda r: mtia.Stream(stream_id=True, device_index=0), TypeError,
                 r"stream_id must be an int, got bool", id="Stream-id-bool"),
    pytest.param(lambda r: mtia.Stream(stream_id=0, device_index=0, device_type=1), ValueError,
                 r"device_type must be 19 \(MTIA\), got 1", id="Stream-handle-cuda-device-type"),
    pytest.param(lambda r: mtia.Stream(priority="high"), TypeError, r"priority must be an int, got str",
                 id="Stream-priority-str"),
    pytest.param(lambda r: r.side0.wait_event(r.side0), TypeError, r"wait_event expects an Event, got Stream",
                 id="wait_event-stream"),
    pytest.param(lambda r: r.side0.wait_stream(mtia.Event()), TypeError, r"wait_stream expects a Stream, got Event",
                 id="wait_stream-event"),
    pytest.param(lambda r: r.side0.record_event("e"), TypeError, r"record_event expects an Event or None, got str",
                 id="record_event-str"),
    pytest.param(lambda r: mtia.set_stream(0), TypeError, r"set_stream expects a Stream, got int",
                 id="set_stream-int"),
    pytest.param(lambda r: mtia.set_stream(mtia.Event()), TypeError, r"set_stream expects a Stream, got Event",
                 id="set_stream-event"),
    pytest.param(lambda r: mtia.stream(0), TypeError, r"stream expects an mtia_alloc.Stream or None, got int",
                 id="stream-ctx-int"),
    pytest.param(lambda r: mtia.StreamContext("s"), TypeError,
                 r"stream expects an mtia_alloc.Stream or None, got str", id="StreamContext-str"),
    # ------------------------------------------------------------ events
    pytest.param(lambda r: _elapsed(False, True, True, True), ValueError,
                 r"^Both events must be created with argument 'enable_timing=True'$", id="elapsed-start-untimed"),
    pytest.param(lambda r: _elapsed(True, False, True, True), ValueError,
                 r"^Both events must be created with argument 'enable_timing=True'$", id="elapsed-end-untimed"),
    pytest.param(lambda r: _elapsed(True, True, False, True), ValueError,
                 r"^Both events must be recorded before calculating elapsed time$", id="elapsed-start-unrecorded"),
    pytest.param(lambda r: _elapsed(True, True, True, False), ValueError,
                 r"^Both events must be recorded before calculating elapsed time$", id="elapsed-end-unrecorded"),
    pytest.param(lambda r: mtia.Event(enable_timing=True).elapsed_time(1.0), TypeError,
                 r"elapsed_time expects an Event, got float", id="elapsed-non-event"),
    pytest.param(_record_on_other_device, ValueError,
                 r"^Event device index 0 does not match recording stream's device index 1$",
                 id="Event-record-other-device-after-first-record"),
    pytest.param(lambda r: mtia.Event().record(0), TypeError, r"record expects a Stream, got int",
                 id="Event-record-int"),
    pytest.param(lambda r: mtia.Event().wait("s"), TypeError, r"wait expects a Stream, got str",
                 id="Event-wait-str"),
    # ------------------------------------------------------------ emulator kernels
    pytest.param(lambda r: emulator.launch(42), TypeError, r"launch expects a callable, got int",
                 id="launch-non-callable"),
    pytest.param(lambda r: emulator.launch(print, stream=0), TypeError,
                 r"stream must be an mtia_alloc.Stream or None, got int", id="launch-stream-int"),
    pytest.param(lambda r: emulator.sleep(-1), ValueError, r"ms must be between 0 and 3600000, got -1",
                 id="sleep-negative"),
    pytest.param(lambda r: emulator.sleep(1e12), ValueError, r"ms must be between 0 and 3600000",
                 id="sleep-huge"),
    pytest.param(lambda r: emulator.sleep(float("nan")), ValueError, r"ms must be between 0 and 3600000, got nan",
                 id="sleep-nan"),
    pytest.param(lambda r: emulator.sleep("5"), TypeError, r"ms must be a number, got str", id="sleep-str"),
    pytest.param(lambda r: emulator.sleep(None), TypeError, r"ms must be a number, got NoneType", id="sleep-None"),
    pytest.param(lambda r: emulator.copy_(r.a4, r.a8), ValueError,
                 r"copy_ needs arrays of equal size, got 16 and 32 bytes", id="copy-mismatched-sizes"),
    pytest.param(lambda r: emulator.copy_(r.a4, np.zeros(4, np.float32)), TypeError,
                 r"copy_ expects two DeviceArrays", id="copy-numpy-source"),
    pytest.param(lambda r: emulator.copy_([0.0] * 4, r.a4), TypeError, r"copy_ expects two DeviceArrays",
                 id="copy-list-destination"),
    pytest.param(lambda r: emulator.fill_(r.a4, "abc"), TypeError,
                 r"cannot fill a float32 array with 'abc'", id="fill-str-into-float32"),
    pytest.param(lambda r: emulator.fill_(r.u8, 1000), TypeError, r"cannot fill a uint8 array with 1000",
                 id="fill-out-of-range-into-uint8"),
    pytest.param(lambda r: emulator.fill_(r.a4, None), TypeError, r"cannot fill a float32 array with None",
                 id="fill-None"),
    pytest.param(lambda r: emulator.fill_(r.a4, [1.0, 2.0]), TypeError, r"fill_ value must be a scalar",
                 id="fill-sequence"),
    pytest.param(lambda r: emulator.fill_(np.zeros(4), 1.0), TypeError, r"fill_ expects a DeviceArray",
                 id="fill-numpy-destination"),
    pytest.param(lambda r: emulator.fill_(r.a4, 1.0, stream="s"), TypeError,
                 r"stream must be an mtia_alloc.Stream or None, got str", id="fill-stream-str"),
    pytest.param(lambda r: emulator.fail_device_allocations(-1), ValueError,
                 r"after_n must be a non-negative int below 2\*\*63, got -1", id="fail-after-negative"),
    pytest.param(lambda r: emulator.fail_device_allocations(1, every=-2), ValueError,
                 r"every must be a non-negative int below 2\*\*63, got -2", id="fail-every-negative"),
    pytest.param(lambda r: emulator.fail_device_allocations(1.5), ValueError,
                 r"after_n must be a non-negative int below 2\*\*63, got 1\.5", id="fail-after-float"),
    pytest.param(lambda r: emulator.configure(device_count=4), RuntimeError,
                 r"emulator.configure\(\) must be called before mtia_alloc is initialized",
                 id="configure-after-init"),
    pytest.param(lambda r: emulator.configure(memory_per_device="abc"), RuntimeError,
                 r"must be called before mtia_alloc is initialized", id="configure-bad-type-after-init"),
    # ------------------------------------------------------------ record_stream
    pytest.param(lambda r: mtia.record_stream(r.ptr, 0), TypeError,
                 r"record_stream expects an mtia_alloc.Stream, got int", id="record_stream-int-stream"),
    pytest.param(_record_stream_other_device, ValueError, r"is on device 1, but block 0x[0-9a-f]+ is on device 0",
                 id="record_stream-stream-of-another-device"),
    pytest.param(lambda r: mtia.record_stream(0x7F00_DEAD_0000, r.side0), RuntimeError,
                 r"invalid device pointer: 0x7f00dead0000", id="record_stream-unknown-pointer"),
    pytest.param(lambda r: mtia.record_stream(r.ptr + 512, r.side0), RuntimeError, r"invalid device pointer",
                 id="record_stream-interior-pointer"),
    pytest.param(lambda r: mtia.record_stream(float(r.ptr), r.side0), TypeError, r"ptr must be an int, got float",
                 id="record_stream-float-pointer"),
    pytest.param(lambda r: mtia.record_stream(-1, r.side0), RuntimeError, r"invalid device pointer",
                 id="record_stream-negative-pointer"),
    pytest.param(lambda r: r.a4.record_stream("s"), TypeError, r"record_stream expects an mtia_alloc.Stream",
                 id="DeviceArray-record_stream-str"),
]


@pytest.mark.parametrize("call, exc, message", CASES)
def test_bad_stream_event_or_kernel_call(resources, call, exc, message):
    check_bad_call(resources, call, exc, message)
