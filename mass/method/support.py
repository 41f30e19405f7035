"""The few-example router and the unknown-task detector (issue 14).

A *support set* is a few unlabelled images per task. Their routing features (the first pass's MLP input at
the routing block(s), the same feature the data-free router reads) span, per task, a subspace; its top right
singular vectors replace the fc1-delta basis of MASS.md §3, so the residual ``‖x − Vᵀ V x‖`` and the same
fused routing op score it (a (G, T, k, D) basis). With ``centre`` the subspace is affine: each task's support
mean is subtracted from x first (the stacked op then runs with one task per stack entry, still one launch).

With ``whiten`` > 0 (``RouterConfig.whiten``) the features are first whitened by the support's pooled
within-task covariance, shrunk towards a scaled identity (:func:`whitener`): the residual is then measured in
units of how much the tasks' own images vary, per direction, instead of in raw feature units (the basis and
centres are fitted in the whitened coordinates; one (D, D) product per scored block before the same op).

The unknown-task detector divides the chosen task's residual by that task's *scale*: the largest residual of
its support images measured held out (leave-one-out for the support basis, so a fitted image does not vouch for
itself; plain residuals for the fc1 basis, which saw no image). ``score > unknown_threshold`` means "no task".
A whitened fit calibrates it instead: its score is the chosen task's squared whitened residual over the
held-out mean (pooled over tasks, per block), averaged over the blocks, divided by the ``1 − UNKNOWN_RATE``
split-conformal quantile of the same score of every support image held out (:func:`conformal_quantile`). So
at ``unknown_threshold=1`` an in-task image is flagged with probability about ``UNKNOWN_RATE`` (≤ it when the
held-out scores are exchangeable with a new image's), whatever the features' scale.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

import mass_kernels

DEFAULT_IMAGES = 32  # images per task the study recommends (docs/router_study.md)
DEFAULT_RANK = 1  # support_rank=None (chosen on validation images in docs/router_study.md); capped by N
MIN_IMAGES = 2
UNKNOWN_RATE = 0.02  # a whitened fit's detector flags about this share of in-task images at threshold 1


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
    (``RouterConfig.norm``; always ``"l2"`` for a support basis). ``whiten``: ``RouterConfig.whiten`` of the fit;
    when > 0, ``whitener`` (G, D, D) fp32 maps a feature x (row) to x @ W, basis and centre are in those
    coordinates, and ``scale`` is the unit of the *squared* residual (see the module docstring). Files saved
    before the option have neither: whiten 0."""

    basis: Optional[torch.Tensor]
    centre: Optional[torch.Tensor]
    scale: torch.Tensor
    layers: tuple
    features: str
    token: str
    n_images: int
    norm: str = "l2"
    whiten: float = 0.0
    whitener: Optional[torch.Tensor] = None

    def matches(self, router, layers: Sequence[int]) -> bool:
        """Whether this fit serves ``router`` (same features; for a support basis also its rank/centring)."""
        if tuple(layers) != self.layers or router.features != self.features or router.token != self.token:
            return False
        if router.basis == "fc1":
            return self.basis is None and router.norm == self.norm
        return self.basis is not None and (self.centre is not None) == router.centre and (
            router.support_rank is None or router.support_rank == self.basis.shape[2]) and router.whiten == self.whiten

    def tensors(self) -> dict:
        """The tensors to save (CPU, contiguous); :meth:`from_tensors` reads them back."""
        out = {"scale": self.scale}
        if self.basis is not None:
            out["basis"] = self.basis
        if self.centre is not None:
            out["centre"] = self.centre
        if self.whitener is not None:
            out["whitener"] = self.whitener
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def meta(self) -> dict:
        return {"layers": list(self.layers), "features": self.features, "token": self.token,
                "n_images": self.n_images, "norm": self.norm, "whiten": self.whiten}

    @staticmethod
    def from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> "SupportFit":
        return SupportFit(basis=tensors.get("basis"), centre=tensors.get("centre"), scale=tensors["scale"],
                          layers=tuple(int(l) for l in meta["layers"]), features=str(meta["features"]),
                          token=str(meta["token"]), n_images=int(meta["n_images"]), norm=str(meta.get("norm", "l2")),
                          whiten=float(meta.get("whiten", 0.0)), whitener=tensors.get("whitener"))

    def to(self, device) -> "SupportFit":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, basis=move(self.basis), centre=move(self.centre), scale=move(self.scale),
                                   whitener=move(self.whitener))


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
    """(G, N, D) features of one task → basis (G, rank, D) (top right singular vectors) and centre (G, D) or
    None, in fp64 for fp64 features, else fp32. ``rank`` must not exceed what the N images span (N, or N − 1
    centred)."""
    x = features if features.dtype == torch.float64 else features.float()
    mu = x.mean(1) if centre else None
    if centre:
        x = x - mu.unsqueeze(1)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:, :rank].contiguous(), mu


def max_rank(n_images: int, dim: int, centre: bool) -> int:
    return min(n_images - (1 if centre else 0), dim)


