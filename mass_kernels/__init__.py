"""Hot-path ops of MASS with a PyTorch path (CPU) and a Triton path (CUDA), as PyTorch custom ops.

``MASS_KERNEL_IMPL=torch|triton`` forces one implementation; by default CUDA tensors use Triton
and everything else PyTorch. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set
before the first import of triton (tests use this).
"""
from __future__ import annotations

import torch

from .candidates import LOWRANK_CANDIDATES, clear_choices, lowrank_choices
from .cpu import lowrank_linear_torch, routing_residuals_torch
from .ops import dense_delta_linear_op, lowrank_linear_op, routing_residuals_op, select_impl
from .padding import pad_rank


def warmup(*args, **kwargs) -> int:
    """Compile and autotune the Triton ops for the given shapes and time the ``lowrank_linear`` candidates;
    see :func:`mass_kernels.tuning.warmup`."""
    from .tuning import warmup as _warmup  # lazy: triton must not be imported with the package

    return _warmup(*args, **kwargs)


__all__ = [
    "routing_residuals",
    "lowrank_linear",
    "dense_delta_linear",
    "routing_residuals_torch",
    "lowrank_linear_torch",
    "select_impl",
    "warmup",
    "pad_rank",
    "lowrank_choices",
    "clear_choices",
    "LOWRANK_CANDIDATES",
]


def routing_residuals(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Residual norms ``‖x − Vtᵀ Vt x‖₂`` (fp32) of x (N, D) against basis (T, k, D) → (N, T).

    Stacked blocks: x (G, N, D) with basis (G, T, k, D) → (G, N, T), one launch. Rows of a basis may carry
    weights ≤ 1 (``√w_i·v_i``, the router's ``norm="sv"``): then r² = ‖x‖² − ‖Bx‖².
    Error bound (``mass_kernels.reference.routing_error_bound``): the CPU path forms the residual
    vector, |error| = O(u·√k·‖x‖); the Triton path uses ``sqrt(‖x‖² − ‖Vt x‖²)``, |error| =
    O(√u·‖x‖) near the subspace (u = 2⁻²⁴, fp32 accumulation in both). One custom op,
    ``torch.ops.mass.routing_residuals``.
    """
    return routing_residuals_op(x, basis)


def lowrank_linear(
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
    """``x Wᵀ + b + Σ_j w_j (((x V_tjᵀ) ⊙ S_tj) U_tjᵀ + task_bias_tj)`` for rows of mixed tasks.

    x (N, in); weight (out, in); bias (out,) or None; U (T, out, k); S (T, k); V (T, k, in);
    row_tasks (N,) or (N, K) integer, -1 = no task block in that slot; row_weights like row_tasks
    (default 1); task_bias (T, out) optional per-task bias deltas. Returns (N, out) in x's dtype. Every input
    but row_tasks must be floating point (a ValueError names the dtypes); mixed floating dtypes are computed in
    fp32 on the CPU, and with the weights cast to x's dtype on the Triton path (fp32 for fp32 activations).
    One custom op, ``torch.ops.mass.lowrank_linear``; on the Triton path the candidate measured fastest by
    :func:`warmup` for the shape serves the call (``MASS_LOWRANK_IMPL=fused|vendor`` overrides).
    """
    return lowrank_linear_op(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)


def dense_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: torch.Tensor,
    row_entries: torch.Tensor,
    row_weights: torch.Tensor,
    task_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + w_r (x Δ_{e_r}ᵀ + task_bias_{e_r})`` for each row r of x (N, in): one entry e_r per row
    (-1 = none) into whole weight deltas (E, out, in), with weight w_r. PyTorch on every device (rows grouped by
    entry inside the op); the patch embedding uses it on the CPU under ``torch.compile``. One custom op,
    ``torch.ops.mass.dense_delta_linear``."""
    return dense_delta_linear_op(x, weight, bias, deltas, row_entries, row_weights, task_bias)
