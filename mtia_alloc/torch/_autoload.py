"""torch's device-backend autoload entry point (group "torch.backends"), run at the end of
`import torch`. It loads the backend, but never makes `import torch` fail: a wrong torch
version or a failed build becomes a warning, and torch.mtia stays unavailable."""
import warnings


def load():
    try:
        import mtia_alloc.torch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - reported, not raised: import torch must work
        warnings.warn(f"mtia_alloc: the PyTorch MTIA backend was not loaded: {e}", RuntimeWarning, stacklevel=2)
