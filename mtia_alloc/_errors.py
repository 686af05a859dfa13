"""The façade's exception types and its refusal to copy objects that own allocator state.

Owns: OutOfMemoryError (the binding raises it; the core's hooks get it from _device_arg),
DeferredMtiaCallError (lazy initialisation raises it), refuse_copy (MemPool, MTIAGraph),
as_integer (sizes and indices: any integer type, numpy's included, never bool).
Relies on: nothing but Python. Lowest layer: every module may import it."""

import operator

__all__ = ["OutOfMemoryError", "DeferredMtiaCallError", "refuse_copy", "as_integer"]


def as_integer(value):
    """`value` as an int if it is an integer of any type (int, numpy integer, anything with
    __index__) other than bool, else None."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


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
