"""The ops as PyTorch custom ops (one node under torch.compile, no graph break) and the measured choice
between the lowrank_linear candidates (selection plumbing on the CPU: interpreter and a fake timer)."""
import pytest
import torch

import mass_kernels
import mass_kernels.lowrank as lowrank_mod
from mass_kernels.reference import lowrank_error_bound, lowrank_linear_exact, routing_error_bound, routing_residuals_exact

from conftest import DEVICE  # conftest also switches on the Triton interpreter when there is no GPU


def _problem(N=12, d_in=20, d_out=16, T=3, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(N, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    U, S = torch.randn(T, d_out, k, generator=gen), torch.rand(T, k, generator=gen)
    V = torch.linalg.qr(torch.randn(T, d_in, k, generator=gen))[0].transpose(1, 2).contiguous()
    tasks = torch.randint(-1, T, (N,), generator=gen)
    return [t.to(DEVICE) for t in (x, W, b, U, S, V, tasks)]


def _model_step(x, W, b, U, S, V, tasks):
    residuals = mass_kernels.routing_residuals(x, V)
    y = mass_kernels.lowrank_linear(x, W, b, U, S, V, tasks)
    return torch.relu(y).sum(-1, keepdim=True) + residuals.min(-1, keepdim=True).values


def test_compile_fullgraph_captures_one_op_each():
    args = _problem()
    nodes = []

    def backend(gm, example_inputs):
        nodes.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(_model_step, fullgraph=True, backend=backend)  # fullgraph: a break would raise
    got = compiled(*args)
    assert nodes.count(torch.ops.mass.lowrank_linear.default) == 1
    assert nodes.count(torch.ops.mass.routing_residuals.default) == 1
    assert torch.equal(got, _model_step(*args))  # the same op runs inside and outside the graph


def test_compile_aot_eager_matches_eager():
    """Through AOTAutograd (fake tensors: the register_fake shapes and dtypes must be right)."""
    args = _problem(seed=1)
    torch._dynamo.reset()
    got = torch.compile(_model_step, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(got, _model_step(*args))
    x, W, b, U, S, V, tasks = args
    fake_lr = torch.ops.mass.lowrank_linear.default
    with torch._subclasses.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = fake_lr(fx, mode.from_tensor(W), None, mode.from_tensor(U), mode.from_tensor(S), mode.from_tensor(V),
                      mode.from_tensor(tasks), None, None)
        res = torch.ops.mass.routing_residuals.default(fx, mode.from_tensor(V))
    assert out.shape == (x.shape[0], W.shape[0]) and out.dtype == x.dtype
    assert res.shape == (x.shape[0], V.shape[0]) and res.dtype == torch.float32


def test_ops_keep_clear_errors():
    x, W, b, U, S, V, tasks = _problem()
    with pytest.raises(ValueError, match="feature size"):
        mass_kernels.routing_residuals(x[:, :5], V)
    with pytest.raises(ValueError, match="factor shapes"):
        mass_kernels.lowrank_linear(x, W, b, U[:, :, :2], S, V, tasks)


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("MASS_KERNEL_IMPL", "triton")
    monkeypatch.delenv("MASS_LOWRANK_IMPL", raising=False)
    mass_kernels.clear_choices()
    yield
    mass_kernels.clear_choices()


def _spy(monkeypatch):
    calls = []
    for name in ("lowrank_linear_triton", "lowrank_linear_vendor"):
        real = getattr(lowrank_mod, name)
        monkeypatch.setattr(lowrank_mod, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    return calls


@pytest.mark.parametrize("times,winner", [({"fused": 2.0, "vendor": 1.0}, "vendor"),
                                          ({"fused": 1.0, "vendor": 3.0}, "fused")])
def test_warmup_records_the_fastest_candidate_and_calls_use_it(triton_path, monkeypatch, times, winner):
    x, W, b, U, S, V, tasks = _problem()
    calls = _spy(monkeypatch)
    order = []

    def fake_timer(fn):  # candidates are timed in LOWRANK_CANDIDATES order
        name = mass_kernels.LOWRANK_CANDIDATES[len(order)]
        order.append(name)
        return times[name]

    n = mass_kernels.warmup(linear_shapes=[(W.shape[0], W.shape[1], S.shape[0], S.shape[1])], batch_sizes=(x.shape[0],),
                            dtypes=(torch.float32,), device=DEVICE, timer=fake_timer)
    assert n == 2 and order == ["fused", "vendor"]
    choices = mass_kernels.lowrank_choices()
    assert [c["choice"] for c in choices.values()] == [winner] and list(choices.values())[0]["ms"] == times
    calls.clear()
    got = mass_kernels.lowrank_linear(x, W, b, U, S, V, tasks)
    assert calls == ["lowrank_linear_" + ("vendor" if winner == "vendor" else "triton")]
    bound = lowrank_error_bound(x, W, b, U, S, V, tasks, **lowrank_mod.kernel_roundoff(x.dtype, "vendor"))
    assert bool(((got.double() - lowrank_linear_exact(x, W, b, U, S, V, tasks)).abs() <= bound).all())
    # another shape (other row bucket) was not measured: the fused kernel
    calls.clear()
    mass_kernels.lowrank_linear(torch.cat([x] * 3), W, b, U, S, V, torch.cat([tasks] * 3))
    assert calls == ["lowrank_linear_triton"]


def test_env_override_beats_the_record(triton_path, monkeypatch):
    x, W, b, U, S, V, tasks = _problem()
    mass_kernels.warmup(linear_shapes=[(W.shape[0], W.shape[1], S.shape[0], S.shape[1])], batch_sizes=(x.shape[0],),
                        dtypes=(torch.float32,), device=DEVICE, timer=lambda fn: {0: 5.0}.get(0))
    calls = _spy(monkeypatch)
    monkeypatch.setenv("MASS_LOWRANK_IMPL", "vendor")
    mass_kernels.lowrank_linear(x, W, b, U, S, V, tasks)
    monkeypatch.setenv("MASS_LOWRANK_IMPL", "fused")
    mass_kernels.lowrank_linear(x, W, b, U, S, V, tasks)
    assert calls == ["lowrank_linear_vendor", "lowrank_linear_triton"]
    monkeypatch.setenv("MASS_LOWRANK_IMPL", "cublas")
    with pytest.raises(ValueError, match="MASS_LOWRANK_IMPL"):
        mass_kernels.lowrank_linear(x, W, b, U, S, V, tasks)


def test_routing_op_on_the_triton_path(triton_path):
    x, *_, V, _ = _problem(seed=2)
    got = mass_kernels.routing_residuals(x, V)
    from mass_kernels.routing import kernel_roundoff

    bound = routing_error_bound(x, V, "fused", **kernel_roundoff(x.dtype))
    assert bool(((got.double() - routing_residuals_exact(x, V)).abs() <= bound).all())
