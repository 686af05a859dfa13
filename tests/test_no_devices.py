"""MTIA_EMULATOR_DEVICES=0 (issue 19 item 8): no device, as a machine without one:
is_available() is False, device_count() is 0, and device calls raise a clear RuntimeError.
Each case runs in a fresh interpreter."""
import os
import subprocess
import sys
import textwrap

import mtia_alloc as mtia


def _run(code, devices="0"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTIA_")}
    env["MTIA_EMULATOR_DEVICES"] = devices
    root = os.path.dirname(os.path.dirname(os.path.abspath(mtia.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_zero_devices_is_not_available_and_device_calls_raise_runtime_error():
    proc = _run("""
        import mtia_alloc as mtia
        assert mtia.is_available() is False
        assert mtia.device_count() == 0
        assert not mtia.is_initialized()
        calls = {
            "init": mtia.init,
            "current_device": mtia.current_device,
            "caching_allocator_alloc": lambda: mtia.caching_allocator_alloc(512),
            "empty": lambda: mtia.empty(4),
            "Stream": mtia.Stream,
            "synchronize": mtia.synchronize,
            "memory_allocated": mtia.memory_allocated,
            "memory_stats": mtia.memory_stats,
            "mem_get_info": mtia.mem_get_info,
        }
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as e:
                assert "No MTIA devices are available" in str(e), (name, e)
                assert "MTIA_EMULATOR_DEVICES=0" in str(e), (name, e)
            else:
                raise AssertionError(f"{name} did not raise")
        assert mtia.is_available() is False and mtia.device_count() == 0
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_zero_devices_then_configure_gives_devices():
    proc = _run("""
        import mtia_alloc as mtia
        assert not mtia.is_available()
        mtia.emulator.configure(device_count=1)
        assert mtia.is_available() and mtia.device_count() == 1
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(512))
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_malformed_device_count_makes_is_available_false_with_a_warning():
    proc = _run("""
        import warnings, mtia_alloc as mtia
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert mtia.is_available() is False
        assert any("MTIA_EMULATOR_DEVICES must be a whole number" in str(x.message) for x in w), w
        try:
            mtia.device_count()
        except ValueError:
            print("ok")
    """, devices="abc")
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout
