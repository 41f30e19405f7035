"""The second pass's banks: the per-task blocks every task-conditioned layer holds (MASS.md §4).

:func:`build_banks` fills the (not yet installed) MASS layers from a decomposition: each layer's bank of
task entries, and the TSV-M weights where the first pass runs. :class:`TaskBanks` holds what is not a layer
(class-token and positional deltas, open_clip's ``proj``) and the multi-task set cache
(:class:`mass.nn.set_cache.ComboCache`). :func:`read_decomposition` reads a decomposition back for saving.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from mass.nn.adapters import Architecture, block_of
from mass.method.decompose import LowRankFactors, TaskDecomposition
from mass.method.merging import tsv_delta
from mass.nn.layers import MASSLinear, MASSMultiheadAttention
from mass.nn.set_cache import ComboCache


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
        bank = dict(device=like.device, dtype=dec.bank_dtype or like.dtype)  # half-precision banks keep theirs
        covered.add(w_key)
        if isinstance(layer, MASSLinear):
            f = dec.lowrank[w_key]
            layer.set_factors(*(t.to(**bank) for t in (f.U, f.S, f.V)))
            if keep:
                layer.merged_weight = (base[w_key].float() + tsv_delta(f)).to(like)
        else:
            deltas = dec.dense_delta(w_key)
            layer.set_weight_deltas(deltas.to(**bank))
            if keep:
                layer.merged_weight = (base[w_key].float() + deltas.mean(0)).to(like)
        if layer.bias is not None:
            covered.add(b_key)
            deltas = dec.dense_delta(b_key)
            layer.task_bias = deltas.to(**bank)
            if keep:
                layer.merged_bias = (base[b_key].float() + deltas.mean(0)).to(like)
    # Raw parameters: class token and positional embedding (added before the pre-norm), open_clip's proj.
    cls_key, pos_key = arch.token_keys["cls"], arch.token_keys["pos"]
    pos_factors = dec.lowrank[pos_key]
    cls_delta = dec.dense_delta(cls_key)
    pos_delta = torch.stack([pos_factors.delta(t) for t in range(T)])
    covered.update((cls_key, pos_key))
    proj = None
    if arch.proj_key is not None:
        key = arch.proj_key
        p0 = model.get_parameter(key)
        f = dec.lowrank[key]
        # x @ (P0 + U S V) is a linear layer with weight P0ᵀ and factors (Vᵀ, S, Uᵀ).
        proj = MASSLinear(p0.detach().t().contiguous(), None, state, 0)
        bank = dict(device=p0.device, dtype=dec.bank_dtype or p0.dtype)
        proj.set_factors(f.V.transpose(1, 2).to(**bank), f.S.to(**bank), f.U.transpose(1, 2).to(**bank))
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
                       tasks: list, bank_dtype=None, rank_rule: str = "default") -> TaskDecomposition:
    """The stored artifact read back from a wrapped model: θ0 (its state dict), the tasks' factors and whole
    non-matrix values from the banks (the T task entries; cached sets are not part of it). With half-precision
    banks (``bank_dtype``) the non-matrix values are read back as the deltas the banks hold."""
    T = len(tasks)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dec = TaskDecomposition(tasks=list(tasks), base=base, bank_dtype=bank_dtype, rank_rule=rank_rule)

    def whole(key, deltas):
        if bank_dtype is not None:
            return deltas[:T].to(bank_dtype).clone(memory_format=torch.contiguous_format)
        return base[key].unsqueeze(0) + deltas[:T]

    for _, layer, w_key, b_key in targets(layers):
        if isinstance(layer, MASSLinear):
            factors = layer.true_factors(T)
            dec.lowrank[w_key] = LowRankFactors(*(f.clone(memory_format=torch.contiguous_format) for f in factors))
        else:
            dec.dense[w_key] = whole(w_key, layer.task_weight)
        if layer.bias is not None:
            dec.dense[b_key] = whole(b_key, layer.task_bias)
    cls_key, pos_key = arch.token_keys["cls"], arch.token_keys["pos"]
    dec.dense[cls_key] = whole(cls_key, banks.cls_delta)
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
