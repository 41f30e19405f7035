"""The second pass's banks (per-task blocks) and the cache of multi-task TSV-M sets (MASS.md §4).

:func:`build_banks` fills the (not yet installed) MASS layers from a decomposition: each layer's bank of
task entries, and the TSV-M weights where the first pass runs. :class:`TaskBanks` holds what is not a layer
(class-token and positional deltas, open_clip's ``proj``). :class:`ComboCache` adds multi-task sets: each set's
TSV-M factors become extra entries past the T tasks, in a new *generation* of extended banks built copy-on-write
under a lock; a call keeps the generation it resolved for its whole forward, so entries never change under it.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterator, Optional

import torch
from torch import nn

import mass_kernels

from .adapters import Architecture, block_of
from .decompose import LowRankFactors, TaskDecomposition
from .layers import MASSLinear, MASSMultiheadAttention, bank_layout
from .merging import tsv_delta, tsv_factors


def targets(layers: dict) -> Iterator[tuple]:
    """(module path, layer, weight key, bias key) for every task-conditioned layer, in ``layers`` order."""
    for name, layer in layers.items():
        if isinstance(layer, MASSMultiheadAttention):
            yield name, layer.in_proj, name + ".in_proj_weight", name + ".in_proj_bias"
        else:
            yield name, layer, name + ".weight", name + ".bias"


def merged_needed(arch: Architecture, order: dict, names, routing_layer: int, keep_merged: str,
                  first_pass_merged: bool, reuse_prefix: bool = True) -> set:
    """Which layers need TSV-M weights: all (``keep_merged='all'``), none when the first pass runs θ0, else
    the embeddings, the pre-norm and the blocks up to the (last) routing block. ``names``: the layers' module
    paths; ``order``: module path -> position in the wrapped model's ``named_modules()``.

    ``reuse_prefix=False``: the first pass ends at the routing block's MLP input (the trimmed CLS block returns
    it, or the block's fc1 reads its input and stops the pass before computing anything), so the MLP layers of
    that block (fc1, fc2) need none. The default (True) keeps them, as the whole routing block runs when its
    output is replayed by the second pass."""
    if keep_merged == "all":
        return set(names)
    if not first_pass_merged:
        return set()
    first_block = arch.block_names[0]
    needed = set()
    for name in names:
        blk = block_of(arch, name)
        if (blk is not None and blk <= routing_layer) or (blk is None and order[name] < order[first_block]):
            needed.add(name)
    if not reuse_prefix:
        needed -= set(routing_mlp_layers(arch, names, routing_layer))
    return needed


def routing_mlp_layers(arch: Architecture, names, layer: int) -> list:
    """Module paths of block ``layer``'s MLP layers among ``names``: ``<block>.mlp.*`` (HF ``fc1``/``fc2``,
    open_clip ``c_fc``/``c_proj``), the MLP whose first layer is ``arch.fc1[layer]``."""
    prefix = arch.block_names[layer] + ".mlp."
    return [name for name in names if name.startswith(prefix)]


class TaskBanks(nn.Module):
    """Banks that are not a layer: class-token and positional deltas (and their TSV-M values), open_clip's
    ``proj`` as a :class:`MASSLinear`. ``layers`` lists every layer holding a bank (not registered here: they
    live in the wrapped model); ``combos`` caches multi-task sets."""

    def __init__(self, n_tasks: int, layers: list, proj: Optional[MASSLinear], pos_factors: LowRankFactors,
                 cls_delta: torch.Tensor, pos_delta: torch.Tensor, max_cached_combos: int):
        super().__init__()
        self.n_tasks = n_tasks
        object.__setattr__(self, "layers", layers + ([proj] if proj is not None else []))
        self.proj = proj
        self.pos_factors = pos_factors  # fp32 factors of the positional embedding (multi-task sets are built from them)
        self.register_buffer("cls_delta", cls_delta, persistent=False)
        self.register_buffer("pos_delta", pos_delta, persistent=False)
        self.register_buffer("merged_cls_delta", cls_delta.mean(0), persistent=False)
        self.register_buffer("merged_pos_delta", tsv_delta(pos_factors).to(pos_delta), persistent=False)
        self.combos = ComboCache(self, max_cached_combos)
        self.head_names: Optional[dict] = None

    def set_heads(self, heads: Optional[dict]) -> None:
        """One buffer per task's head (checked before); ``head_names`` maps each task to its buffer."""
        if heads is None:
            return
        names = {}
        for i, (task, head) in enumerate(heads.items()):
            self.register_buffer(f"_head_{i}", head, persistent=False)
            names[task] = f"_head_{i}"
        self.head_names = names

    def _apply(self, fn, recurse=True):  # moved or cast: cached sets are rebuilt from the moved banks
        super()._apply(fn, recurse)
        self.combos.clear()
        return self


