"""Offline step of MASS: per task and per 2-D weight, keep the top-k singular components of the delta.

Non-2-D floating parameters (biases, LayerNorm, class token, the patch-embedding conv) are kept whole
per task. See MASS.md §1. The top-k SVDs come from :mod:`mass.method.svd_solvers` (full or randomised, fp32);
a checkpoint that holds some deltas as thin factors (a LoRA adapter, :mod:`mass.files.lora`) has those
decomposed from the factors (:mod:`mass.method.factored_svd`), never formed densely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from mass.files.checkpoints import Checkpoint, CheckpointError, all_finite, open_checkpoint, open_finetuned
from mass.method.factored_svd import factored_topk
from mass.method.svd_solvers import DEFAULT_POWER_ITERS, check_solver_options, choose_solver, full_topk, topk_svd

Rank = Union[int, float, None]


@dataclass
class LowRankFactors:
    """Truncated SVD factors of one matrix's task deltas, stacked over tasks: Δt ≈ Ut diag(St) Vt."""

    U: torch.Tensor  # (T, out, k)
    S: torch.Tensor  # (T, k)
    V: torch.Tensor  # (T, k, in), orthonormal rows

    @property
    def rank(self) -> int:
        return self.S.shape[1]

    def delta(self, t: int) -> torch.Tensor:
        """Task t's delta in fp32 (half-precision factors are upcast first)."""
        return (self.U[t].float() * self.S[t].float()) @ self.V[t].float()


@dataclass
class TaskDecomposition:
    """What MASS stores: the pretrained weights, per-task low-rank factors, per-task whole non-matrix params.

    ``bank_dtype``: None, or the half precision the task values are stored in (:mod:`mass.method.half_banks`):
    then ``lowrank`` factors are in that dtype and ``dense`` holds per-task *deltas* from θ0 in it (else full
    task values). Read them through :meth:`dense_delta` / :meth:`dense_values`, which work for both.
    ``rank_rule``: how the ranks follow the task count when tasks are added or removed
    (:mod:`mass.method.task_sets`): ``"default"`` (k = ⌊min(out, in) / T⌋, capped by the stored rank) or
    ``"fixed"`` (the user chose the rank)."""

    tasks: list[str]
    base: dict[str, torch.Tensor]
    lowrank: dict[str, LowRankFactors] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> (T, *shape) full task values (or deltas)
    bank_dtype: Optional[torch.dtype] = None
    rank_rule: str = "default"

    def dense_delta(self, key: str) -> torch.Tensor:
        """(T, *shape) fp32 task deltas of a non-matrix parameter."""
        if self.bank_dtype is not None:
            return self.dense[key].float()
        return self.dense[key].float() - self.base[key].float()

    def dense_values(self, key: str) -> torch.Tensor:
        """(T, *shape) fp32 task values of a non-matrix parameter."""
        if self.bank_dtype is not None:
            return self.base[key].float() + self.dense[key].float()
        return self.dense[key].float()

    def task_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        """Task t's weights as MASS reconstructs them (θ0 + Ut St Vt; non-matrix params whole)."""
        sd = {}
        for key, value in self.base.items():
            if key in self.lowrank:
                sd[key] = (value.float() + self.lowrank[key].delta(t)).to(value.dtype)
            elif key in self.dense:
                sd[key] = self.dense_values(key)[t].to(value.dtype)
            else:
                sd[key] = value
        return sd

    def stored_numel(self) -> dict[str, int]:
        """Element counts: the pretrained model, and what the tasks add (factors + non-matrix params)."""
        base = sum(v.numel() for v in self.base.values())
        factors = sum(f.U.numel() + f.S.numel() + f.V.numel() for f in self.lowrank.values())
        dense = sum(v.numel() for v in self.dense.values())
        return {"pretrained": base, "task_factors": factors, "task_dense": dense}

    def storage_factor(self) -> float:
        """Stored elements relative to the pretrained model (the method's '~2x' claim, exact); with half-precision
        banks, stored bytes relative to the pretrained model's bytes."""
        if self.bank_dtype is not None:
            size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
            factors = [t for f in self.lowrank.values() for t in (f.U, f.S, f.V)]
            base = size(self.base.values())
            return (base + size(factors) + size(self.dense.values())) / base
        n = self.stored_numel()
        return (n["pretrained"] + n["task_factors"] + n["task_dense"]) / n["pretrained"]


