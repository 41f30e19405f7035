"""Static merges over state dicts: TSV-Merge (MASS's first-pass model), task arithmetic, TIES.

Each method is one pure function ``f(pretrained, finetuned, ...) -> state dict``; ``MERGE_METHODS`` names them.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .checkpoints import Checkpoint
from .decompose import LowRankFactors, Rank, _state_dict_of, decompose, open_finetuned


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows, if wide): P Qᵀ from the SVD (Procrustes)."""
    P, _, Qh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return P @ Qh


def tsv_factors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV-M over the given tasks' factors: U (m, out, k), S (m, k), V (m, k, in) → Uo (out, mk), Scat, Vo (mk, in)."""
    m, d_out, k = U.shape
    Ucat = U.permute(1, 0, 2).reshape(d_out, m * k)
    Vcat = V.reshape(m * k, V.shape[-1])
    return polar_factor(Ucat), S.reshape(m * k).float(), polar_factor(Vcat)


def tsv_delta(factors: LowRankFactors, tasks: list[int] | None = None) -> torch.Tensor:
    """Dense TSV-M delta ``Uo diag(Scat) Vo`` over a subset of tasks (all by default)."""
    idx = slice(None) if tasks is None else torch.as_tensor(tasks)
    Uo, Scat, Vo = tsv_factors(factors.U[idx], factors.S[idx], factors.V[idx])
    return (Uo * Scat) @ Vo


@torch.no_grad()
def tsv_merge(
    pretrained: Checkpoint, finetuned: Mapping[str, Checkpoint], rank: Rank = None, alpha: float = 1.0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """TSV-Merge: ``W0 + α Uo diag(Scat) Vo`` per matrix; ``θ0 + mean_t Δt`` for the other params."""
    return tsv_merge_from_decomposition(decompose(pretrained, finetuned, rank=rank, progress=progress), alpha)


@torch.no_grad()
def tsv_merge_from_decomposition(dec, alpha: float = 1.0, tasks: list[int] | None = None) -> dict[str, torch.Tensor]:
    """TSV-M state dict from stored factors (optionally over a subset of tasks)."""
    sd = {}
    for key, value in dec.base.items():
        if key in dec.lowrank:
            sd[key] = (value.float() + alpha * tsv_delta(dec.lowrank[key], tasks)).to(value.dtype)
        elif key in dec.dense:
            stack = dec.dense[key] if tasks is None else dec.dense[key][torch.as_tensor(tasks)]
            sd[key] = stack.mean(0).to(value.dtype)
        else:
            sd[key] = value.clone()
    return sd


def _task_vectors(pretrained, finetuned):
    base = _state_dict_of(pretrained)
    float_keys, opened = open_finetuned(base, finetuned)
    return base, float_keys, opened


@torch.no_grad()
def task_arithmetic(
    pretrained: Checkpoint, finetuned: Mapping[str, Checkpoint], scaling: float = 0.3
) -> dict[str, torch.Tensor]:
    """Task arithmetic: ``θ0 + λ Σt Δt``."""
    base, float_keys, opened = _task_vectors(pretrained, finetuned)
    sd = dict(base)
    for key in float_keys:
        theta0 = base[key].float()
        total = sum(src.get(km[key]).float() - theta0 for _, src, km in opened)
        sd[key] = (theta0 + scaling * total).to(base[key].dtype)
    return sd


@torch.no_grad()
def ties_merging(
    pretrained: Checkpoint, finetuned: Mapping[str, Checkpoint], density: float = 0.2, scaling: float = 1.0
) -> dict[str, torch.Tensor]:
    """TIES: trim each task vector to its top-``density`` magnitudes (per tensor), elect the sign by the
    summed mass, average the entries that agree with it, scale by λ."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    base, float_keys, opened = _task_vectors(pretrained, finetuned)
    sd = dict(base)
    for key in float_keys:
        theta0 = base[key].float()
        deltas = torch.stack([src.get(km[key]).float() - theta0 for _, src, km in opened]).flatten(1)
        keep = max(1, int(round(density * deltas.shape[1])))
        thresh = deltas.abs().kthvalue(deltas.shape[1] - keep + 1, dim=1, keepdim=True).values
        trimmed = torch.where(deltas.abs() >= thresh, deltas, torch.zeros_like(deltas))
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
        sd[key] = (theta0 + scaling * merged.view_as(theta0)).to(base[key].dtype)
    return sd


MERGE_METHODS = {
    "tsv": tsv_merge,
    "task_arithmetic": task_arithmetic,
    "ties": ties_merging,
}
