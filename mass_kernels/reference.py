"""Test oracles of the two hot-path ops (fp64, written for clarity, not speed) and the worst-case error bounds
every kernel test tolerance comes from. The production CPU paths are in :mod:`mass_kernels.cpu`; their names
stay importable from here for existing callers.
"""
from __future__ import annotations

import torch

from .cpu import (  # noqa: F401 - re-exported: mass/layers.py, mass/model.py and tests import them from here
    dense_delta_segments_torch,
    group_rows,
    lowrank_linear_grouped_torch,
    lowrank_linear_segments_torch,
    lowrank_linear_torch,
    routing_residuals_torch,
    row_weights_of,
    segment_runs,
    unit_row_tolerance,
    whole_weight_segments_torch,
)


def routing_residuals_exact(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Test oracle of :func:`routing_residuals_torch`'s definition in fp64, one task at a time, from the given
    (rounded) values: ``sqrt(‖x − Σ v_i (v_i·x)‖² + Σ (1 − w_i)(v_i·x)²)``."""
    xd = x.double()
    w = basis.double().square().sum(-1)
    unit = (w - 1.0).abs() <= unit_row_tolerance(basis.dtype)
    w = torch.where(unit, 1.0, w)
    dirs = basis.double() / torch.where(unit | (w == 0), 1.0, w.sqrt()).unsqueeze(-1)
    cols = []
    for t in range(basis.shape[-3]):
        v = dirs[..., t, :, :]
        c = xd @ v.transpose(-1, -2)
        r2 = (xd - c @ v).square().sum(-1) + (c.square() * (1.0 - w[..., t, :]).unsqueeze(-2)).sum(-1)
        cols.append(r2.clamp_min(0.0).sqrt())
    return torch.stack(cols, -1) if cols else xd.new_zeros(*xd.shape[:-1], 0)


def _gamma(n: int, u: float) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative error bound of an n-term fp sum or dot product."""
    return n * u / (1.0 - n * u)


def routing_error_bound(x: torch.Tensor, basis: torch.Tensor, method: str, unit_roundoff: float = 2.0 ** -24,
                        input_roundoff: float = 0.0) -> torch.Tensor:
    """Worst-case bound on ``|computed − routing_residuals_exact(x, basis)|`` per (row, task), fp64.

    ``unit_roundoff`` u is the accumulation precision (fp32: 2⁻²⁴; pass 2⁻²³ for tensor cores that
    truncate), ``input_roundoff`` the rounding of dot operands before multiplying (0 when products are
    exact in fp32, as for fp16/bf16 operands or an fp32 FMA; 2⁻¹¹ for TF32). With ω_t = ‖V̂t V̂tᵀ − I‖₂
    for the basis' row directions (its loss of orthonormality, e.g. after rounding to bf16), τ the
    :func:`unit_row_tolerance`, s = 1 + ω, and e = γ_{D+2} + 2u_in + u_in² the relative error of one dot
    product (Higham, *Accuracy and Stability*, §3.1):

    * ``"fused"`` (Triton: ``sqrt(max(‖x‖² − ‖ĉ‖², 0))``, ĉ = B x): the computed r² is off by at most
      δ = ‖x‖²·[(ω + τ)·s + γ_{D+2} + e√k·s·(2 + e√k) + γ_{k+2}·s·(1 + e√k)² + u(1 + 2s)], hence
      ``|r̂ − r| ≤ min(√δ, δ/r) + 2u·r̂`` — an absolute error of order √u·‖x‖ when r → 0.
    * ``"direct"`` (CPU, :func:`routing_residuals_torch`): ``|r̂ − r| ≤ E + γ_{D+2}(r + E) + 2.25·δ'/‖x‖`` with
      E = ‖x‖·[e√k·s + γ_{k+2}√(k·s)·(√s + e√(k·s)) + u(1 + s) + 3u√k·s + (γ_{k+4} + 2e√k)·s] (the last two
      terms: directions normalised in fp32, and the Σ(1 − w)(v·x)² term) for the pairs it recomputes, and
      δ/r ≤ 2.25·δ'/‖x‖ for those it keeps from the subtraction (r̂² ≥ ‖x‖²/4, so r ≥ ‖x‖/√5 while δ' ≤
      ‖x‖²/20), δ' being δ with the snapped weights (no τ) — of order u·√k·‖x‖ either way.
    """
    if method not in ("fused", "direct"):
        raise ValueError(f"method must be 'fused' or 'direct', got {method!r}")
    xd, bd = x.double(), basis.double()
    D, k = bd.shape[-1], bd.shape[-2]
    u, ui = float(unit_roundoff), float(input_roundoff)
    eye = torch.eye(k, dtype=torch.float64, device=bd.device)
    w = bd.square().sum(-1, keepdim=True)
    dirs = bd / torch.where(w > 0, w.sqrt(), 1.0)
    omega = torch.linalg.matrix_norm(dirs @ dirs.transpose(-1, -2) - eye, ord=2) if k else bd.new_zeros(bd.shape[:-2])
    tau = unit_row_tolerance(basis.dtype)
    s = (1.0 + omega).unsqueeze(-2)  # (..., 1, T)
    e = _gamma(D + 2, u) + 2 * ui + ui * ui
    ek = e * k ** 0.5
    xn = xd.norm(dim=-1, keepdim=True)  # (..., N, 1)
    r = routing_residuals_exact(x, basis)
    rounding = (omega.unsqueeze(-2) * s + _gamma(D + 2, u) + ek * s * (2 + ek) + _gamma(k + 2, u) * s * (1 + ek) ** 2
                + u * (1 + 2 * s))  # δ / ‖x‖² without the unit-row tolerance
    if method == "fused":
        delta = xn ** 2 * (tau * s + rounding)
        bound = torch.minimum(delta.sqrt(), delta / r.clamp_min(1e-300))
        return bound + 2 * u * (r + bound)
    big_e = xn * (ek * s + _gamma(k + 2, u) * (k * s).sqrt() * (s.sqrt() + e * (k * s).sqrt()) + u * (1 + s)
                  + 3 * u * k ** 0.5 * s + (_gamma(k + 4, u) + 2 * ek) * s)
    return big_e + _gamma(D + 2, u) * (r + big_e) + 2.25 * xn * rounding


def lowrank_linear_exact(x, weight, bias, U, S, V, row_tasks, row_weights=None, task_bias=None) -> torch.Tensor:
    """Test oracle of ``lowrank_linear`` in fp64: every row gathers its own factors (memory ∝ N·k·(in+out),
    test sizes only); ids outside [0, T) mean no task block. Independent of the grouping the fast paths use."""
    d = torch.float64
    x, weight, U, S, V = (t.to(d) for t in (x, weight, U, S, V))
    tasks = row_tasks.reshape(x.shape[0], -1).long()
    weights = torch.ones(tasks.shape, dtype=d) if row_weights is None else row_weights.reshape(tasks.shape).to(d)
    y = x @ weight.T + (0.0 if bias is None else bias.to(d))
    for j in range(tasks.shape[1]):
        valid = (tasks[:, j] >= 0) & (tasks[:, j] < U.shape[0])
        t = torch.where(valid, tasks[:, j], 0)
        h = torch.einsum("ni,nki->nk", x, V[t]) * S[t]
        delta = torch.einsum("nk,nok->no", h, U[t]) + (0.0 if task_bias is None else task_bias.to(d)[t])
        y = y + torch.where(valid[:, None], weights[:, j, None] * delta, 0.0)
    return y


def lowrank_error_bound(x, weight, bias, U, S, V, row_tasks, row_weights=None, task_bias=None, *,
                        unit_roundoff: float = 2.0 ** -24, input_roundoff: float = 0.0, h_roundoff: float = 0.0,
                        out_roundoff: float = 0.0, partial_roundoff: float = 0.0) -> torch.Tensor:
    """Worst-case bound on ``|computed − lowrank_linear_exact(...)|`` per output element, fp64.

    Standard componentwise bounds (Higham §3.1): with n = in + k + 2K + 4 operations on the longest path
    to one output and γ_n = n·u/(1 − n·u), every fp32-accumulated evaluation order satisfies
    ``|ŷ − y| ≤ (γ_n + 2u_in + u_p)·M + u_h·M_lr + u_out·(|y| + γ_n·M)``, where M is the same expression
    evaluated on absolute values (|x||W|ᵀ + |b| + Σ|w|((|x||V|ᵀ ⊙ |S|)|U|ᵀ + |tb|)), M_lr its low-rank
    part, u_in the rounding of dot operands (TF32: 2⁻¹¹), u_h the rounding of h to the operand dtype
    before the expand (16-bit kernels), u_p the rounding of a partial result bounded by M (the vendor
    candidate stores biases + expand before adding x Wᵀ) and u_out the final rounding to x's dtype.
    """
    a = lambda t: None if t is None else t.to(torch.float64).abs()  # noqa: E731
    M = lowrank_linear_exact(a(x), a(weight), a(bias), a(U), a(S), a(V), row_tasks, a(row_weights), a(task_bias))
    M_lr = lowrank_linear_exact(a(x), torch.zeros_like(a(weight)), None, a(U), a(S), a(V), row_tasks,
                                a(row_weights), None)
    y = lowrank_linear_exact(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias).abs()
    K = row_tasks.reshape(x.shape[0], -1).shape[1]
    g = _gamma(x.shape[1] + S.shape[1] + 2 * K + 4, unit_roundoff)
    return (g + 2 * input_roundoff + partial_roundoff) * M + h_roundoff * M_lr + out_roundoff * (y + g * M)
