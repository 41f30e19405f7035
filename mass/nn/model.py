"""The two-pass MASS model (MASS.md §3–4): :class:`MASSModel`, the public surface, which delegates.

Where things are: the first pass and where it stops in :mod:`mass.nn.first_pass`; the router inside the model
in :mod:`mass.nn.routing`; the second pass in :mod:`mass.nn.second_pass`; unknown-task samples in
:mod:`mass.nn.unknown`; the banks in :mod:`mass.nn.banks` and the multi-task set cache in
:mod:`mass.nn.set_cache`; the per-call pass state and the hooks that read it in :mod:`mass.nn.passes`; input
checks in :mod:`mass.nn.pass_inputs`. This module wraps the model (transactionally), derives models with other
routers, and saves and loads them through :mod:`mass.storage`.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from mass.method.decompose import TaskDecomposition
from mass.method.router import RouterConfig, Routing, describe_tensor
from mass.method.support import SupportFit, check_support
from mass.method.support import fit as fit_support
from mass.nn.adapters import Architecture, detect, install_layers, plan_layers
from mass.nn.banks import TaskBanks, add_merged_weights, build_banks, layer_factors, merged_needed, read_decomposition
from mass.nn.encoders import EncoderSpecError, build_encoder, default_preprocess, encoder_spec, image_size
from mass.nn.first_pass import routing_basis, run_first_pass
from mass.nn.layers import MASSLinear
from mass.nn.pass_inputs import (
    check_decomposition, check_flags, check_heads, check_router, check_task_names, empty_like_output, find_images,
)
from mass.nn.passes import BlockGate, PassState, ProjSwitch, TokenDeltas, proj_class
from mass.nn.routing import empty_routing, forced_routing, route_features
from mass.nn.second_pass import run_second_pass
from mass.nn.unknown import unknown_pass
from mass.storage.saved_format import SavedModel, SavedModelError, check_preprocess
from mass.storage.serialization import read_artifact, save_artifact

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
        class_names: Optional[Mapping[str, Sequence[str]]] = None,
        preprocessing=None,
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
        if class_names is None and heads is not None and all(hasattr(h, "classes") for h in heads.values()):
            class_names = {t: h.classes for t, h in heads.items()}  # mass.Heads carry their class names
        heads = check_heads(heads, tasks, arch.output_dim)
        class_names = check_class_names(class_names, tasks, heads)
        spec = encoder_spec(model, arch.kind)  # read before the module is wrapped
        preprocessing = check_preprocessing(preprocessing, spec)
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
        self.bank_dtype, self.rank_rule = decomposition.bank_dtype, decomposition.rank_rule
        self.keep_merged = keep_merged
        self.encoder_spec, self._class_names, self._preprocessing = spec, class_names, preprocessing
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
        self._router_config = router
        self.reuse_prefix = reuse_prefix
        self.routing_layers = routing_layers
        self.routing_layer = routing_layers[-1]  # the first pass stops here
        # With the CLS token, the routing block runs only what that token's MLP input needs (same feature).
        self.trim_routing_block = True
        self.register_buffer("routing_basis", basis, persistent=False)
        self.register_buffer("routing_centre", centre, persistent=False)
        self.register_buffer("routing_scale", scale, persistent=False)
        self.register_buffer("routing_whitener", whitener, persistent=False)

    @property
    def router_config(self) -> RouterConfig:
        """The router this model routes with. Read-only: :meth:`with_router` gives a model with another one."""
        return self._router_config

    @router_config.setter
    def router_config(self, value) -> None:
        raise AttributeError(f"MASSModel.router_config is read-only (got an assignment of a "
                             f"{type(value).__name__}): use model.with_router(RouterConfig(...)) for a model with "
                             f"another router (it shares this one's banks; nothing is decomposed again)")

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
        view.encoder_spec, view._class_names = self.encoder_spec, self._class_names
        view._preprocessing = self._preprocessing
        view.bank_dtype, view.rank_rule = self.bank_dtype, self.rank_rule
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
        per-task subspaces of the routing features (:mod:`mass.method.support`); for any basis, the per-task residual
        scales the unknown-task detector needs. This model is not changed."""
        router = check_router(self.router_config if router is None else router)
        support = check_support(support, self.tasks)
        # The probe's fc1 basis keeps the router's norm: the unknown-task scales are residuals of that basis.
        probe = self.with_router(dataclasses.replace(router, basis="fc1", unknown="off", whiten=0.0),
                                 reuse_prefix=False)
        features = {}
        for task, images in support.items():
            find_images(self, (images,), {})  # device, layout, channels
            chunks = [probe.first_pass(images[i:i + batch_size])[0] for i in range(0, images.shape[0], batch_size)]
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
    def class_names(self) -> Optional[dict]:
        """``{task: [class name per head row]}`` (saved with the model; what a server answers with), or None."""
        return self._class_names

    @class_names.setter
    def class_names(self, names: Optional[Mapping[str, Sequence[str]]]) -> None:
        heads = None if self.heads is None else {t: self.head(t) for t in self.tasks}
        self._class_names = check_class_names(names, self.tasks, heads)

    @property
    def preprocessing(self) -> Optional[dict]:
        """The image preprocessing the encoder expects (the fields of
        :class:`mass.evaluation.data.ClipPreprocess` as a dict; default: CLIP's at the encoder's image size)."""
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value) -> None:
        self._preprocessing = check_preprocessing(value, self.encoder_spec)

    @property
    def max_cached_combos(self) -> int:
        return self.banks.combos.max_cached_combos

    # ------------------------------------------------------------------ caches
    def cached_tensors(self) -> list:
        """Tensors that caches grown by calls hold outside the module's parameters and buffers: the cached
        multi-task sets' extended banks (``topk``/``weighted`` with several tasks) and the CPU patch embedding's
        per-set whole weights. Count them with the module's tensors for the memory a served model holds."""
        held = self.banks.combos.tensors()
        for layer in self._layers.values():
            held += layer.cached_tensors()
        return held

    # ------------------------------------------------------------------ first pass and routing
    def first_pass(self, *inputs, **kwargs) -> tuple[torch.Tensor, object]:
        """The first pass alone (:func:`mass.nn.first_pass.run_first_pass`): the routing features (G, B, D) and,
        with prefix reuse, the routing block's output (else None)."""
        return run_first_pass(self, inputs, kwargs)

    def route_features(self, features: torch.Tensor) -> Routing:
        """The router alone, on routing features (G, B, D) from :meth:`first_pass`
        (:func:`mass.nn.routing.route_features`)."""
        return route_features(self, features)

    @torch.no_grad()
    def route(self, *inputs, **kwargs) -> Routing:
        """Routing alone: the first pass and the router, no second pass."""
        images = find_images(self, inputs, kwargs)
        if images.shape[0] == 0:
            return empty_routing(self, images, None)
        feature, _ = self.first_pass(*inputs, **kwargs)
        return self.route_features(feature)

    # ------------------------------------------------------------------ second pass
    def task_index(self, names: Sequence[str]) -> list[int]:
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task name(s) {unknown}; known tasks: {self.tasks}")
        return [self.tasks.index(n) for n in names]

    @torch.no_grad()
    def forward(self, *inputs, task_ids: Optional[TaskIds] = None, return_routing: bool = False, **kwargs):
        """Two passes: route (unless ``task_ids`` forces tasks), then one batched task-conditioned forward.

        ``task_ids``: a task name or index for the whole batch, one name / index / set (list) per sample, or an
        integer tensor or array (B,) or (B, K) padded with -1. An empty batch gives an empty result."""
        images = find_images(self, inputs, kwargs)
        batch = images.shape[0]
        if batch == 0:
            routing = empty_routing(self, images, task_ids)
            out = empty_like_output(self, inputs, kwargs)
            return (out, routing) if return_routing else out
        block_output = None
        if task_ids is None:
            feature, block_output = self.first_pass(*inputs, **kwargs)
            routing = self.route_features(feature)
        else:
            routing = forced_routing(self.tasks, task_ids, batch, images.device)
        if routing.unknown is not None and bool(routing.unknown.any()):  # a host sync, only with the detector on
            out = unknown_pass(self, inputs, kwargs, routing, block_output)
        else:
            out = run_second_pass(self, inputs, kwargs, routing, block_output)
        return (out, routing) if return_routing else out

    @torch.no_grad()
    def forward_merged(self, *inputs, **kwargs):
        """The TSV-M model alone (needs ``keep_merged='all'``)."""
        return self.single_pass("merged", inputs, kwargs)

    @torch.no_grad()
    def forward_pretrained(self, *inputs, **kwargs):
        """The pretrained model θ0 alone."""
        return self.single_pass("base", inputs, kwargs)

    def single_pass(self, mode: str, inputs: tuple, kwargs: dict):
        """One plain pass in ``mode``: ``"base"`` (θ0) or ``"merged"`` (TSV-M)."""
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
        return read_decomposition(self.model, self.arch, self._layers, self.banks, self.tasks, self.bank_dtype,
                                  self.rank_rule)

    # ------------------------------------------------------------------ tasks over time
    def add_tasks(self, finetuned: Mapping, heads: Optional[Mapping[str, torch.Tensor]] = None,
                  support: Optional[Mapping[str, torch.Tensor]] = None, solver: str = "auto", device=None,
                  progress: bool = False, base_model: Optional[nn.Module] = None,
                  class_names: Optional[Mapping[str, Sequence[str]]] = None) -> "MASSModel":
        """A new model with the tasks of ``finetuned`` (``{task: checkpoint}``, any form :func:`mass.merge`
        takes, LoRA adapter directories included) added after this model's: only their deltas are decomposed,
        the other tasks' factors are reused (sliced when the rank rule k = ⌊min(out, in) / T⌋ shrinks; kept when
        the rank was fixed), the first-pass TSV-M weights are rebuilt from the stored factors. ``heads``: the new
        tasks' heads (required when this model has heads). ``support``: images of every task of the new model
        when its router needs a calibration. The new model wraps a fresh copy of the encoder (``base_model``
        when given; HF models are rebuilt from their config); this model is only read and stays usable.
        ``class_names``: the new tasks' class names (required when this model has class names, unless ``heads``
        are ``mass.Heads``, which carry them); the image preprocessing is kept."""
        from mass.nn.grow import add_tasks

        return add_tasks(self, finetuned, heads=heads, support=support, solver=solver, device=device,
                         progress=progress, base_model=base_model, class_names=class_names)

    def with_bank_dtype(self, bank_dtype, base_model: Optional[nn.Module] = None) -> "MASSModel":
        """A new model with this one's task values rounded to ``bank_dtype`` (``"bfloat16"``/``"float16"``),
        stored and applied in half precision; θ0 keeps its dtype. ``base_model`` as in :meth:`add_tasks`."""
        from mass.nn.grow import with_bank_dtype

        return with_bank_dtype(self, bank_dtype, base_model=base_model)

    def remove_tasks(self, names: Sequence[str], support: Optional[Mapping[str, torch.Tensor]] = None,
                     base_model: Optional[nn.Module] = None) -> "MASSModel":
        """A new model without the tasks ``names``: their factors, values, heads and calibration are dropped, the
        first-pass TSV-M weights rebuilt from the remaining factors; ranks are kept (stored factors cannot grow).
        ``support``/``base_model`` as in :meth:`add_tasks`; this model is only read and stays usable."""
        from mass.nn.grow import remove_tasks

        return remove_tasks(self, names, support=support, base_model=base_model)

    def storage_factor(self) -> float:
        return self.decomposition().storage_factor()

    def saved_artifact(self) -> SavedModel:
        """What :meth:`save_pretrained` writes, as plain data (:class:`~mass.storage.saved_format.SavedModel`)."""
        heads = None if self.heads is None else {t: self.head(t) for t in self.tasks}
        return SavedModel(architecture=self.arch.kind, model_class=type(self.model).__name__,
                          router=self.router_config, reuse_prefix=self.reuse_prefix, keep_merged=self.keep_merged,
                          decomposition=self.decomposition(), heads=heads, support=getattr(self, "support", None),
                          encoder=self.encoder_spec, preprocess=self.preprocessing, classes=self.class_names)

    def save_pretrained(self, directory) -> None:
        """Save to ``directory`` all or nothing (:mod:`mass.storage.serialization`): one checksummed file."""
        save_artifact(self.saved_artifact(), directory)

    @classmethod
    def from_pretrained(cls, directory, base_model: Optional[nn.Module] = None, trust_task_order: bool = False,
                        **overrides) -> "MASSModel":
        """Load a saved model. A self-contained directory (saved by this mass) needs nothing else: the encoder is
        built from its saved config. ``base_model`` (needed for directories saved before the encoder's config
        was saved) is wrapped in place instead, its weights replaced by the saved θ0; if loading fails, it is
        left as it was: its weights are restored from a copy taken first (one copy of them meanwhile). A
        directory whose task order is not bound to its tensors (format 1, or saved before the binding existed)
        loads only with ``trust_task_order=True``, with a warning; save it again to bind it."""
        if base_model is not None and not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be the pretrained nn.Module to load into, got "
                            f"{type(base_model).__name__}")
        if base_model is not None:
            detect(base_model)  # unsupported or already wrapped: refused before anything is read or changed
        if not isinstance(trust_task_order, bool):
            raise TypeError(f"trust_task_order must be a bool, got {type(trust_task_order).__name__}")
        saved = read_artifact(directory, trust_task_order)
        kwargs = {"router": saved.router, "heads": saved.heads, "reuse_prefix": saved.reuse_prefix,
                  "keep_merged": saved.keep_merged, "support": saved.support, "class_names": saved.classes,
                  "preprocessing": saved.preprocess}
        kwargs.update(overrides)
        if base_model is None:
            return cls(_saved_encoder(saved, directory), saved.decomposition, **kwargs)
        previous = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        try:
            try:
                base_model.load_state_dict(saved.decomposition.base, strict=True)
            except RuntimeError as exc:
                raise SavedModelError(f"base_model does not match the saved model's architecture: {exc}") from exc
            return cls(base_model, saved.decomposition, **kwargs)
        except BaseException:
            with torch.no_grad():
                for key, value in base_model.state_dict().items():
                    value.copy_(previous[key])
            raise


