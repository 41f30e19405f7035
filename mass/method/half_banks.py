"""Half-precision banks: the tasks' stored values in bfloat16 or float16 while θ0 keeps its dtype.

``to_bank_dtype(dec, dtype)`` rounds every task factor (U, S, V) once to ``dtype`` and turns the whole per-task
values (biases, LayerNorms, class token, patch embedding) into per-task *deltas* rounded to ``dtype`` (a delta
is small next to θ0, so rounding it loses far less than rounding the fine-tuned value; such a decomposition's
``dense`` holds deltas, see :class:`~mass.method.decompose.TaskDecomposition`). Everything built from it (the
banks, the TSV-M first pass, the routing basis, a saved file) uses those rounded values, so a saved and loaded
model is the model that was served.

Error bound (what the tests use): rounding to nearest changes each stored value x by at most
e(x) = u_h·|x| + η_h/2, with u_h the unit roundoff (2⁻⁸ bfloat16, 2⁻¹¹ float16) and η_h the smallest subnormal
(2⁻¹³³ bfloat16: fp32's range, negligible; 2⁻²⁴ float16, whose normal range ends at 6.1·10⁻⁵, which small
deltas fall below). A task block U diag(S) V of three rounded factors therefore differs from the fp32 one,
elementwise, by at most (|U| + e(U)) diag(|S| + e(S)) (|V| + e(V)) − |U| diag|S| |V| (≈ 3u_h·|U| diag|S| |V|
for normal values), a whole delta Δ by e(Δ). Applied to an input, the products accumulate in fp32 on the
rounded values (on the CPU the selected entries are upcast), so a half-precision bank adds nothing beyond that
rounding: a forced task computes, within the fp32 encoder bound, the encoder whose weights are θ0 plus the
rounded task values (``tests/test_half_banks.py``). bfloat16 is the default choice: its range is fp32's.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .decompose import LowRankFactors, TaskDecomposition

BANK_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SMALLEST_SUBNORMAL = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}


def rounding_error(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e(x) = u_h·|x| + η_h/2 (fp64): the most rounding ``x`` to ``dtype`` (to nearest) can change it by."""
    return UNIT_ROUNDOFF[dtype] * x.double().abs() + SMALLEST_SUBNORMAL[dtype] / 2


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