@torch.no_grad()
def build_banks(arch: Architecture, layers: dict, dec: TaskDecomposition, model: nn.Module, state,
                needs_merged: set, keep_merged: str, max_cached_combos: int) -> TaskBanks:
    """Fill the planned layers' banks (and TSV-M weights for ``needs_merged``) from ``dec``; nothing is
    installed and ``model`` is only read. Raises if a floating parameter of ``model`` has no task values."""
    base, T = dec.base, len(dec.tasks)
    covered = set()
    for name, layer, w_key, b_key in targets(layers):
        keep = name in needs_merged
        like = layer.weight
        covered.add(w_key)
        if isinstance(layer, MASSLinear):
            f = dec.lowrank[w_key]
            layer.set_factors(*(t.to(like) for t in (f.U, f.S, f.V)))
            if keep:
                layer.merged_weight = (base[w_key].float() + tsv_delta(f)).to(like)
        else:
            deltas = dec.dense[w_key] - base[w_key].float()
            layer.set_weight_deltas(deltas.to(like))
            if keep:
                layer.merged_weight = (base[w_key].float() + deltas.mean(0)).to(like)
        if layer.bias is not None:
            covered.add(b_key)
            deltas = dec.dense[b_key] - base[b_key].float()
            layer.task_bias = deltas.to(like)
            if keep:
                layer.merged_bias = (base[b_key].float() + deltas.mean(0)).to(like)
    # Raw parameters: class token and positional embedding (added before the pre-norm), open_clip's proj.
    cls_key, pos_key = arch.token_keys["cls"], arch.token_keys["pos"]
    pos_factors = dec.lowrank[pos_key]
    cls_delta = dec.dense[cls_key] - base[cls_key].float()
    pos_delta = torch.stack([pos_factors.delta(t) for t in range(T)])
    covered.update((cls_key, pos_key))
    proj = None
    if arch.proj_key is not None:
        key = arch.proj_key
        p0 = model.get_parameter(key)
        f = dec.lowrank[key]
        # x @ (P0 + U S V) is a linear layer with weight P0ᵀ and factors (Vᵀ, S, Uᵀ).
        proj = MASSLinear(p0.detach().t().contiguous(), None, state, 0)
        proj.set_factors(f.V.transpose(1, 2).to(p0), f.S.to(p0), f.U.transpose(1, 2).to(p0))
        if keep_merged == "all":
            proj.merged_weight = (p0.float() + tsv_delta(f)).t().contiguous().to(p0)
        covered.add(key)
    floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    missing = sorted(floats - covered)
    if missing:
        raise NotImplementedError(f"MASS does not know how to condition these parameters on tasks: {missing[:8]}")
    bank_layers = [layer for _, layer, _, _ in targets(layers)]
    return TaskBanks(T, bank_layers, proj, pos_factors, cls_delta, pos_delta, max_cached_combos)


