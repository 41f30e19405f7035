"""Small helpers shared by the Triton launchers (no kernels here)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``, read at triton import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def needs_bf16_upcast(*dtypes: torch.dtype) -> bool:
    """Work around the triton 3.9 interpreter bug: ``tl.dot`` on bf16 operands returns garbage.

    Only under the interpreter do the kernels upcast bf16 operands to fp32 before ``tl.dot``; on a
    GPU the bf16 tensor-core MMA is kept. Consequence: CPU/interpreter tests do NOT exercise the bf16
    MMA path — that needs a real GPU run.
    """
    return interpreting() and any(d == torch.bfloat16 for d in dtypes)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands, following ``torch.get_float32_matmul_precision``.

    "highest" → exact fp32 ("ieee"), "high"/"medium" → TF32, as torch's own matmuls would. For
    fp16/bf16 operands the value is irrelevant (the MMA runs in the operand dtype).
    """
    if dtype != torch.float32:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def n_bucket(n: int) -> int:
    """Autotune bucket of a row count: next power of two, 16…8192 (always a multiple of 16)."""
    return min(8192, max(16, next_pow2(n)))
