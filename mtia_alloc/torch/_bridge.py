"""What the backend's C++ hooks (csrc/backend.cpp) call for torch.mtia's Python-shaped
answers: stats dicts, snapshots, memory history, OOM observers and graphs. Each function
forwards to mtia_alloc's own API, so torch.mtia and mtia_alloc share one state."""
import sys
import warnings

import mtia_alloc
from mtia_alloc import _C, memory as _memory

_graphs = {}  # handle -> mtia_alloc.MTIAGraph (pool, capture stream and routing)


def _device(d):
    return None if d is None or d < 0 else d


def memory_stats(device):
    return mtia_alloc.memory_stats(_device(device))


def nested_stats(device):
    mtia_alloc.init()
    return _C.memory_stats_nested(device)


def reset_peak_memory_stats(device):
    mtia_alloc.reset_peak_memory_stats(_device(device))


def reset_accumulated_memory_stats(device):
    mtia_alloc.reset_accumulated_memory_stats(_device(device))


def empty_cache(pool):
    if pool is None or tuple(pool) == (0, 0):
        mtia_alloc.empty_cache()
    else:
        _C.empty_cache(tuple(pool))


def device_capability(device):
    return mtia_alloc.get_device_capability(_device(device))


def device_properties(device):
    return mtia_alloc.get_device_properties(_device(device))


def show_config():
    mtia_alloc.init()
    return (f"mtia_alloc {mtia_alloc.__version__}: {mtia_alloc.device_count()} emulated MTIA devices of "
            f"{mtia_alloc.get_device_properties(0)['total_memory']} bytes; allocator settings "
            f"{_C.allocator_settings()['PYTORCH_CUDA_ALLOC_CONF']!r}")


def record_memory_history(enabled, stacks, max_entries):
    # torch.mtia passes max_entries=0 by default, meaning "no limit" there.
    _memory._record_memory_history(enabled, context="all", stacks=stacks,
                                   max_entries=max_entries if max_entries else sys.maxsize)


def snapshot(local_path):
    snap = mtia_alloc.snapshot()
    if local_path:
        import pickle
        with open(local_path, "wb") as f:
            pickle.dump(snap, f, protocol=4)
    return snap


def attach_out_of_memory_observer(observer):
    mtia_alloc.attach_out_of_memory_observer(observer)


def graph_pool_handle():
    return mtia_alloc.graph_pool_handle()


def graph_create(handle, keep_graph):
    _graphs[handle] = mtia_alloc.MTIAGraph(keep_graph=keep_graph)


def _graph(handle):
    g = _graphs.get(handle)
    if g is None:
        raise RuntimeError(f"MTIAGraph handle {handle} is unknown (destroyed?)")
    return g


def graph_destroy(handle):
    g = _graphs.pop(handle, None)
    if g is not None:
        g.reset()


def graph_capture_begin(handle, pool):
    _graph(handle).capture_begin(tuple(pool))


def graph_capture_end(handle, torch_ops):
    g = _graph(handle)
    with warnings.catch_warnings():
        if torch_ops:  # mtia_alloc's own kernel list is empty when only torch ops ran
            warnings.simplefilter("ignore", UserWarning)
        g.capture_end()


def graph_instantiate(handle):
    _graph(handle).instantiate()


def graph_replay(handle):
    _graph(handle).replay()


def graph_reset(handle):
    _graph(handle).reset()


def graph_pool(handle):
    return _graph(handle).pool()
