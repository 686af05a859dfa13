"""python -m mtia_alloc.torch [build]: compiles the PyTorch backend now (importing the
package does, once per version, with a progress line) and says where the build is cached."""
import sys

from . import _ext


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["build"]):
        print("usage: python -m mtia_alloc.torch [build]", file=sys.stderr)
        return 2
    import torch
    print(f"mtia_alloc.torch: backend ready for torch {torch.__version__} ({_ext.__file__}); "
          f"torch.mtia.is_available() = {torch.mtia.is_available()}, {torch.mtia.device_count()} devices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
