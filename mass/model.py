"""The two-pass MASS model (MASS.md §3–4) and ``mass.merge``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

import mass_kernels
from mass_kernels.reference import group_rows

from .adapters import Architecture, block_of, cls_mlp_input, detect, install_layers
from .checkpoints import Checkpoint
from .decompose import LowRankFactors, Rank, TaskDecomposition, decompose
from .layers import MASSConv2d, MASSLayerNorm, MASSLinear, MASSMultiheadAttention, PassState
from .merging import tsv_delta, tsv_factors
from .router import RouterConfig, Routing, select_tasks

TaskIds = Union[torch.Tensor, Sequence[str], Sequence[Sequence[str]]]


class _StopForward(Exception):
    """Raised by a hook to end the first pass once the routing features are read."""


@dataclass
class Classification:
    """Per-sample logits of the chosen head (padded with -inf to the largest head), chosen task, prediction."""

    logits: torch.Tensor  # (B, C_max)
    task_ids: torch.Tensor  # (B,)
    predictions: torch.Tensor  # (B,)
    routing: Routing


def extract_embedding(output) -> torch.Tensor:
    """The image embedding in a model's output: ``image_embeds``, else ``pooler_output``, else the tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return extract_embedding(output[0])
    for name in ("image_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find an image embedding in a {type(output).__name__}")


