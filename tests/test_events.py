"""Events on the emulated streams (API.md §2, spec pools_graphs_streams_api.md §4.3-§4.4,
must-haves 28-29): PyTorch's test_events and test_events_elapsedtime re-expressed with
`emulator.sleep` as torch.cuda._sleep, event ids, query/synchronize, cross-stream and
cross-device ordering through Event.record/wait, Stream.wait_event/wait_stream, and timing
events that measure the sleep. No test asserts a tight upper bound on time."""
import threading

import pytest

import mtia_alloc as mtia
import mtia_alloc.emulator as emulator
from helpers import BUSY_MS


def test_events():
    """PyTorch test_cuda.py: test_events."""
    stream = mtia.current_stream()
    event = mtia.Event(enable_timing=True)
    assert event.query()
    start_event = mtia.Event(enable_timing=True)
    stream.record_event(start_event)
    emulator.sleep(BUSY_MS)
    stream.record_event(event)
    assert not event.query()
    event.synchronize()
    assert event.query()
    assert start_event.elapsed_time(event) > 0


def test_events_elapsedtime():
    """PyTorch test_cuda.py: test_events_elapsedtime (exact messages)."""
    event1 = mtia.Event(enable_timing=False)
    event2 = mtia.Event(enable_timing=False)
    with pytest.raises(ValueError, match="^Both events must be created with argument 'enable_timing=True'$"):
        event1.elapsed_time(event2)

    event1 = mtia.Event(enable_timing=True)
    event2 = mtia.Event(enable_timing=True)
    with pytest.raises(ValueError, match="^Both events must be recorded before calculating elapsed time$"):
        event1.elapsed_time(event2)

    # The default of enable_timing is False.
    event1 = mtia.Event()
    event2 = mtia.Event()
    with pytest.raises(ValueError, match="^Both events must be created with argument 'enable_timing=True'$"):
        event1.elapsed_time(event2)


def test_elapsed_time_errors_with_one_bad_event():
    timed, untimed = mtia.Event(enable_timing=True), mtia.Event()
    timed.record()
    untimed.record()
    with pytest.raises(ValueError, match="enable_timing=True"):
        timed.elapsed_time(untimed)
    with pytest.raises(ValueError, match="enable_timing=True"):
        untimed.elapsed_time(timed)
    never = mtia.Event(enable_timing=True)
    with pytest.raises(ValueError, match="Both events must be recorded"):
        timed.elapsed_time(never)
    with pytest.raises(ValueError, match="Both events must be recorded"):
        never.elapsed_time(timed)


def test_timing_events_measure_the_sleep():
    s = mtia.Stream()
    start, end = mtia.Event(enable_timing=True), mtia.Event(enable_timing=True)
    start.record(s)
    emulator.sleep(BUSY_MS, stream=s)
    end.record(s)
    end.synchronize()  # elapsed_time needs both events completed, as torch's
    ms = start.elapsed_time(end)
    assert end.query()
    assert BUSY_MS * 0.999 <= ms < 60_000
    # Stream.record_event and a timing event behind busy work on another device.
    s1 = mtia.Stream(device=1)
    a = s1.record_event(mtia.Event(device=1, enable_timing=True))
    emulator.sleep(100, stream=s1)
    b = s1.record_event(mtia.Event(device=1, enable_timing=True))
    b.synchronize()
    assert 100 * 0.999 <= a.elapsed_time(b) < 60_000
    assert b.elapsed_time(b) == 0


def test_event_ids_and_attributes():
    e = mtia.Event()
    assert e.event_id == 0
    assert e.query()
    e.synchronize()  # a no-op before the first record
    assert e.device.type == "mtia" and e.device.index == 0
    e.record()
    first = e.event_id
    assert first != 0
    e.record()
    assert e.event_id == first  # one id per event
    f = mtia.Event(device="mtia:1", enable_timing=True, blocking=True, interprocess=False)
    assert f.device.index == 1
    f.record(mtia.current_stream(1))
    assert f.event_id not in (0, first)
    assert repr(f) == f"torch.Event device_type=mtia, device_index=1, event_flag=1, event_id={f.event_id}"
    assert repr(mtia.Event()).startswith("torch.Event device_type=mtia, device_index=0")


