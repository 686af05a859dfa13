"""torch.mtia.MTIAGraph / torch.mtia.graph / torch.mtia.graph_pool_handle with mtia_alloc
as the backend (issue 18 item 7): capture routes the capturing stream's allocations into
the graph's private pool and records the ops; replay() runs them again on the same memory."""
import pytest

torch = pytest.importorskip("torch")
if not torch.__version__.startswith("2.13."):
    pytest.skip(f"mtia_alloc.torch supports torch 2.13 only, found {torch.__version__}", allow_module_level=True)

import mtia_alloc  # noqa: E402
import mtia_alloc.torch  # noqa: E402,F401

nn = torch.nn


def pool_of(ptr):
    for seg in mtia_alloc.memory_snapshot():
        if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return seg["segment_pool_id"]
    return None


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).to("mtia")


def test_capture_forward_then_replay_matches_eager():
    model = make_model()
    static_in = torch.randn(5, 8, device="mtia")
    with torch.no_grad():
        model(static_in)  # warm-up, as with CUDA graphs
        g = torch.mtia.MTIAGraph()
        with torch.mtia.graph(g):
            static_out = model(static_in)
        pool = g.pool()
        assert pool[0] > 0 and pool[1] == 0  # a graph-minted private pool
        assert pool_of(static_out.data_ptr()) == pool  # the capture's allocations went there
        for seed in range(3):
            new = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
            static_in.copy_(new)
            g.replay()
            eager = model(new.to("mtia"))
            assert torch.equal(static_out.cpu(), eager.cpu())
    del g, static_out
    torch.mtia.empty_cache()


def test_capture_a_training_step():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 8, device="mtia")
    y = torch.randint(0, 4, (6,), device="mtia")
    reference = make_model()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for m, o in ((model, opt), (reference, ref_opt)):  # warm-up step, also creates the grads
        o.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    g = torch.mtia.MTIAGraph()
    with torch.mtia.graph(g):
        opt.zero_grad(set_to_none=False)
        static_loss = nn.functional.cross_entropy(model(x), y)
        static_loss.backward()
        opt.step()
    # Unlike a CUDA capture, this one also ran the step once (ops run, and are recorded)
    ref_opt.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    for _ in range(3):
        g.replay()
        ref_opt.zero_grad(set_to_none=False)
        ref_loss = nn.functional.cross_entropy(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        assert torch.equal(static_loss.cpu(), ref_loss.cpu())
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a.cpu(), b.cpu())
    del g
    torch.mtia.empty_cache()


def test_graphs_sharing_a_pool_handle():
    handle = torch.mtia.graph_pool_handle()
    assert handle[0] == 0 and handle[1] > 0
    a = torch.ones(64, device="mtia")
    g1, g2 = torch.mtia.MTIAGraph(), torch.mtia.MTIAGraph()
    with torch.mtia.graph(g1, pool=handle):
        b = a * 2
    with torch.mtia.graph(g2, pool=handle):
        c = b + 1
    assert g1.pool() == g2.pool() == handle
    assert pool_of(b.data_ptr()) == handle and pool_of(c.data_ptr()) == handle
    assert mtia_alloc._C.pool_use_count(0, handle) == 2
    a.fill_(3)
    g1.replay()
    g2.replay()
    assert b.cpu().tolist() == [6.0] * 64 and c.cpu().tolist() == [7.0] * 64
    g1.reset()
    g2.reset()
    del b, c
    torch.mtia.empty_cache()
    assert pool_of(a.data_ptr()) == (0, 0)
    assert all(seg["segment_pool_id"] != handle for seg in mtia_alloc.memory_snapshot())


def test_mtia_alloc_sees_the_capture():
    g = torch.mtia.MTIAGraph()
    s = torch.mtia.Stream()
    x = torch.zeros(4, device="mtia")
    with torch.mtia.graph(g, stream=s):
        assert mtia_alloc.is_current_stream_capturing()
        assert torch.mtia.current_stream() == s
        x += 1
        fresh = torch.zeros(4, device="mtia")  # allocated on the capture stream: in the graph's pool
    assert pool_of(fresh.data_ptr()) == g.pool()
    assert pool_of(x.data_ptr()) == (0, 0)
    assert not mtia_alloc.is_current_stream_capturing()
    g.replay()
    g.replay()
    assert x.cpu().tolist() == [3.0] * 4  # once in capture, twice replayed
    del g, x, fresh
    torch.mtia.empty_cache()


def _capture_two(share):
    """Two successive captures of small temporaries-heavy work, sharing one pool or not
    (PyTorch's test_graph_two_successive): returns the reserved bytes they add and the graphs."""
    torch.mtia.synchronize()
    torch.mtia.empty_cache()
    before = torch.mtia.memory_stats()["reserved_bytes.all.current"]
    a = torch.ones(1000, device="mtia")
    g0, g1 = torch.mtia.MTIAGraph(), torch.mtia.MTIAGraph()
    s = torch.mtia.Stream()
    with torch.mtia.stream(s):
        g0.capture_begin(torch.mtia.graph_pool_handle() if share else (0, 0))
        b = a.clone()
        for _ in range(5):
            b = (b + 1) * 1  # temporaries freed within the capture
        g0.capture_end()
        g1.capture_begin(g0.pool() if share else (0, 0))
        for _ in range(5):
            b = (b + 1) * 1
        g1.capture_end()
    added = torch.mtia.memory_stats()["reserved_bytes.all.current"] - before
    return added, (a, b, g0, g1)


def test_sharing_a_pool_saves_a_segment_and_replays_in_order():
    separate, keep = _capture_two(share=False)
    a, b, g0, g1 = keep
    assert g0.pool() != g1.pool()
    del keep, a, b, g0, g1
    torch.mtia.empty_cache()
    shared, keep = _capture_two(share=True)
    a, b, g0, g1 = keep
    assert g0.pool() == g1.pool()
    # as PyTorch's test_graph_two_successive: one 2 MiB small segment less when shared
    assert separate - shared == 2 << 20
    a.fill_(0)
    g0.replay()
    g1.replay()
    assert b.cpu().tolist() == [10.0] * 1000
    del keep, a, b, g0, g1
    torch.mtia.empty_cache()



def test_capture_a_momentum_sgd_step_with_foreach_ops():
    # (Adam needs capturable=True to be replayable, which torch 2.13 refuses for MTIA.)
    model = make_model()
    reference = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=True)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=True)
    x = torch.randn(6, 8, device="mtia")
    y = torch.randint(0, 4, (6,), device="mtia")

    def step(m, o):
        o.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss
    for _ in range(2):  # warm-up: creates the grads and the momentum buffers
        step(model, opt)
        step(reference, ref_opt)
    g = torch.mtia.MTIAGraph()
    with torch.mtia.graph(g):
        static_loss = step(model, opt)
    step(reference, ref_opt)  # the capture ran the step once
    for _ in range(3):
        g.replay()
        ref_loss = step(reference, ref_opt)
        assert torch.equal(static_loss.cpu(), ref_loss.cpu())
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a.cpu(), b.cpu())
    del g, static_loss
    torch.mtia.empty_cache()
