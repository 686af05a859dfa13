"""record_memory_history takes torch 2.13's skip_actions, compile_context and
global_record_annotations (issue 19 item 14): skip_actions leaves the named actions out of
the recorded history; the names are validated; the other two are accepted (the emulator has
no torch.compile context nor profiler annotations: entries keep compile_context 'N/A' and
external_annotations stays empty)."""
import sys

import pytest

import mtia_alloc as mtia
import mtia_alloc.memory


@pytest.fixture
def history():
    mtia.init()
    yield
    mtia.memory._record_memory_history(None)


BLOCK_ACTIONS = ("alloc", "free_requested", "free_completed")


def actions(device=0):
    """The block actions of the device's trace (segment and snapshot entries left out)."""
    return [e["action"] for e in mtia.snapshot()["device_traces"][device] if e["action"] in BLOCK_ACTIONS]


def test_skip_actions_leaves_out_free_requested(history, blocks):
    mtia.memory._record_memory_history("all", skip_actions=["free_requested"], clear_history=True)
    blocks.free(blocks.alloc(4096, device=0))
    assert actions() == ["alloc", "free_completed"]
    mtia.memory._record_memory_history("all", skip_actions=["snapshot", "segment_alloc"], clear_history=True)
    mtia.empty_cache()
    blocks.free(blocks.alloc(4096, device=0))
    mtia.snapshot()
    trace = [e["action"] for e in mtia.snapshot()["device_traces"][0]]
    assert "snapshot" not in trace and "segment_alloc" not in trace and "alloc" in trace


def test_skipping_stops_when_recording_is_set_again_without_it(history, blocks):
    mtia.memory._record_memory_history("all", skip_actions=["free_requested", "alloc"], clear_history=True)
    blocks.free(blocks.alloc(4096, device=0))
    assert actions() == ["free_completed"]
    mtia.memory._record_memory_history("all")  # no skip from now on; the earlier entries stay filtered
    blocks.free(blocks.alloc(4096, device=0))
    assert actions() == ["free_completed", "alloc", "free_requested", "free_completed"]


def test_skip_actions_in_the_public_and_positional_forms(history, blocks):
    mtia.record_memory_history("all", "all", "python", sys.maxsize, None, True, False, False, ["alloc"])
    blocks.free(blocks.alloc(4096, device=0))
    assert "alloc" not in actions() and "free_requested" in actions()


@pytest.mark.parametrize("bad, exc, message", [
    (["free_request"], ValueError, r"Invalid action 'free_request' in skip_actions; valid actions are alloc, "),
    ("alloc", TypeError, "skip_actions must be a list of action names, got str"),
    ([1], ValueError, "Invalid action 1 in skip_actions"),
])
def test_skip_actions_names_are_validated(history, bad, exc, message):
    with pytest.raises(exc, match=message):
        mtia.memory._record_memory_history("all", skip_actions=bad)


def test_compile_context_and_global_record_annotations_are_accepted(history, blocks):
    mtia.memory._record_memory_history("all", compile_context=True, global_record_annotations=True,
                                       clear_history=True)
    blocks.free(blocks.alloc(4096, device=0))
    snap = mtia.snapshot()
    assert snap["device_traces"][0] and all(e["compile_context"] == "N/A" for e in snap["device_traces"][0])
    assert snap["external_annotations"] == []
    with pytest.raises(TypeError, match="compile_context must be a bool"):
        mtia.memory._record_memory_history("all", compile_context="yes")


def test_legacy_form_refuses_the_new_arguments(history):
    with pytest.raises(TypeError, match="legacy"):
        mtia.memory._record_memory_history(True, skip_actions=["alloc"])
