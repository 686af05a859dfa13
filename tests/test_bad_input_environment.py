"""Malformed settings at start-up, each in a fresh interpreter: MTIA_EMULATOR_DEVICES,
MTIA_EMULATOR_MEMORY and MTIA_ALLOC_CONF values, emulator.configure() arguments before
initialisation, and a deferred call that fails at initialisation. Each must fail with a
Python traceback naming the exception and the problem, never a crash and never initialise.
"""
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import run_code


PROBE = "import mtia_alloc as m\nm.caching_allocator_delete(m.caching_allocator_alloc(4096))\nprint('initialised')\n"

ENV_CASES = {
    # id: (environment, code, exception type name, message fragment)
    # MTIA_EMULATOR_DEVICES=0 is a machine without devices (tests/test_no_devices.py)
    "devices-0": ({"MTIA_EMULATOR_DEVICES": "0"}, PROBE, "RuntimeError",
                  r"No MTIA devices are available \(MTIA_EMULATOR_DEVICES=0\)"),
    "devices-abc": ({"MTIA_EMULATOR_DEVICES": "abc"}, PROBE, "ValueError",
                    r"MTIA_EMULATOR_DEVICES must be a whole number of devices, got 'abc'"),
    "devices-100": ({"MTIA_EMULATOR_DEVICES": "100"}, PROBE, "ValueError",
                    r"MTIA_EMULATOR_DEVICES must be between 1 and 64, got 100"),
    "devices-1.5": ({"MTIA_EMULATOR_DEVICES": "1.5"}, PROBE, "ValueError",
                    r"MTIA_EMULATOR_DEVICES must be a whole number of devices, got '1\.5'"),
    "memory--1": ({"MTIA_EMULATOR_MEMORY": "-1"}, PROBE, "ValueError",
                  r"MTIA_EMULATOR_MEMORY: '-1' is out of range"),
    "memory-abc": ({"MTIA_EMULATOR_MEMORY": "abc"}, PROBE, "ValueError",
                   r"MTIA_EMULATOR_MEMORY: cannot parse 'abc' as a memory size"),
    "memory-1PiB": ({"MTIA_EMULATOR_MEMORY": "1PiB"}, PROBE, "ValueError",
                    r"MTIA_EMULATOR_MEMORY: cannot parse '1PiB' as a memory size"),
    "memory-100-bytes": ({"MTIA_EMULATOR_MEMORY": "100"}, PROBE, "ValueError",
                         r"MTIA_EMULATOR_MEMORY must be at least 1 MiB, got '100'"),
    "memory-512KiB": ({"MTIA_EMULATOR_MEMORY": "512KiB"}, PROBE, "ValueError",
                      r"MTIA_EMULATOR_MEMORY must be at least 1 MiB, got '512KiB'"),
    "alloc-conf-bogus": ({"MTIA_ALLOC_CONF": "bogus:1"}, PROBE, "RuntimeError",
                         r"MTIA_ALLOC_CONF='bogus:1': Unrecognized key 'bogus' in Accelerator allocator config\."),
    "alloc-conf-bad-bool": ({"MTIA_ALLOC_CONF": "expandable_segments:true"}, PROBE, "ValueError",
                            r"MTIA_ALLOC_CONF='expandable_segments:true': Expected 'True' or 'False'"),
    "alloc-conf-bad-number": ({"MTIA_ALLOC_CONF": "max_split_size_mb:abc"}, PROBE, "RuntimeError",
                              r"MTIA_ALLOC_CONF='max_split_size_mb:abc': Expected a non-negative integer"),
    "configure-count-str": ({}, "import mtia_alloc as m\nm.emulator.configure(device_count='2')\n", "TypeError",
                            r"device_count must be an int, got str"),
    "configure-count-0": ({}, "import mtia_alloc as m\nm.emulator.configure(device_count=0)\n", "ValueError",
                          r"device_count must be between 1 and 64, got 0"),
    "configure-memory-float": ({}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device=1.5e9)\n",
                               "TypeError", r"memory_per_device must be an int number of bytes or a string"),
    "configure-memory-abc": ({}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device='abc')\n",
                             "ValueError", r"memory_per_device: cannot parse 'abc'"),
    "configure-memory-100-bytes": ({}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device='100')\n",
                                   "ValueError", r"memory_per_device must be at least 1 MiB, got '100'"),
    "configure-memory-1PiB-int": ({}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device=1 << 50)\n",
                                  "ValueError", r"memory_per_device must be at most 64 TiB"),
    "configure-runtime-reserved-bool": ({}, "import mtia_alloc as m\nm.emulator.configure(runtime_reserved=True)\n",
                                        "TypeError", r"runtime_reserved must be an int number of bytes or a string"),
    "configure-runtime-reserved-negative": ({}, "import mtia_alloc as m\nm.emulator.configure(runtime_reserved=-1)\n",
                                            "ValueError", r"runtime_reserved must be >= 0, got -1"),
    "configure-runtime-reserved-whole-device": (
        {}, "import mtia_alloc as m\nm.emulator.configure(memory_per_device='8MiB', runtime_reserved='8MiB')\n",
        "ValueError", r"runtime_reserved \(8388608 bytes\) must be less than memory_per_device \(8388608 bytes\)"),
    "configure-runtime-reserved-over-env-memory": (
        {"MTIA_EMULATOR_MEMORY": "4MiB"}, "import mtia_alloc as m\nm.emulator.configure(runtime_reserved='4MiB')\n" + PROBE,
        "ValueError", r"emulator.configure\(runtime_reserved=4194304\) must be less than the device memory"),
    "deferred-set_rng_state-bad-device": (
        {}, "import numpy, mtia_alloc as m\nm.set_rng_state(numpy.zeros(40, numpy.uint8), 9)\n" + PROBE,
        "DeferredMtiaCallError", r"MTIA call failed lazily at initialization with error: Invalid device index 9"),
}


@pytest.fixture(scope="module")
def fresh_runs():
    """Every ENV_CASES interpreter, run in parallel once for the module."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {cid: pool.submit(run_code, code, env=env) for cid, (env, code, _, _) in ENV_CASES.items()}
        return {cid: f.result() for cid, f in futures.items()}


@pytest.mark.parametrize("case_id", list(ENV_CASES), ids=list(ENV_CASES))
def test_malformed_setting_in_a_fresh_interpreter(fresh_runs, case_id):
    _, _, exc_name, message = ENV_CASES[case_id]
    proc = fresh_runs[case_id]
    assert proc.returncode != 0, proc.stdout
    assert "initialised" not in proc.stdout
    assert "Fatal" not in proc.stderr and "Segmentation" not in proc.stderr, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert re.search(rf"^(\w+\.)*{exc_name}: ", proc.stderr, re.M), proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
