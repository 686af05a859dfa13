"""Allocator configuration: MTIA_ALLOC_CONF strings (same keys, syntax and error messages as
PYTORCH_CUDA_ALLOC_CONF, spec/allocator_core.md §10), parsed at runtime through
mtia_alloc.memory._set_allocator_settings, and the environment variables MTIA_ALLOC_CONF and
MTIA_EMULATOR_MEMORY read at start-up (checked in fresh subprocesses).

Options that survive a re-parse (expandable_segments, release_lock_on_cudamalloc,
max_non_split_rounding_mb, ...) are only ever set to their defaults here, so the conftest
fixture's `_set_allocator_settings("")` really restores the default config.
"""
import pytest

import mtia_alloc as mtia
import mtia_alloc.memory
from helpers import GiB, MiB, round_size, run_code

set_settings = mtia.memory._set_allocator_settings


# ----------------------------------------------------------------------------- valid strings

@pytest.mark.parametrize("conf", [
    pytest.param("", id="empty"),
    pytest.param("max_split_size_mb:100", id="max_split"),
    pytest.param("max_split_size_mb:20", id="max_split-minimum"),
    pytest.param("max_non_split_rounding_mb:20", id="max_non_split_rounding"),
    pytest.param("roundup_power2_divisions:4", id="divisions-int"),
    pytest.param("roundup_power2_divisions:0", id="divisions-zero"),
    pytest.param("roundup_power2_divisions:[256:1,512:2,1024:4,>:8]", id="divisions-list"),
    pytest.param("roundup_power2_divisions:[1:4,>:2]", id="divisions-list-short"),
    pytest.param("garbage_collection_threshold:0.6", id="gc-threshold"),
    pytest.param("expandable_segments:False", id="expandable-False"),
    pytest.param("release_lock_on_cudamalloc:False", id="release_lock-False"),
    pytest.param("max_split_size_mb:100,garbage_collection_threshold:0.5,"
                 "roundup_power2_divisions:2", id="several"),
    pytest.param(" max_split_size_mb : 100 , roundup_power2_divisions : [ 256 : 2 ] ",
                 id="whitespace-is-ignored"),
])
def test_valid_settings_are_accepted(blocks, conf):
    set_settings(conf)
    # The allocator keeps working under the new settings.
    blocks.free(blocks.alloc(1000))
    blocks.free(blocks.alloc(30 * MiB))


