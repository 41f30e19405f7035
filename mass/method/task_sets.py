"""Growing and shrinking a decomposition: add tasks without decomposing the others again, remove tasks.

Each task's factors are a truncated SVD sorted by singular value, so the factors of a smaller rank are a slice
of the stored ones. The rank policy (``TaskDecomposition.rank_rule``):

- ``"default"`` (the merge used the rule k = ⌊min(out, in) / T⌋): with T' tasks afterwards, every matrix gets
  k' = min(k_stored, ⌊min(out, in) / T'⌋). Adding tasks shrinks the rule's k: the stored factors are sliced and
  the new tasks decomposed at k'. Removing tasks grows the rule's k, but stored factors cannot grow (the
  directions past k were never kept): k stays. So a model grown task by task equals one merged at once, and
  a model shrunk keeps its rank (it equals a merge without the removed tasks at the stored ranks).
- ``"fixed"`` (the user gave ``rank``): every matrix keeps its stored k, new tasks are decomposed at it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .decompose import LowRankFactors, TaskDecomposition

RANK_RULES = ("default", "fixed")


def grown_ranks(dec: TaskDecomposition, n_tasks: int) -> dict:
    """Per matrix, the rank a decomposition of ``n_tasks`` tasks has under ``dec.rank_rule`` (see above)."""
    ranks = {}
    for key, f in dec.lowrank.items():
        k = f.rank
        if dec.rank_rule == "default":
            k = min(k, max(1, min(dec.base[key].shape) // n_tasks))
        ranks[key] = k
    return ranks


def sliced(dec: TaskDecomposition, ranks: Mapping[str, int]) -> TaskDecomposition:
    """``dec`` with every matrix's factors cut to ``ranks[key]`` (≤ its rank): the top singular triplets."""
    lowrank = {}
    for key, f in dec.lowrank.items():
        k = ranks[key]
        if k > f.rank:
            raise ValueError(f"cannot grow the factors of {key!r} from rank {f.rank} to {k}")
        lowrank[key] = f if k == f.rank else LowRankFactors(
            f.U[:, :, :k].contiguous(), f.S[:, :k].contiguous(), f.V[:, :k].contiguous())
    return TaskDecomposition(list(dec.tasks), dec.base, lowrank, dict(dec.dense), dec.bank_dtype, dec.rank_rule)


def joined(first: TaskDecomposition, second: TaskDecomposition) -> TaskDecomposition:
    """The tasks of ``first`` then those of ``second`` (same θ0, same ranks, same bank dtype)."""
    clash = sorted(set(first.tasks) & set(second.tasks))
    if clash:
        raise ValueError(f"task name(s) {clash} are already in the model")
    if first.bank_dtype != second.bank_dtype:
        raise ValueError(f"bank dtypes differ: {first.bank_dtype} vs {second.bank_dtype}")
    lowrank = {}
    for key, f in first.lowrank.items():
        g = second.lowrank[key]
        if g.rank != f.rank:
            raise ValueError(f"{key!r}: ranks differ ({f.rank} vs {g.rank})")
        lowrank[key] = LowRankFactors(torch.cat([f.U, g.U.to(f.U)]), torch.cat([f.S, g.S.to(f.S)]),
                                      torch.cat([f.V, g.V.to(f.V)]))
    dense = {key: torch.cat([v, second.dense[key].to(v)]) for key, v in first.dense.items()}
    return TaskDecomposition(first.tasks + second.tasks, first.base, lowrank, dense, first.bank_dtype,
                             first.rank_rule)


def without(dec: TaskDecomposition, names: Sequence[str]) -> TaskDecomposition:
    """``dec`` without the tasks ``names`` (each must be one of its tasks; at least one task must remain)."""
    names = list(names)
    unknown = [n for n in names if n not in dec.tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the model's tasks: {dec.tasks}")
    if len(set(names)) != len(names):
        raise ValueError(f"a task is named twice in {names}")
    keep = [i for i, t in enumerate(dec.tasks) if t not in names]
    if not keep:
        raise ValueError("cannot remove every task: a MASS model needs at least one")
    idx = torch.tensor(keep)
    lowrank = {key: LowRankFactors(f.U[idx], f.S[idx], f.V[idx]) for key, f in dec.lowrank.items()}
    dense = {key: v[idx] for key, v in dec.dense.items()}
    return TaskDecomposition([dec.tasks[i] for i in keep], dec.base, lowrank, dense, dec.bank_dtype, dec.rank_rule)
