"""torch's device-backend autoload entry point (group "torch.backends"), run at the end of
`import torch` when mtia_alloc is installed. It loads the PyTorch backend,
mtia_alloc.torch, but never makes `import torch` fail: a wrong torch version or a failed
build becomes a warning, and torch.mtia stays unavailable. (It lives outside the
mtia_alloc.torch package on purpose: importing that package is what may fail.)"""
import warnings


def load():
    try:
        import mtia_alloc.torch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - reported, not raised: import torch must keep working
        warnings.warn(f"mtia_alloc: the PyTorch MTIA backend was not loaded: {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=2)
