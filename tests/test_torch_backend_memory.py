"""Observability with real models (issue 18 item 8): torch.mtia.record_memory_history(),
a training step, torch.mtia.snapshot() -> frames at the model's Python code, readable by
torch.cuda._memory_viz and mtia_alloc.memory.Snapshot."""
import pickle

import pytest

torch = pytest.importorskip("torch")
if not torch.__version__.startswith("2.13."):
    pytest.skip(f"mtia_alloc.torch supports torch 2.13 only, found {torch.__version__}", allow_module_level=True)

import mtia_alloc  # noqa: E402
import mtia_alloc.torch  # noqa: E402,F401
from mtia_alloc.tools import viz_check as _viz_check  # noqa: E402

nn = torch.nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        return self.fc2(hidden)


def training_step(model, opt):
    x = torch.randn(16, 32, device="mtia")
    y = torch.randint(0, 10, (16,), device="mtia")
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.fixture
def history():
    torch.mtia.init()  # torch.mtia.record_memory_history is a no-op before init (torch's rule)
    torch.mtia.record_memory_history("all", "python", 0)
    yield
    torch.mtia.record_memory_history(None)


def test_snapshot_frames_point_at_the_model(history, tmp_path):
    model = Net().to("mtia")
    opt = torch.optim.Adam(model.parameters())
    training_step(model, opt)
    snap = torch.mtia.snapshot()
    assert snap.keys() >= {"segments", "device_traces", "allocator_settings"}
    trace = snap["device_traces"][0]
    allocs = [e for e in trace if e["action"] == "alloc"]
    assert allocs, trace[:3]
    ours = {f["name"] for e in trace for f in e.get("frames", []) if f["filename"] == __file__}
    assert {"forward", "training_step"} <= ours
    # the forward's activation was allocated at the model's own line
    fwd_lines = {f["line"] for e in allocs for f in e.get("frames", [])
                 if f["filename"] == __file__ and f["name"] == "forward"}
    assert fwd_lines and all(Net.forward.__code__.co_firstlineno < ln <= Net.forward.__code__.co_firstlineno + 2
                             for ln in fwd_lines)
    assert _viz_check.check(snap) == []
    # torch's renderers read it
    from torch.cuda import _memory_viz
    assert "cudaMalloc" in _memory_viz.trace(snap)
    assert "segments: 1" in _memory_viz.segsum(snap) or "segments:" in _memory_viz.segsum(snap)
    assert len(_memory_viz.trace_plot(snap)) > 1000
    # and so does mtia_alloc's
    view = mtia_alloc.memory.Snapshot(snap)
    assert "trace_entries" in repr(view)
    path = tmp_path / "snap.pickle"
    mtia_alloc.memory._dump_snapshot(str(path))
    assert _viz_check.check_pickle(str(path)) == []
    with open(path, "rb") as f:
        assert pickle.load(f)["device_traces"][0]


def test_history_is_shared_with_mtia_alloc(history):
    assert mtia_alloc._C.record_level() == 3
    x = torch.empty(100, device="mtia")
    ptr = x.data_ptr()
    del x
    trace = mtia_alloc.snapshot()["device_traces"][0]
    assert [e["action"] for e in trace if e.get("addr") == ptr][-2:] == ["alloc", "free_requested"] or \
        [e["action"] for e in trace if e.get("addr") == ptr][-3:-1] == ["alloc", "free_requested"]


def test_history_off_means_no_stacks():
    torch.mtia.record_memory_history(None)
    assert mtia_alloc._C.record_level() == 0
    x = torch.empty(100, device="mtia")
    del x
    assert torch.mtia.snapshot()["device_traces"][0] == []
