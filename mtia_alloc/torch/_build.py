"""Builds (once) and loads the backend's C++ extension, csrc/*.cpp, with
torch.utils.cpp_extension. The build is cached per source hash, torch version and Python
in $MTIA_ALLOC_TORCH_CACHE (default ~/.cache/mtia_alloc/torch); later imports load the
cached library directly, without invoking the compiler."""
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_NAME = "mtia_alloc_torch_backend"


def _sources():
    src = os.path.join(_HERE, "csrc")
    files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith((".cpp", ".h")))
    files.append(os.path.join(os.path.dirname(_HERE), "_capi.h"))
    return files


def build_dir():
    import torch
    h = hashlib.sha256()
    for path in _sources():
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    h.update(torch.__version__.encode() + sys.version.encode())
    base = os.environ.get("MTIA_ALLOC_TORCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtia_alloc", "torch")
    return os.path.join(base, f"{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-"
                              f"{h.hexdigest()[:16]}")


def _library_path(directory):
    return os.path.join(directory, _NAME + ".so")  # the name torch.utils.cpp_extension gives it


def load(verbose=False):
    """The extension module, built first if this source/torch/Python combination has no
    cached build (with a progress line on stderr: it takes a minute or two)."""
    directory = build_dir()
    lib = _library_path(directory)
    # A build under way in another process holds torch's lock file: then wait for it below.
    if os.path.exists(lib) and not os.path.exists(os.path.join(directory, "lock")):
        spec = importlib.util.spec_from_file_location(_NAME, lib,
                                                      loader=importlib.machinery.ExtensionFileLoader(_NAME, lib))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    os.makedirs(directory, exist_ok=True)
    print(f"mtia_alloc.torch: compiling the PyTorch MTIA backend (first use of this version; takes a minute or "
          f"two, cached in {directory}) ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    from torch.utils import cpp_extension
    module = cpp_extension.load(
        name=_NAME,
        sources=[p for p in _sources() if p.endswith(".cpp")],
        build_directory=directory,
        extra_cflags=["-O2", "-fvisibility=hidden"],
        extra_include_paths=[os.path.join(_HERE, "csrc"), os.path.dirname(_HERE)],
        verbose=verbose,
    )
    print(f"mtia_alloc.torch: built in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return module
