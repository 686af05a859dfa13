"""The façade's exception types and its refusal to copy objects that own allocator state.

Owns: OutOfMemoryError (the binding raises it; the core's hooks get it from _device_arg),
DeferredMtiaCallError (lazy initialisation raises it), refuse_copy (MemPool, MTIAGraph).
Relies on: nothing but Python. Lowest layer: every module may import it."""

__all__ = ["OutOfMemoryError", "DeferredMtiaCallError", "refuse_copy"]


class OutOfMemoryError(RuntimeError):
    """The device (or the memory fraction) cannot hold the request. Message as PyTorch's."""


class DeferredMtiaCallError(Exception):
    """A call queued before initialisation failed when initialisation ran it."""


def refuse_copy(self, protocol=None):
    """`__reduce_ex__` of objects that own a reference to allocator state (a pool, a graph):
    a copy would release it a second time when it dies. As for PyTorch's MemPool and
    CUDAGraph (pybind objects), copy, deepcopy and pickle raise TypeError."""
    raise TypeError(f"cannot pickle or copy '{type(self).__name__}' object: it owns allocator state; "
                    f"share the object itself")