def residuals(x: torch.Tensor, basis: torch.Tensor, centre: Optional[torch.Tensor],
              whitener: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Residuals (G, B, T) of stacked features x (G, B, D) against a (G, T, k, D) basis, each task's centre
    (G, T, D) subtracted first when given, the features mapped to x @ W first when a whitener (G, D, D) is
    given. One ``routing_residuals`` launch either way."""
    if whitener is not None:
        x = torch.bmm(x.float(), whitener.float()).to(x.dtype)
    if centre is None:
        return mass_kernels.routing_residuals(x, basis.to(x.dtype))
    G, B, D = x.shape
    T, k = basis.shape[1], basis.shape[2]
    xc = (x.float().unsqueeze(1) - centre.float().unsqueeze(2)).to(x.dtype)  # (G, T, B, D)
    r = mass_kernels.routing_residuals(xc.reshape(G * T, B, D), basis.reshape(G * T, 1, k, D).to(x.dtype))
    return r.reshape(G, T, B).transpose(1, 2)


def pooled_scatter(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The within-task scatter Σ_t Σ_i (x_ti − μ_t)(x_ti − μ_t)ᵀ (G, D, D) of per-task features (G, N_t, D),
    fp64, and its degrees of freedom (Σ_t N_t − T)."""
    scatter, dof = 0, 0
    for f in features:
        xc = f.double() - f.double().mean(1, keepdim=True)
        scatter = scatter + xc.transpose(1, 2) @ xc
        dof += f.shape[1] - 1
    return scatter, dof


def whitener(scatter: torch.Tensor, dof: int, whiten: float) -> torch.Tensor:
    """W = C^(-1/2) (G, D, D), symmetric, fp64, for C = whiten · S / dof + (1 − whiten) · (tr(S / dof) / D) · I:
    the pooled within-task covariance shrunk towards the scaled identity of the same trace (so 0 < whiten < 1
    keeps every eigenvalue ≥ (1 − whiten) · tr / D > 0 with any number of images)."""
    cov = scatter / dof
    D = cov.shape[-1]
    level = cov.diagonal(dim1=-2, dim2=-1).sum(-1) / D  # (G,)
    if not bool((level > 0).all()):
        raise ValueError("the support images' routing features do not vary within any task: nothing to whiten by "
                         "(give distinct images, or RouterConfig(whiten=0))")
    eye = torch.eye(D, dtype=cov.dtype, device=cov.device)
    shrunk = whiten * cov + (1 - whiten) * level.view(-1, 1, 1) * eye
    e, U = torch.linalg.eigh(shrunk)
    return (U * e.rsqrt().unsqueeze(-2)) @ U.transpose(-1, -2)


def conformal_quantile(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """The ⌈(n + 1)(1 − rate)⌉-th smallest of n held-out scores: a new score exchangeable with them exceeds it
    with probability ≤ rate (split conformal). With fewer than 1 / rate − 1 scores no order statistic
    certifies the rate; the largest score is returned (the rate is then about 1 / (n + 1))."""
    n = scores.numel()
    k = min(math.ceil((n + 1) * (1 - rate)), n)
    return scores.flatten().sort().values[k - 1]


def fit(features: Mapping[str, torch.Tensor], tasks: Sequence[str], router, layers: Sequence[int],
        fc1_basis: torch.Tensor) -> SupportFit:
    """Fit the support router for ``router`` from per-task features (G, N, D): the basis (when
    ``router.basis == "support"``, whitened first when ``router.whiten`` > 0) and every task's held-out scale."""
    n = min(f.shape[1] for f in features.values())
    D = next(iter(features.values())).shape[-1]
    support_basis = router.basis == "support"
    basis = centre = None
    rank = 0
    if support_basis:
        limit = max_rank(n - 1, D, router.centre)  # the held-out fits see N − 1 images
        if limit < 1:
            raise ValueError(f"a centred support basis needs at least 3 images per task, got {n}")
        rank = DEFAULT_RANK if router.support_rank is None else router.support_rank
        if router.support_rank is not None and rank > limit:
            raise ValueError(f"support_rank={rank} exceeds what {n} images per task span held out "
                             f"({limit}{', centred' if router.centre else ''}): give more images or a lower rank")
        rank = min(rank, limit)
    if support_basis and router.whiten > 0:
        return _fit_whitened(features, tasks, router, layers, rank)
    if support_basis:
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


def _fit_whitened(features: Mapping[str, torch.Tensor], tasks: Sequence[str], router, layers: Sequence[int],
                  rank: int) -> SupportFit:
    """The whitened support fit (module docstring): whitener, basis and centres in whitened coordinates, and
    the detector's unit from every support image held out (its own image removed from the whitener too)."""
    xs = [features[t].double() for t in tasks]  # (G, N_t, D)
    scatter, dof = pooled_scatter(xs)
    W = whitener(scatter, dof, router.whiten)
    fits = [task_subspace(x @ W, rank, router.centre) for x in xs]
    d2 = torch.cat([_held_out_whitened(x, scatter, dof, router.whiten, rank, router.centre) for x in xs])
    unit = d2.mean(0).clamp_min(torch.finfo(torch.float32).tiny)  # (G,): mean held-out squared residual
    q = conformal_quantile((d2 / unit).mean(1), UNKNOWN_RATE)
    scale = (unit * q).float().unsqueeze(1).expand(-1, len(tasks)).contiguous()  # (G, T)
    return SupportFit(basis=torch.stack([b for b, _ in fits], 1).float(),
                      centre=torch.stack([c for _, c in fits], 1).float() if router.centre else None,
                      scale=scale, layers=tuple(layers), features=router.features, token=router.token,
                      n_images=min(x.shape[1] for x in xs), norm="l2", whiten=router.whiten, whitener=W.float())


def _held_out_whitened(x: torch.Tensor, scatter: torch.Tensor, dof: int, whiten: float, rank: int,
                       centre: bool) -> torch.Tensor:
    """(N, G) squared whitened residual of each image of one task (x: (G, N, D) fp64) against the fit without
    it: its task's rows, the pooled scatter (``scatter``, ``dof`` with it) and so the whitener all lose it.

    Without a factorisation per image: removing image i lowers the scatter by c·d dᵀ (d = x_i − μ, c = N/(N−1),
    exactly), so the held-out covariance is A − c' d dᵀ with A = (w/dof')·S + (1 − w)·level'·I diagonal in S's
    eigenbasis and c' = w·c/dof'; its inverse M is diagonal plus one rank-one term (Sherman–Morrison; A − c' d dᵀ
    is positive definite, so the denominator is > 0). A residual against the top-k right singular vectors of
    the whitened rows Z = R W (W Wᵀ = M) needs only M-inner products: with R M Rᵀ = U Λ Uᵀ,
    r² = y M yᵀ − Σ_j (u_jᵀ R M yᵀ)² / λ_j. Equal to whitening with M^(1/2) and an SVD (tests check it)."""
    G, N, D = x.shape
    lam, Q = torch.linalg.eigh(scatter)  # (G, D), (G, D, D): one factorisation per block for all images
    xq = x @ Q  # every feature in S's eigenbasis
    mu = xq.mean(1, keepdim=True)
    total = scatter.diagonal(dim1=-2, dim2=-1).sum(-1)  # (G,)
    c = N / (N - 1)
    out = []
    for i in range(N):
        d = xq[:, i] - mu[:, 0]  # (G, D)
        dof_i = dof - 1
        level = (total - c * d.square().sum(-1)) / dof_i / D  # (G,)
        a = (whiten / dof_i) * lam + (1 - whiten) * level.unsqueeze(-1)  # (G, D): A's diagonal
        cw = whiten * c / dof_i
        h = d / a
        k_sm = cw / (1 - cw * (d * h).sum(-1))  # (G,): M = diag(1/a) + k_sm·h hᵀ

        def inner(u, v):  # (G, m, D), (G, n, D) -> (G, m, n): u M vᵀ
            return (u / a.unsqueeze(1)) @ v.transpose(1, 2) + k_sm.view(G, 1, 1) * (u @ h.unsqueeze(-1)) @ (
                v @ h.unsqueeze(-1)).transpose(1, 2)

        rest = torch.cat([xq[:, :i], xq[:, i + 1:]], 1)  # (G, N−1, D)
        y = xq[:, i:i + 1]
        if centre:
            m = rest.mean(1, keepdim=True)
            rest, y = rest - m, y - m
        gram_val, gram_vec = torch.linalg.eigh(inner(rest, rest))  # ascending
        top_val, top_vec = gram_val[:, -rank:], gram_vec[:, :, -rank:]  # (G, k), (G, N−1, k)
        proj = (top_vec.transpose(1, 2) @ inner(rest, y))[..., 0]  # (G, k)
        safe = top_val > top_val.amax(-1, keepdim=True) * 1e-12  # a direction the rows do not span adds nothing
        r2 = inner(y, y)[:, 0, 0] - torch.where(safe, proj.square() / top_val.clamp_min(1e-300), 0).sum(-1)
        out.append(r2)
    return torch.stack(out)


def unknown_scores(res: torch.Tensor, chosen: torch.Tensor, scale: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """(B,) the chosen task's residual over its calibrated scale (``squared``: the squared residual, for a
    whitened fit), averaged over the scored blocks. res: (B, T) or (G, B, T); chosen: (B,) task ids; scale: (G, T)."""
    r = res if res.dim() == 3 else res.unsqueeze(0)
    idx = chosen.clamp_min(0).view(1, -1, 1).expand(r.shape[0], -1, 1)
    mine = r.float().gather(2, idx)[..., 0]  # (G, B)
    if squared:
        mine = mine.square()
    return (mine / scale.float().gather(1, idx[..., 0])).mean(0)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_support_dir(directory, preprocess, limit: Optional[int] = None) -> torch.Tensor:
    """(N, C, H, W) images of a folder (its image files at any depth, in sorted path order, at most ``limit``),
    each through ``preprocess`` (e.g. :class:`mass.evaluation.data.ClipPreprocess`): the support images of one task for
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