def read_decomposition(model: nn.Module, arch: Architecture, layers: dict, banks: TaskBanks,
                       tasks: list) -> TaskDecomposition:
    """The stored artifact read back from a wrapped model: θ0 (its state dict), the tasks' factors and whole
    non-matrix values from the banks (the T task entries; cached sets are not part of it)."""
    T = len(tasks)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dec = TaskDecomposition(tasks=list(tasks), base=base)
    for _, layer, w_key, b_key in targets(layers):
        if isinstance(layer, MASSLinear):
            factors = layer.true_factors(T)
            dec.lowrank[w_key] = LowRankFactors(*(f.clone(memory_format=torch.contiguous_format) for f in factors))
        else:
            dec.dense[w_key] = base[w_key].unsqueeze(0) + layer.task_weight[:T]
        if layer.bias is not None:
            dec.dense[b_key] = base[b_key].unsqueeze(0) + layer.task_bias[:T]
    cls_key, pos_key = arch.token_keys["cls"], arch.token_keys["pos"]
    dec.dense[cls_key] = base[cls_key].unsqueeze(0) + banks.cls_delta[:T]
    dec.lowrank[pos_key] = banks.pos_factors
    if banks.proj is not None:
        U, S, V = banks.proj.true_factors(T)  # x @ (P0 + U S V) is held as a linear layer with factors (Vᵀ, S, Uᵀ)
        dec.lowrank[arch.proj_key] = LowRankFactors(V.transpose(1, 2).contiguous(), S.clone(),
                                                    U.transpose(1, 2).contiguous())
    return dec


def layer_factors(layer: MASSLinear, n_tasks: int) -> LowRankFactors:
    """The T tasks' factors held by a layer (fp32 copies)."""
    return LowRankFactors(*(t.float() for t in layer.true_factors(n_tasks)))


@torch.no_grad()
def add_merged_weights(layers: dict, names: set, n_tasks: int) -> None:
    """TSV-M weights for the layers in ``names`` that hold none, rebuilt from their banks (a router moved to a
    deeper block than the merged weights kept). Each layer's weights are computed before they are set (one
    assignment each), so a concurrent forward sees either none or the whole value."""
    with torch.inference_mode(False), torch.no_grad():  # (leaving inference mode re-enables grad: no_grad after)
        for name, layer, _, _ in targets(layers):
            if name not in names or layer.merged_weight is not None:
                continue
            like = layer.weight
            if layer.bias is not None:
                layer.merged_bias = (layer.bias.float() + layer.task_bias[:n_tasks].float().mean(0)).to(like)
            if isinstance(layer, MASSLinear):
                merged = like.float() + tsv_delta(layer_factors(layer, n_tasks))
            else:
                merged = like.float() + layer.task_weight[:n_tasks].float().mean(0)
            layer.merged_weight = merged.to(like)


# ---------------------------------------------------------------------------------------------- multi-task sets
@dataclass
class Generation:
    """Banks extended with cached sets: ``entries[set]`` lists the set's slots (entry indices past the tasks),
    ``banks[id(layer)]`` the extended tensors of each bank layer. Never modified once published."""

    sources: tuple  # the base banks it was built from (identity): a moved model builds a new generation
    entries: dict = field(default_factory=dict)
    banks: dict = field(default_factory=dict)

    def of(self, holder):
        return self.banks[id(holder)]


def _bank_sources(banks: TaskBanks) -> tuple:
    return tuple(layer.task_S if isinstance(layer, MASSLinear) else layer.task_weight for layer in banks.layers) + (
        banks.cls_delta,)


class ComboCache:
    """Multi-task sets (TSV-M over each set, MASS.md §4) as extra bank entries. Lookups are lock-free reads of
    the published generation; a miss builds a new generation under the lock, copy-on-write (the previous one
    stays valid for the calls using it). At most ``max_cached_combos`` sets: past that, the new generation
    starts again from the tasks alone with the sets the call needs."""

    def __init__(self, banks: TaskBanks, max_cached_combos: int):
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

