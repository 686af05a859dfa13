"""mtia_alloc: a fast caching device-memory allocator with PyTorch's semantics, on an
emulated MTIA accelerator, behind a torch.mtia-shaped API.

    import mtia_alloc as mtia
    p = mtia.caching_allocator_alloc(4096)
    mtia.caching_allocator_delete(p)
    mtia.memory_stats()["allocated_bytes.all.peak"]

The package is in layers, each importing only from the ones below it (the table and the
check are in tests/test_import_graph.py): private state (_errors, _settings, _format,
_kernel_errors, _lazy_init, _device_arg, _capture); devices, streams, kernel submission,
history, pools, raw allocators, stats and the snapshot view (viz/); the public modules
memory, array, graphs, emulator, rng; this façade; on top the tools (tools/: the CLI,
replay, workloads, bench suite, visualizer checks), which the library never imports.
mtia_alloc/torch/ is reserved for the PyTorch backend; nothing here imports torch.
Owns: the public names of torch.mtia (API.md) and the exit handlers.
Relies on: the public modules (devices, streams, memory, array, graphs, emulator, rng).
"""
import atexit

from . import _C
from ._errors import DeferredMtiaCallError, OutOfMemoryError
from ._lazy_init import is_initialized
from .array import DeviceArray, empty
from .devices import (current_device, device, device_count, get_device_capability, get_device_properties, init,
                      is_available, is_bf16_supported, set_device, synchronize)
from .graphs import MTIAGraph, graph, graph_pool_handle, is_current_stream_capturing
from .memory import (MemPool, attach_out_of_memory_observer, caching_allocator_alloc, caching_allocator_delete,
                     empty_cache, get_allocator_backend, get_per_process_memory_fraction, max_memory_allocated,
                     max_memory_cached, max_memory_reserved, mem_get_info, memory_allocated, memory_cached,
                     memory_reserved, memory_snapshot, memory_stats, memory_stats_as_nested_dict, memory_summary,
                     record_memory_history, record_stream, reset_accumulated_memory_stats, reset_max_memory_allocated,
                     reset_max_memory_cached, reset_peak_memory_stats, set_per_process_memory_fraction, snapshot,
                     use_mem_pool)
from .rng import (get_rng_state, get_rng_state_all, initial_seed, manual_seed, manual_seed_all, seed, seed_all,
                  set_rng_state, set_rng_state_all)
from .streams import Event, Stream, StreamContext, current_stream, default_stream, set_stream, stream
from . import emulator, memory  # the submodules API.md names, as attributes

__version__ = "0.1.0"

__all__ = [
    "DeferredMtiaCallError", "DeviceArray", "Event", "MTIAGraph", "MemPool", "OutOfMemoryError", "Stream",
    "StreamContext", "attach_out_of_memory_observer", "caching_allocator_alloc", "caching_allocator_delete",
    "current_device", "current_stream", "default_stream", "device", "device_count", "empty", "empty_cache",
    "emulator", "get_device_capability", "get_device_properties", "get_per_process_memory_fraction",
    "get_rng_state", "get_rng_state_all", "graph", "graph_pool_handle", "init", "initial_seed", "is_available",
    "is_bf16_supported", "is_current_stream_capturing", "is_initialized", "manual_seed", "manual_seed_all",
    "max_memory_allocated", "max_memory_reserved", "mem_get_info", "memory", "memory_allocated",
    "memory_reserved", "memory_snapshot", "memory_stats", "memory_stats_as_nested_dict", "memory_summary",
    "record_memory_history", "record_stream", "reset_accumulated_memory_stats", "reset_peak_memory_stats",
    "seed", "seed_all", "set_device", "set_per_process_memory_fraction", "set_rng_state", "set_rng_state_all",
    "set_stream",
    "snapshot", "stream", "synchronize", "use_mem_pool", "get_allocator_backend", "memory_cached",
    "max_memory_cached", "reset_max_memory_allocated", "reset_max_memory_cached",
]

# Stream workers must stop before the interpreter finalises (queued Python kernels are
# dropped); arrays that die after that leave their blocks to the process's exit.
atexit.register(_C._mark_shut_down)
atexit.register(_C.shutdown)
