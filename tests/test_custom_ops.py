"""The ops as PyTorch custom ops (one node under torch.compile, no graph break) and the measured choice
between the lowrank_linear candidates (selection plumbing on the CPU: interpreter and a fake timer)."""
import pytest
import torch

import mass_kernels
import mass_kernels.lowrank as lowrank_mod
from mass_kernels.reference import lowrank_error_bound, lowrank_linear_exact, routing_error_bound, routing_residuals_exact

from _tolerances import U32, gamma
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


# ---------------------------------------------------------------------------------------------- dense_delta_linear
HALF_U = {torch.float32: U32, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff per dtype


@pytest.mark.parametrize("N,d_in,E", [(1, 100, 1), (7, 100, 3), (38, 51, 20), (5, 12, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("task_bias", [False, True])
def test_dense_delta_linear_matches_the_exact_rows(N, d_in, E, dtype, task_bias):
    """Against fp64 per row: x (W + Δ_e)ᵀ + b + w (tb_e), e = -1 rows get the base only; odd shapes, one row,
    entries that no row uses. Bound: two products of n = d_in terms accumulated in at least fp32 (γ_n·u32 each,
    over |x|(|W| + |Δ|)), each rounded once to the dtype and added and scaled (3 roundings of u_h), and the
    biases: (γ_{n+2}(u32) + 4·u_h)·(|x|(|W| + |Δ|) + |b| + |tb|)."""
    gen = torch.Generator().manual_seed(N * 131 + E)
    d_out = 24
    x, W, b = (torch.randn(N, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen),
               torch.randn(d_out, generator=gen))
    deltas = 0.1 * torch.randn(E, d_out, d_in, generator=gen)
    tb = 0.1 * torch.randn(E, d_out, generator=gen) if task_bias else None
    entries = torch.randint(-1, E, (N,), generator=gen)
    weights = torch.where(torch.rand(N, generator=gen) < 0.5, torch.ones(N), torch.rand(N, generator=gen))
    cast = [t.to(dtype) if t is not None else None for t in (x, W, b, deltas, tb)]
    got = mass_kernels.dense_delta_linear(cast[0], cast[1], cast[2], cast[3], entries, weights.to(dtype), cast[4])
    assert got.shape == (N, d_out) and got.dtype == dtype
    xd, Wd, bd, Dd = (t.to(dtype).double() for t in (x, W, b, deltas))
    tbd = None if tb is None else tb.to(dtype).double()
    wd = weights.to(dtype).double()
    want, scale = torch.empty(N, d_out, dtype=torch.float64), torch.empty(N, d_out, dtype=torch.float64)
    for r in range(N):
        e = int(entries[r])
        delta = Dd[e] if e >= 0 else torch.zeros_like(Wd)
        extra = (tbd[e] if (tbd is not None and e >= 0) else torch.zeros(d_out, dtype=torch.float64))
        want[r] = xd[r] @ Wd.T + bd + wd[r] * (xd[r] @ delta.T + extra)
        scale[r] = xd[r].abs() @ (Wd.abs() + delta.abs()).T + bd.abs() + extra.abs()
    bound = (gamma(d_in + 2) + 4 * HALF_U[dtype]) * scale
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


def test_dense_delta_linear_is_one_node_under_compile_and_checks_its_arguments():
    gen = torch.Generator().manual_seed(3)
    x, W, D = torch.randn(6, 10, generator=gen), torch.randn(4, 10, generator=gen), torch.randn(3, 4, 10, generator=gen)
    entries, weights = torch.tensor([0, 2, -1, 1, 0, 2]), torch.ones(6)
    nodes = []

    def backend(gm, example_inputs):
        nodes.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    fn = lambda *a: mass_kernels.dense_delta_linear(*a)  # noqa: E731
    got = torch.compile(fn, fullgraph=True, backend=backend)(x, W, None, D, entries, weights)
    assert nodes.count(torch.ops.mass.dense_delta_linear.default) == 1
    assert torch.equal(got, fn(x, W, None, D, entries, weights))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, W, None, D, entries, weights), got)
    with pytest.raises(ValueError, match=r"deltas \(3, 4, 9\) must be \(entries, 4, 10\)"):
        mass_kernels.dense_delta_linear(x, W, None, D[..., :9], entries, weights)
    with pytest.raises(ValueError, match="row_entries"):
        mass_kernels.dense_delta_linear(x, W, None, D, entries[:5], weights)
