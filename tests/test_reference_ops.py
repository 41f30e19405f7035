"""The PyTorch ops against a direct, row-by-row computation of their formulas."""
import pytest
import torch

import mass_kernels
from mass_kernels.reference import lowrank_linear_exact


def _orthonormal_basis(T, k, D, gen):
    q, _ = torch.linalg.qr(torch.randn(T, D, k, generator=gen))
    return q.transpose(1, 2).contiguous()  # (T, k, D), orthonormal rows


def assert_lowrank_within_bound(got, *args, out_roundoff=0.0):
    """The CPU paths compute in fp32 (u = 2⁻²⁴, exact-enough products, no TF32 on the CPU): every output element
    within ``lowrank_error_bound`` of the fp64 oracle; ``out_roundoff`` for a final rounding to 16 bits."""
    from mass_kernels.reference import lowrank_error_bound, lowrank_linear_exact

    bound = lowrank_error_bound(*args, out_roundoff=out_roundoff)
    err = (got.double() - lowrank_linear_exact(*args)).abs()
    assert bool((err <= bound).all()), f"error {float((err / bound).max()):.3g}x the bound"


def as_lowrank(weights):
    """Whole per-task matrices (T, out, in) as factors U = W_t, S = 1, V = I: ``lowrank_error_bound`` then
    bounds ``x W_tᵀ`` (with a slightly longer operation chain, so the bound stays valid)."""
    T, _, d_in = weights.shape
    return weights, torch.ones(T, d_in), torch.eye(d_in).expand(T, d_in, d_in)


@pytest.mark.parametrize("N,D,T,k", [(1, 16, 1, 16), (7, 100, 3, 33), (20, 64, 8, 8)])
@pytest.mark.parametrize("near", [False, True])
def test_routing_residuals_matches_projection(N, D, T, k, near):
    """The CPU path against a direct fp64 projection, within the "direct" method's worst-case bound
    (O(u·√k·‖x‖)); ``near`` puts rows a hair off task 0's subspace, where ‖x‖² − ‖Vx‖² cancels."""
    from mass_kernels.reference import routing_error_bound

    gen = torch.Generator().manual_seed(0)
    basis = _orthonormal_basis(T, k, D, gen).float()
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    if near:
        x = torch.randn(N, k, generator=gen, dtype=torch.float64) @ basis[0].double() + 1e-4 * x
    x = x.float()
    got = mass_kernels.routing_residuals(x, basis)
    xd, bd = x.double(), basis.double()
    want = torch.stack([(xd - xd @ bd[t].T @ bd[t]).norm(dim=1) for t in range(T)], 1)
    assert got.dtype == torch.float32 and got.shape == (N, T)
    bound = routing_error_bound(x, basis, "direct")  # fp32 accumulation, exact fp32 products
    assert bool(((got.double() - want).abs() <= bound).all()), float(((got.double() - want).abs() / bound).max())


def test_routing_residuals_with_scaled_rows_are_the_projection_energy():
    """Rows √w_i·v_i (the router's norm="sv"): r² = ‖x‖² − ‖Bx‖² (checked in fp64), computed without the
    cancellation; rows within the unit tolerance of norm 1 count as unit rows."""
    from mass_kernels.reference import routing_error_bound, routing_residuals_exact, unit_row_tolerance

    gen = torch.Generator().manual_seed(8)
    V = _orthonormal_basis(2, 6, 30, gen)
    w = torch.rand(2, 6, generator=gen).double()
    w[:, 0] = 1.0
    B = (V.double() * w.sqrt().unsqueeze(-1)).float()
    x = torch.randn(5, 6, generator=gen) @ V[1] + 1e-3 * torch.randn(5, 30, generator=gen)  # near task 1
    got = mass_kernels.routing_residuals(x, B)
    xd, Bd = x.double(), B.double()
    energy = torch.stack([(xd.square().sum(1) - (xd @ Bd[t].T).square().sum(1)).sqrt() for t in range(2)], 1)
    exact = routing_residuals_exact(x, B)
    # the exact definition differs from the energy only by rows snapped to unit norm (≤ τ·‖x‖²) and the fp32
    # basis' loss of orthonormality (≤ 1e-6·‖x‖², far above its real size) — both on r², through √
    slack = ((unit_row_tolerance(torch.float32) + 1e-6) * xd.square().sum(1, keepdim=True)).sqrt()
    assert bool(((exact - energy).abs() <= slack).all())
    assert bool(((got.double() - exact).abs() <= routing_error_bound(x, B, "direct")).all())


