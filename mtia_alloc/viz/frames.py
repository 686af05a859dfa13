"""Stack frames of snapshots: which frame names an allocation's call site.

A PyTorch snapshot's stacks (blocks, segments and trace entries carry `frames`, innermost
first) start with the machinery that gathered them: with `stacks="all"` the C++ unwinder
(`??:0 in torch::unwind::unwind()`, `CapturedTraceback::gather`), then torch's and c10's
C++ frames (the caching allocator, the dispatcher, the Python bindings), the interpreter's
C frames, and Python frames inside torch itself. The call site a user wants is the first
frame after all that: their own code. PyTorch's viewer (torch/cuda/_memory_viz.py,
MemoryViz.js) hides the unwinder, the gatherers and the interpreter frames; this module
does the same and also skips torch/c10 C++ frames and Python frames inside torch and
mtia_alloc, so that `Block.where`, the plots and the per-site figures (diff, fit, ranks)
name user code. The full stack stays available (Block.frames, user_frames()).

Owns: is_internal, user_frames, site_frame, format_frame, where, SiteKey (the grouping
keys of `diff --by site|file|frame:N`). Relies on: nothing of mtia_alloc."""
import os

__all__ = ["is_internal", "user_frames", "site_frame", "format_frame", "where", "SiteKey", "NO_STACK",
           "BEFORE_RECORDING"]

NO_STACK = "<no stack recorded>"
BEFORE_RECORDING = "<allocated before recording, no stack>"

# PyTorch's viewer hides these (torch/cuda/_memory_viz.py _frame_filter, MemoryViz.js):
# the unwinder and the traceback gatherers, process start-up and the interpreter's C frames.
_OMIT_NAMES = ("unwind::unwind", "CapturedTraceback::gather", "gather_with_cpp", "__libc_start_main",
               "PyEval_", "PyObject_", "PyFunction_", "_PyEval", "_PyObject", "_PyFunction", "PyVectorcall",
               "_PyVectorcall", "method_vectorcall", "cfunction_call")
_OMIT_FILES = ("core/boxing", "/Register", "/Redispatch", "pythonrun.c", "Modules/main.c", "Objects/call.c",
               "Objects/methodobject.c", "pycore_ceval.h", "ceval.c", "cpython/abstract.h")
# C++ frames of the framework: torch, c10, ATen (and pybind11 glue)
_FRAMEWORK_CXX_NAMES = ("torch::", "c10::", "at::", "at_", "THP", "pybind11::", "caffe2::", "std::")
_FRAMEWORK_CXX_FILES = ("/torch/csrc/", "/c10/", "/aten/", "libtorch", "libc10", "/pybind11/", "/caffe2/")
# Python frames inside the framework and this package
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_FRAMEWORK_PY = ("-packages/torch/", "/torch/nn/", "/torch/_", "/torch/utils/", "/torch/autograd/", "/torch/cuda/",
                 "/torch/optim/", "/torch/distributed/", "/torch/fx/", "/torch/mtia/", "/torch/xpu/", "/torch/amp/",
                 "/torch/functional.py", "/torch/overrides.py", "/torch/serialization.py", "/torch/storage.py",
                 "-packages/mtia_alloc/")


def _internal(name, filename):
    if name == "_start":  # torch matches "_start" anywhere in a name; a user's fit_start is user code
        return True
    for s in _OMIT_NAMES:
        if s in name:
            return True
    for s in _OMIT_FILES:
        if s in filename:
            return True
    if name in _COMPREHENSIONS:
        return True  # the enclosing function's frame (next) names the site
    if filename in ("??", "", "<unknown>") or filename.startswith("<frozen"):
        return True  # unsymbolised C++ frame, or the import machinery
    if filename.endswith(".py") or filename.endswith(".pyc"):
        if filename.startswith(_PACKAGE_DIR):
            return True
        filename = filename.replace("\\", "/")
        return any(s in filename for s in _FRAMEWORK_PY)
    # C/C++ frames: the framework's own, and shared libraries without a source file
    if name.startswith(_FRAMEWORK_CXX_NAMES) or any(s in filename for s in _FRAMEWORK_CXX_FILES):
        return True
    return filename.endswith((".so", ".so.1", ".so.6")) or ".so." in filename


_COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")
_cache = {}  # (name, filename) -> 0 user frame, 1 internal but shown by torch's viewer, 2 hidden by it


def _classify(frame):
    try:
        key = (frame.get("name", ""), frame.get("filename", ""))
    except AttributeError:
        return 2
    hit = _cache.get(key)
    if hit is None:
        if len(_cache) > 200_000:
            _cache.clear()
        name, filename = str(key[0]), str(key[1])
        if not _internal(name, filename):
            hit = 0
        elif name == "_start" or any(s in name for s in _OMIT_NAMES) or any(s in filename for s in _OMIT_FILES) \
                or filename == "??":
            hit = 2
        else:
            hit = 1
        _cache[key] = hit
    return hit


def is_internal(frame):
    """True for a frame that does not name user code (see the module docstring)."""
    return _classify(frame) != 0


def user_frames(frames):
    """The frames of a stack that name user code, innermost first."""
    if not isinstance(frames, (list, tuple)):
        return []
    return [fr for fr in frames if isinstance(fr, dict) and not _classify(fr)]


def site_frame(frames):
    """The call site of an allocation: its first (innermost) user frame. Without one, the
    first frame that PyTorch's viewer would show (a torch frame is better than nothing);
    None for an empty stack."""
    if not isinstance(frames, (list, tuple)):
        return None
    fallback = None
    for fr in frames:
        c = _classify(fr)
        if c == 0:
            return fr
        if c == 1 and fallback is None:
            fallback = fr
    return fallback


def format_frame(frame, full_path=False):
    """'file.py:12 in fn' ('/path/to/file.py:12 in fn' with full_path)."""
    filename = str(frame.get("filename", "?"))
    if not full_path:
        filename = os.path.basename(filename) or filename
    return f"{filename}:{frame.get('line', '?')} in {frame.get('name', '?')}"


def where(frames):
    """The call site as 'file.py:12 in fn', or '' without a stack."""
    fr = site_frame(frames)
    return format_frame(fr) if fr is not None else ""


class SiteKey:
    """Groups allocations by call site. by = "site" (file, line and function of the first
    user frame), "file" (its file), or "frame:N" (the first N user frames, innermost first,
    joined with " < ": frame:1 is the site, frame:2 adds its caller). Identical stacks are
    usually one shared list in a snapshot; keys are cached per list."""

    def __init__(self, by="site"):
        if by in ("site", "file"):
            self.depth = 1
        elif isinstance(by, str) and by.startswith("frame:") and by[6:].isdigit() and int(by[6:]) >= 1:
            self.depth = int(by[6:])
        else:
            raise ValueError(f"--by must be site, file or frame:N (N >= 1), got {by!r}")
        self.by = by
        self._memo = {}

    def __call__(self, frames, missing=NO_STACK):
        if not frames:
            return missing
        k = id(frames)
        hit = self._memo.get(k)
        if hit is not None and hit[0] is frames:
            return hit[1]
        key = self._key(frames)
        self._memo[k] = (frames, key)
        return key

    def _key(self, frames):
        if self.by == "file":
            fr = site_frame(frames)
            return str(fr.get("filename", "?")) if fr is not None else NO_STACK
        if self.depth == 1:
            fr = site_frame(frames)
            return format_frame(fr, full_path=True) if fr is not None else NO_STACK
        kept = user_frames(frames)[:self.depth]
        if not kept:
            fr = site_frame(frames)
            kept = [fr] if fr is not None else []
        return " < ".join(format_frame(fr, full_path=True) for fr in kept) or NO_STACK