def _saved_encoder(saved, directory) -> nn.Module:
    """The encoder of a self-contained saved model, built from its config, holding the saved θ0."""
    if saved.encoder is None:
        raise SavedModelError(
            f"{directory} holds no encoder config (it was saved by an older mass, or from an encoder mass cannot "
            f"describe): pass base_model=<the pretrained vision encoder> to from_pretrained; saving it again then "
            f"writes a self-contained directory")
    try:
        module = build_encoder(saved.encoder)
    except EncoderSpecError as exc:
        raise SavedModelError(f"{directory}: {exc}") from exc
    try:
        module.load_state_dict(saved.decomposition.base, strict=True)
    except RuntimeError as exc:
        raise SavedModelError(f"{directory}: the saved encoder config does not match the saved weights: {exc}") from exc
    return module


def check_class_names(names, tasks: list, heads: Optional[Mapping[str, torch.Tensor]]) -> Optional[dict]:
    """``{task: [names]}`` in task order, one non-empty name per row of the task's head; None stays None."""
    if names is None:
        return None
    if heads is None:
        raise ValueError("class names need heads: this model has none")
    if not isinstance(names, Mapping) or set(names) != set(tasks):
        got = sorted(names) if isinstance(names, Mapping) else type(names).__name__
        raise ValueError(f"class_names must be a dict with one entry per task {tasks}, got {got}")
    out = {}
    for t in tasks:
        listed = names[t]
        if isinstance(listed, str) or not all(isinstance(n, str) and n for n in listed):
            raise ValueError(f"class names of task {t!r} must be a list of non-empty strings, got {listed!r}")
        listed = list(listed)
        if len(listed) != heads[t].shape[0]:
            raise ValueError(f"task {t!r} has {heads[t].shape[0]} head rows but {len(listed)} class names")
        out[t] = listed
    return out


def check_preprocessing(value, spec: Optional[dict]) -> Optional[dict]:
    """The preprocessing as a plain dict (a ClipPreprocess-like dataclass or a dict); None: CLIP's default at
    the encoder's image size when the encoder can be described, else None."""
    if value is None:
        return None if spec is None else default_preprocess(image_size(spec))
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"preprocessing must be a ClipPreprocess or a dict of its fields, got {type(value).__name__}")
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in value.items()}
    try:
        check_preprocess(out)
    except SavedModelError as exc:
        raise ValueError(f"preprocessing: {exc}") from None
    return out


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
        raise TypeError(f"support must be a mass.method.support.SupportFit (see MASSModel.calibrate), got "
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
            switch = ProjSwitch(state, banks.proj)
            root.__dict__["_mass_proj"] = switch
            undo.append(lambda: root.__dict__.pop("_mass_proj", None))
            undo.append(root.register_forward_hook(switch).remove)
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
