"""Issue 20, item 1: the call site of an allocation is its first user frame. PyTorch's stacks
start with the unwinder (`??:0 in torch::unwind::unwind()`), torch/c10 C++ frames and
Python frames inside torch; Block.where, the plot and the per-site figures skip them, as
PyTorch's viewer does, and the full stack stays available."""
import pickle

import pytest

from helpers import fresh_python
from memdebug_snapshots import UNWIND, snapshots_dir
from mtia_alloc.memory import Snapshot
from mtia_alloc.viz import frames as F

USER = [{"filename": "/home/me/project/model.py", "line": 42, "name": "forward"},
        {"filename": "/home/me/project/train.py", "line": 7, "name": "step"}]


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    return snapshots_dir(tmp_path_factory)


def test_site_skips_unwinder_torch_and_interpreter_frames():
    stack = UNWIND + USER
    assert F.where(stack) == "model.py:42 in forward"
    assert F.user_frames(stack) == USER
    assert F.site_frame(stack) is USER[0]


def test_frames_of_torch_c10_and_this_package_are_internal():
    internal = [
        {"filename": "??", "line": 0, "name": "torch::unwind::unwind()"},
        {"filename": "/x/libtorch_python.so", "line": 0, "name": "torch::autograd::THPVariable_add"},
        {"filename": "/pytorch/c10/core/Allocator.h", "line": 3, "name": "c10::DataPtr::get"},
        {"filename": "Python/ceval.c", "line": 1, "name": "_PyEval_EvalFrameDefault"},
        {"filename": "/usr/lib/python3/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
        {"filename": "/usr/lib/python3/dist-packages/torch/_tensor.py", "line": 1, "name": "__add__"},
        {"filename": F._PACKAGE_DIR + "array.py", "line": 1, "name": "empty"},
        {"filename": "/home/me/x.py", "line": 1, "name": "<listcomp>"},
        {"filename": "<frozen importlib._bootstrap>", "line": 1, "name": "_call_with_frames_removed"},
    ]
    for fr in internal:
        assert F.is_internal(fr), fr
    for fr in USER + [{"filename": "/home/me/torchvision_utils.py", "line": 1, "name": "fit_start"},
                      {"filename": "/home/me/ext/kernel.cpp", "line": 9, "name": "my_op"}]:
        assert not F.is_internal(fr), fr


def test_without_user_frames_the_site_is_the_first_frame_torchs_viewer_shows():
    assert F.where(UNWIND).startswith("libc10_cuda.so:0 in c10::cuda::CUDACachingAllocator")
    assert F.where([]) == "" and F.where(None) == "" and F.site_frame([UNWIND[0]]) is None


def test_site_keys_by_site_file_and_frames():
    stack = UNWIND + USER
    assert F.SiteKey("site")(stack) == "/home/me/project/model.py:42 in forward"
    assert F.SiteKey("file")(stack) == "/home/me/project/model.py"
    assert F.SiteKey("frame:2")(stack) == "/home/me/project/model.py:42 in forward < /home/me/project/train.py:7 in step"
    assert F.SiteKey("site")([]) == F.NO_STACK
    for bad in ("line", "frame:0", "frame:", "frame:x", 3):
        with pytest.raises(ValueError, match="--by must be"):
            F.SiteKey(bad)


def test_block_where_on_a_pytorch_style_snapshot(snaps, tmp_path):
    snap = Snapshot(f"{snaps}/base.pickle")
    allocated = [b for b in snap.blocks if b.is_allocated and b.frames]
    assert allocated
    for b in allocated:
        assert "unwind" not in b.where and b.where.startswith("memdebug_snapshots.py:")
        assert b.frames[0]["name"] == "torch::unwind::unwind()"  # the full stack is kept
        assert b.stack[0] == "??:0 in torch::unwind::unwind()" and len(b.stack) == len(b.frames)
        assert b.user_frames and all(not F.is_internal(f) for f in b.user_frames)
    assert "unwind" not in repr(allocated[0])
    # the plot's hover titles name the user frame, never the unwinder
    page = snap.plot(tmp_path / "p.html") and (tmp_path / "p.html").read_text()
    assert "torch::unwind" not in page


def test_our_own_blocks_name_the_callers_line(tmp_path):
    proc = fresh_python("-c", "import mtia_alloc as m\nm.init(); m.record_memory_history()\n"
                              "def make():\n    return m.caching_allocator_alloc(3000)\n"
                              "p = make()\nfrom mtia_alloc.memory import Snapshot\n"
                              "print([b.where for b in Snapshot().blocks if b.is_allocated])")
    assert proc.returncode == 0, proc.stderr
    assert "<string>:4 in make" in proc.stdout


def test_device_kind_is_detected_and_named_in_the_summary(snaps):
    snap = Snapshot(f"{snaps}/base.pickle")
    assert snap.device_kind == "CUDA"
    assert "PyTorch CUDA memory summary, device ID 0" in snap.summary(replay=False)
    with open(f"{snaps}/base.pickle", "rb") as f:
        data = pickle.load(f)
    for s in data["segments"]:
        s.pop("frames", None)
        for b in s["blocks"]:
            b.pop("frames", None)
    data["device_traces"] = [[]]
    assert Snapshot(data).device_kind == ""
    assert "PyTorch memory summary, device ID 0" in Snapshot(data).summary()
