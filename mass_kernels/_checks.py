"""Argument checks shared by the PyTorch and Triton paths: clear errors, no device sync."""
from __future__ import annotations

import torch


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def check_routing_args(x: torch.Tensor, basis: torch.Tensor) -> None:
    op = "routing_residuals"
    if x.dim() not in (2, 3) or basis.dim() != x.dim() + 1:
        _fail(op, f"expected x (N, D) with basis (T, k, D), or x (G, N, D) with basis (G, T, k, D); "
                  f"got x {tuple(x.shape)} and basis {tuple(basis.shape)}")
    if x.shape[-1] != basis.shape[-1]:
        _fail(op, f"feature size of x ({x.shape[-1]}) differs from the basis ({basis.shape[-1]})")
    if x.dim() == 3 and x.shape[0] != basis.shape[0]:
        _fail(op, f"x stacks {x.shape[0]} blocks but basis stacks {basis.shape[0]}")
    if x.device != basis.device:
        _fail(op, f"x is on {x.device} but basis is on {basis.device}")
    if not x.is_floating_point() or not basis.is_floating_point():
        _fail(op, f"x and basis must be floating point, got x {x.dtype} and basis {basis.dtype}")


def check_lowrank_dtypes(x, weight, bias, U, S, V, row_weights, task_bias) -> None:
    """Every operand but ``row_tasks`` floating point: an integer x would give an integer output with the
    fractions truncated. The message names the offending dtype beside x's and the weight's. Mixed floating
    dtypes are accepted (each path computes with fp32 accumulation; see :func:`mass_kernels.lowrank_linear`)."""
    named = {"x": x, "weight": weight, "bias": bias, "U": U, "S": S, "V": V, "row_weights": row_weights,
             "task_bias": task_bias}
    bad = [f"{name} is {t.dtype}" for name, t in named.items() if t is not None and not t.is_floating_point()]
    if bad:
        fine = [f"{name} {t.dtype}" for name, t in named.items() if t is not None and t.is_floating_point()]
        _fail("lowrank_linear", f"every input but row_tasks must be floating point: {', '.join(bad)}"
                                + (f" (the others: {', '.join(fine)})" if fine else ""))


def check_lowrank_args(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias, values: bool = True) -> None:
    """Shapes, dtypes and devices; with ``values``, also the task ids of CPU tensors (not under tracing)."""
    op = "lowrank_linear"
    check_lowrank_dtypes(x, weight, bias, U, S, V, row_weights, task_bias)
    if x.dim() != 2:
        _fail(op, f"x must be (N, in), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        _fail(op, f"weight must be (out, in={x.shape[1]}), got {tuple(weight.shape)}")
    n, d_in = x.shape
    d_out = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (d_out,):
        _fail(op, f"bias must be ({d_out},), got {tuple(bias.shape)}")
    if U.dim() != 3 or S.dim() != 2 or V.dim() != 3:
        _fail(op, f"U, S, V must be (T, out, k), (T, k), (T, k, in); got {tuple(U.shape)}, "
                  f"{tuple(S.shape)}, {tuple(V.shape)}")
    T, k = S.shape
    if tuple(U.shape) != (T, d_out, k) or tuple(V.shape) != (T, k, d_in):
        _fail(op, f"factor shapes disagree: U {tuple(U.shape)} (want {(T, d_out, k)}), "
                  f"V {tuple(V.shape)} (want {(T, k, d_in)})")
    if task_bias is not None and tuple(task_bias.shape) != (T, d_out):
        _fail(op, f"task_bias must be (T={T}, out={d_out}), got {tuple(task_bias.shape)}")
    if row_tasks.dtype not in (torch.int64, torch.int32):
        _fail(op, f"row_tasks must be an integer tensor (int64), got {row_tasks.dtype}")
    if row_tasks.dim() not in (1, 2) or row_tasks.shape[0] != n:
        _fail(op, f"row_tasks must be (N={n},) or (N={n}, K), got {tuple(row_tasks.shape)}")
    if row_weights is not None:
        want = tuple(row_tasks.shape)
        if tuple(row_weights.shape) != want:
            _fail(op, f"row_weights must match row_tasks' shape {want}, got {tuple(row_weights.shape)}")
    tensors = [t for t in (weight, bias, U, S, V, row_tasks, row_weights, task_bias) if t is not None]
    for t in tensors:
        if t.device != x.device:
            _fail(op, f"all tensors must be on {x.device}; found one on {t.device}")
    # Value check only where it costs no device synchronisation (CPU tensors).
    if values and row_tasks.device.type == "cpu" and row_tasks.numel() and (
        bool((row_tasks < -1).any()) or bool((row_tasks >= T).any())
    ):
        _fail(op, f"row_tasks must lie in [-1, {T - 1}] (-1 = no task block)")
