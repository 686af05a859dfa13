"""Bad input to the memory tools and settings: record_memory_history's enabled, context,
stacks and max_entries (and the legacy signature), memory_snapshot pool ids, memory metadata,
memory fractions, OOM observers, and allocator settings strings not already in test_config.py
(allocator_core.md §10.4) (a bad-input matrix over ../shared/API.md).

Each case names the call, the exception type and a message fragment, and must change nothing
(helpers.check_bad_call and state_unchanged); the cases get the `resources` fixture.
"""
import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from helpers import check_bad_call


CASES = [
    # ------------------------------------------------------------ history, snapshots, metadata
    pytest.param(lambda r: mtia.record_memory_history(enabled="everything"), ValueError,
                 r"^expected state to be 'state', 'all', or None$", id="history-enabled-bad"),
    pytest.param(lambda r: mtia.record_memory_history(context="stacks"), ValueError,
                 r"^expected context to be 'state', 'alloc', 'all', or None$", id="history-context-bad"),
    pytest.param(lambda r: mtia.record_memory_history(context=True), ValueError,
                 r"^expected context to be 'state', 'alloc', 'all', or None$", id="history-context-bool"),
    pytest.param(lambda r: mtia.record_memory_history(stacks=None), ValueError,
                 r"^expected stacks to be 'python', or 'all'$", id="history-stacks-None"),
    pytest.param(lambda r: mtia.record_memory_history(max_entries="100"), TypeError,
                 r"max_entries must be an int, got str", id="history-max-entries-str"),
    pytest.param(lambda r: mtia.record_memory_history(max_entries=-5), ValueError,
                 r"max_entries must be non-negative, got -5", id="history-max-entries-negative"),
    pytest.param(lambda r: mtia.record_memory_history(trace_alloc_max_entries=5), TypeError,
                 r"unexpected keyword arguments \['trace_alloc_max_entries'\]", id="history-legacy-kwarg-new-form"),
    pytest.param(lambda r: mtia.memory._record_memory_history(True, bogus=1), TypeError,
                 r"unexpected keyword arguments \['bogus'\]", id="history-legacy-unknown-kwarg"),
    pytest.param(lambda r: mtia.memory_snapshot((0, 1, 2)), TypeError,
                 r"expected a MemPool or a \(int, int\) pool id, got \(0, 1, 2\)", id="memory_snapshot-3-tuple"),
    pytest.param(lambda r: mtia.memory_snapshot("pool"), TypeError, r"expected a MemPool or a \(int, int\) pool id",
                 id="memory_snapshot-str"),
    pytest.param(lambda r: mtia.memory_snapshot((0, -1)), TypeError, r"expected a MemPool or a \(int, int\) pool id",
                 id="memory_snapshot-negative-half"),
    pytest.param(lambda r: mtia.memory_snapshot((0, 1 << 64)), TypeError,
                 r"expected a MemPool or a \(int, int\) pool id", id="memory_snapshot-half-beyond-64-bits"),
    pytest.param(lambda r: mtia.memory._set_memory_metadata(b"x"), TypeError, r"metadata must be a str, got bytes",
                 id="set_memory_metadata-bytes"),
    pytest.param(lambda r: mtia.set_per_process_memory_fraction(float("nan"), 0), ValueError, r"fraction",
                 id="fraction-nan"),
    pytest.param(lambda r: mtia.set_per_process_memory_fraction(0.5, "mtia:x"), ValueError,
                 r"Invalid device string 'mtia:x'", id="fraction-bad-device-string"),
    pytest.param(lambda r: mtia.attach_out_of_memory_observer("print"), TypeError, r"observer must be callable",
                 id="oom-observer-not-callable"),
    # ------------------------------------------------------------ allocator settings (§10.4), not in test_config
    pytest.param(lambda r: mtia.memory._set_allocator_settings(3), TypeError, r"settings must be a str, got int",
                 id="settings-not-str"),
    *[pytest.param(lambda r, conf=conf: mtia.memory._set_allocator_settings(conf), exc, message, id=f"settings-{sid}")
      for conf, sid, exc, message in [
          ("max_split_size_mb:-5", "negative-size", RuntimeError,
           r"Expected a non-negative integer at index 2 in ConfigTokenizer but got '-5'"),
          ("max_split_size_mb:20.5", "fractional-size", RuntimeError,
           r"Expected a non-negative integer at index 2 in ConfigTokenizer but got '20\.5'"),
          ("max_split_size_mb:0x20", "hex-size", RuntimeError, r"Expected a non-negative integer .* got '0x20'"),
          ("max_split_size_mb:99999999999999999999999", "size-overflow", RuntimeError,
           r"Expected a non-negative integer .* got '99999999999999999999999'"),
          ("max_non_split_rounding_mb:abc", "non-split-rounding-abc", RuntimeError,
           r"Expected a non-negative integer .* got 'abc'"),
          ("garbage_collection_threshold:x", "threshold-not-a-number", RuntimeError,
           r"Expected a number at index 2 in ConfigTokenizer but got 'x'"),
          ("garbage_collection_threshold:-0.5", "threshold-negative", RuntimeError,
           r"garbage_collect_threshold is invalid, set it in \(0\.0, 1\.0\)"),
          ("garbage_collection_threshold:nan", "threshold-nan", RuntimeError,
           r"garbage_collect_threshold is invalid, set it in \(0\.0, 1\.0\)"),
          ("expandable_segments:TRUE", "bool-uppercase", ValueError,
           r"Expected 'True' or 'False' at index 2 in ConfigTokenizer but got 'TRUE'"),
          ("max_split_size_mb:100,expandable_segments:maybe", "bool-after-valid-key", ValueError,
           r"Expected 'True' or 'False' at index 6 in ConfigTokenizer but got 'maybe'"),
          ("expandable_segments", "missing-colon-and-value", RuntimeError, r"Index out of bounds in ConfigTokenizer"),
          (":", "lone-colon", RuntimeError, r"Index out of bounds in ConfigTokenizer"),
          ("max_split_size_mb:20:30", "two-values", RuntimeError,
           r"Error parsing CachingAllocator settings, expected , at index 3 but got ':'"),
          ("roundup_power2_divisions:[:1]", "list-missing-key", RuntimeError,
           r"Error parsing CachingAllocator settings, expected :"),
          ("roundup_power2_divisions:256:1]", "list-missing-open-bracket", RuntimeError,
           r"Error parsing CachingAllocator settings, expected , at index 3"),
          ("roundup_power2_divisions:[0:2]", "list-key-zero", RuntimeError,
           r"For roundups, the intervals have to be power of 2"),
          ("roundup_power2_divisions:[256:1,>:6]", "list-default-not-power-of-2", RuntimeError,
           r"For roundups, the divisions has to be power of 2 or 0 to disable roundup"),
          ("garbage_collection_threshold:0.5,roundup_power2_divisions:[64:2,128:4", "unclosed-after-valid",
           RuntimeError,
           r"Expected closing bracket '\]' in ConfigTokenizer but reached end of config"),
          ("backend:cudaMallocAsync", "backend-async", RuntimeError, r"Unknown allocator backend 'cudaMallocAsync'"),
          ("Max_Split_Size_MB:100", "key-wrong-case", RuntimeError,
           r"Unrecognized key 'Max_Split_Size_MB' in Accelerator allocator config\."),
      ]],
]


@pytest.mark.parametrize("call, exc, message", CASES)
def test_bad_memory_tool_or_setting_call(resources, call, exc, message):
    check_bad_call(resources, call, exc, message)
