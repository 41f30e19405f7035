"""The two-pass MASS model (MASS.md §3–4) and ``mass.merge``.

Where things are: the banks and the multi-task set cache in :mod:`mass.banks`, the per-call pass state and
the hooks that read it in :mod:`mass.passes`, input checks in :mod:`mass.pass_inputs`; this module wraps the model
(transactionally) and orchestrates the two passes.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from mass_kernels.reference import group_rows

from .adapters import Architecture, cls_mlp_input, detect, install_layers, plan_layers
from .banks import (
    TaskBanks, add_merged_weights, build_banks, layer_factors, merged_needed, read_decomposition,
)
from .checkpoints import Checkpoint
from .decompose import LowRankFactors, Rank, TaskDecomposition, decompose, resolve_rank
from .pass_inputs import (
    check_decomposition, check_flags, check_heads, check_router, check_task_names, empty_like_output, find_images,
    forced_task_ids,
)
from .layers import MASSLinear
from .passes import (
    BlockGate, FirstPassCapture, PassState, ProjSwitch, StopForward, TokenDeltas, proj_class,
)
from .router import RouterConfig, Routing, describe_tensor, norm_weights, select_tasks
from .support import SupportFit, UnknownTaskError, check_support, unknown_scores
from .support import fit as fit_support
from .support import residuals as routing_residuals

TaskIds = Union[torch.Tensor, str, int, Sequence[str], Sequence[int], Sequence[Sequence[Union[str, int]]]]

_VIEWS_LOCK = threading.Lock()  # with_router: adding merged weights to shared layers


@dataclass(repr=False)
class Classification:
    """Per-sample logits of the chosen head (padded with -inf to the largest head), chosen task, prediction."""

    logits: torch.Tensor  # (B, C_max)
    task_ids: torch.Tensor  # (B,)
    predictions: torch.Tensor  # (B,)
    routing: Routing

    def __repr__(self) -> str:
        return (f"Classification(logits={describe_tensor(self.logits)}, task_ids={describe_tensor(self.task_ids)}, "
                f"predictions={describe_tensor(self.predictions)}, routing={self.routing!r})")


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


def routing_basis(factors: list[LowRankFactors], norm: str) -> torch.Tensor:
    """(G, T, k, D): per routing block, each task's right-singular basis of the fc1 delta, rows scaled by
    √w for ``norm`` (:func:`mass.router.norm_weights`: ‖Vx‖² becomes Σ w_i (v_i·x)², still ≤ ‖x‖²)."""
    bases = []
    for f in factors:
        V = f.V.float()
        w = norm_weights(f.S, norm)
        if w is not None:
            V = V * w.sqrt().unsqueeze(-1)
        bases.append(V)
    return torch.stack(bases)


class MASSModel(nn.Module):
    """T fine-tuned encoders served as one: route on a first (merged) pass, apply the selected tasks' blocks
    in one batched second pass. Build with :func:`merge` or :meth:`from_pretrained`.

    Wrapping is transactional: everything (banks, merged weights, heads, routing basis) is built before the
    module is touched; a failed construction leaves it exactly as it was, and a module that is already wrapped
    is refused. Calls are thread-safe: any number of threads may run ``forward``/``route``/``classify`` on one
    model (and on the models :meth:`with_router` derives from it) at once, each getting exactly the result it
    would get alone.
    """

    def __init__(
        self,
        model: nn.Module,
        decomposition: TaskDecomposition,
        router: Optional[RouterConfig] = None,
        heads: Optional[Mapping[str, torch.Tensor]] = None,
        reuse_prefix: bool = False,
        keep_merged: str = "prefix",
        max_cached_combos: int = 64,
        support: Optional[SupportFit] = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the pretrained nn.Module to wrap, got {type(model).__name__}")
        if not isinstance(decomposition, TaskDecomposition):
            raise TypeError(f"decomposition must be a TaskDecomposition, got {type(decomposition).__name__}")
        router = check_router(router)
        check_flags(reuse_prefix, keep_merged, max_cached_combos)
        arch = detect(model)  # refuses an unsupported or already wrapped module
        routing_layers = router.resolved_layers(arch.n_blocks)
        tasks = check_task_names(decomposition.tasks)
        check_decomposition(decomposition, model)
        heads = check_heads(heads, tasks, arch.output_dim)
        support = _usable_fit(router, routing_layers, support)
        _check_fit(router, routing_layers, support, len(tasks), keep_merged)
        # Build everything on layers that are not installed yet: the module is only read until _install.
        state = PassState()
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        layers = plan_layers(model, arch, state)
        needs = merged_needed(arch, order, list(layers), routing_layers[-1], keep_merged,
                              router.features == "merged", reuse_prefix=reuse_prefix)
        banks = build_banks(arch, layers, decomposition, model, state, needs, keep_merged, max_cached_combos)
        banks.set_heads(heads)
        basis = routing_basis([decomposition.lowrank[_fc1_key(arch, layer)] for layer in routing_layers], router.norm)
        self.tasks = tasks
        self.ranks = {k: f.rank for k, f in decomposition.lowrank.items()}
        self.keep_merged = keep_merged
        self.state, self.arch, self._layers, self.banks = state, arch, layers, banks
        self._configure(router, bool(reuse_prefix), routing_layers, basis, support)
        _install(model, arch, layers, banks, state)  # the only step that touches the module; undone on failure
        self.model = model

    def _configure(self, router: RouterConfig, reuse_prefix: bool, routing_layers: list, basis: torch.Tensor,
                   support: Optional[SupportFit]):
        """The per-model (not shared) settings: router, prefix reuse, routing basis (the fc1 deltas' or the
        support set's, with its centres) and the calibration (``support``, kept for saving and derived models)."""
        self.support = support
        centre = scale = whitener = None
        if support is not None:
            support = support.to(basis.device)
            scale = support.scale
            if router.basis == "support":
                basis, centre, whitener = support.basis, support.centre, support.whitener
        self.router_config = router
        self.reuse_prefix = reuse_prefix
        self.routing_layers = routing_layers
        self.routing_layer = routing_layers[-1]  # the first pass stops here
        # With the CLS token, the routing block runs only what that token's MLP input needs (same feature).
        self.trim_routing_block = True
        self.register_buffer("routing_basis", basis, persistent=False)
        self.register_buffer("routing_centre", centre, persistent=False)
        self.register_buffer("routing_scale", scale, persistent=False)
        self.register_buffer("routing_whitener", whitener, persistent=False)

    # ------------------------------------------------------------------ derived models
    def with_router(self, router: Optional[RouterConfig] = None, *, reuse_prefix: Optional[bool] = None,
                    support: Optional[SupportFit] = None) -> "MASSModel":
        """A model with another router (and optionally prefix reuse) that shares this one's encoder, banks,
        heads and set cache: nothing is decomposed again. A routing block deeper than the merged weights
        this model kept gets them, rebuilt from the factors. Both models stay usable, concurrently too.
        (They share one encoder: move or cast the original, not a derived model.) A support-set router or the
        unknown-task detector uses ``support`` (else this model's calibration, if it was fitted for the same
        routing features): :meth:`calibrate` fits one."""
        router = check_router(router)
        reuse_prefix = self.reuse_prefix if reuse_prefix is None else reuse_prefix
        check_flags(reuse_prefix, self.keep_merged, self.banks.combos.max_cached_combos)
        routing_layers = router.resolved_layers(self.arch.n_blocks)
        T = len(self.tasks)
        support = _usable_fit(router, routing_layers, self.support if support is None else support)
        _check_fit(router, routing_layers, support, T, self.keep_merged)
        fc1 = [self._fc1_layer(layer) for layer in routing_layers]
        basis = routing_basis([layer_factors(layer, T) for layer in fc1], router.norm).to(self.routing_basis.device)
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        needs = merged_needed(self.arch, order, list(self._layers), routing_layers[-1], self.keep_merged,
                              router.features == "merged", reuse_prefix=reuse_prefix)
        with _VIEWS_LOCK:
            add_merged_weights(self._layers, needs, T)
        view = MASSModel.__new__(MASSModel)
        nn.Module.__init__(view)
        view.tasks, view.ranks, view.keep_merged = self.tasks, self.ranks, self.keep_merged
        view.state, view.arch, view._layers, view.banks = self.state, self.arch, self._layers, self.banks
        view._configure(router, bool(reuse_prefix), routing_layers, basis, support)
        view.model = self.model
        return view

    @torch.no_grad()
    def calibrate(self, support: Mapping[str, torch.Tensor], router: Optional[RouterConfig] = None,
                  batch_size: int = 256) -> "MASSModel":
        """A model (sharing this one's encoder, like :meth:`with_router`) whose router is fitted on a few
        unlabelled images per task: ``support = {task: (N, C, H, W) images}`` for every task, N ≥ 2
        (32 recommended). ``router`` (default: this model's) says what to fit: with ``basis="support"`` the
        per-task subspaces of the routing features (:mod:`mass.support`); for any basis, the per-task residual
        scales the unknown-task detector needs. This model is not changed."""
        router = check_router(self.router_config if router is None else router)
        support = check_support(support, self.tasks)
        # The probe's fc1 basis keeps the router's norm: the unknown-task scales are residuals of that basis.
        probe = self.with_router(dataclasses.replace(router, basis="fc1", unknown="off", whiten=0.0),
                                 reuse_prefix=False)
        features = {}
        for task, images in support.items():
            find_images(self, (images,), {})  # device, layout, channels
            chunks = [probe._first_pass(images[i:i + batch_size])[0] for i in range(0, images.shape[0], batch_size)]
            features[task] = torch.cat(chunks, 1)
        fitted = fit_support(features, self.tasks, router, probe.routing_layers, probe.routing_basis)
        return self.with_router(router, support=fitted)

    def _fc1_layer(self, layer: int) -> MASSLinear:
        return self.arch.fc1[layer]

    # ------------------------------------------------------------------ heads
    @property
    def heads(self) -> Optional[dict]:
        """Task -> name of its head buffer (None without heads); :meth:`head` returns the tensor."""
        return self.banks.head_names

    def head(self, task: str) -> torch.Tensor:
        if self.heads is None:
            raise RuntimeError("this MASSModel has no heads: pass heads={task: (C, D) tensor} to merge()")
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; known tasks: {self.tasks}")
        return getattr(self.banks, self.heads[task])

    @property
    def max_cached_combos(self) -> int:
        return self.banks.combos.max_cached_combos

    # ------------------------------------------------------------------ first pass
    def _token(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        seq_axis = 1 - self.arch.batch_axes[layer]
        if self.router_config.token == "cls":
            return x.select(seq_axis, 0)
        return x.mean(seq_axis)

    def cached_tensors(self) -> list:
        """Tensors that caches grown by calls hold outside the module's parameters and buffers: the cached
        multi-task sets' extended banks (``topk``/``weighted`` with several tasks) and the CPU patch embedding's
        per-set whole weights. Count them with the module's tensors for the memory a served model holds."""
        held = self.banks.combos.tensors()
        for layer in self._layers.values():
            held += layer.cached_tensors()
        return held

    def _first_pass(self, *inputs, **kwargs) -> tuple[torch.Tensor, object]:
        """Run the first-pass model until the last routing block's MLP input (or, with prefix reuse, that
        block's output). Returns the routing features (G, B, D) and the block output (or None)."""
        capture = FirstPassCapture(
            layers=frozenset(self.routing_layers), stop=self.routing_layer, reuse_prefix=self.reuse_prefix,
            trim=self.router_config.token == "cls" and self.trim_routing_block, token=self._token,
            trimmed_feature=lambda index, hidden: cls_mlp_input(self.arch, index, hidden),
        )
        mode = "base" if self.router_config.features == "pretrained" else "merged"
        try:
            with self.state.use(mode, capture=capture):
                self.model(*inputs, **kwargs)
        except StopForward as stop:
            if stop.capture is not capture:
                raise
        captured = capture.captured
        if any(layer not in captured for layer in self.routing_layers):
            raise RuntimeError("the first pass never reached the routing layer")
        return torch.stack([captured[layer] for layer in self.routing_layers]), captured.get("block")

    def _route_features(self, features: torch.Tensor) -> Routing:
        residuals = routing_residuals(features, self.routing_basis, self.routing_centre, self.routing_whitener)
        if residuals.shape[0] == 1:
            residuals = residuals[0]
        routing = select_tasks(residuals, self.router_config)
        if self.router_config.unknown == "off":
            return routing
        scores = unknown_scores(residuals, routing.task_ids[:, 0], self.routing_scale,
                                squared=self.routing_whitener is not None)
        flagged = scores > self.router_config.unknown_threshold
        return Routing(task_ids=routing.task_ids.masked_fill(flagged.unsqueeze(1), -1),
                       weights=routing.weights.masked_fill(flagged.unsqueeze(1), 0.0),
                       residuals=residuals, unknown=flagged, unknown_scores=scores)

    @torch.no_grad()
    def route(self, *inputs, **kwargs) -> Routing:
        """Routing alone: the first pass and the router, no second pass."""
        images = find_images(self, inputs, kwargs)
        if images.shape[0] == 0:
            return self._empty_routing(images, None)
        feature, _ = self._first_pass(*inputs, **kwargs)
        return self._route_features(feature)

    # ------------------------------------------------------------------ second pass
    def task_index(self, names: Sequence[str]) -> list[int]:
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task name(s) {unknown}; known tasks: {self.tasks}")
        return [self.tasks.index(n) for n in names]

    def _forced_routing(self, task_ids: TaskIds, batch: int, device) -> Routing:
        ids = forced_task_ids(task_ids, self.tasks, batch).to(device)
        valid = ids >= 0
        weights = valid.float() / valid.sum(1, keepdim=True).clamp_min(1)
        return Routing(task_ids=ids, weights=weights, residuals=None)

    def _entries(self, routing: Routing):
        """Bank entries, weights and the set-cache generation (or None) for the second pass. Rows that select
        several tasks under TSV-M semantics (``topk``, or forced sets) use that set's cached TSV-M blocks (a
        host sync finds them)."""
        ids, weights = routing.task_ids, routing.weights
        if self.router_config.mode == "weighted" and routing.residuals is not None:
            return ids, weights, None
        n_selected = (ids >= 0).sum(1)
        if ids.shape[1] == 1 or not bool((n_selected > 1).any()):
            return ids, (ids >= 0).to(weights.dtype), None
        rows = [tuple(sorted(t for t in r if t >= 0)) for r in ids.tolist()]
        generation = self.banks.combos.resolve({c for c in rows if len(c) > 1})
        width = ids.shape[1]
        entries = [(generation.entries[c] if len(c) > 1 else list(c)) for c in rows]
        entries = torch.tensor([e + [-1] * (width - len(e)) for e in entries], dtype=torch.long, device=ids.device)
        return entries, (entries >= 0).to(weights.dtype), generation

    def _second_pass(self, inputs, kwargs, routing: Routing, block_output):
        entries, weights, generation = self._entries(routing)
        order, segments = None, None
        if not entries.is_cuda:
            # CPU fast path: each entry's samples become one slice (order None: already in entry order)
            order, segments = group_rows(entries)
        if order is not None:
            B = entries.shape[0]
            inputs, kwargs = _take(inputs, order, B), _take(kwargs, order, B)
            entries, weights = entries[order], weights[order]
            if block_output is not None:
                block_output = _take(block_output, order, B, self.arch.batch_axes[self.routing_layer])
        replay = None if block_output is None else (self.routing_layer, block_output)
        with self.state.use("tasks", entries, weights, segments, extension=generation, replay=replay):
            out = self.model(*inputs, **kwargs)
        if order is not None:
            out = _take(out, torch.argsort(order), entries.shape[0])
        return out

    @torch.no_grad()
    def forward(self, *inputs, task_ids: Optional[TaskIds] = None, return_routing: bool = False, **kwargs):
        """Two passes: route (unless ``task_ids`` forces tasks), then one batched task-conditioned forward.

        ``task_ids``: a task name or index for the whole batch, one name / index / set (list) per sample, or an
        integer tensor or array (B,) or (B, K) padded with -1. An empty batch gives an empty result."""
        images = find_images(self, inputs, kwargs)
        batch = images.shape[0]
        if batch == 0:
            routing = self._empty_routing(images, task_ids)
            out = empty_like_output(self, inputs, kwargs)
            return (out, routing) if return_routing else out
        block_output = None
        if task_ids is None:
            feature, block_output = self._first_pass(*inputs, **kwargs)
            routing = self._route_features(feature)
        else:
            routing = self._forced_routing(task_ids, batch, images.device)
        if routing.unknown is not None and bool(routing.unknown.any()):  # a host sync, only with the detector on
            out = self._unknown_pass(inputs, kwargs, routing, block_output)
        else:
            out = self._second_pass(inputs, kwargs, routing, block_output)
        return (out, routing) if return_routing else out

    def _unknown_pass(self, inputs, kwargs, routing: Routing, block_output):
        """Samples that matched no task: an error, or the merged / pretrained model's output for them and the
        second pass for the others, put back in batch order."""
        flagged = routing.unknown
        if self.router_config.unknown == "error":
            raise UnknownTaskError(flagged.nonzero().squeeze(1).tolist())
        B = flagged.shape[0]
        lost, kept = flagged.nonzero().squeeze(1), (~flagged).nonzero().squeeze(1)
        mode = "merged" if self.router_config.unknown == "merged" else "base"
        fallback = self._single_pass(mode, _take(inputs, lost, B), _take(kwargs, lost, B))
        if kept.numel() == 0:
            return fallback
        sub = Routing(routing.task_ids[kept], routing.weights[kept], None)
        if block_output is not None:
            block_output = _take(block_output, kept, B, self.arch.batch_axes[self.routing_layer])
        routed = self._second_pass(_take(inputs, kept, B), _take(kwargs, kept, B), sub, block_output)
        joined = _join(routed, fallback, kept.numel(), lost.numel())
        return _take(joined, torch.argsort(torch.cat([kept, lost])), B)

    def _empty_routing(self, images: torch.Tensor, task_ids) -> Routing:
        if task_ids is not None:
            ids = forced_task_ids(task_ids, self.tasks, 0).to(images.device)
            return Routing(ids, ids.new_zeros(ids.shape, dtype=torch.float32), None)
        K, T, G = self.router_config.slots, len(self.tasks), len(self.routing_layers)
        shape = (0, T) if G == 1 else (G, 0, T)
        return Routing(torch.zeros(0, K, dtype=torch.long, device=images.device),
                       torch.zeros(0, K, device=images.device), torch.zeros(shape, device=images.device))

    @torch.no_grad()
    def forward_merged(self, *inputs, **kwargs):
        """The TSV-M model alone (needs ``keep_merged='all'``)."""
        return self._single_pass("merged", inputs, kwargs)

    @torch.no_grad()
    def forward_pretrained(self, *inputs, **kwargs):
        """The pretrained model θ0 alone."""
        return self._single_pass("base", inputs, kwargs)

    def _single_pass(self, mode: str, inputs: tuple, kwargs: dict):
        if find_images(self, inputs, kwargs).shape[0] == 0:
            return empty_like_output(self, inputs, kwargs, mode)
        with self.state.use(mode):
            return self.model(*inputs, **kwargs)

    # ------------------------------------------------------------------ heads
    @torch.no_grad()
    def classify(self, *inputs, logit_scale: float = 100.0, task_ids: Optional[TaskIds] = None, **kwargs):
        """Logits of each sample's head; with several selected tasks, the head with the largest max-logit.
        The routing is always returned, in ``Classification.routing``."""
        if self.heads is None:
            raise RuntimeError("this MASSModel has no heads: pass heads={task: (C, D) tensor} to merge()")
        if "return_routing" in kwargs:
            raise TypeError("classify() always returns the routing (in Classification.routing): drop return_routing")
        out, routing = self(*inputs, task_ids=task_ids, return_routing=True, **kwargs)
        emb = F.normalize(extract_embedding(out).float(), dim=-1)
        width = self.head(self.tasks[0]).shape[1]
        if emb.dim() != 2 or emb.shape[1] != width:
            raise ValueError(f"the model's image embedding has shape {tuple(emb.shape)} but the heads take "
                             f"(batch, {width}) embeddings")
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
        predictions = torch.where(chosen >= 0, best_logits.argmax(1), torch.full_like(chosen, -1))
        return Classification(best_logits, chosen, predictions, routing)

    # ------------------------------------------------------------------ storage
    def decomposition(self) -> TaskDecomposition:
        """What MASS stores (θ0, the tasks' factors, their whole non-matrix params), read back from the layers."""
        return read_decomposition(self.model, self.arch, self._layers, self.banks, self.tasks)

    def storage_factor(self) -> float:
        return self.decomposition().storage_factor()

    def save_pretrained(self, directory) -> None:
        from .serialization import save_mass

        save_mass(self, directory)

    @classmethod
    def from_pretrained(cls, directory, base_model: nn.Module, **overrides) -> "MASSModel":
        """Load a saved model into ``base_model`` (wrapped in place). If loading fails, ``base_model`` is left
        as it was: its weights are restored from a copy taken first (this costs one copy of them meanwhile)."""
        from .serialization import load_mass

        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be the pretrained nn.Module to load into, got "
                            f"{type(base_model).__name__}")
        detect(base_model)  # unsupported or already wrapped: refused before anything is loaded into it
        saved = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        try:
            return load_mass(directory, base_model, **overrides)
        except BaseException:
            with torch.no_grad():
                for key, value in base_model.state_dict().items():
                    value.copy_(saved[key])
            raise


def _join(a, b, n_a: int, n_b: int):
    """Two outputs of one model on disjoint sample subsets (n_a then n_b samples) as one output."""
    if isinstance(a, torch.Tensor):
        if a.dim() > 0 and a.shape[0] == n_a and isinstance(b, torch.Tensor) and b.dim() > 0 and b.shape[0] == n_b:
            return torch.cat([a, b.to(a.dtype)], 0)
        return a
    if isinstance(a, tuple) and not hasattr(a, "_fields"):
        return tuple(_join(x, y, n_a, n_b) for x, y in zip(a, b))
    if isinstance(a, list):
        return [_join(x, y, n_a, n_b) for x, y in zip(a, b)]
    if isinstance(a, dict):
        items = {k: _join(v, b[k], n_a, n_b) if k in b else v for k, v in a.items()}
        return type(a)(**items) if type(a) is not dict else items
    return a


def _usable_fit(router: RouterConfig, layers: list, support):
    """``support``, or None when the router does not need it and it was fitted for other routing features
    (dropped, not carried into a router it does not describe)."""
    needs = router.basis == "support" or router.unknown != "off"
    if support is not None and isinstance(support, SupportFit) and not needs and not support.matches(router, layers):
        return None
    return support


def _check_fit(router: RouterConfig, layers: list, support: Optional[SupportFit], n_tasks: int,
               keep_merged: str) -> None:
    """A router that needs a calibration has one that fits it; the merged fallback has its weights."""
    if support is not None and not isinstance(support, SupportFit):
        raise TypeError(f"support must be a mass.support.SupportFit (see MASSModel.calibrate), got "
                        f"{type(support).__name__}")
    if support is not None and (support.scale.shape[-1] != n_tasks or
                                (support.basis is not None and support.basis.shape[1] != n_tasks)):
        raise ValueError(f"the support calibration is for {support.scale.shape[-1]} tasks, the model has {n_tasks}")
    if router.basis == "support" or router.unknown != "off":
        what = "basis='support'" if router.basis == "support" else f"unknown={router.unknown!r}"
        if support is None:
            raise ValueError(f"RouterConfig({what}) needs a few images per task: pass support={{task: images}} "
                             f"to mass.merge, or use model.calibrate(support, router)")
        if not support.matches(router, layers):
            raise ValueError(f"RouterConfig({what}): the model's calibration was fitted for other routing "
                             f"features (layers {list(support.layers)}, features {support.features!r}, token "
                             f"{support.token!r}, basis {'support' if support.basis is not None else 'fc1'}): "
                             f"calibrate again with this router")
    if router.unknown == "merged" and keep_merged != "all":
        raise ValueError("RouterConfig(unknown='merged') falls back to the merged model: build with keep_merged='all'")


def _fc1_key(arch: Architecture, layer: int) -> str:
    suffix = "mlp.fc1.weight" if arch.kind == "hf" else "mlp.c_fc.weight"
    return f"{arch.block_names[layer]}.{suffix}"


def _install(model: nn.Module, arch: Architecture, layers: dict, banks: TaskBanks, state: PassState) -> None:
    """Touch the module: install the MASS layers, a gate per block, the token-delta hook and (open_clip) the
    task-conditioned ``proj``. All persistent (nothing is installed per call). If a step
    fails, the steps done so far are undone and the module is as it was."""
    undo: list = []
    try:
        install_layers(model, layers, undo)
        for i, block in enumerate(arch.blocks):
            gate = BlockGate(block, state, i)
            block.forward = gate
            undo.append(lambda block=block, gate=gate: _restore_forward(block, gate.previous))
        undo.append(arch.pre_norm.register_forward_pre_hook(TokenDeltas(state, banks)).remove)
        if banks.proj is not None:
            root, original = arch.root, type(arch.root)
            root.__dict__["_mass_proj"] = ProjSwitch(state, banks.proj)
            undo.append(lambda: root.__dict__.pop("_mass_proj", None))
            root.__class__ = proj_class(original)
            undo.append(lambda: setattr(root, "__class__", original))
    except BaseException:
        for step in reversed(undo):
            step()
        raise


def _restore_forward(block: nn.Module, previous) -> None:
    if previous is None:
        block.__dict__.pop("forward", None)
    else:
        block.forward = previous


def merge(
    pretrained: nn.Module,
    finetuned: Mapping[str, Checkpoint],
    rank: Rank = None,
    router: Optional[RouterConfig] = None,
    heads: Optional[Mapping[str, torch.Tensor]] = None,
    reuse_prefix: bool = False,
    keep_merged: str = "prefix",
    progress: bool = True,
    support: Optional[Mapping[str, torch.Tensor]] = None,
    solver: str = "auto",
    device=None,
) -> MASSModel:
    """Decompose T fine-tuned checkpoints of ``pretrained`` and wrap it (in place) as a :class:`MASSModel`.
    Everything that can be checked without the SVDs (model structure, router layers against the depth, heads
    against the tasks and the embedding width, task names, options, the support images) is checked before
    they run. ``support={task: (N, C, H, W) images}`` calibrates the router on them (:meth:`MASSModel.calibrate`):
    needed for ``RouterConfig(basis="support")`` and the unknown-task detector. ``solver`` and ``device`` choose
    how and where the SVDs run (see :func:`mass.decompose`)."""
    if not isinstance(pretrained, nn.Module):
        raise TypeError("pretrained must be the pretrained nn.Module (its structure is wrapped in place)")
    from .clip import prepare  # a CLIPModel's vision tower with its projection; open_clip names; missing proj

    pretrained, finetuned = prepare(pretrained, finetuned)
    arch = detect(pretrained)  # unsupported or already wrapped
    router = check_router(router)
    router.resolved_layers(arch.n_blocks)
    check_flags(reuse_prefix, keep_merged, 64)
    if isinstance(finetuned, Mapping) and finetuned:
        tasks = check_task_names(list(finetuned))
        check_heads(heads, tasks, arch.output_dim)
        if support is not None:
            check_support(support, tasks)
        for key, value in pretrained.state_dict().items():  # the rank fits every matrix
            if value.is_floating_point() and value.dim() == 2:
                resolve_rank(rank, tuple(value.shape), len(tasks), key)
    if support is None and (router.basis == "support" or router.unknown != "off"):
        raise ValueError("RouterConfig(basis='support') and the unknown-task detector need support={task: images}")
    dec = decompose(pretrained, finetuned, rank=rank, progress=progress, solver=solver, device=device)
    if support is None:
        return MASSModel(pretrained, dec, router=router, heads=heads, reuse_prefix=reuse_prefix,
                         keep_merged=keep_merged)
    norm = "l2" if router.basis == "support" else router.norm
    plain = dataclasses.replace(router, basis="fc1", unknown="off", norm=norm, whiten=0.0)
    model = MASSModel(pretrained, dec, router=plain, heads=heads, reuse_prefix=reuse_prefix, keep_merged=keep_merged)
    return model.calibrate(support, router)