def _take(obj, order: torch.Tensor, batch: int, axis: int = 0):
    """Reorder the samples of every tensor in ``obj`` (tensors, tuples, dicts, HF ModelOutputs)."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() > axis and obj.shape[axis] == batch:
            return obj.index_select(axis, order.to(obj.device))
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_take(v, order, batch, axis) for v in obj)
    if isinstance(obj, list):
        return [_take(v, order, batch, axis) for v in obj]
    if isinstance(obj, dict):
        items = {k: _take(v, order, batch, axis) for k, v in obj.items()}
        return type(obj)(**items) if type(obj) is not dict else items
    return obj


class MASSModel(nn.Module):
    """T fine-tuned encoders served as one: route on a first (merged) pass, apply the selected tasks' blocks
    in one batched second pass. Build with :func:`merge` or :meth:`from_pretrained`."""

    def __init__(
        self,
        model: nn.Module,
        decomposition: TaskDecomposition,
        router: Optional[RouterConfig] = None,
        heads: Optional[Mapping[str, torch.Tensor]] = None,
        reuse_prefix: bool = False,
        keep_merged: str = "prefix",
        max_cached_combos: int = 64,
    ):
        super().__init__()
        if keep_merged not in ("prefix", "all"):
            raise ValueError(f"keep_merged must be 'prefix' or 'all', got {keep_merged!r}")
        self.router_config = router if router is not None else RouterConfig()
        self.tasks = list(decomposition.tasks)
        self.reuse_prefix = bool(reuse_prefix)
        self.keep_merged = keep_merged
        self.max_cached_combos = max_cached_combos
        # With the CLS token, the routing block runs only what that token's MLP input needs (same feature).
        self.trim_routing_block = True
        self.model = model
        self.state = PassState()
        arch: Architecture = detect(model)
        self.arch = arch
        self.routing_layers = self.router_config.resolved_layers(arch.n_blocks)
        self.routing_layer = self.routing_layers[-1]  # the first pass stops here
        self._layers = install_layers(model, arch, self.state)
        self._combos: dict[tuple, list[int]] = {}
        self.ranks = {k: f.rank for k, f in decomposition.lowrank.items()}
        self._build(decomposition)
        self.heads = self._check_heads(heads)
        self._register_hooks()

    # ------------------------------------------------------------------ construction
    def _module_order(self) -> dict[str, int]:
        return {name: i for i, (name, _) in enumerate(self.model.named_modules())}

    def _keeps_merged(self, name: str, order: dict[str, int]) -> bool:
        if self.keep_merged == "all":
            return True
        if self.router_config.features == "pretrained" and not self.reuse_prefix:
            return False  # the first pass runs θ0: no merged weights are needed at all
        blk = block_of(self.arch, name)
        if blk is not None:
            return blk <= self.routing_layer
        return order[name] < order[self.arch.block_names[0]]  # embeddings and pre-norm run in pass 1

    def _targets(self):
        """(state-dict prefix, layer, weight attr, bias attr) for every task-conditioned layer."""
        for name, layer in self._layers.items():
            if isinstance(layer, MASSMultiheadAttention):
                yield name, layer.in_proj, name + ".in_proj_weight", name + ".in_proj_bias"
            else:
                yield name, layer, name + ".weight", name + ".bias"

    def _bank_layers(self) -> list:
        """Every layer holding a bank of task entries: the wrapped layers and open_clip's ``proj``."""
        layers = [layer for _, layer, _, _ in self._targets()]
        return layers + ([self.proj] if self.proj is not None else [])

    @torch.no_grad()
    def _build(self, dec: TaskDecomposition):
        base, T = dec.base, len(dec.tasks)
        covered = set()
        order = self._module_order()
        for name, layer, w_key, b_key in self._targets():
            keep = self._keeps_merged(name, order)
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
        cls_key, pos_key = self.arch.token_keys["cls"], self.arch.token_keys["pos"]
        self._pos_factors = dec.lowrank[pos_key]
        cls_delta = dec.dense[cls_key] - base[cls_key].float()
        pos_delta = torch.stack([self._pos_factors.delta(t) for t in range(T)])
        self.register_buffer("cls_delta", cls_delta, persistent=False)
        self.register_buffer("pos_delta", pos_delta, persistent=False)
        self.register_buffer("merged_cls_delta", cls_delta.mean(0), persistent=False)
        self.register_buffer("merged_pos_delta", tsv_delta(self._pos_factors), persistent=False)
        covered.update((cls_key, pos_key))
        self.proj = None
        if self.arch.proj_key is not None:
            key = self.arch.proj_key
            p0 = self.model.get_parameter(key)
            f = dec.lowrank[key]
            # x @ (P0 + U S V) is a linear layer with weight P0ᵀ and factors (Vᵀ, S, Uᵀ).
            self.proj = MASSLinear(p0.detach().t().contiguous(), None, self.state, 0)
            self.proj.set_factors(f.V.transpose(1, 2).to(p0), f.S.to(p0), f.U.transpose(1, 2).to(p0))
            if self.keep_merged == "all":
                self.proj.merged_weight = (p0.float() + tsv_delta(f)).t().contiguous().to(p0)
            covered.add(key)
        floats = {k for k, v in self.model.state_dict().items() if v.is_floating_point()}
        missing = sorted(floats - covered)
        if missing:
            raise NotImplementedError(f"MASS does not know how to condition these parameters on tasks: {missing[:8]}")
        self.register_buffer("routing_basis", self._routing_basis(dec), persistent=False)

    def _routing_basis(self, dec: TaskDecomposition) -> torch.Tensor:
        """(G, T, k, D): per routing block, each task's right-singular basis of the fc1 delta. With norm='sv'
        rows are scaled by sqrt(s_i / s_1), so ‖Vx‖² becomes Σ (s_i / s_1)(v_i·x)² (still ≤ ‖x‖²)."""
        bases = []
        for layer in self.routing_layers:
            f = dec.lowrank[self._fc1_key(layer)]
            V = f.V.float()
            if self.router_config.norm == "sv":
                rel = f.S.float() / f.S.float()[:, :1].clamp_min(1e-12)
                V = V * rel.sqrt().unsqueeze(-1)
            bases.append(V)
        return torch.stack(bases)

    def _fc1_key(self, layer: int) -> str:
        suffix = "mlp.fc1.weight" if self.arch.kind == "hf" else "mlp.c_fc.weight"
        return f"{self.arch.block_names[layer]}.{suffix}"

    def _check_heads(self, heads):
        if heads is None:
            return None
        unknown = sorted(set(heads) - set(self.tasks))
        missing = [t for t in self.tasks if t not in heads]
        if unknown or missing:
            raise ValueError(f"heads must have one entry per task; unknown {unknown}, missing {missing}")
        out = {}
        for t in self.tasks:
            h = torch.as_tensor(heads[t])
            if h.dim() != 2 or not h.is_floating_point() or not bool(torch.isfinite(h).all()):
                raise ValueError(f"head for task {t!r} must be a finite float (C, D) tensor, got {tuple(h.shape)}")
            out[t] = h
        dims = {h.shape[1] for h in out.values()}
        if len(dims) != 1:
            raise ValueError(f"all heads must share the embedding size, got {sorted(dims)}")
        for i, t in enumerate(self.tasks):
            self.register_buffer(f"_head_{i}", out[t].clone(), persistent=False)
        return {t: f"_head_{i}" for i, t in enumerate(self.tasks)}

    def head(self, task: str) -> torch.Tensor:
        return getattr(self, self.heads[task])

    # ------------------------------------------------------------------ hooks
    def _register_hooks(self):
        self.arch.pre_norm.register_forward_pre_hook(self._add_token_deltas)

    def _add_token_deltas(self, module, args):
        mode = self.state.mode
        if mode == "base":
            return None
        x = args[0]
        if mode == "merged":
            delta = self.merged_pos_delta.unsqueeze(0).clone()
            delta[:, 0] += self.merged_cls_delta
        else:
            delta = self.state.sample_delta(self.pos_delta)
            delta[:, 0] += self.state.sample_delta(self.cls_delta)
        if x.shape[1:] != delta.shape[1:]:
            raise RuntimeError(
                f"token layout {tuple(x.shape)} does not match the stored positional embedding "
                f"{tuple(self.pos_delta.shape[1:])} (interpolated positions and patch dropout are not supported)"
            )
        return (x + delta.to(x.dtype),) + tuple(args[1:])

    def _call(self, *inputs, **kwargs):
        """Run the wrapped model. open_clip's raw ``proj`` is taken out for the call (the forward then returns
        the pooled features) and applied here with the current pass's weights; it is put back even when the
        first pass stops early."""
        if self.proj is None:
            return self.model(*inputs, **kwargs)
        root = self.arch.root
        saved = root.proj
        root.proj = None
        try:
            output = self.model(*inputs, **kwargs)
        finally:
            root.proj = saved
        pooled = output[0] if isinstance(output, tuple) else output
        projected = pooled @ saved if self.state.mode == "base" else self.proj(pooled)
        return (projected,) + tuple(output[1:]) if isinstance(output, tuple) else projected

    # ------------------------------------------------------------------ routing
    def _token(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        seq_axis = 1 - self.arch.batch_axes[layer]
        if self.router_config.token == "cls":
            return x.select(seq_axis, 0)
        return x.mean(seq_axis)

    def _first_pass(self, *inputs, **kwargs) -> tuple[torch.Tensor, object]:
        """Run the first-pass model until the last routing block's MLP input (or, with prefix reuse, that
        block's output). Returns the routing features (G, B, D) and the block output (or None)."""
        L = self.routing_layer
        captured: dict = {}

        def reader(layer):
            def read_feature(module, args):
                captured[layer] = self._token(args[0], layer)
                if layer == L and not self.reuse_prefix:
                    raise _StopForward
            return read_feature

        def read_block(module, args, output):
            captured["block"] = output
            raise _StopForward

        def read_routing_block(module, args, kwargs):
            hidden = args[0] if args else next((kwargs[k] for k in ("hidden_states", "x", "q_x") if k in kwargs), None)
            # Masks, separate key/value inputs, anything beyond the hidden states: run the whole block instead.
            extra = list(args[1:]) + [kwargs.get(k) for k in ("attention_mask", "causal_attention_mask", "attn_mask",
                                                               "k_x", "v_x")]
            if hidden is None or any(e is not None for e in extra):
                return
            feature = cls_mlp_input(self.arch, L, hidden)
            if feature is not None:
                captured[L] = feature
                raise _StopForward

        handles = [self.arch.fc1[layer].register_forward_pre_hook(reader(layer)) for layer in self.routing_layers]
        if self.reuse_prefix:
            handles.append(self.arch.blocks[L].register_forward_hook(read_block))
        elif self.router_config.token == "cls" and self.trim_routing_block:
            handles.append(self.arch.blocks[L].register_forward_pre_hook(read_routing_block, with_kwargs=True))
        mode = "base" if self.router_config.features == "pretrained" else "merged"
        try:
            with self.state.use(mode):
                self._call(*inputs, **kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if any(layer not in captured for layer in self.routing_layers):
            raise RuntimeError("the first pass never reached the routing layer")
        return torch.stack([captured[layer] for layer in self.routing_layers]), captured.get("block")

    def _route_features(self, features: torch.Tensor) -> Routing:
        residuals = mass_kernels.routing_residuals(features, self.routing_basis.to(features.dtype))
        if residuals.shape[0] == 1:
            residuals = residuals[0]
        return select_tasks(residuals, self.router_config)

    @torch.no_grad()
    def route(self, *inputs, **kwargs) -> Routing:
        """Routing alone: the first pass and the router, no second pass."""
        feature, _ = self._first_pass(*inputs, **kwargs)
        return self._route_features(feature)

    # ------------------------------------------------------------------ second pass
    def task_index(self, names: Sequence[str]) -> list[int]:
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task name(s) {unknown}; known tasks: {self.tasks}")
        return [self.tasks.index(n) for n in names]

    def _forced_routing(self, task_ids: TaskIds, batch: int, device) -> Routing:
        if isinstance(task_ids, torch.Tensor):
            ids = task_ids
            if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
                raise ValueError(f"task_ids must be a LongTensor (B,) or (B, K), got {ids.dtype} {tuple(ids.shape)}")
            ids = ids.long().view(ids.shape[0], -1)
            T = len(self.tasks)
            bad = (ids < -1) | (ids >= T)
            if bool(bad.any()):
                raise ValueError(f"task_ids must lie in [-1, {T - 1}] (-1 = padding); got {ids[bad][:5].tolist()}")
        else:
            rows = [[r] if isinstance(r, str) else list(r) for r in task_ids]
            width = max((len(r) for r in rows), default=1)
            ids = torch.tensor([self.task_index(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.long)
        if ids.shape[0] != batch:
            raise ValueError(f"task_ids names {ids.shape[0]} samples but the batch has {batch}")
        ids = ids.to(device)
        valid = ids >= 0
        weights = valid.float() / valid.sum(1, keepdim=True).clamp_min(1)
        return Routing(task_ids=ids, weights=weights, residuals=None)

    def _entries(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank entries and weights for the second pass. Rows that select several tasks under TSV-M
        semantics (``topk``, or forced sets) use that set's cached TSV-M blocks (a host sync finds them)."""
        ids, weights = routing.task_ids, routing.weights
        n_selected = (ids >= 0).sum(1)
        if self.router_config.mode == "weighted" and routing.residuals is not None:
            return ids, weights
        if ids.shape[1] == 1 or not bool((n_selected > 1).any()):
            return ids, (ids >= 0).to(weights.dtype)
        rows = ids.tolist()
        combos = {tuple(sorted(t for t in r if t >= 0)) for r in rows}
        combos = {c for c in combos if len(c) > 1}
        if len(self._combos) + len(combos) > self.max_cached_combos:
            self._reset_combos()
        for combo in combos:
            self._add_combo(combo)
        entries = []
        for r in rows:
            sel = tuple(sorted(t for t in r if t >= 0))
            ent = self._combos[sel] if len(sel) > 1 else list(sel)
            entries.append(ent + [-1] * (ids.shape[1] - len(ent)))
        entries = torch.tensor(entries, dtype=torch.long, device=ids.device)
        return entries, (entries >= 0).to(weights.dtype)

    @torch.no_grad()
    def _add_combo(self, combo: tuple):
        if combo in self._combos:
            return
        idx = torch.tensor(combo, device=self.cls_delta.device)
        m = len(combo)
        start = None
        for layer in self._bank_layers():
            if isinstance(layer, MASSLinear):
                start = self._append_lowrank(layer, idx, m)
            else:
                layer.set_weight_deltas(torch.cat([layer.task_weight, layer.task_weight[idx] / m]))
            if layer.bias is not None:
                layer.task_bias = torch.cat([layer.task_bias, layer.task_bias[idx] / m])
        self.cls_delta = torch.cat([self.cls_delta, self.cls_delta[idx] / m])
        f = self._pos_factors
        Uo, So, Vo = tsv_factors(f.U[idx.cpu()], f.S[idx.cpu()], f.V[idx.cpu()])
        k = f.rank
        slots = [(Uo[:, j * k:(j + 1) * k] * So[j * k:(j + 1) * k]) @ Vo[j * k:(j + 1) * k] for j in range(m)]
        self.pos_delta = torch.cat([self.pos_delta, torch.stack(slots).to(self.pos_delta)])
        self._combos[combo] = list(range(start, start + m))

    @staticmethod
    def _append_lowrank(layer: MASSLinear, idx: torch.Tensor, m: int) -> int:
        start, k = layer.task_S.shape
        Uo, So, Vo = tsv_factors(layer.task_U[idx], layer.task_S[idx], layer.task_V[idx])
        like = layer.task_U
        U_new = Uo.reshape(Uo.shape[0], m, k).permute(1, 0, 2)
        layer.set_factors(torch.cat([layer.task_U, U_new.to(like)]), torch.cat([layer.task_S, So.view(m, k).to(like)]),
                          torch.cat([layer.task_V, Vo.view(m, k, -1).to(like)]))
        return start

    def _reset_combos(self):
        T = len(self.tasks)
        for layer in self._bank_layers():
            if isinstance(layer, MASSLinear):
                layer.set_factors(layer.task_U[:T], layer.task_S[:T], layer.task_V[:T])
            else:
                layer.set_weight_deltas(layer.task_weight[:T])
            if layer.bias is not None:
                layer.task_bias = layer.task_bias[:T]
        self.cls_delta, self.pos_delta = self.cls_delta[:T], self.pos_delta[:T]
        self._combos.clear()

    @contextlib.contextmanager
    def _replay_prefix(self, block_output):
        """Blocks ≤ L return the first pass's block-L output: the second pass starts at block L+1."""
        blocks = self.arch.blocks[: self.routing_layer + 1]
        for blk in blocks:
            blk.forward = lambda *a, **k: block_output
        try:
            yield
        finally:
            for blk in blocks:
                del blk.forward

    @torch.no_grad()
    def forward(self, *inputs, task_ids: Optional[TaskIds] = None, return_routing: bool = False, **kwargs):
        """Two passes: route (unless ``task_ids`` forces tasks), then one batched task-conditioned forward."""
        block_output = None
        if task_ids is None:
            feature, block_output = self._first_pass(*inputs, **kwargs)
            routing = self._route_features(feature)
        else:
            batch, device = self._batch_of(inputs, kwargs)
            routing = self._forced_routing(task_ids, batch, device)
        entries, weights = self._entries(routing)
        order, segments = None, None
        if not entries.is_cuda:
            # CPU fast path: each entry's samples become one slice (order None: already in entry order)
            order, segments = group_rows(entries)
        if order is not None:
            inputs, kwargs = _take(inputs, order, entries.shape[0]), _take(kwargs, order, entries.shape[0])
            entries, weights = entries[order], weights[order]
            if block_output is not None:
                block_output = _take(block_output, order, entries.shape[0], self.arch.batch_axes[self.routing_layer])
        replay = self._replay_prefix(block_output) if block_output is not None else contextlib.nullcontext()
        with self.state.use("tasks", entries, weights, segments), replay:
            out = self._call(*inputs, **kwargs)
        if order is not None:
            out = _take(out, torch.argsort(order), entries.shape[0])
        return (out, routing) if return_routing else out

    @staticmethod
    def _batch_of(inputs, kwargs):
        for value in list(inputs) + list(kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.shape[0], value.device
        raise ValueError("cannot infer the batch size: pass the images as a tensor")

    @torch.no_grad()
    def forward_merged(self, *inputs, **kwargs):
        """The TSV-M model alone (needs ``keep_merged='all'``)."""
        with self.state.use("merged"):
            return self._call(*inputs, **kwargs)

    @torch.no_grad()
    def forward_pretrained(self, *inputs, **kwargs):
        with self.state.use("base"):
            return self._call(*inputs, **kwargs)

    # ------------------------------------------------------------------ heads
    @torch.no_grad()
    def classify(self, *inputs, logit_scale: float = 100.0, task_ids: Optional[TaskIds] = None, **kwargs):
        """Logits of each sample's head; with several selected tasks, the head with the largest max-logit."""
        if self.heads is None:
            raise RuntimeError("this MASSModel has no heads: pass heads={task: (C, D) tensor} to merge()")
        out, routing = self(*inputs, task_ids=task_ids, return_routing=True, **kwargs)
        emb = F.normalize(extract_embedding(out).float(), dim=-1)
        B = emb.shape[0]
        c_max = max(self.head(t).shape[0] for t in self.tasks)
        best_logits = emb.new_full((B, c_max), float("-inf"))
        best_max = emb.new_full((B,), float("-inf"))
        chosen = torch.full((B,), -1, dtype=torch.long, device=emb.device)
        for slot in range(routing.task_ids.shape[1]):
            ids = routing.task_ids[:, slot]
            for t, name in enumerate(self.tasks):
                rows = (ids == t).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                head = F.normalize(self.head(name).float(), dim=-1)
                logits = logit_scale * emb.index_select(0, rows) @ head.T
                better = logits.max(1).values > best_max.index_select(0, rows)
                upd = rows[better]
                padded = F.pad(logits[better], (0, c_max - logits.shape[1]), value=float("-inf"))
                best_logits[upd] = padded
                best_max[upd] = logits[better].max(1).values
                chosen[upd] = t
        return Classification(best_logits, chosen, best_logits.argmax(1), routing)

    # ------------------------------------------------------------------ storage
    def decomposition(self) -> TaskDecomposition:
        """What MASS stores (θ0, the tasks' factors, their whole non-matrix params), read back from the layers."""
        T = len(self.tasks)
        base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        dec = TaskDecomposition(tasks=list(self.tasks), base=base)
        for _, layer, w_key, b_key in self._targets():
            if isinstance(layer, MASSLinear):
                factors = (layer.task_U, layer.task_S, layer.task_V)
                dec.lowrank[w_key] = LowRankFactors(*(f[:T].clone(memory_format=torch.contiguous_format) for f in factors))
            else:
                dec.dense[w_key] = base[w_key].unsqueeze(0) + layer.task_weight[:T]
            if layer.bias is not None:
                dec.dense[b_key] = base[b_key].unsqueeze(0) + layer.task_bias[:T]
        cls_key, pos_key = self.arch.token_keys["cls"], self.arch.token_keys["pos"]
        dec.dense[cls_key] = base[cls_key].unsqueeze(0) + self.cls_delta[:T]
        dec.lowrank[pos_key] = self._pos_factors
        if self.proj is not None:
            p = self.proj
            dec.lowrank[self.arch.proj_key] = LowRankFactors(
                p.task_V[:T].transpose(1, 2).contiguous(), p.task_S[:T].clone(), p.task_U[:T].transpose(1, 2).contiguous()
            )
        return dec

    def storage_factor(self) -> float:
        return self.decomposition().storage_factor()

    def save_pretrained(self, directory) -> None:
        from .serialization import save_mass

        save_mass(self, directory)

    @classmethod
    def from_pretrained(cls, directory, base_model: nn.Module, **overrides) -> "MASSModel":
        from .serialization import load_mass

        return load_mass(directory, base_model, **overrides)


def merge(
    pretrained: nn.Module,
    finetuned: Mapping[str, Checkpoint],
    rank: Rank = None,
    router: Optional[RouterConfig] = None,
    heads: Optional[Mapping[str, torch.Tensor]] = None,
    reuse_prefix: bool = False,
    keep_merged: str = "prefix",
    progress: bool = True,
) -> MASSModel:
    """Decompose T fine-tuned checkpoints of ``pretrained`` and wrap it (in place) as a :class:`MASSModel`."""
    if not isinstance(pretrained, nn.Module):
        raise TypeError("pretrained must be the pretrained nn.Module (its structure is wrapped in place)")
    detect(pretrained)  # fail early on an unsupported model, before the SVDs
    dec = decompose(pretrained, finetuned, rank=rank, progress=progress)
    return MASSModel(pretrained, dec, router=router, heads=heads, reuse_prefix=reuse_prefix, keep_merged=keep_merged)
