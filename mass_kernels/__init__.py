"""Hot-path ops of MASS with a PyTorch path (CPU, oracle) and a Triton path (CUDA).

``MASS_KERNEL_IMPL=torch|triton`` forces one implementation; by default CUDA tensors use Triton
and everything else PyTorch. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set
before the first import of triton (tests use this).
"""
from __future__ import annotations

import os

import torch

from ._checks import check_lowrank_args, check_routing_args
from .padding import pad_rank
from .reference import lowrank_linear_grouped_torch, lowrank_linear_torch, routing_residuals_torch


def warmup(*args, **kwargs) -> int:
    """Compile and autotune the Triton ops for the given shapes; see :func:`mass_kernels.tuning.warmup`."""
    from .tuning import warmup as _warmup  # lazy: triton must not be imported with the package

    return _warmup(*args, **kwargs)

__all__ = [
    "routing_residuals",
    "lowrank_linear",
    "routing_residuals_torch",
    "lowrank_linear_torch",
    "select_impl",
    "warmup",
    "pad_rank",
]

_IMPLS = ("torch", "triton")


def select_impl(x: torch.Tensor) -> str:
    """Which implementation serves tensors like ``x``: the env override, else triton on CUDA."""
    forced = os.environ.get("MASS_KERNEL_IMPL", "").strip().lower()
    if forced:
        if forced not in _IMPLS:
            raise ValueError(f"MASS_KERNEL_IMPL must be one of {_IMPLS}, got {forced!r}")
        return forced
    return "triton" if x.is_cuda else "torch"


def routing_residuals(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Residual norms ``‖x − Vtᵀ Vt x‖₂`` (fp32) of x (N, D) against basis (T, k, D) → (N, T).

    Stacked blocks: x (G, N, D) with basis (G, T, k, D) → (G, N, T), one launch.
    Error bound (``mass_kernels.reference.routing_error_bound``): the CPU path forms the residual
    vector, |error| = O(u·√k·‖x‖); the Triton path uses ``sqrt(‖x‖² − ‖Vt x‖²)``, |error| =
    O(√u·‖x‖) near the subspace (u = 2⁻²⁴, fp32 accumulation in both).
    """
    if select_impl(x) == "triton":
        from .routing import routing_residuals_triton

        return routing_residuals_triton(x, basis)  # the launcher checks its arguments
    check_routing_args(x, basis)
    return routing_residuals_torch(x, basis)


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
    (default 1); task_bias (T, out) optional per-task bias deltas. Returns (N, out) in x's dtype.
    """
    if select_impl(x) == "triton":
        # Kernel module is `lowrank`, not `lowrank_linear`: importing a submodule binds its name on the
        # package, which would replace this public function with the module object.
        from .lowrank import lowrank_linear_triton

        return lowrank_linear_triton(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)  # checks
    check_lowrank_args(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)
    if not x.is_cuda and (row_tasks.dim() == 1 or row_tasks.shape[1] == 1):
        return lowrank_linear_grouped_torch(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)
    return lowrank_linear_torch(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)
