"""What the history benchmarks share (bench/test_bench_history*.py): the Python stack
depth above the measured calls, which is what a captured stack walks."""

DEPTH = 30  # Python frames above the allocation call: a typical training-loop stack


def at_depth(depth, fn, *args):
    """Runs fn with `depth` extra Python frames on the stack."""
    if depth <= 0:
        return fn(*args)
    return at_depth(depth - 1, fn, *args)
