"""Which implementation serves a ``lowrank_linear`` call on the Triton path: the fused kernel (base GEMM and
expand in one accumulator, one store of y) or the vendor-GEMM candidate (expand and biases written first, then
``addmm`` with beta = 1). A Triton GEMM is not guaranteed to match cuBLAS, so :func:`mass_kernels.warmup`
times both per shape and records the faster; ``MASS_LOWRANK_IMPL=fused|vendor`` overrides the record.
Unmeasured shapes use the fused kernel. No triton import here.
"""
from __future__ import annotations

import os

import torch

from ._triton_utils import n_bucket

LOWRANK_CANDIDATES = ("fused", "vendor")
_CHOICES: dict[tuple, str] = {}
_TIMINGS: dict[tuple, dict[str, float]] = {}


def shape_key(x: torch.Tensor, weight: torch.Tensor, bias, S: torch.Tensor, row_tasks: torch.Tensor, row_weights,
              task_bias) -> tuple:
    """What a measured choice is keyed on: the autotune row bucket, the layer and bank sizes, slots, dtype and
    which optional operands are present (they select different compiled variants)."""
    slots = 1 if row_tasks.dim() == 1 else row_tasks.shape[1]
    return (n_bucket(x.shape[0]), weight.shape[0], x.shape[1], S.shape[0], S.shape[1], slots,
            str(x.dtype).replace("torch.", ""), bias is not None, row_weights is not None, task_bias is not None)


def forced_candidate() -> str | None:
    """The ``MASS_LOWRANK_IMPL`` override, validated; None when unset."""
    value = os.environ.get("MASS_LOWRANK_IMPL", "").strip().lower()
    if value and value not in LOWRANK_CANDIDATES:
        raise ValueError(f"MASS_LOWRANK_IMPL must be one of {LOWRANK_CANDIDATES}, got {value!r}")
    return value or None


def choose(key: tuple) -> str:
    """The candidate for a call with this :func:`shape_key`: the override, the measured choice, or "fused"."""
    return forced_candidate() or _CHOICES.get(key, "fused")


def record(key: tuple, timings_ms: dict[str, float]) -> str:
    """Keep the fastest of the timed candidates for ``key``; returns its name."""
    best = min(timings_ms, key=timings_ms.get)
    _CHOICES[key], _TIMINGS[key] = best, dict(timings_ms)
    return best


def lowrank_choices() -> dict:
    """The recorded choices: ``{shape_key: {"choice": name, "ms": {candidate: median ms}}}``."""
    return {key: {"choice": name, "ms": dict(_TIMINGS.get(key, {}))} for key, name in _CHOICES.items()}


def clear_choices() -> None:
    _CHOICES.clear()
    _TIMINGS.clear()


def candidate(name: str):
    """The launcher of a candidate by name (imports triton)."""
    from .lowrank import lowrank_linear_triton, lowrank_linear_vendor

    return {"fused": lowrank_linear_triton, "vendor": lowrank_linear_vendor}[name]
