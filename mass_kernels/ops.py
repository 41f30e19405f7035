"""The two hot-path ops as PyTorch custom ops (``torch.ops.mass.lowrank_linear``, ``torch.ops.mass.routing_residuals``)
with fake (meta) implementations, so ``torch.compile`` and CUDA-graph capture see one op each instead of
tracing into the dispatch, the grouping and the Triton launchers (which broke graphs). The real
implementation picks the PyTorch or Triton path (:func:`select_impl`) and, on the Triton path, the measured
``lowrank_linear`` candidate (:mod:`mass_kernels.candidates`). A third op, ``torch.ops.mass.dense_delta_linear``
(PyTorch only), lets the patch embedding group its rows by task inside an op when ``torch.compile`` traces the
CPU second pass (grouping in traced code would read values back: a graph break).

No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads the annotations as types.
"""
import os
from typing import Optional

import torch

from . import candidates
from ._triton_utils import interpreting
from ._checks import check_lowrank_args, check_routing_args
from .cpu import dense_delta_linear_torch, lowrank_linear_grouped_torch, lowrank_linear_torch, routing_residuals_torch

_IMPLS = ("torch", "triton")


def select_impl(x: torch.Tensor) -> str:
    """Which implementation serves tensors like ``x``: the env override, else triton on CUDA."""
    forced = os.environ.get("MASS_KERNEL_IMPL", "").strip().lower()
    if forced:
        if forced not in _IMPLS:
            raise ValueError(f"MASS_KERNEL_IMPL must be one of {_IMPLS}, got {forced!r}")
        if forced == "triton" and not x.is_cuda and not interpreting():
            raise ValueError(f"MASS_KERNEL_IMPL=triton: the Triton kernels need CUDA tensors, got tensors on "
                             f"{x.device} (set TRITON_INTERPRET=1 before importing triton to run them in the "
                             f"interpreter, or MASS_KERNEL_IMPL=torch)")
        return forced
    return "triton" if x.is_cuda else "torch"


@torch.library.custom_op("mass::routing_residuals", mutates_args=())
def routing_residuals_op(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    if select_impl(x) == "triton":
        from .routing import routing_residuals_triton

        return routing_residuals_triton(x, basis)  # the launcher checks its arguments
    check_routing_args(x, basis)
    return routing_residuals_torch(x, basis)


@routing_residuals_op.register_fake
def _routing_residuals_fake(x, basis):
    check_routing_args(x, basis)
    return x.new_empty(*x.shape[:-1], basis.shape[-3], dtype=torch.float32)


@torch.library.custom_op("mass::lowrank_linear", mutates_args=())
def lowrank_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    row_tasks: torch.Tensor,
    row_weights: Optional[torch.Tensor],
    task_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    args = (x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)
    if select_impl(x) == "triton":
        name = candidates.choose(candidates.shape_key(x, weight, bias, S, row_tasks, row_weights, task_bias))
        return candidates.candidate(name)(*args)  # the launchers check their arguments
    check_lowrank_args(*args)
    if not x.is_cuda and (row_tasks.dim() == 1 or row_tasks.shape[1] == 1):
        return lowrank_linear_grouped_torch(*args)
    return lowrank_linear_torch(*args)


@lowrank_linear_op.register_fake
def _lowrank_linear_fake(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias):
    check_lowrank_args(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias, values=False)
    return x.new_empty(x.shape[0], weight.shape[0])


def _check_dense_delta_args(x, weight, bias, deltas, row_entries, row_weights, task_bias) -> None:
    N, D = x.shape if x.dim() == 2 else (None, None)
    E = deltas.shape[0] if deltas.dim() == 3 else None
    problems = []
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != D:
        problems.append(f"x {tuple(x.shape)} must be (N, in) and weight {tuple(weight.shape)} (out, in)")
    elif deltas.dim() != 3 or tuple(deltas.shape[1:]) != tuple(weight.shape):
        problems.append(f"deltas {tuple(deltas.shape)} must be (entries, {weight.shape[0]}, {D})")
    if row_entries.shape != (N,) or row_entries.dtype != torch.long or row_weights.shape != (N,):
        problems.append(f"row_entries {tuple(row_entries.shape)} {row_entries.dtype} and row_weights "
                        f"{tuple(row_weights.shape)} must be ({N},), the entries int64")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        problems.append(f"bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if task_bias is not None and tuple(task_bias.shape) != (E, weight.shape[0]):
        problems.append(f"task_bias {tuple(task_bias.shape)} must be ({E}, {weight.shape[0]})")
    if problems:
        raise ValueError("dense_delta_linear: " + "; ".join(problems))


@torch.library.custom_op("mass::dense_delta_linear", mutates_args=())
def dense_delta_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    deltas: torch.Tensor,
    row_entries: torch.Tensor,
    row_weights: torch.Tensor,
    task_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """One entry per row with whole weight deltas: the CPU path of a task-conditioned patch embedding under
    ``torch.compile``, where the rows cannot be grouped in the traced code (a host sync) but can inside an op."""
    _check_dense_delta_args(x, weight, bias, deltas, row_entries, row_weights, task_bias)
    return dense_delta_linear_torch(x, weight, bias, deltas, row_entries, row_weights, task_bias)


@dense_delta_linear_op.register_fake
def _dense_delta_linear_fake(x, weight, bias, deltas, row_entries, row_weights, task_bias):
    _check_dense_delta_args(x, weight, bias, deltas, row_entries, row_weights, task_bias)
    return x.new_empty(x.shape[0], weight.shape[0])