def test_event_on_an_idle_stream_is_complete_at_once():
    s = mtia.Stream()
    e = s.record_event()
    assert isinstance(e, mtia.Event) and e.event_id != 0
    assert e.query()
    e2 = mtia.Event(enable_timing=True)
    assert s.record_event(e2) is e2
    assert e2.query()


def test_event_record_defaults_to_the_current_stream():
    s = mtia.Stream()
    emulator.sleep(BUSY_MS, stream=s)
    e = mtia.Event()
    with mtia.stream(s):
        e.record()
    assert not e.query()
    assert mtia.default_stream(0).query()
    e.synchronize()
    assert e.query()
    assert s.query()


def test_event_query_turns_true_when_the_stream_reaches_it():
    s = mtia.Stream()
    emulator.sleep(BUSY_MS, stream=s)
    e = s.record_event()
    ran = []
    emulator.launch(ran.append, "after", stream=s)  # work queued after the event
    emulator.sleep(BUSY_MS, stream=s)
    assert not e.query()
    e.synchronize()
    assert e.query()
    assert not s.query()  # the event does not wait for later work
    s.synchronize()
    assert ran == ["after"]


def test_event_record_on_another_device_is_rejected():
    e = mtia.Event()
    e.record(mtia.default_stream(0))
    with pytest.raises(ValueError, match="Event device index 0 does not match recording stream's device index 1"):
        e.record(mtia.default_stream(1))
    with pytest.raises(TypeError):
        e.record("stream")


@pytest.mark.parametrize("how", ["event.wait", "wait_event", "wait_stream"])
@pytest.mark.parametrize("devices", [(0, 0), (0, 1)], ids=["same-device", "cross-device"])
def test_cross_stream_ordering(how, devices):
    producer, consumer = mtia.Stream(device=devices[0]), mtia.Stream(device=devices[1])
    order = []
    emulator.sleep(BUSY_MS, stream=producer)
    emulator.launch(order.append, "produced", stream=producer)
    if how == "event.wait":
        e = mtia.Event()
        e.record(producer)
        e.wait(consumer)
    elif how == "wait_event":
        consumer.wait_event(producer.record_event())
    else:
        consumer.wait_stream(producer)
    emulator.launch(order.append, "consumed", stream=consumer)
    emulator.launch(order.append, "unrelated", stream=mtia.Stream(device=devices[1]))
    assert not consumer.query()  # waits for the producer
    consumer.synchronize()
    assert order.index("produced") < order.index("consumed")
    producer.synchronize()
    assert order.count("unrelated") == 1


def test_event_wait_defaults_to_the_current_stream():
    producer, consumer = mtia.Stream(), mtia.Stream()
    emulator.sleep(BUSY_MS, stream=producer)
    e = producer.record_event()
    with mtia.stream(consumer):
        e.wait()
        emulator.launch(lambda: None)
    assert not consumer.query()
    consumer.synchronize()
    assert producer.query()


def test_wait_does_not_block_the_host_and_completed_events_add_no_wait():
    producer, consumer = mtia.Stream(), mtia.Stream()
    emulator.sleep(BUSY_MS, stream=producer)
    e = producer.record_event()
    consumer.wait_event(e)
    assert not producer.query()  # wait_event returned while the producer was still busy
    producer.synchronize()
    consumer.wait_event(e)  # already complete
    consumer.wait_stream(producer)  # idle
    consumer.synchronize()
    assert consumer.query()
    with pytest.raises(TypeError):
        consumer.wait_event(producer)
    with pytest.raises(TypeError):
        consumer.wait_stream(e)


def test_event_synchronize_from_several_threads():
    s = mtia.Stream()
    emulator.sleep(BUSY_MS, stream=s)
    e = s.record_event()
    seen = []

    def waiter():
        e.synchronize()
        seen.append(e.query())

    threads = [threading.Thread(target=waiter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True] * 4
