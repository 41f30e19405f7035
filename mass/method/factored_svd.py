"""Top-k SVD of a delta given as a product of thin factors (a LoRA update scale·B·A), never formed densely.

With B (out × r) and A (r × in): QR B = Qb Rb and Aᵀ = Qa Ra (Householder), then the SVD of the small r × r
matrix scale·Rb Raᵀ = Um Σ Vmᵀ, so that scale·B A = (Qb Um) Σ (Qa Vm)ᵀ: O((out + in)·r²) work instead of an
SVD of an out × in matrix. All three steps are backward stable, so the factors are those of a rank-r matrix
within a few multiples of u·‖scale·B A‖ of the true delta (what ``tests/test_lora.py`` checks, in fp64).
When k exceeds r the delta has only r directions: the remaining k − r singular values are exact zeros with
zero vectors (they add nothing to the delta, to the TSV-M first pass or to a routing residual).
"""
from __future__ import annotations

import torch


def factored_topk(B: torch.Tensor, A: torch.Tensor, scale: float, k: int,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD factors U (out, k), S (k), V (k, in) of ``scale · B @ A``, computed in ``dtype``."""
    B, A = B.to(dtype), A.to(dtype)
    out, r = B.shape
    inp = A.shape[1]
    if A.shape[0] != r or not 1 <= k <= min(out, inp):
        raise ValueError(f"factored_topk: B {tuple(B.shape)}, A {tuple(A.shape)}, k = {k}")
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    Um, S, Vmh = torch.linalg.svd(scale * (Rb @ Ra.mT))
    U, V = Qb @ Um, Vmh @ Qa.mT
    keep = min(k, S.shape[0])
    if keep == k:
        return U[:, :k].contiguous(), S[:k].contiguous(), V[:k].contiguous()
    Uk = torch.zeros(out, k, dtype=dtype)
    Sk = torch.zeros(k, dtype=dtype)
    Vk = torch.zeros(k, inp, dtype=dtype)
    Uk[:, :keep], Sk[:keep], Vk[:keep] = U[:, :keep], S[:keep], V[:keep]
    return Uk, Sk, Vk
