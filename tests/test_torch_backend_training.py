"""Real models on device="mtia" (issue 18): an MLP and a small CNN (conv, batch norm, ReLU,
pooling, linear; cross-entropy; SGD and Adam) train with losses and parameters identical
to the same run on CPU, and the allocator's figures match what the tensors hold."""
import copy

import pytest

torch = pytest.importorskip("torch")
if not torch.__version__.startswith("2.13."):
    pytest.skip(f"mtia_alloc.torch supports torch 2.13 only, found {torch.__version__}", allow_module_level=True)

import mtia_alloc  # noqa: E402
import mtia_alloc.torch  # noqa: E402,F401

nn = torch.nn


def mlp():
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10))


MODELS = {"mlp": (mlp, (16, 20)), "cnn": (cnn, (16, 3, 12, 12))}
OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
              "adam": lambda p: torch.optim.Adam(p, lr=0.01)}


def train(model, opt, batches, device):
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().to("cpu"))
    return losses


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_training_identical_to_cpu(model_name, opt_name):
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    on_cpu = make()
    on_mtia = copy.deepcopy(on_cpu).to("mtia")
    assert all(p.device.type == "mtia" for p in on_mtia.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)) for _ in range(4)]
    cpu_losses = train(on_cpu, OPTIMIZERS[opt_name](on_cpu.parameters()), batches, "cpu")
    mtia_losses = train(on_mtia, OPTIMIZERS[opt_name](on_mtia.parameters()), batches, "mtia")
    for a, b in zip(cpu_losses, mtia_losses):
        assert (a - b).abs().max().item() == 0, (cpu_losses, mtia_losses)
    for (name, a), (_, b) in zip(on_cpu.state_dict().items(), on_mtia.state_dict().items()):
        assert b.device.type == "mtia"
        assert (a - b.cpu()).abs().max().item() == 0, name
    on_mtia.eval()
    on_cpu.eval()
    x = batches[0][0]
    assert torch.equal(on_cpu(x), on_mtia(x.to("mtia")).cpu())


def block_bytes(nbytes):
    """What the allocator gives a request of n bytes: 512-byte multiples below 1 MiB."""
    return 0 if nbytes == 0 else (nbytes + 511) // 512 * 512


def live_mtia_bytes(*groups):
    seen, total = set(), 0
    for group in groups:
        for t in group:
            if t is None or t.device.type != "mtia":
                continue
            st = t.untyped_storage()
            if st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            total += block_bytes(st.nbytes())
    return total


def test_memory_figures_match_the_tensors():
    torch.mtia.synchronize()
    base = torch.mtia.memory_stats()["allocated_bytes.all.current"]
    assert base == mtia_alloc.memory_allocated()
    torch.manual_seed(0)
    model = cnn().to("mtia")
    params = list(model.parameters())
    buffers = list(model.buffers())
    assert mtia_alloc.memory_allocated() - base == live_mtia_bytes(params, buffers)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(16, 3, 12, 12, device="mtia")
    y = torch.randint(0, 10, (16,), device="mtia")
    torch.mtia.reset_peak_memory_stats()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    grads = [p.grad for p in params]
    live = live_mtia_bytes(params, buffers, grads, state, [x, y, loss])
    stats = torch.mtia.memory_stats()
    assert stats["allocated_bytes.all.current"] - base == live
    assert mtia_alloc.memory_stats()["allocated_bytes.all.current"] == stats["allocated_bytes.all.current"]
    assert torch.accelerator.memory_allocated() == stats["allocated_bytes.all.current"]
    # the step's activations were live at its peak, and are gone now
    assert stats["allocated_bytes.all.peak"] > stats["allocated_bytes.all.current"]
    assert torch.mtia.max_memory_allocated() == stats["allocated_bytes.all.peak"]
    assert torch.accelerator.max_memory_allocated() == stats["allocated_bytes.all.peak"]
    del model, opt, x, y, loss, params, buffers, grads, state
    assert mtia_alloc.memory_allocated() == base


def test_training_on_the_second_device():
    torch.manual_seed(0)
    on_cpu = mlp()
    on_mtia = copy.deepcopy(on_cpu).to("mtia:1")
    before0 = mtia_alloc.memory_allocated(0)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 20, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    a = train(on_cpu, OPTIMIZERS["sgd"](on_cpu.parameters()), batches, "cpu")
    b = train(on_mtia, OPTIMIZERS["sgd"](on_mtia.parameters()), batches, "mtia:1")
    assert [x.item() for x in a] == [x.item() for x in b]
    assert all(p.device == torch.device("mtia:1") for p in on_mtia.parameters())
    assert mtia_alloc.memory_allocated(0) == before0  # nothing landed on device 0
    assert mtia_alloc.memory_allocated(1) >= live_mtia_bytes(on_mtia.parameters())


def test_process_ending_right_after_backward_exits_cleanly():
    # autograd's device threads must be done with their graph tasks before finalization
    # (they hold a Python object: an abort at exit, before mtia_alloc.torch drained them).
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import mtia_alloc.torch, torch\n"
            "x = torch.ones(4, device='mtia:1', requires_grad=True)\n(x * 2).sum().backward()\n")
    for _ in range(6):
        r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]


def test_concurrent_training_on_both_devices_and_cpu():
    import threading
    torch.manual_seed(0)
    template = cnn()
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(5)]
    out, errors = {}, []

    def run(device):
        try:
            model = copy.deepcopy(template).to(device)
            out[device] = [x.item() for x in train(model, OPTIMIZERS["adam"](model.parameters()), batches, device)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(d,)) for d in ("mtia:0", "mtia:1", "cpu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert out["mtia:0"] == out["mtia:1"] == out["cpu"]
    mtia_alloc.memory.check_invariants()