def resolve_rank(rank: Rank, shape: tuple, n_tasks: int, key: str) -> int:
    """k for one matrix: floor(min(out, in) / T) by default, an int, or a fraction of min(out, in)."""
    full = min(shape)
    if rank is None:
        return max(1, full // n_tasks)
    if isinstance(rank, bool):
        raise ValueError("rank must be an int, a float in (0, 1], or None")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if rank > full:
            raise ValueError(
                f"rank {rank} is larger than matrix {key!r} {tuple(shape)} allows (at most {full}); "
                f"pass a fraction such as rank=0.25 to scale with each matrix"
            )
        return rank
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank must lie in (0, 1], got {rank}")
        return max(1, math.floor(rank * full + 1e-9))
    raise ValueError(f"rank must be an int, a float in (0, 1], or None; got {type(rank).__name__}")


def truncated_svd(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of the full thin SVD in fp32 (the exact reference; :func:`decompose` picks a solver)."""
    return full_topk(delta, k)


def pretrained_state_dict(pretrained: Checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(pretrained, nn.Module):
        return {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    src = open_checkpoint("pretrained", pretrained)
    return {k: src.get(k).clone() for k in src.keys()}


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be None, a torch.device or a device string, got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available")
    return device


@torch.no_grad()
def decompose(
    pretrained: Checkpoint,
    finetuned: Mapping[str, Checkpoint],
    rank: Rank = None,
    progress: bool = True,
    solver: str = "auto",
    device=None,
    oversample: Optional[int] = None,
    power_iters: int = DEFAULT_POWER_ITERS,
    ranks: Optional[Mapping[str, int]] = None,
) -> TaskDecomposition:
    """Per-task truncated SVD factors of every 2-D delta (one matrix, all tasks, at a time) and whole non-2-D
    params.

    ``solver``: ``"full"`` (exact thin SVD), ``"randomized"`` (range finder with ``oversample`` extra columns,
    default max(10, k/2), and ``power_iters`` power iterations), or ``"auto"`` (randomised only for large
    matrices with a narrow sketch: :func:`mass.method.svd_solvers.choose_solver`). ``device``: where the SVDs run
    (e.g. ``"cuda"``); the factors are returned on the CPU. Progress: one bar over the matrices, with an ETA.
    ``ranks``: ``{matrix key: k}`` for every matrix, overriding ``rank`` (adding tasks to a model uses its ranks).
    A checkpoint whose source carries ``lowrank`` factors (a LoRA adapter) has those matrices decomposed from the
    factors; the other tasks of the matrix still share one batched SVD.
    """
    check_solver_options(solver, oversample, power_iters)
    device = _resolve_device(device)
    base = pretrained_state_dict(pretrained)
    for key, value in base.items():
        if value.is_floating_point() and not all_finite(value):
            raise CheckpointError(f"checkpoint 'pretrained': tensor {key!r} contains NaN or Inf")
    float_keys, opened = open_finetuned(base, finetuned)
    tasks = [name for name, _, _ in opened]
    n_tasks = len(tasks)
    out = TaskDecomposition(tasks=tasks, base=base, rank_rule="default" if rank is None and ranks is None else "fixed")
    n_matrices = sum(base[key].dim() == 2 for key in float_keys)
    bar = tqdm(total=n_matrices, desc=f"decompose (T={n_tasks}, {solver} SVD)", unit="matrix",
               disable=not progress, leave=False)
    try:
        for key in float_keys:
            if base[key].dim() != 2:
                out.dense[key] = torch.stack([src.get(key_map[key]).float() for _, src, key_map in opened])
                continue
            theta0 = base[key].to(device=device, dtype=torch.float32)
            k = ranks[key] if ranks is not None else resolve_rank(rank, tuple(theta0.shape), n_tasks, key)
            factored = [t for t, (_, src, km) in enumerate(opened) if km[key] in getattr(src, "lowrank", {})]
            dense = [t for t in range(n_tasks) if t not in factored]
            U = torch.zeros((n_tasks, theta0.shape[0], k))
            S, V = torch.zeros((n_tasks, k)), torch.zeros((n_tasks, k, theta0.shape[1]))
            if dense:
                # Every task's delta of this one matrix (T × out × in): the memory held is about one layer's. Each
                # difference is written into its slot (no per-task temporaries copied again by a stack).
                deltas = torch.empty((len(dense), *theta0.shape), device=device, dtype=torch.float32)
                for i, t in enumerate(dense):
                    _, src, km = opened[t]
                    torch.sub(src.get(km[key]).to(device=device, dtype=torch.float32), theta0, out=deltas[i])
                found = [value.cpu() for value in topk_svd(deltas, k, solver, oversample, power_iters)]
                if not factored:
                    U, S, V = found
                else:
                    for part, value in zip((U, S, V), found):
                        part[dense] = value
                del deltas, found
            for t in factored:
                _, src, km = opened[t]
                f = src.lowrank[km[key]]
                for part, value in zip((U, S, V), factored_topk(f.B.to(device), f.A.to(device), f.scale, k)):
                    part[t] = value.cpu()
            out.lowrank[key] = LowRankFactors(U, S, V)
            bar.set_postfix_str(f"{key} {choose_solver(solver, tuple(theta0.shape), k, oversample)}", refresh=False)
            bar.update()
    finally:
        bar.close()
    return out
