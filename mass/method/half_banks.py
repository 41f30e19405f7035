"""Half-precision banks: the tasks' stored values in bfloat16 or float16 while θ0 keeps its dtype.

``to_bank_dtype(dec, dtype)`` rounds every task factor (U, S, V) once to ``dtype`` and turns the whole per-task
values (biases, LayerNorms, class token, patch embedding) into per-task *deltas* rounded to ``dtype`` (a delta
is small next to θ0, so rounding it loses far less than rounding the fine-tuned value; such a decomposition's
``dense`` holds deltas, see :class:`~mass.method.decompose.TaskDecomposition`). Everything built from it (the
banks, the TSV-M first pass, the routing basis, a saved file) uses those rounded values, so a saved and loaded
model is the model that was served.

Error bound (what the tests use): rounding to nearest gives each stored value a relative error of at most
u_h (2⁻⁸ for bfloat16, 2⁻¹¹ for float16), so a task block's delta U diag(S) V, a product of three rounded
factors, differs from the fp32 one elementwise by at most ((1 + u_h)³ − 1)·(|U| diag|S| |V|), and a whole
delta by u_h·|Δ|. Applied to an input x, the block's contribution errs by at most
((1 + u_h)³ − 1)·((|x| |V|ᵀ) ⊙ |S|) |U|ᵀ + u_h·|task bias|, on top of the fp32 arithmetic bound of
:func:`mass_kernels.reference.lowrank_error_bound` evaluated on the rounded factors (the products accumulate in
fp32: on the CPU the selected entries are upcast, so a half-precision bank computes exactly what an fp32 bank
holding the rounded values computes).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .decompose import LowRankFactors, TaskDecomposition

BANK_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def resolve_bank_dtype(value: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``None``, ``"bfloat16"``/``"float16"`` (or the torch dtypes) → the dtype; anything else a clear error."""
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in UNIT_ROUNDOFF:
        return value
    if isinstance(value, str) and value in BANK_DTYPES:
        return BANK_DTYPES[value]
    raise ValueError(f"bank_dtype must be None, 'bfloat16' or 'float16', got {value!r}")


def bank_dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def to_bank_dtype(dec: TaskDecomposition, dtype) -> TaskDecomposition:
    """``dec`` with its task values rounded to ``dtype`` (see the module docstring); θ0 is not changed."""
    dtype = resolve_bank_dtype(dtype)
    if dtype is None or dec.bank_dtype == dtype:
        return dec
    if dec.bank_dtype is not None:
        raise ValueError(f"the decomposition's banks are already {bank_dtype_name(dec.bank_dtype)}; rounding them "
                         f"to {bank_dtype_name(dtype)} would round twice")
    lowrank = {key: LowRankFactors(*(_rounded(t, dtype, key) for t in (f.U, f.S, f.V)))
               for key, f in dec.lowrank.items()}
    dense = {key: _rounded(v.float() - dec.base[key].float(), dtype, key) for key, v in dec.dense.items()}
    return TaskDecomposition(list(dec.tasks), dec.base, lowrank, dense, dtype, dec.rank_rule)


def _rounded(t: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    out = t.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"the task values of {key!r} overflow {bank_dtype_name(dtype)} (largest magnitude "
                         f"{float(t.abs().max()):.3g}); use bank_dtype='bfloat16' or None")
    return out
