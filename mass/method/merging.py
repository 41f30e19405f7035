"""Static merges over state dicts: TSV-Merge (MASS's first-pass model), task arithmetic, TIES.

Each method is one pure function ``f(pretrained, finetuned, ...) -> state dict``; ``MERGE_METHODS`` names them.
"""
from __future__ import annotations

from typing import Mapping

import torch

from mass.files.checkpoints import Checkpoint, open_finetuned
from mass.method.decompose import LowRankFactors, Rank, decompose, pretrained_state_dict


GRAM_MAX_COND = 8.0  # the Gram route is used only for matrices this well conditioned (see polar_factor)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows, if wide), in fp32, batched over leading dims.

    Square matrices (and those within a factor 2 of square): P Qᵀ from the thin SVD (Procrustes). TSV-M's
    square ``Ucat`` (T·k = out) is ill-conditioned (κ ≈ 5·10³ measured for 8 random 96-dim subspaces of
    R^768), and the SVD route's error grows only like κ·u.
    Clearly rectangular matrices (the 3072-long side of an MLP matrix: κ ≈ 3 for random subspaces) first
    try the Gram route, M (MᵀM)^-1/2 from an eigendecomposition of the small Gram matrix: about half the
    time of the SVD here, with an error that grows like κ²·u (first order: ‖ΔP‖_F ≤ ‖ΔG‖_F / (2σ_min²)),
    so it is taken only when the computed eigenvalues show κ ≤ ``GRAM_MAX_COND``; otherwise the SVD.
    """
    A = matrix.float()
    m, n = A.shape[-2:]
    if max(m, n) >= 2 * min(m, n):
        tall = A if m > n else A.mT
        eigenvalues, W = torch.linalg.eigh(tall.mT @ tall)
        smallest, largest = eigenvalues[..., :1], eigenvalues[..., -1:]
        if bool(((smallest > 0) & (smallest * GRAM_MAX_COND ** 2 >= largest)).all()):
            P = tall @ ((W * eigenvalues.rsqrt().unsqueeze(-2)) @ W.mT)
            return P if m > n else P.mT
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def _tsv_factors_on(U, S, V, run_on: torch.device):
    m, d_out, k = U.shape
    Ucat = U.to(run_on).permute(1, 0, 2).reshape(d_out, m * k)
    VcatT = V.to(run_on).reshape(m * k, V.shape[-1]).mT  # polar(Vcat) = polar(Vcatᵀ)ᵀ
    if Ucat.shape == VcatT.shape:  # square attention matrices: both polar factors from one batched SVD call
        Uo, VoT = polar_factor(torch.stack([Ucat, VcatT])).unbind(0)
    else:
        Uo, VoT = polar_factor(Ucat), polar_factor(VcatT)
    return Uo, S.to(run_on).reshape(m * k).float(), VoT.mT


def tsv_factors(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV-M over the given tasks' factors: U (m, out, k), S (m, k), V (m, k, in) → Uo (out, mk), Scat, Vo (mk, in).

    ``device``: where the two orthogonalisations run (default: where the factors are); the results come back
    to the factors' device.
    """
    Uo, Scat, Vo = _tsv_factors_on(U, S, V, U.device if device is None else torch.device(device))
    return Uo.to(U.device), Scat.to(U.device), Vo.contiguous().to(U.device)


def tsv_delta(factors: LowRankFactors, tasks: list[int] | None = None, device=None) -> torch.Tensor:
    """Dense TSV-M delta ``Uo diag(Scat) Vo`` over a subset of tasks (all by default); ``device``: where the
    orthogonalisation and the product run (the result comes back to the factors' device)."""
    idx = slice(None) if tasks is None else torch.as_tensor(tasks)
    home = factors.U.device
    Uo, Scat, Vo = _tsv_factors_on(factors.U[idx], factors.S[idx], factors.V[idx],
                                   home if device is None else torch.device(device))
    return ((Uo * Scat) @ Vo).to(home)


@torch.no_grad()
def tsv_merge(
    pretrained: Checkpoint, finetuned: Mapping[str, Checkpoint], rank: Rank = None, alpha: float = 1.0,
    progress: bool = False, solver: str = "auto", device=None,
) -> dict[str, torch.Tensor]:
    """TSV-Merge: ``W0 + α Uo diag(Scat) Vo`` per matrix; ``θ0 + mean_t Δt`` for the other params.
    ``solver`` and ``device`` as in :func:`mass.method.decompose.decompose` (the device also runs the orthogonalisation)."""
    dec = decompose(pretrained, finetuned, rank=rank, progress=progress, solver=solver, device=device)
    return tsv_merge_from_decomposition(dec, alpha, device=device)


@torch.no_grad()
def tsv_merge_from_decomposition(
    dec, alpha: float = 1.0, tasks: list[int] | None = None, device=None
) -> dict[str, torch.Tensor]:
    """TSV-M state dict from stored factors (optionally over a subset of tasks; ``device``: where the
    orthogonalisations run)."""
    sd = {}
    for key, value in dec.base.items():
        if key in dec.lowrank:
            sd[key] = (value.float() + alpha * tsv_delta(dec.lowrank[key], tasks, device)).to(value.dtype)
        elif key in dec.dense:
            stack = dec.dense[key] if tasks is None else dec.dense[key][torch.as_tensor(tasks)]
            sd[key] = stack.mean(0).to(value.dtype)
        else:
            sd[key] = value.clone()
    return sd


def _task_vectors(pretrained, finetuned):
    base = pretrained_state_dict(pretrained)
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
