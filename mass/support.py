"""The few-example router and the unknown-task detector (issue 14).

A *support set* is a few unlabelled images per task. Their routing features (the first pass's MLP input at
the routing block(s), the same feature the data-free router reads) span, per task, a subspace; its top right
singular vectors replace the fc1-delta basis of MASS.md §3, so the residual ``‖x − Vᵀ V x‖`` and the same
fused routing op score it (a (G, T, k, D) basis). With ``centre`` the subspace is affine: each task's support
mean is subtracted from x first (the stacked op then runs with one task per stack entry, still one launch).

The unknown-task detector divides the chosen task's residual by that task's *scale*: the largest residual of
its support images measured held out (leave-one-out for the support basis, so a fitted image does not vouch for
itself; plain residuals for the fc1 basis, which saw no image). ``score > unknown_threshold`` means "no task".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

import mass_kernels

DEFAULT_IMAGES = 32  # images per task the study recommends (docs/router_study.md)
DEFAULT_RANK = 1  # support_rank=None (chosen on validation images in docs/router_study.md); capped by N
MIN_IMAGES = 2


class UnknownTaskError(ValueError):
    """Raised by a model with ``RouterConfig(unknown="error")`` when samples match none of its tasks."""

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)
        super().__init__(f"{len(self.indices)} sample(s) match none of the merged tasks (batch indices "
                         f"{self.indices[:20]}{' ...' if len(self.indices) > 20 else ''}); set "
                         f"RouterConfig(unknown='merged'|'pretrained') to fall back instead")


@dataclass(frozen=True)
class SupportFit:
    """What calibration measured, as a few tensors plus the settings they are valid for.

    basis: (G, T, k, D) fp32 rows orthonormal per task (None: the router keeps the fc1 basis);
    centre: (G, T, D) fp32 or None; scale: (G, T) fp32, the held-out residual scale of each task's support
    images (the unknown-task detector's unit). ``layers``, ``features``, ``token``: the routing features it was
    fitted on; ``n_images``: images per task; ``norm``: the fc1 basis's weighting the scale was measured with
    (``RouterConfig.norm``; always ``"l2"`` for a support basis)."""

    basis: Optional[torch.Tensor]
    centre: Optional[torch.Tensor]
    scale: torch.Tensor
    layers: tuple
    features: str
    token: str
    n_images: int
    norm: str = "l2"

    def matches(self, router, layers: Sequence[int]) -> bool:
        """Whether this fit serves ``router`` (same features; for a support basis also its rank/centring)."""
        if tuple(layers) != self.layers or router.features != self.features or router.token != self.token:
            return False
        if router.basis == "fc1":
            return self.basis is None and router.norm == self.norm
        return self.basis is not None and (self.centre is not None) == router.centre and (
            router.support_rank is None or router.support_rank == self.basis.shape[2])

    def tensors(self) -> dict:
        """The tensors to save (CPU, contiguous); :meth:`from_tensors` reads them back."""
        out = {"scale": self.scale}
        if self.basis is not None:
            out["basis"] = self.basis
        if self.centre is not None:
            out["centre"] = self.centre
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def meta(self) -> dict:
        return {"layers": list(self.layers), "features": self.features, "token": self.token,
                "n_images": self.n_images, "norm": self.norm}

    @staticmethod
    def from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> "SupportFit":
        return SupportFit(basis=tensors.get("basis"), centre=tensors.get("centre"), scale=tensors["scale"],
                          layers=tuple(int(l) for l in meta["layers"]), features=str(meta["features"]),
                          token=str(meta["token"]), n_images=int(meta["n_images"]), norm=str(meta.get("norm", "l2")))

    def to(self, device) -> "SupportFit":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, basis=move(self.basis), centre=move(self.centre), scale=move(self.scale))


def check_support(support, tasks: Sequence[str], channels: Optional[int] = None) -> dict:
    """``{task: (N, C, H, W) images}`` for exactly ``tasks``, N ≥ 2, one image shape for all: or a clear error."""
    if not isinstance(support, Mapping):
        raise TypeError(f"support must be a mapping task -> (N, C, H, W) image tensor, got {type(support).__name__}")
    missing = [t for t in tasks if t not in support]
    extra = [t for t in support if t not in tasks]
    if missing or extra:
        raise ValueError(f"support must hold images of every merged task and no other: missing {missing}, "
                         f"unknown {extra}; tasks: {list(tasks)}")
    shape = None
    for task in tasks:
        images = support[task]
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"support[{task!r}] must be a float image tensor (N, C, H, W), got "
                            f"{type(images).__name__}{'' if not isinstance(images, torch.Tensor) else ' ' + str(images.dtype)}")
        if images.dim() != 4 or (channels is not None and images.shape[1] != channels):
            raise ValueError(f"support[{task!r}] must have shape (N, {channels or 'C'}, H, W), got {tuple(images.shape)}")
        if images.shape[0] < MIN_IMAGES:
            raise ValueError(f"support[{task!r}] has {images.shape[0]} image(s); at least {MIN_IMAGES} are needed "
                             f"(a subspace and a held-out scale need two; {DEFAULT_IMAGES} recommended)")
        if shape is not None and images.shape[1:] != shape:
            raise ValueError(f"support images differ in shape: {tuple(images.shape[1:])} for {task!r} vs {tuple(shape)}")
        if not torch.isfinite(images).all():
            raise ValueError(f"support[{task!r}] holds NaN or Inf values")
        shape = images.shape[1:]
    return {t: support[t] for t in tasks}


def task_subspace(features: torch.Tensor, rank: int, centre: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(G, N, D) features of one task → basis (G, rank, D) (top right singular vectors, fp32) and centre
    (G, D) or None. ``rank`` must not exceed what the N images span (N, or N − 1 centred)."""
    x = features.float()
    mu = x.mean(1) if centre else None
    if centre:
        x = x - mu.unsqueeze(1)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:, :rank].contiguous(), mu


