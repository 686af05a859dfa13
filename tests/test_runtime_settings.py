"""Every key MTIA_ALLOC_CONF's parser accepts takes effect when set at run time through
memory._set_allocator_settings, or is refused with a message (issue 19 item 7). One test
per key. Keys that survive a re-parse are put back to their defaults at the end."""
import os
import subprocess
import sys

import pytest

import mtia_alloc as mtia
import mtia_alloc.memory

MiB = 1 << 20
set_settings = mtia.memory._set_allocator_settings


def settings():
    return mtia.snapshot()["allocator_settings"]


@pytest.fixture
def fresh_cache():
    mtia.synchronize()
    mtia.empty_cache()
    yield
    set_settings("max_split_size_mb:20,max_non_split_rounding_mb:20,expandable_segments:False,"
                 "per_process_memory_fraction:1.0")
    set_settings("")
    mtia.empty_cache()


def test_per_process_memory_fraction_takes_effect_on_every_device(fresh_cache):
    set_settings("per_process_memory_fraction:0.5")
    for d in range(mtia.device_count()):
        assert mtia.get_per_process_memory_fraction(d) == 0.5
    _, total = mtia.mem_get_info(0)
    with pytest.raises(mtia.OutOfMemoryError):
        mtia.caching_allocator_alloc(int(total * 0.6))
    set_settings("per_process_memory_fraction:1.0")
    assert mtia.get_per_process_memory_fraction(0) == 1.0


def test_settings_without_the_fraction_keep_the_fraction(fresh_cache):
    mtia.set_per_process_memory_fraction(0.25, 1)
    set_settings("max_split_size_mb:100")
    assert mtia.get_per_process_memory_fraction(1) == 0.25
    assert mtia.get_per_process_memory_fraction(0) == 1.0


def test_a_bad_string_with_a_fraction_changes_nothing(fresh_cache):
    with pytest.raises(RuntimeError):
        set_settings("per_process_memory_fraction:0.5,bogus:1")
    assert mtia.get_per_process_memory_fraction(0) == 1.0


def test_max_split_size_mb_takes_effect(fresh_cache, blocks):
    set_settings("max_split_size_mb:20")
    assert settings()["max_split_size"] == 20 * MiB
    before = mtia.memory_stats()["oversize_allocations.allocated"]
    blocks.free(blocks.alloc(30 * MiB))  # at or above max_split_size: an oversize allocation
    assert mtia.memory_stats()["oversize_allocations.allocated"] == before + 1


def test_max_non_split_rounding_mb_takes_effect(fresh_cache, blocks):
    # An oversize cached block serves a smaller request only if it is less than
    # max_non_split_rounding bigger than it.
    set_settings("max_split_size_mb:20")
    blocks.free(blocks.alloc(90 * MiB))
    reserved = mtia.memory_reserved()
    blocks.free(blocks.alloc(30 * MiB))  # 90 >= 30 + 20: a new segment
    assert mtia.memory_reserved() > reserved
    mtia.empty_cache()
    set_settings("max_split_size_mb:20,max_non_split_rounding_mb:64")
    blocks.free(blocks.alloc(90 * MiB))
    reserved = mtia.memory_reserved()
    blocks.free(blocks.alloc(30 * MiB))  # 90 < 30 + 64: the cached block serves it
    assert mtia.memory_reserved() == reserved


def test_roundup_power2_divisions_takes_effect(fresh_cache):
    set_settings("roundup_power2_divisions:4")
    assert mtia.memory._round_size(MiB + 1) == MiB + MiB // 4
    assert settings()["roundup_power2_divisions"]["1"] == 4


def test_garbage_collection_threshold_takes_effect(fresh_cache, blocks):
    set_settings("garbage_collection_threshold:0.5")
    assert settings()["garbage_collection_threshold"] == 0.5
    # Under a 64 MiB fraction, a malloc that finds no cached block while more than half of
    # it is reserved first frees the cached blocks (without the threshold, 18 MiB stay).
    mtia.set_per_process_memory_fraction(64 * MiB / mtia.mem_get_info(0)[1], 0)
    blocks.alloc(16 * MiB, device=0)
    blocks.free(blocks.alloc(18 * MiB, device=0))
    assert mtia.memory_reserved(0) == 34 * MiB
    blocks.alloc(20 * MiB, device=0)
    assert mtia.memory_reserved(0) == 36 * MiB


def test_expandable_segments_takes_effect(fresh_cache, blocks):
    set_settings("expandable_segments:True")
    p = blocks.alloc(30 * MiB)
    seg = [s for s in mtia.memory_snapshot() if s["address"] <= p < s["address"] + s["total_size"]][0]
    assert seg["is_expandable"] is True
    blocks.free(p)
    set_settings("expandable_segments:False")
    mtia.empty_cache()
    p = blocks.alloc(30 * MiB)
    seg = [s for s in mtia.memory_snapshot() if s["address"] <= p < s["address"] + s["total_size"]][0]
    assert seg["is_expandable"] is False


def test_backend_takes_only_native(fresh_cache):
    set_settings("backend:native")
    with pytest.raises(RuntimeError, match="Unknown allocator backend 'cudaMallocAsync'"):
        set_settings("backend:cudaMallocAsync")


@pytest.mark.parametrize("key", ["release_lock_on_cudamalloc", "graph_capture_record_stream_reuse"])
def test_unimplemented_keys_are_refused_when_true(fresh_cache, key):
    set_settings(f"{key}:False")  # the default: accepted
    set_settings("max_split_size_mb:100")
    with pytest.raises(NotImplementedError, match=rf"{key}:True is not supported by mtia_alloc"):
        set_settings(f"roundup_power2_divisions:4, {key} : True")
    assert settings()[key] is False
    assert settings()["max_split_size"] == 100 * MiB  # unchanged


def test_unimplemented_key_in_the_environment_is_refused():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    env["MTIA_ALLOC_CONF"] = "release_lock_on_cudamalloc:True"
    root = os.path.dirname(os.path.dirname(os.path.abspath(mtia.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", "import mtia_alloc as m; m.init()"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "NotImplementedError" in proc.stderr and "release_lock_on_cudamalloc:True" in proc.stderr
