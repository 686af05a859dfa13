"""empty_cache() and busy streams (issue 19, item 3): it waits for a device's busy streams
only when it has something to give back. With nothing cached it returns at once, however
long the kernels running on the device; with a free segment cached on a busy stream it
still waits for the stream and then releases the segment (cudaFree synchronizes).

Each case runs in a fresh interpreter, so the long kernel delays no other test."""
import textwrap

from helpers import run_code


def _run(code):
    r = run_code(textwrap.dedent("""
        import time
        import mtia_alloc as mtia
        from mtia_alloc import emulator
        MiB = 1 << 20
    """) + textwrap.dedent(code), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_empty_cache_with_nothing_cached_does_not_wait_for_a_busy_stream():
    out = _run("""
        s = mtia.Stream()
        a = mtia.empty(1000, stream=s)  # allocated, not cached: nothing to release
        emulator.sleep(3000, stream=s)
        emulator.sleep(3000)  # the default stream too
        t0 = time.monotonic()
        mtia.empty_cache()
        print(round(time.monotonic() - t0, 3))
        assert not s.query()
        mtia.memory.check_invariants()
    """)
    assert float(out.split()[-1]) < 0.5, out


def test_empty_cache_with_only_split_segments_cached_does_not_wait():
    # A segment of which one block is still allocated cannot go back: nothing to release.
    out = _run("""
        s = mtia.Stream()
        p = mtia.caching_allocator_alloc(1 * MiB, stream=s)
        q = mtia.caching_allocator_alloc(1 * MiB, stream=s)  # same 20 MiB segment
        mtia.caching_allocator_delete(q)
        emulator.sleep(3000, stream=s)
        reserved = mtia.memory_reserved()
        t0 = time.monotonic()
        mtia.empty_cache()
        print(round(time.monotonic() - t0, 3))
        assert mtia.memory_reserved() == reserved
        mtia.caching_allocator_delete(p)
        mtia.memory.check_invariants()
    """)
    assert float(out.split()[-1]) < 0.5, out


def test_empty_cache_with_a_free_segment_on_a_busy_stream_still_waits_and_releases_it():
    out = _run("""
        s = mtia.Stream()
        mtia.caching_allocator_delete(mtia.caching_allocator_alloc(4 * MiB, stream=s))
        emulator.sleep(800, stream=s)
        t0 = time.monotonic()
        mtia.empty_cache()
        print(round(time.monotonic() - t0, 3), mtia.memory_reserved())
        mtia.memory.check_invariants()
    """)
    waited, reserved = out.split()[-2:]
    assert float(waited) > 0.5 and reserved == "0", out