def max_rank(n_images: int, dim: int, centre: bool) -> int:
    return min(n_images - (1 if centre else 0), dim)


def residuals(x: torch.Tensor, basis: torch.Tensor, centre: Optional[torch.Tensor]) -> torch.Tensor:
    """Residuals (G, B, T) of stacked features x (G, B, D) against a (G, T, k, D) basis, each task's centre
    (G, T, D) subtracted first when given. One ``routing_residuals`` launch either way."""
    if centre is None:
        return mass_kernels.routing_residuals(x, basis.to(x.dtype))
    G, B, D = x.shape
    T, k = basis.shape[1], basis.shape[2]
    xc = (x.float().unsqueeze(1) - centre.float().unsqueeze(2)).to(x.dtype)  # (G, T, B, D)
    r = mass_kernels.routing_residuals(xc.reshape(G * T, B, D), basis.reshape(G * T, 1, k, D).to(x.dtype))
    return r.reshape(G, T, B).transpose(1, 2)


def fit(features: Mapping[str, torch.Tensor], tasks: Sequence[str], router, layers: Sequence[int],
        fc1_basis: torch.Tensor) -> SupportFit:
    """Fit the support router for ``router`` from per-task features (G, N, D): the basis (when
    ``router.basis == "support"``) and every task's held-out residual scale."""
    n = min(f.shape[1] for f in features.values())
    D = next(iter(features.values())).shape[-1]
    support_basis = router.basis == "support"
    basis = centre = None
    if support_basis:
        limit = max_rank(n - 1, D, router.centre)  # the held-out fits see N − 1 images
        if limit < 1:
            raise ValueError(f"a centred support basis needs at least 3 images per task, got {n}")
        rank = DEFAULT_RANK if router.support_rank is None else router.support_rank
        if router.support_rank is not None and rank > limit:
            raise ValueError(f"support_rank={rank} exceeds what {n} images per task span held out "
                             f"({limit}{', centred' if router.centre else ''}): give more images or a lower rank")
        rank = min(rank, limit)
        fits = [task_subspace(features[t], rank, router.centre) for t in tasks]
        basis = torch.stack([b for b, _ in fits], 1)  # (G, T, k, D)
        centre = torch.stack([c for _, c in fits], 1) if router.centre else None
    scales = []
    for t_idx, task in enumerate(tasks):
        f = features[task].float()  # (G, N, D)
        if not support_basis:
            r = mass_kernels.routing_residuals(f, fc1_basis[:, t_idx:t_idx + 1].float())[..., 0]  # (G, N)
        else:
            r = torch.stack([_held_out(f, i, basis.shape[2], router.centre) for i in range(f.shape[1])], 1)
        scales.append(r.max(1).values)
    scale = torch.stack(scales, 1).clamp_min(torch.finfo(torch.float32).tiny)  # (G, T)
    return SupportFit(basis=basis, centre=centre, scale=scale, layers=tuple(layers), features=router.features,
                      token=router.token, n_images=n, norm="l2" if support_basis else router.norm)


def _held_out(f: torch.Tensor, i: int, rank: int, centre: bool) -> torch.Tensor:
    """Residual (G,) of image i against the subspace fitted on the other images."""
    rest = torch.cat([f[:, :i], f[:, i + 1:]], 1)
    b, mu = task_subspace(rest, rank, centre)
    return residuals(f[:, i:i + 1], b.unsqueeze(1), None if mu is None else mu.unsqueeze(1))[:, 0, 0]


def unknown_scores(res: torch.Tensor, chosen: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B,) the chosen task's residual over its calibrated scale, averaged over the scored blocks.
    res: (B, T) or (G, B, T); chosen: (B,) task ids; scale: (G, T)."""
    r = res if res.dim() == 3 else res.unsqueeze(0)
    idx = chosen.clamp_min(0).view(1, -1, 1).expand(r.shape[0], -1, 1)
    mine = r.float().gather(2, idx)[..., 0]  # (G, B)
    return (mine / scale.float().gather(1, idx[..., 0])).mean(0)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_support_dir(directory, preprocess, limit: Optional[int] = None) -> torch.Tensor:
    """(N, C, H, W) images of a folder (its image files at any depth, in sorted path order, at most ``limit``),
    each through ``preprocess`` (e.g. :class:`mass.data.ClipPreprocess`): the support images of one task for
    ``mass merge --support TASK=DIR``."""
    from pathlib import Path

    from PIL import Image

    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"support images: {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if len(files) < MIN_IMAGES:
        raise ValueError(f"support images: {root} holds {len(files)} image file(s) ({', '.join(IMAGE_SUFFIXES)}); "
                         f"at least {MIN_IMAGES} are needed, {DEFAULT_IMAGES} recommended")
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(preprocess(image))
        except OSError as exc:
            raise ValueError(f"support images: cannot read {path}: {exc}") from exc
    return torch.stack(images)
