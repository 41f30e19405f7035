"""Offline step of MASS: per task and per 2-D weight, keep the top-k singular components of the delta.

Non-2-D floating parameters (biases, LayerNorm, class token, the patch-embedding conv) are kept whole
per task. See MASS.md §1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import Checkpoint, CheckpointError, check_shapes, match_keys, open_checkpoint

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
        return (self.U[t] * self.S[t]) @ self.V[t]


@dataclass
class TaskDecomposition:
    """What MASS stores: the pretrained weights, per-task low-rank factors, per-task whole non-matrix params."""

    tasks: list[str]
    base: dict[str, torch.Tensor]
    lowrank: dict[str, LowRankFactors] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> (T, *shape) full task values

    def task_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        """Task t's weights as MASS reconstructs them (θ0 + Ut St Vt; non-matrix params whole)."""
        sd = {}
        for key, value in self.base.items():
            if key in self.lowrank:
                sd[key] = (value.float() + self.lowrank[key].delta(t)).to(value.dtype)
            elif key in self.dense:
                sd[key] = self.dense[key][t].to(value.dtype)
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
        """Stored elements relative to the pretrained model (the method's '~2x' claim, exact)."""
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
    """Top-k thin SVD in fp32."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k, :].contiguous()


def _state_dict_of(pretrained: Checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(pretrained, nn.Module):
        return {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    src = open_checkpoint("pretrained", pretrained)
    return {k: src.get(k).clone() for k in src.keys()}


def open_finetuned(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, Checkpoint]):
    """Open every fine-tuned checkpoint and check its keys and shapes against the pretrained ones."""
    if not isinstance(finetuned, Mapping) or not finetuned:
        raise CheckpointError("finetuned must be a non-empty dict: task name -> module, state dict or path")
    float_keys = [k for k, v in base.items() if v.is_floating_point()]
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    opened = []
    for name, ckpt in finetuned.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"task names must be non-empty strings, got {name!r}")
        src = open_checkpoint(name, ckpt)
        key_map = match_keys(src, list(base.keys()))
        check_shapes(src, key_map, shapes)
        opened.append((name, src, key_map))
    return float_keys, opened


@torch.no_grad()
def decompose(
    pretrained: Checkpoint,
    finetuned: Mapping[str, Checkpoint],
    rank: Rank = None,
    progress: bool = True,
) -> TaskDecomposition:
    """Per-task truncated SVD factors of every 2-D delta (one matrix at a time) and whole non-2-D params."""
    base = _state_dict_of(pretrained)
    for key, value in base.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"checkpoint 'pretrained': tensor {key!r} contains NaN or Inf")
    float_keys, opened = open_finetuned(base, finetuned)
    tasks = [name for name, _, _ in opened]
    n_tasks = len(tasks)
    out = TaskDecomposition(tasks=tasks, base=base)
    for key in tqdm(float_keys, desc="decompose", disable=not progress, leave=False):
        theta0 = base[key].float()
        if theta0.dim() == 2:
            k = resolve_rank(rank, tuple(theta0.shape), n_tasks, key)
            Us, Ss, Vs = [], [], []
            for _, src, key_map in opened:
                U, S, V = truncated_svd(src.get(key_map[key]).float() - theta0, k)
                Us.append(U), Ss.append(S), Vs.append(V)
            out.lowrank[key] = LowRankFactors(torch.stack(Us), torch.stack(Ss), torch.stack(Vs))
        else:
            out.dense[key] = torch.stack([src.get(key_map[key]).float() for _, src, key_map in opened])
    return out