def test_routing_error_bounds_are_attained_in_order_of_magnitude():
    """The two formulas' bounds: the fused one must allow √u·‖x‖ near the subspace (what the subtraction
    loses, seen on AMD CPUs), the direct one must stay at u·√k·‖x‖ there."""
    from mass_kernels.reference import routing_error_bound

    gen = torch.Generator().manual_seed(9)
    basis = _orthonormal_basis(1, 16, 16, gen).float()  # k = D: every x lies in the subspace, r = 0
    x = torch.randn(4, 16, generator=gen)
    xn = x.double().norm(dim=1, keepdim=True)
    fused, direct = routing_error_bound(x, basis, "fused"), routing_error_bound(x, basis, "direct")
    assert bool((fused >= 2.0 ** -12 * xn).all()) and bool((direct <= 1e-4 * xn).all())
    with pytest.raises(ValueError, match="method"):
        routing_error_bound(x, basis, "exact")


def test_routing_residuals_stacked_blocks():
    from mass_kernels.reference import routing_error_bound

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 40, generator=gen)
    basis = torch.stack([_orthonormal_basis(4, 6, 40, gen) for _ in range(3)])
    got = mass_kernels.routing_residuals(x, basis)
    for g in range(3):  # both within the "direct" bound of the exact value, so within twice it of each other
        bound = routing_error_bound(x[g], basis[g], "direct")
        assert bool(((got[g] - mass_kernels.routing_residuals(x[g], basis[g])).abs() <= 2 * bound).all())


