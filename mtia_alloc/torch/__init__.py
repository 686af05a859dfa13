"""mtia_alloc as PyTorch's MTIA backend: torch.mtia, device="mtia" tensors, streams,
events, graphs and memory observability, all answered by mtia_alloc's caching allocator
on the emulated devices.

    import torch                 # with mtia_alloc installed, its entry point loads this
    import mtia_alloc.torch      # or load it explicitly
    x = torch.ones(4, device="mtia")

Supports torch 2.13.* only: the C++ MTIA hooks interface changes between releases.
Importing this module must happen before anything asks torch.mtia or torch.accelerator
about MTIA (PyTorch creates its MTIA hooks once, on first use, and keeps them)."""
import atexit

import mtia_alloc
from mtia_alloc import _C

from . import _build

SUPPORTED_TORCH = "2.13"

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised without torch
    raise ImportError("mtia_alloc.torch needs PyTorch 2.13: pip install 'mtia_alloc[torch]' "
                      "(or pip install torch==2.13.*)") from e

_version = torch.__version__.split("+")[0]
if _version.split(".")[:2] != SUPPORTED_TORCH.split("."):
    raise ImportError(f"mtia_alloc.torch supports torch {SUPPORTED_TORCH}.* only (its C++ MTIA hooks interface "
                      f"changes between releases), but torch {torch.__version__} is installed: "
                      f"pip install 'torch=={SUPPORTED_TORCH}.*' (or pip install 'mtia_alloc[torch]')")

_ext = _build.load()
_ext.install(_C._capi_capsule())
if not _ext.hooks_are_ours():
    raise RuntimeError(
        "torch.mtia was used in this process before mtia_alloc.torch was loaded, and PyTorch keeps the MTIA "
        "hooks it made then (no backend) for the life of the process. Import mtia_alloc.torch (or just import "
        "torch with mtia_alloc installed, whose entry point loads it) before calling anything in torch.mtia, "
        "torch.accelerator or creating an MTIA tensor.")

__all__ = ["SUPPORTED_TORCH", "is_loaded"]


def _drain_autograd_device_threads():
    """At exit: a backward pass on an MTIA device runs in autograd's device thread, which
    drops its last reference to the finished graph task a moment after backward() has
    returned; torch 2.13 stashes a Python object (contextvars) in that task, so if the
    interpreter is already finalizing then, its decref kills the thread inside a noexcept
    frame and the process aborts ("terminate called without an active exception"). A
    last, Python-free backward through every device's queue makes each device thread
    finish with the user's graph tasks before finalization begins."""
    try:
        if not torch.mtia.is_initialized():
            return
        engine = torch.autograd.Variable._execution_engine
        for d in range(torch.mtia.device_count()):
            x = torch.ones(1, device=f"mtia:{d}", requires_grad=True)
            y = x.sum()
            # The engine itself, not torch.autograd.backward: that would stash the context again.
            engine.run_backward((y,), (torch.ones_like(y),), False, False, (), True, True)
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


atexit.register(_drain_autograd_device_threads)


def is_loaded():
    """True: the backend is loaded and answers torch.mtia."""
    return True

