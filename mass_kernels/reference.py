"""Plain PyTorch implementations of the two hot-path ops.

They are the oracle for the Triton kernels' tests and the CPU path. Both compute in fp32 and return
the documented dtype, so a test compares a kernel against the mathematically intended result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def routing_residuals_torch(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``‖x − Vtᵀ Vt x‖₂`` for every row of ``x`` and every task ``t``, in fp32.

    x: (N, D) or stacked (G, N, D); basis: (T, k, D) or stacked (G, T, k, D), rows orthonormal.
    Returns (N, T) or (G, N, T) fp32, computed as ``sqrt(max(‖x‖² − ‖Vt x‖², 0))``.
    """
    xf = x.float()
    bf = basis.float()
    *lead, T, k, D = bf.shape
    coords = xf @ bf.reshape(*lead, T * k, D).transpose(-1, -2)  # (..., N, T*k)
    explained = coords.reshape(*coords.shape[:-1], T, k).square().sum(-1)  # (..., N, T)
    total = xf.square().sum(-1, keepdim=True)  # (..., N, 1)
    return (total - explained).clamp_min_(0.0).sqrt_()


def lowrank_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    row_tasks: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    task_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + Σ_j w_j (((x V_tjᵀ) ⊙ S_tj) U_tjᵀ + task_bias_tj)`` with inputs already validated.

    Rows are grouped by task on the device (one mask per task and slot); there is no loop over rows
    and no ``.item()``. Accumulates in fp32 and returns ``x.dtype``.
    """
    xf = x.float()
    y = F.linear(xf, weight.float(), None if bias is None else bias.float())
    if row_tasks.dim() == 1:
        row_tasks = row_tasks[:, None]
        row_weights = None if row_weights is None else row_weights[:, None]
    n_tasks = U.shape[0]
    Uf, Sf, Vf = U.float(), S.float(), V.float()
    for slot in range(row_tasks.shape[1]):
        slot_tasks = row_tasks[:, slot]
        for t in range(n_tasks):
            rows = (slot_tasks == t).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = (xf.index_select(0, rows) @ Vf[t].T) * Sf[t]
            delta = h @ Uf[t].T
            if task_bias is not None:
                delta = delta + task_bias[t].float()
            if row_weights is not None:
                delta = delta * row_weights.index_select(0, rows)[:, slot, None].float()
            y.index_add_(0, rows, delta)
    return y.to(x.dtype)


def lowrank_linear_segments_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    row_weights: torch.Tensor | None = None,
    task_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU fast path of ``lowrank_linear`` when rows are already grouped: ``segments`` lists
    ``(slot, task, start, stop)`` row ranges. Each task block is a slice and an in-place ``addmm_`` on the
    output (no gather/scatter copies). Same result as :func:`lowrank_linear_torch` for the same grouping."""
    y = F.linear(x, weight, bias)
    for slot, t, start, stop in segments:
        xs = x[start:stop]
        h = (xs @ V[t].T) * S[t]
        w = None if row_weights is None else row_weights[start:stop, slot, None].to(h.dtype)
        if w is not None:
            h = h * w
        ys = y[start:stop]
        ys.addmm_(h, U[t].T)
        if task_bias is not None:
            ys.add_(task_bias[t] if w is None else w * task_bias[t])
    return y
