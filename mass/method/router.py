"""The data-free projection router of MASS (MASS.md §3): residual of a feature against each task's subspace."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

_TOKENS = ("cls", "mean", "patch_mean")
_MODES = ("top1", "topk", "weighted")
_FEATURES = ("merged", "pretrained")
NORMS = ("l2", "sv", "energy")
_BASES = ("fc1", "support")
_UNKNOWN = ("off", "merged", "pretrained", "error")


class RouterConfigTypeError(TypeError, ValueError):
    """A RouterConfig field of the wrong type. Also a ValueError, so code that validates settings with
    ``except ValueError`` (as it did before fields were type-checked) still catches it."""


def _int(name: str, value, minimum: int) -> int:
    """A plain int (numpy integers converted; bools and floats refused) of at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RouterConfigTypeError(f"RouterConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"RouterConfig.{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _float(name: str, value) -> float:
    """A plain finite float (ints and numpy scalars converted; bools refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RouterConfigTypeError(f"RouterConfig.{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"RouterConfig.{name} must be finite, got {value!r}")
    return value


def _choice(name: str, value, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"RouterConfig.{name} must be one of {choices}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class RouterConfig:
    """How MASS routes. ``layer=None`` picks the paper's block (9 of 12, 20 of 24, else 3/4 of the depth).

    mode: ``top1`` (argmax), ``topk`` (standardise scores over tasks, softmax with ``temperature``, keep tasks
    whose weight exceeds ``threshold``, at most ``max_tasks``, argmax if none; the second pass applies TSV-M
    over the selected set), ``weighted`` (softmax of the scores / ``temperature``; the ``max_tasks`` largest
    weights are kept, renormalised, and the blocks are summed with those weights — our reading of the mode).
    ``batch_level`` averages residuals over the batch and takes one decision for all samples; samples whose
    residuals are not finite (a NaN or Inf image) take no part in that average (see :func:`select_tasks`).

    Beyond the paper (defaults keep the paper's router): ``layers`` scores several blocks in the same first
    pass (one stacked kernel launch) and sums their per-block standardised scores; ``features="pretrained"``
    reads the routing features from θ0 instead of the TSV-M model; ``norm`` calibrates the data-free residual
    from the factors alone (:func:`norm_weights`): ``"l2"`` the plain residual, ``"sv"`` each basis direction
    weighted by its singular value relative to the task's largest, ``"energy"`` by its share of the task's
    delta energy (s_i² / Σ s_j²), so every task's score is normalised by what its delta does to a random input.
    ``token``: the routing feature of a block's MLP input: ``"cls"`` (the class token's row, the paper's),
    ``"mean"`` (the mean over all tokens) or ``"patch_mean"`` (the mean over the patch tokens, the class token
    left out). ``depth`` in (0, 1] places the routing block by the encoder's depth instead of ``layer``: the
    last of the first ⌈depth · N⌉ blocks (:func:`depth_layer`), so the first pass runs about ``depth`` of a
    forward whatever N (the early router of :meth:`fast`).

    Few-example router (``basis="support"``, :mod:`mass.method.support`): per task, the top ``support_rank`` right
    singular vectors of the routing features of a few unlabelled images of that task (centred on their mean
    when ``centre``, the default: it measured better), fitted by :meth:`MASSModel.calibrate` /
    ``mass.merge(support=...)``; scored by the same projection residual. ``support_rank=None`` takes
    :data:`mass.method.support.DEFAULT_RANK` (capped at what N − 1 held-out images span). ``whiten`` in [0, 1) (support
    basis only): > 0 first whitens the features by the support images' pooled within-task covariance, shrunk
    towards a scaled identity (weight ``whiten`` on the covariance, 1 − whiten on the identity), so residuals
    count how unusual a feature is for the tasks' own images rather than its raw size; it also calibrates the
    unknown-task detector (below). :meth:`few_example` is the measured best setting.

    Unknown task (``unknown != "off"``, needs a calibrated model): a sample whose best task's residual exceeds
    ``unknown_threshold`` × that task's calibrated scale (the largest held-out residual of its support images)
    gets ``Routing.task_ids = -1`` and the merged model's (``"merged"``, needs ``keep_merged="all"``) or the
    pretrained model's (``"pretrained"``) output; ``"error"`` raises :class:`mass.method.support.UnknownTaskError`.
    With ``whiten`` > 0 the scale is calibrated instead: at ``unknown_threshold=1`` about
    :data:`mass.method.support.UNKNOWN_RATE` (2%) of in-task images are flagged, by construction (split-conformal
    quantile of the support images' held-out scores; :mod:`mass.method.support`); a larger threshold flags fewer.

    Immutable and type-checked: every field holds a plain Python value (numpy scalars are converted, bools are
    refused where a number is expected), ``layers`` is stored as a sorted tuple. Use
    ``dataclasses.replace(config, field=value)`` for a changed copy.
    """

    layer: Optional[int] = None
    token: str = "cls"
    mode: str = "topk"
    threshold: float = 0.2
    max_tasks: int = 2
    temperature: float = 1.0
    batch_level: bool = False
    layers: Optional[tuple] = None
    features: str = "merged"
    norm: str = "l2"
    basis: str = "fc1"
    support_rank: Optional[int] = None
    centre: bool = True
    unknown: str = "off"
    unknown_threshold: float = 1.0
    whiten: float = 0.0
    depth: Optional[float] = None

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        set_("token", _choice("token", self.token, _TOKENS))
        set_("mode", _choice("mode", self.mode, _MODES))
        set_("features", _choice("features", self.features, _FEATURES))
        set_("norm", _choice("norm", self.norm, NORMS))
        if self.layer is not None:
            set_("layer", _int("layer", self.layer, 0))
        set_("max_tasks", _int("max_tasks", self.max_tasks, 1))
        set_("temperature", _float("temperature", self.temperature))
        if not self.temperature > 0:
            raise ValueError(f"RouterConfig.temperature must be > 0, got {self.temperature!r}")
        set_("threshold", _float("threshold", self.threshold))
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"RouterConfig.threshold must lie in [0, 1), got {self.threshold!r}")
        if not isinstance(self.batch_level, (bool, np.bool_)):
            raise RouterConfigTypeError(f"RouterConfig.batch_level must be a bool, got "
                                        f"{type(self.batch_level).__name__} {self.batch_level!r}")
        set_("batch_level", bool(self.batch_level))
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple, np.ndarray)):
                raise RouterConfigTypeError(
                    f"RouterConfig.layers must be a list or tuple of block indices, got {self.layers!r}")
            layers = [_int("layers[]", l, 0) for l in self.layers]
            if not layers or len(set(layers)) != len(layers):
                raise ValueError(f"RouterConfig.layers must be distinct block indices >= 0, got {self.layers!r}")
            set_("layers", tuple(sorted(layers)))
        set_("basis", _choice("basis", self.basis, _BASES))
        set_("unknown", _choice("unknown", self.unknown, _UNKNOWN))
        if self.support_rank is not None:
            set_("support_rank", _int("support_rank", self.support_rank, 1))
        if not isinstance(self.centre, (bool, np.bool_)):
            raise RouterConfigTypeError(f"RouterConfig.centre must be a bool, got "
                                        f"{type(self.centre).__name__} {self.centre!r}")
        set_("centre", bool(self.centre))
        set_("unknown_threshold", _float("unknown_threshold", self.unknown_threshold))
        if not self.unknown_threshold > 0:
            raise ValueError(f"RouterConfig.unknown_threshold must be > 0, got {self.unknown_threshold!r}")
        set_("whiten", _float("whiten", self.whiten))
        if not 0.0 <= self.whiten < 1.0:
            raise ValueError(f"RouterConfig.whiten must lie in [0, 1), got {self.whiten!r}")
        if self.whiten > 0 and self.basis != "support":
            raise ValueError(f"RouterConfig.whiten={self.whiten!r} whitens by the support images' covariance: it "
                             f"needs basis='support'")
        if self.depth is not None:
            set_("depth", _float("depth", self.depth))
            if not 0.0 < self.depth <= 1.0:
                raise ValueError(f"RouterConfig.depth must lie in (0, 1], got {self.depth!r}")
            if self.layer is not None or self.layers is not None:
                raise ValueError("RouterConfig.depth places the routing block by the encoder's depth: give depth, "
                                 "layer or layers, not several")
        if self.basis == "support" and self.norm != "l2":
            raise ValueError(f"RouterConfig.norm={self.norm!r} weights the fc1 basis by its singular values; the "
                             f"support basis has none: use norm='l2' with basis='support'")

    @property
    def slots(self) -> int:
        """Tasks a sample can select (the K of the second pass)."""
        return 1 if self.mode == "top1" else self.max_tasks

    @classmethod
    def recommended(cls, **overrides) -> "RouterConfig":
        """The configuration ``mass`` recommends from its router study (docs/router_study.md): route on the
        pretrained model's features, top-1. On the offline benchmark (8 tasks in CLIP's regime, 3 seeds) it
        reached 85.3 ± 1.1% normalised accuracy against 58.3 ± 3.9% for the paper's router (89.6 ± 3.3% with
        ``norm="energy"``); the first pass then needs no merged weights. The class defaults stay the paper's."""
        return cls(**{"features": "pretrained", "mode": "top1", **overrides})

    @classmethod
    def few_example(cls, **overrides) -> "RouterConfig":
        """The router ``mass`` recommends when a few unlabelled images per task are at hand (fit it with
        ``mass.merge(..., support=...)`` or :meth:`MASSModel.calibrate`): the support-set basis of the pretrained
        model's features, whitened by the support's own covariance (``whiten=0.2``), uncentred, rank 1, top-1
        (chosen on validation images, docs/router_study.md section 9). On the offline benchmark (8 tasks in
        CLIP's regime, 3 seeds, 32 images per task, test images) it routed 97.4 ± 0.1% right (normalised
        accuracy 96.5 ± 0.4%), against 97.0 ± 0.1% (96.1 ± 0.2%) unwhitened and centred, 86.3 ± 1.2%
        (85.3 ± 1.1%) for :meth:`recommended` and 61.4 ± 3.5% (58.3 ± 3.9%) for the paper's router. At the last
        block (``layer=n_blocks - 1, centre=True, whiten=0.5``, the setting chosen there) it routed 98.4 ± 0.2%
        (97.7 ± 0.5%) for a longer first pass; its unknown-task detector (``unknown="pretrained"``, default
        threshold) flagged 93.4 ± 3.9% of the images of 2 tasks left out of the merge for 1.7 ± 1.0% of in-task
        images."""
        return cls(**{"basis": "support", "features": "pretrained", "centre": False, "whiten": 0.2, "mode": "top1",
                      **overrides})

    @classmethod
    def fast(cls, **overrides) -> "RouterConfig":
        """The few-example router (fit it with ``mass.merge(..., support=...)`` or :meth:`MASSModel.calibrate`)
        at an early block placed by ``depth=5/12`` (block 4 of ViT-B/32's 12: the first pass runs about 5/12
        of a forward), centred, rank 1, whitened (0.5): the best router on validation images whose FLOP-model
        cost on ViT-B/32 (T = 8, top-1) is at most 1.6× one plain forward (issue 25; docs/router_study.md
        section 10: 1.545× by FLOPs against 1.951× at the paper's block). On the offline benchmark (3 seeds,
        32 images per task, test images; block 2 of 6) it routed 91.9 ± 0.9% right (normalised accuracy
        90.7 ± 1.1%) against 98.4 ± 0.2% (97.4 ± 0.4%) at the last block: a shorter first pass bought with
        accuracy; no earlier block came within 0.5 point of the last there. ``layer=`` or ``layers=`` in
        ``overrides`` replace the depth."""
        preset = {"basis": "support", "features": "pretrained", "support_rank": 1, "centre": True, "whiten": 0.5,
                  "mode": "top1", "depth": 5 / 12}
        if "layer" in overrides or "layers" in overrides:
            del preset["depth"]
        return cls(**{**preset, **overrides})

    def resolved_layers(self, n_blocks: int) -> list[int]:
        """The blocks whose MLP input is scored, ascending."""
        if self.layers is not None:
            layers = self.layers
        elif self.depth is not None:
            layers = [depth_layer(self.depth, n_blocks)]
        else:
            layers = [default_layer(n_blocks) if self.layer is None else self.layer]
        for layer in layers:
            if layer >= n_blocks:
                raise ValueError(f"router layer {layer} does not exist: the encoder has {n_blocks} blocks (0-based)")
        return list(layers)


def default_layer(n_blocks: int) -> int:
    return {12: 9, 24: 20}.get(n_blocks, int(0.75 * n_blocks))


def depth_layer(depth: float, n_blocks: int) -> int:
    """The routing block of ``RouterConfig.depth``: the last of the first ``ceil(depth · n_blocks)`` blocks, so
    the first pass runs about ``depth`` of a forward (0.5: block 2 of 6, block 5 of 12, block 11 of 24)."""
    return max(0, math.ceil(round(depth * n_blocks, 9)) - 1)


def norm_weights(S: torch.Tensor, norm: str) -> Optional[torch.Tensor]:
    """Weights w (T, k) in [0, 1] of the basis directions for ``RouterConfig.norm``: the router's residual is
    ``r_t(x)² = ‖x‖² − Σ_i w_ti (v_ti · x)²`` (rows √w_ti · v_ti; w ≤ 1 keeps r² ≥ 0). None for ``"l2"`` (w = 1).

    ``"sv"``: w = s_i / s_1. ``"energy"``: w = s_i² / Σ_j s_j², i.e. ``Σ_i w_i (v_i · x)² = ‖Δ_t x‖² / ‖Δ_t‖_F²``
    (the rank-k delta's response to x over its Frobenius energy): a per-task normalisation from the factors
    alone: a random unit direction excites E[‖Δ_t x‖²] / ‖Δ_t‖_F² = 1 / D for *every* task, so no task wins by
    the size of its delta, only by how much of it x excites. A task whose delta is zero gets w = 0."""
    if norm == "l2":
        return None
    s = S.float()
    if norm == "sv":
        return s / s[:, :1].clamp_min(1e-12)
    if norm == "energy":
        e = s * s
        return e / e.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    raise ValueError(f"unknown router norm {norm!r}; known: {NORMS}")


def describe_tensor(t: Optional[torch.Tensor]) -> str:
    """A one-line summary of a tensor for reprs (shape, dtype, device; values only when tiny)."""
    if t is None:
        return "None"
    if 0 < t.numel() <= 8 and t.dim() <= 1 and t.device.type != "meta":
        return f"tensor({t.tolist()}, dtype={t.dtype})"
    return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"


@dataclass(repr=False)
class Routing:
    """Per-sample routing: selected task ids (B, K) padded with -1, their weights (B, K), residuals (B, T)
    (or (G, B, T) when several blocks are scored; None when tasks were forced). With the unknown-task detector
    on, ``unknown`` (B,) bool marks the samples that matched no task (their ``task_ids`` row is all -1) and
    ``unknown_scores`` (B,) holds the detector's score (> ``unknown_threshold`` means flagged)."""

    task_ids: torch.Tensor
    weights: torch.Tensor
    residuals: Optional[torch.Tensor] = None
    unknown: Optional[torch.Tensor] = None
    unknown_scores: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        extra = "" if self.unknown is None else f", unknown={describe_tensor(self.unknown)}"
        return (f"Routing(task_ids={describe_tensor(self.task_ids)}, weights={describe_tensor(self.weights)}, "
                f"residuals={describe_tensor(self.residuals)}{extra})")

    def names(self, tasks: list[str]) -> list[list[str]]:
        return [[tasks[t] for t in row if t >= 0] for row in self.task_ids.tolist()]


def combine_scores(residuals: torch.Tensor) -> torch.Tensor:
    """Scores (B, T), higher is better: ``-r`` for one block; for stacked blocks (G, B, T) the sum over blocks
    of each block's scores standardised over tasks (so no block dominates by its feature scale)."""
    scores = -residuals.float()
    if scores.dim() == 2:
        return scores
    z = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-6)
    return z.sum(0)


def batch_scores(scores: torch.Tensor) -> torch.Tensor:
    """One decision for the batch: the mean scores over the samples whose scores are all finite, for every
    sample. A sample with a non-finite score (a NaN or Inf image) takes no part, so it cannot reroute the rest;
    if no sample is finite the plain mean is used (every output is then non-finite anyway). On the device."""
    finite = torch.isfinite(scores).all(1, keepdim=True)
    kept = torch.where(finite, scores, torch.zeros_like(scores)).sum(0, keepdim=True)
    n = finite.sum(0, keepdim=True)
    mean = torch.where(n > 0, kept / n.clamp_min(1), scores.mean(0, keepdim=True))
    return mean.expand_as(scores)


def select_tasks(residuals: torch.Tensor, config: RouterConfig) -> Routing:
    """Turn residual norms (B, T), or stacked per block (G, B, T), into a :class:`Routing` following
    ``config.mode``. Runs on the device."""
    scores = combine_scores(residuals)
    if config.batch_level:
        scores = batch_scores(scores)
    B, T = scores.shape
    K = min(config.slots, T)
    if config.mode == "top1" or T == 1:
        ids = scores.argmax(1, keepdim=True)
        weights = torch.ones_like(ids, dtype=torch.float32)
    elif config.mode == "topk":
        z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)
        probs = torch.softmax(z / config.temperature, dim=1)
        top_w, top_ids = probs.topk(K, dim=1)
        keep = top_w > config.threshold
        keep[:, 0] = True  # argmax when nothing clears the threshold
        ids = torch.where(keep, top_ids, torch.full_like(top_ids, -1))
        weights = keep.float() / keep.sum(1, keepdim=True)
    else:  # weighted
        probs = torch.softmax(scores / config.temperature, dim=1)
        top_w, ids = probs.topk(K, dim=1)
        weights = top_w / top_w.sum(1, keepdim=True)
    if K < config.slots:
        pad = config.slots - K
        ids = torch.cat([ids, ids.new_full((B, pad), -1)], 1)
        weights = torch.cat([weights, weights.new_zeros((B, pad))], 1)
    return Routing(task_ids=ids, weights=weights, residuals=residuals)
