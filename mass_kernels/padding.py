"""Rank padding of factor banks for the CUDA kernels."""
from __future__ import annotations

import torch


def pad_rank(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, multiple: int = 16):
    """Zero-pad a bank's rank k up to a multiple of ``multiple``: U (T, out, k), S (T, k), V (T, k, in) →
    k' = ceil(k / multiple)·multiple. The padded components have S = 0 and zero vectors, so every op gives
    the same result (the kernels add exact zeros). Why: with k a multiple of 16 the Triton kernels' rank
    tiles need no remainder masks and U's rows are 16-aligned; with k = 38 (T = 20 at ViT-B) the fused linear
    spilled 24–120 B per thread and loaded U through registers (bench/static_gpu_check.py). Memory: the
    bank grows by (k' − k)·(out + in + 1) elements per task (k = 38 → 48: +26%; k = 96: unchanged).
    Returns the inputs themselves when k is already a multiple."""
    if multiple < 1:
        raise ValueError(f"multiple must be ≥ 1, got {multiple}")
    if U.dim() != 3 or S.dim() != 2 or V.dim() != 3 or U.shape[2] != S.shape[1] or V.shape[1] != S.shape[1]:
        raise ValueError(f"pad_rank: expected U (T, out, k), S (T, k), V (T, k, in); got {tuple(U.shape)}, "
                         f"{tuple(S.shape)}, {tuple(V.shape)}")
    k = S.shape[1]
    extra = -k % multiple
    if extra == 0:
        return U, S, V
    return (torch.nn.functional.pad(U, (0, extra)), torch.nn.functional.pad(S, (0, extra)),
            torch.nn.functional.pad(V, (0, 0, 0, extra)))
