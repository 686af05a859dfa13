"""The snapshot view: PyTorch's memory snapshot dicts read safely (load), modelled for a
REPL (Snapshot, Segment, Block, Fragmentation) and drawn as HTML (render). Named `viz` so
that the package attribute `mtia_alloc.snapshot` stays the snapshot() function.

Modules, lowest first: load (unpickler, loader, validator; plain dicts only), frames
(which stack frame names an allocation's call site), render (HTML/SVG; reads a Snapshot
through its methods), reports (the faces of fit/sweep/diff/ranks results), runner (starts
those commands in a child process for the REPL: a replay needs a fresh allocator), model
(the classes). The public class
is also `mtia_alloc.memory.Snapshot`. The summary/plot commands are mtia_alloc.tools.snapshot_cli.
Relies on: _format and history (model: Snapshot() of the live allocator)."""
from .load import UnsafePickleError, load
from .model import Block, Fragmentation, Segment, Snapshot

__all__ = ["Snapshot", "Segment", "Block", "Fragmentation", "load", "UnsafePickleError"]