@pytest.mark.parametrize("conf, size, expected", [
    pytest.param("", MiB + 1, MiB + 512, id="default-512-rounding"),
    pytest.param("roundup_power2_divisions:4", MiB + 1, MiB + MiB // 4, id="div4"),
    pytest.param("roundup_power2_divisions:2", 3 * MiB + 1, 4 * MiB, id="div2"),
    pytest.param("roundup_power2_divisions:0", MiB + 1, MiB + 512, id="div0-off"),
    pytest.param("roundup_power2_divisions:[1:4,>:2]", MiB + 1, MiB + MiB // 4,
                 id="list-first-interval"),
    pytest.param("roundup_power2_divisions:[1:4,>:2]", 3 * MiB + 1, 4 * MiB, id="list-greater"),
    pytest.param(" roundup_power2_divisions : 4 ", MiB + 1, MiB + MiB // 4, id="whitespace"),
])
def test_divisions_setting_changes_rounding(conf, size, expected):
    set_settings(conf)
    assert round_size(size) == expected


def test_each_parse_resets_unspecified_rounding_options():
    set_settings("roundup_power2_divisions:4")
    assert round_size(MiB + 1) == MiB + MiB // 4
    set_settings("max_split_size_mb:100")
    assert round_size(MiB + 1) == MiB + 512
    set_settings("")
    assert round_size(MiB + 1) == MiB + 512


def test_settings_show_in_snapshot():
    conf = "max_split_size_mb:100,roundup_power2_divisions:4"
    set_settings(conf)
    settings = mtia.snapshot()["allocator_settings"]
    assert settings["max_split_size"] == 100 * MiB
    assert settings["roundup_power2_divisions"]["1"] == 4
    assert settings["roundup_power2_divisions"]["32768"] == 4
    assert settings["expandable_segments"] is False
    set_settings("")
    settings = mtia.snapshot()["allocator_settings"]
    assert settings["max_split_size"] == -1
    assert settings["roundup_power2_divisions"]["1"] == 0


# ----------------------------------------------------------------------------- invalid strings

GC_MESSAGE = r"garbage_collect_threshold is invalid, set it in \(0\.0, 1\.0\)"
BOOL_MESSAGE = "Expected 'True' or 'False'"


@pytest.mark.parametrize("conf, message", [
    pytest.param("max_split_size_mb:19", "max_split_size_mb too small, must be >= 20",
                 id="max_split-19"),
    pytest.param("max_split_size_mb:0", "max_split_size_mb too small, must be >= 20",
                 id="max_split-0"),
    pytest.param("max_non_split_rounding_mb:10", "max_non_split_rounding_mb too small, must be >= 20",
                 id="max_non_split_rounding-10"),
    pytest.param("garbage_collection_threshold:1.0", GC_MESSAGE, id="gc-1.0"),
    pytest.param("garbage_collection_threshold:0", GC_MESSAGE, id="gc-0"),
    pytest.param("garbage_collection_threshold:1.5", GC_MESSAGE, id="gc-1.5"),
    pytest.param("expandable_segments:true", BOOL_MESSAGE, id="expandable-lowercase"),
    pytest.param("expandable_segments:1", BOOL_MESSAGE, id="expandable-1"),
    pytest.param("release_lock_on_cudamalloc:yes", BOOL_MESSAGE, id="release_lock-yes"),
    pytest.param("not_an_option:1", "Unrecognized key 'not_an_option'", id="unknown-key"),
    pytest.param("max_split_size_mb:100,bogus:3", "Unrecognized key 'bogus'",
                 id="unknown-key-after-valid"),
    pytest.param("roundup_power2_divisions:3",
                 "For roundups, the divisions has to be power of 2 or 0 to disable roundup",
                 id="divisions-not-power-of-2"),
    pytest.param("roundup_power2_divisions:[256:3]",
                 "For roundups, the divisions has to be power of 2 or 0 to disable roundup",
                 id="divisions-list-value-not-power-of-2"),
    pytest.param("roundup_power2_divisions:[300:2]",
                 "For roundups, the intervals have to be power of 2",
                 id="divisions-list-key-not-power-of-2"),
    pytest.param("roundup_power2_divisions:[256:1,512:2",
                 "Expected closing bracket ']' in ConfigTokenizer but reached end of config",
                 id="divisions-list-unclosed"),
])
def test_invalid_settings_raise_pytorch_messages(conf, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        set_settings(conf)


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
def test_invalid_settings_are_rejected(conf, message):
    """Spec must-have 15 (allocator_core.md §15.15)."""
    with pytest.raises((RuntimeError, ValueError), match=message):
        mtia.memory._set_allocator_settings(conf)


@pytest.mark.parametrize("conf", [
    pytest.param("max_split_size_mb:abc", id="non-numeric-size"),
    pytest.param("garbage_collection_threshold:abc", id="non-numeric-threshold"),
    pytest.param("max_split_size_mb", id="missing-value"),
    pytest.param("max_split_size_mb:", id="empty-value"),
])
def test_malformed_settings_fail_loudly(conf):
    with pytest.raises((RuntimeError, ValueError)) as info:
        set_settings(conf)
    assert str(info.value)


def test_allocator_still_works_after_a_rejected_setting(blocks):
    with pytest.raises((RuntimeError, ValueError)):
        set_settings("max_split_size_mb:19")
    set_settings("")
    assert round_size(MiB + 1) == MiB + 512
    blocks.free(blocks.alloc(5 * MiB))


# ----------------------------------------------------------------------------- environment, in a subprocess

def test_env_alloc_conf_sets_max_split_size():
    code = ("import mtia_alloc as m\n"
            "p = m.caching_allocator_alloc(1 << 20)\n"
            "m.caching_allocator_delete(p)\n"
            "print(m.memory_stats()['max_split_size'])\n")
    result = run_code(code, env={"MTIA_ALLOC_CONF": "max_split_size_mb:100"})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == 100 * MiB


@pytest.mark.parametrize("value, expected", [("512MiB", 512 * MiB), ("1GiB", 1 << 30)])
def test_env_emulator_memory_sets_device_capacity(value, expected):
    code = "import mtia_alloc as m\nprint(m.mem_get_info()[1])\n"
    result = run_code(code, env={"MTIA_EMULATOR_MEMORY": value})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == expected


@pytest.mark.parametrize("configure, free_at_start", [
    ("", 16 * GiB - 64 * MiB),                                       # default: 1/256 of the device
    ("m.emulator.configure(runtime_reserved='1GiB')", 15 * GiB),
    ("m.emulator.configure(runtime_reserved=0)", 16 * GiB),          # what `replay` uses
])
def test_runtime_reservation_makes_free_less_than_total(configure, free_at_start):
    # Like a real device's context: the runtime holds some memory before the first allocation,
    # so "half of the device, twice" does not fit (PyTorch's test_out_of_memory_retry).
    code = ("import mtia_alloc as m\n" + configure + "\n"
            "free, total = m.mem_get_info()\n"
            "half = m.caching_allocator_alloc(total // 2)\n"
            "try:\n    m.caching_allocator_alloc(total // 2)\n    print('fits')\n"
            "except m.OutOfMemoryError:\n    print('oom')\n"
            "print(free, total, m.emulator.runtime_reserved(), m.memory_reserved())\n")
    result = run_code(code)
    assert result.returncode == 0, result.stderr
    verdict, numbers = result.stdout.split("\n")[:2]
    free, total, runtime, reserved = map(int, numbers.split())
    assert (free, total, runtime) == (free_at_start, 16 * GiB, 16 * GiB - free_at_start)
    assert verdict == ("fits" if runtime == 0 else "oom")
    assert reserved == (16 * GiB if runtime == 0 else 8 * GiB)


def test_env_emulator_memory_malformed_fails_clearly():
    code = ("import mtia_alloc as m\n"
            "m.caching_allocator_delete(m.caching_allocator_alloc(4096))\n"
            "print(m.mem_get_info()[1])\n")
    result = run_code(code, env={"MTIA_EMULATOR_MEMORY": "12XB"})
    assert result.returncode != 0, result.stdout
    assert "MTIA_EMULATOR_MEMORY" in result.stderr