def _direct_lowrank(x, W, b, U, S, V, tasks, weights, task_bias):
    rows = []
    for i in range(x.shape[0]):
        y = W @ x[i] + (0 if b is None else b)
        for j in range(tasks.shape[1]):
            t = int(tasks[i, j])
            if t < 0:
                continue
            delta = U[t] @ (S[t] * (V[t] @ x[i])) + (0 if task_bias is None else task_bias[t])
            y = y + weights[i, j] * delta
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("N,din,dout,T,k,K", [(1, 100, 70, 1, 51, 1), (9, 24, 40, 3, 5, 2), (16, 32, 32, 20, 1, 2),
                                               (23, 100, 70, 8, 51, 1), (40, 16, 24, 20, 3, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lowrank_linear_matches_direct(N, din, dout, T, k, K, with_bias):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, din, generator=gen)
    W = torch.randn(dout, din, generator=gen)
    b = torch.randn(dout, generator=gen) if with_bias else None
    U, S, V = torch.randn(T, dout, k, generator=gen), torch.rand(T, k, generator=gen), torch.randn(T, k, din, generator=gen)
    tasks = torch.randint(-1, T, (N, K), generator=gen)
    weights = torch.rand(N, K, generator=gen)
    task_bias = torch.randn(T, dout, generator=gen) if with_bias else None
    got = mass_kernels.lowrank_linear(x, W, b, U, S, V, tasks, weights, task_bias)
    want = _direct_lowrank(x.double(), W.double(), None if b is None else b.double(), U.double(), S.double(),
                           V.double(), tasks, weights.double(), None if task_bias is None else task_bias.double())
    # two fp64 evaluations of the oracle: ~1e-15 apart, far inside the default fp64 tolerance (1e-7)
    torch.testing.assert_close(want, lowrank_linear_exact(x, W, b, U, S, V, tasks, weights, task_bias))
    assert_lowrank_within_bound(got, x, W, b, U, S, V, tasks, weights, task_bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_grouped_path_low_precision_matches_reference(dtype):
    """One task per row on the CPU sorts rows by task; in fp16/bf16 it computes in fp32 like the reference."""
    from mass_kernels.reference import lowrank_linear_torch

    gen = torch.Generator().manual_seed(6)
    N, din, dout, T, k = 30, 40, 24, 5, 7
    x, W, b = torch.randn(N, din, generator=gen), torch.randn(dout, din, generator=gen), torch.randn(dout, generator=gen)
    U, S, V = torch.randn(T, dout, k, generator=gen), torch.rand(T, k, generator=gen), torch.randn(T, k, din, generator=gen)
    tasks, tb = torch.randint(-1, T, (N,), generator=gen), torch.randn(T, dout, generator=gen)
    args = [t.to(dtype) for t in (x, W, b, U, S, V)]
    got = mass_kernels.lowrank_linear(*args, tasks, None, tb.to(dtype))
    assert got.dtype == dtype
    # fp32 on the upcast inputs, then one round-to-nearest to the dtype (u = eps / 2)
    assert_lowrank_within_bound(got, *args, tasks, None, tb.to(dtype), out_roundoff=torch.finfo(dtype).eps / 2)
    want = lowrank_linear_torch(*args, tasks[:, None], None, tb.to(dtype))  # the masked path: same rounding
    assert_lowrank_within_bound(want, *args, tasks, None, tb.to(dtype), out_roundoff=torch.finfo(dtype).eps / 2)


@pytest.mark.parametrize("tasks,in_order", [([2] * 7, True), ([-1, -1, 0, 0, 0, 3, 4], True),
                                             ([1, 0, 0, 2, -1, 1, 3], False)])
def test_cpu_grouped_path_with_rows_in_task_order_or_not(tasks, in_order):
    """One task per row on the CPU: rows already in task order (a task-homogeneous batch, a pre-sorted one) are
    used in place, without the permutation; either way the result is the direct computation."""
    from mass_kernels.reference import group_rows

    gen = torch.Generator().manual_seed(7)
    N, din, dout, T, k = len(tasks), 12, 10, 5, 3
    x, W, b = torch.randn(N, din, generator=gen), torch.randn(dout, din, generator=gen), torch.randn(dout, generator=gen)
    U, S, V = torch.randn(T, dout, k, generator=gen), torch.rand(T, k, generator=gen), torch.randn(T, k, din, generator=gen)
    tasks, weights, tb = torch.tensor(tasks), torch.rand(N, generator=gen), torch.randn(T, dout, generator=gen)
    order, segments = group_rows(tasks[:, None])
    assert (order is None) == in_order and segments is not None
    got = mass_kernels.lowrank_linear(x, W, b, U, S, V, tasks, weights, tb)
    assert_lowrank_within_bound(got, x, W, b, U, S, V, tasks, weights, tb)


def test_lowrank_linear_one_dim_tasks_default_weights():
    gen = torch.Generator().manual_seed(3)
    x, W = torch.randn(5, 8, generator=gen), torch.randn(6, 8, generator=gen)
    U, S, V = torch.randn(2, 6, 3, generator=gen), torch.rand(2, 3, generator=gen), torch.randn(2, 3, 8, generator=gen)
    tasks = torch.tensor([0, 1, -1, 1, 0])
    got = mass_kernels.lowrank_linear(x, W, None, U, S, V, tasks)
    want = mass_kernels.lowrank_linear(x, W, None, U, S, V, tasks[:, None], torch.ones(5, 1))
    assert_lowrank_within_bound(got, x, W, None, U, S, V, tasks)  # row 2 (no task): the base linear alone
    assert_lowrank_within_bound(want, x, W, None, U, S, V, tasks)


@pytest.mark.parametrize("bad,match", [
    (dict(row_tasks=torch.tensor([0, 5])), r"\[-1, 1\]"),
    (dict(row_tasks=torch.tensor([0.0, 1.0])), "integer"),
    (dict(row_tasks=torch.tensor([0, 1, 1])), r"\(N=2"),
    (dict(U=torch.zeros(2, 6, 4)), "factor shapes"),
    (dict(bias=torch.zeros(5)), "bias must be"),
])
def test_lowrank_linear_rejects_bad_arguments(bad, match):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(6, 8), bias=None, U=torch.randn(2, 6, 3), S=torch.rand(2, 3),
                V=torch.randn(2, 3, 8), row_tasks=torch.tensor([0, 1]))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        mass_kernels.lowrank_linear(**args)


def test_routing_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="feature size"):
        mass_kernels.routing_residuals(torch.randn(3, 10), torch.randn(2, 4, 12))


def test_impl_override_is_validated(monkeypatch):
    monkeypatch.setenv("MASS_KERNEL_IMPL", "cuda")
    with pytest.raises(ValueError, match="MASS_KERNEL_IMPL"):
        mass_kernels.routing_residuals(torch.randn(3, 10), torch.randn(2, 4, 10))


# Row segments (slot, task, start, stop) over 12 rows: runs of equal, adjacent segments with consecutive tasks
# (one view of the banks), with scattered tasks (a gathered copy), single segments, rows with no task, slot 1.
SEGMENT_CASES = {
    "uniform consecutive": [(0, 0, 0, 3), (0, 1, 3, 6), (0, 2, 6, 9), (0, 3, 9, 12)],
    "uniform scattered": [(0, 3, 0, 4), (0, 1, 4, 8), (0, 2, 8, 12)],
    "ragged with gaps": [(0, 0, 0, 3), (0, 2, 3, 7), (0, 1, 8, 10)],
    "two slots": [(0, 0, 0, 3), (0, 2, 3, 7), (0, 1, 8, 10), (1, 3, 3, 7), (1, 1, 8, 10)],
}


def _segment_tasks(segments, N):
    tasks = torch.full((N, 2), -1)
    for slot, t, start, stop in segments:
        tasks[start:stop, slot] = t
    return tasks


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("cpu_layout", [False, True])
def test_segment_fast_path_matches_grouped_reference(case, with_weights, with_bias, cpu_layout):
    """The CPU fast path over row segments (batched runs, in-place expand, biases written before the GEMM)
    equals the masked reference for the same grouping, whatever the banks' memory layout."""
    from mass.nn.layers import bank_layout
    from mass_kernels.reference import lowrank_linear_segments_torch, lowrank_linear_torch

    gen = torch.Generator().manual_seed(4)
    T, din, dout, k, N = 4, 20, 12, 3, 12
    x, W = torch.randn(N, din, generator=gen), torch.randn(dout, din, generator=gen)
    b = torch.randn(dout, generator=gen) if with_bias else None
    U, S, V = torch.randn(T, dout, k, generator=gen), torch.rand(T, k, generator=gen), torch.randn(T, k, din, generator=gen)
    if cpu_layout:
        U, V = bank_layout(U), bank_layout(V)
        assert U.transpose(1, 2).is_contiguous() and V.transpose(1, 2).is_contiguous()
    tb = torch.randn(T, dout, generator=gen) if with_bias else None
    segments = SEGMENT_CASES[case]
    weights = torch.rand(N, 2, generator=gen) if with_weights else None
    got = lowrank_linear_segments_torch(x, W, b, U, S, V, segments, weights, tb)
    tasks = _segment_tasks(segments, N)
    assert_lowrank_within_bound(got, x, W, b, U, S, V, tasks, weights, tb)
    assert_lowrank_within_bound(lowrank_linear_torch(x, W, b, U, S, V, tasks, weights, tb), x, W, b, U, S, V, tasks,
                                weights, tb)


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
@pytest.mark.parametrize("with_weights", [False, True])
def test_dense_delta_segments_match_direct(case, with_weights):
    from mass_kernels.reference import dense_delta_segments_torch

    gen = torch.Generator().manual_seed(5)
    T, din, dout, N = 4, 9, 7, 12
    x, W, b = torch.randn(N, din, generator=gen), torch.randn(dout, din, generator=gen), torch.randn(dout, generator=gen)
    deltas, tb = torch.randn(T, dout, din, generator=gen), torch.randn(T, dout, generator=gen)
    segments = SEGMENT_CASES[case]
    weights = torch.rand(N, 2, generator=gen) if with_weights else torch.ones(N, 2)
    got = dense_delta_segments_torch(x, W, b, deltas, segments, weights if with_weights else None, tb)
    assert_lowrank_within_bound(got, x, W, b, *as_lowrank(deltas), _segment_tasks(segments, N), weights, tb)


@pytest.mark.parametrize("with_bias", [False, True])
def test_whole_weight_segments_match_direct(with_bias):
    from mass_kernels.reference import whole_weight_segments_torch

    gen = torch.Generator().manual_seed(6)
    T, din, dout, N = 5, 9, 7, 11
    x, weights = torch.randn(N, din, generator=gen), torch.randn(T, dout, din, generator=gen)
    b = torch.randn(dout, generator=gen) if with_bias else None
    tb = torch.randn(T, dout, generator=gen) if with_bias else None
    segments = [(0, 3, 0, 2), (0, 4, 2, 4), (0, 0, 4, 9), (0, 2, 9, 10), (0, 1, 10, 11)]
    got = whole_weight_segments_torch(x, weights, b, segments, tb)
    tasks = _segment_tasks(segments, N)[:, :1]
    assert_lowrank_within_bound(got, x, torch.zeros(dout, din), b, *as_lowrank(weights), tasks, None, tb)


@pytest.mark.parametrize("segments", [[(0, 0, 0, 2)], [(0, 0, 0, 2), (1, 1, 2, 4)], [(0, 0, 0, 1), (0, 1, 2, 4)]])
def test_whole_weight_segments_refuse_partial_groupings(segments):
    from mass_kernels.reference import whole_weight_segments_torch

    with pytest.raises(ValueError, match="exactly one slot-0 segment"):
        whole_weight_segments_torch(torch.randn(4, 3), torch.randn(2, 5, 3), None, segments)

