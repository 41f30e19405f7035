"""Where task sets are cached: multi-task TSV-M sets as extra bank entries (MASS.md §4).

A sample that selects several tasks (``topk``, or a forced set) runs TSV-M over that set, which is itself
low-rank. :class:`ComboCache` appends each set's TSV-M factors as extra entries past the T tasks, in a new
*generation* of extended banks built copy-on-write under a lock; a call keeps the generation it resolved for its
whole forward, so entries never change under it. At most ``max_cached_combos`` sets are kept.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch

import mass_kernels

from mass.method.merging import tsv_factors
from mass.nn.layers import MASSLinear, bank_layout


@dataclass
class Generation:
    """Banks extended with cached sets: ``entries[set]`` lists the set's slots (entry indices past the tasks),
    ``banks[id(layer)]`` the extended tensors of each bank layer. Never modified once published."""

    sources: tuple  # the base banks it was built from (identity): a moved model builds a new generation
    entries: dict = field(default_factory=dict)
    banks: dict = field(default_factory=dict)

    def of(self, holder):
        return self.banks[id(holder)]


def _bank_sources(banks) -> tuple:
    return tuple(layer.task_S if isinstance(layer, MASSLinear) else layer.task_weight for layer in banks.layers) + (
        banks.cls_delta,)


class ComboCache:
    """Multi-task sets (TSV-M over each set, MASS.md §4) as extra bank entries. Lookups are lock-free reads of
    the published generation; a miss builds a new generation under the lock, copy-on-write (the previous one
    stays valid for the calls using it). At most ``max_cached_combos`` sets: past that, the new generation
    starts again from the tasks alone with the sets the call needs."""

    def __init__(self, banks, max_cached_combos: int):
        """``banks``: the :class:`mass.nn.banks.TaskBanks` whose layers the sets extend."""
        self._banks = banks
        self.max_cached_combos = max_cached_combos
        self._lock = threading.Lock()
        self._generation: Optional[Generation] = None

    def __deepcopy__(self, memo):  # a copied model starts with an empty cache (a lock cannot be copied)
        return ComboCache(copy.deepcopy(self._banks, memo), self.max_cached_combos)

    def clear(self) -> None:
        with self._lock:
            self._generation = None

    def __len__(self) -> int:
        gen = self._generation
        return 0 if gen is None else len(gen.entries)

    def tensors(self) -> list:
        """The tensors of the published generation: each bank extended with the cached sets (a new tensor that
        holds the tasks' entries too, so caching a first set copies the banks)."""
        gen = self._generation
        if gen is None:
            return []
        return [t for held in gen.banks.values() for t in vars(held).values() if isinstance(t, torch.Tensor)]

    def resolve(self, combos: set) -> Generation:
        """A generation holding every set in ``combos`` (tuples of sorted task ids, each of length ≥ 2)."""
        gen = self._generation
        sources = _bank_sources(self._banks)
        if self._serves(gen, combos, sources):
            return gen
        with self._lock, torch.inference_mode(False), torch.no_grad():
            gen = self._generation
            if self._serves(gen, combos, sources):
                return gen
            full = gen is not None and len(gen.entries) + len(combos) > self.max_cached_combos
            if gen is None or full or not _same(gen.sources, sources):
                gen = Generation(sources)  # start again from the tasks
            new = sorted(c for c in combos if c not in gen.entries)
            gen = self._extend(gen, new, sources)
            self._generation = gen
            return gen

    @staticmethod
    def _serves(gen: Optional[Generation], combos: set, sources: tuple) -> bool:
        return gen is not None and _same(gen.sources, sources) and all(c in gen.entries for c in combos)

    def _extend(self, gen: Generation, combos: list, sources: tuple) -> Generation:
        """A new generation: ``gen``'s banks (or the tasks' banks) with ``combos`` appended."""
        banks = self._banks
        out = Generation(sources, dict(gen.entries), {})
        first = gen.of(banks).cls_delta.shape[0] if gen.banks else banks.n_tasks
        for i, combo in enumerate(combos):
            out.entries[combo] = list(range(first + sum(len(c) for c in combos[:i]),
                                            first + sum(len(c) for c in combos[: i + 1])))
        for layer in banks.layers:
            old = gen.of(layer) if gen.banks else layer
            new = SimpleNamespace(**{name: getattr(old, name, None) for name in _BANK_FIELDS})
            for combo in combos:
                idx = torch.tensor(combo, device=layer.weight.device)
                m = len(combo)
                if isinstance(layer, MASSLinear):
                    new.task_U, new.task_S, new.task_V = _append_lowrank(layer, new, idx, m)
                else:
                    new.task_weight = torch.cat([new.task_weight, layer.task_weight[idx] / m])
                if layer.bias is not None:
                    new.task_bias = torch.cat([new.task_bias, layer.task_bias[idx] / m])
            if isinstance(layer, MASSLinear):
                new.task_U, new.task_V = bank_layout(new.task_U), bank_layout(new.task_V)
            out.banks[id(layer)] = new
        old = gen.of(banks) if gen.banks else banks
        tokens = SimpleNamespace(cls_delta=old.cls_delta, pos_delta=old.pos_delta)
        f = banks.pos_factors
        for combo in combos:
            idx = torch.tensor(combo)
            m, k = len(combo), f.rank
            tokens.cls_delta = torch.cat([tokens.cls_delta, banks.cls_delta[idx.to(banks.cls_delta.device)] / m])
            Uo, So, Vo = tsv_factors(f.U[idx], f.S[idx], f.V[idx])
            slots = [(Uo[:, j * k:(j + 1) * k] * So[j * k:(j + 1) * k]) @ Vo[j * k:(j + 1) * k] for j in range(m)]
            tokens.pos_delta = torch.cat([tokens.pos_delta, torch.stack(slots).to(tokens.pos_delta)])
        out.banks[id(banks)] = tokens
        return out


_BANK_FIELDS = ("task_U", "task_S", "task_V", "task_weight", "task_bias")


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _append_lowrank(layer: MASSLinear, bank, idx: torch.Tensor, m: int) -> tuple:
    """``bank``'s factors with the TSV-M factors of the tasks ``idx`` appended as ``m`` slots of rank k (zero-padded
    to the bank's width when the bank is padded)."""
    k = layer.rank
    U, S, V = layer.true_factors()
    Uo, So, Vo = tsv_factors(U[idx], S[idx], V[idx])
    like = layer.task_U
    U_new = Uo.reshape(Uo.shape[0], m, k).permute(1, 0, 2).to(like)
    U_new, S_new, V_new = mass_kernels.pad_rank(U_new, So.view(m, k).to(like), Vo.view(m, k, -1).to(like),
                                                multiple=bank.task_S.shape[1])
    return torch.cat([bank.task_U, U_new]), torch.cat([bank.task_S, S_new]), torch.cat([bank.task_V, V_new])

