"""Pretraining, per-task fine-tuning and caching of the demo's small CLIP-style vision encoders.

This is the offline stand-in for "T CLIP ViTs fine-tuned from one pretrained CLIP": nothing can be downloaded,
so a small ``transformers.CLIPVisionModel`` (the real HF module tree: ``embeddings``, ``pre_layrnorm``,
``encoder.layers[i].{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}``,
``post_layernorm``) is trained here, on 2 CPU cores, in a few minutes.

Pretraining (what stands in for CLIP's web-scale pretraining)
    Data: :func:`mass.demo.tasks.make_pretrain_pool` -- fresh samples of *all 12* generator families (also the
    ones that are not among the ``n_tasks`` benchmark tasks) plus random crops of the two photos shipped with
    scikit-learn, drawn from a seed stream disjoint from every task's train and test split (``digits``: only
    source digits that are never used for testing). No task class label is ever used.
    Objective (exact): a multi-task classification of the pooled embedding (``pooler_output``) by two
    linear heads that are discarded afterwards,
        loss = CE(family head, which generator family / "kind of image" the sample comes from, 13-way)
             + CE(rotation head, which of 0/90/180/270 degrees the image was rotated by, 4-way),
    with each image rotated by a uniformly drawn multiple of 90 degrees (and randomly h-flipped before that).
    Why this objective: the MASS router can only tell tasks apart if the backbone's features already separate
    the domains, as CLIP's do. A rotation-only pretext (features blind to the kind of image) routed at chance in
    an earlier measurement (see MASS.md section 7); recognising the kind of image is what a broad pretraining
    mixture gives CLIP for free. It also makes routing on this benchmark easier than it would be with a
    domain-blind backbone -- that is the assumption MASS itself makes about CLIP, stated here openly.

Fine-tuning (what stands in for the paper's per-task fine-tuned checkpoints)
    All encoder weights are trained (full fine-tuning), the classification head is *frozen*, as CLIP's zero-shot
    text heads are: ``head[c] = normalize(mean of the pretrained model's pooled embeddings of a few training
    images of class c)``, and ``logits = logit_scale * normalize(pooler_output) @ head.T``. AdamW, linear
    warm-up then cosine decay, gradient clipping.

Checkpoints (pretrained, per-task fine-tuned state dicts, heads) are saved with safetensors under
``~/.cache/mass-demo/<config-hash>/`` (or ``cache_dir``), written atomically (temp file + ``os.replace``), so a
second :func:`prepare_demo` with the same config loads instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .tasks import Task, make_pretrain_pool, make_tasks, normalize_uint8

CACHE_VERSION = 1  # bump when the training recipe changes in a way the config does not capture


@dataclass(frozen=True)
class DemoConfig:
    # model (transformers.CLIPVisionConfig)
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 6
    num_heads: int = 4
    router_block: int = 4  # block L whose MLP input the router reads (~3/4 depth, like 9 of 12)
    # data
    n_tasks: int = 8
    n_train: int = 2000
    n_test: int = 500
    seed: int = 0
    # pretraining
    pretrain_per_family: int = 1500
    pretrain_steps: int = 600
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    pretrain_wd: float = 0.05
    # fine-tuning
    finetune_steps: int = 200
    finetune_batch: int = 64
    finetune_lr: float = 2e-4
    finetune_wd: float = 0.1
    warmup_frac: float = 0.1
    logit_scale: float = 100.0
    n_proto_per_class: int = 16
    quick: bool = False

    @staticmethod
    def make(quick: bool = False, n_tasks: int = 8, seed: int = 0, **overrides) -> "DemoConfig":
        base = dict(n_tasks=n_tasks, seed=seed, quick=quick)
        if quick:
            base.update(hidden_size=64, intermediate_size=256, n_train=240, n_test=120, pretrain_per_family=160,
                        pretrain_steps=40, pretrain_batch=64, finetune_steps=20, finetune_batch=32,
                        n_proto_per_class=8)
        base.update(overrides)
        return DemoConfig(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        blob = json.dumps({"v": CACHE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def clip_config(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(image_size=self.image_size, patch_size=self.patch_size, num_channels=3,
                                hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                                num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads)


@dataclass
class DemoArtifacts:
    pretrained: nn.Module  # transformers.CLIPVisionModel, eval mode
    finetuned: Dict[str, Dict[str, torch.Tensor]]  # task -> state dict (same keys as pretrained.state_dict())
    heads: Dict[str, torch.Tensor]  # task -> (C_t, D), rows L2-normalised
    tasks: List[Task]
    config: DemoConfig
    cache_dir: Path
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)  # task -> {pretrained_acc, finetuned_acc}
    timings: Dict[str, float] = field(default_factory=dict)  # seconds, of the run that trained (from meta.json)
    loaded_from_cache: bool = False

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    def finetuned_model(self, task: str) -> nn.Module:
        m = build_model(self.config)
        m.load_state_dict(self.finetuned[task])
        return m.eval()


# ----------------------------------------------------------------------------------------------------------
# model helpers
# ----------------------------------------------------------------------------------------------------------

def build_model(cfg: DemoConfig, seed: Optional[int] = None) -> nn.Module:
    from transformers import CLIPVisionModel

    if seed is not None:
        torch.manual_seed(seed)
    return CLIPVisionModel(cfg.clip_config())


def vision_tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings/encoder/post_layernorm`` (transformers 5 flattened CLIPVisionModel)."""
    return getattr(model, "vision_model", model)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return vision_tower(model).encoder.layers


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled embedding (B, D): ``post_layernorm(CLS)``, i.e. ``CLIPVisionModel(...).pooler_output``."""
    return model(pixel_values=images).pooler_output


ForwardFn = Callable[[torch.Tensor], torch.Tensor]


def _as_forward(model_or_fn: Union[nn.Module, ForwardFn]) -> ForwardFn:
    if isinstance(model_or_fn, nn.Module):
        return lambda x: embed(model_or_fn, x)
    return model_or_fn


@torch.no_grad()
def embed_all(model_or_fn, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    fwd = _as_forward(model_or_fn)
    if isinstance(model_or_fn, nn.Module):
        model_or_fn.eval()
    return torch.cat([fwd(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def evaluate(model_or_fn: Union[nn.Module, ForwardFn], task: Task, head: torch.Tensor, batch_size: int = 256,
             split: str = "test") -> float:
    """Accuracy of ``argmax normalize(forward(x)) @ head.T`` on the task's test (or train) split.

    ``model_or_fn``: a CLIPVisionModel (its ``pooler_output`` is used) or any callable images -> (B, D)."""
    x = task.test_images if split == "test" else task.train_images
    y = task.test_labels if split == "test" else task.train_labels
    fwd = _as_forward(model_or_fn)
    if isinstance(model_or_fn, nn.Module):
        model_or_fn.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        e = F.normalize(fwd(x[i:i + batch_size]).float(), dim=-1)
        correct += (e @ head.T.float()).argmax(-1).eq(y[i:i + batch_size]).sum().item()
    return correct / len(x)


@torch.no_grad()
def prototype_head(model: nn.Module, task: Task, n_per_class: int) -> torch.Tensor:
    """Frozen zero-shot-like head: L2-normalised mean pooled embedding of the first ``n_per_class`` training
    images of each class (pretrained model). Shape (C, D)."""
    rows = []
    for c in range(task.num_classes):
        idx = torch.nonzero(task.train_labels == c).flatten()[:n_per_class]
        rows.append(embed_all(model, task.train_images[idx]).mean(0))
    return F.normalize(torch.stack(rows), dim=-1)


def _lr_lambda(total: int, warmup_frac: float):
    warm = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


def _rotate_batch(x: torch.Tensor, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random h-flip, then rotation by k*90 degrees; returns (images, k)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    k = torch.randint(0, 4, (b,), generator=g)
    out = x.clone()
    for r in range(1, 4):
        m = k == r
        if m.any():
            out[m] = torch.rot90(x[m], r, dims=(-2, -1))
    return out, k


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------

def pretrain(cfg: DemoConfig, pool_images: np.ndarray, pool_families: np.ndarray, n_families: int,
             progress: bool = True) -> Tuple[nn.Module, Dict[str, float]]:
    """Family (kind-of-image) + rotation classification on the pretraining pool. See the module docstring."""
    model = build_model(cfg, seed=cfg.seed)
    d = cfg.hidden_size
    fam_head = nn.Linear(d, n_families)
    rot_head = nn.Linear(d, 4)
    params = list(model.parameters()) + list(fam_head.parameters()) + list(rot_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.pretrain_wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.pretrain_steps, 0.05))
    g = torch.Generator().manual_seed(cfg.seed + 101)
    x_all = torch.from_numpy(pool_images)  # uint8 (N, H, W, 3); normalised per batch
    y_all = torch.from_numpy(pool_families)
    n = len(y_all)
    model.train()
    stats = {"fam_acc": 0.0, "rot_acc": 0.0}
    ema_f = ema_r = None
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, n, (cfg.pretrain_batch,), generator=g)
        x, k = _rotate_batch(normalize_uint8(x_all[idx]), g)
        y = y_all[idx]
        e = embed(model, x)
        lf, lr_ = fam_head(e), rot_head(e)
        loss = F.cross_entropy(lf, y) + F.cross_entropy(lr_, k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        fa = lf.argmax(-1).eq(y).float().mean().item()
        ra = lr_.argmax(-1).eq(k).float().mean().item()
        ema_f = fa if ema_f is None else 0.95 * ema_f + 0.05 * fa
        ema_r = ra if ema_r is None else 0.95 * ema_r + 0.05 * ra
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", fam=f"{ema_f:.2f}", rot=f"{ema_r:.2f}")
    stats.update(fam_acc=float(ema_f or 0), rot_acc=float(ema_r or 0))
    return model.eval(), stats


def finetune(cfg: DemoConfig, pretrained: nn.Module, task: Task, head: torch.Tensor, seed: int,
             progress: bool = True) -> Dict[str, torch.Tensor]:
    """Full fine-tuning of the encoder with the frozen head; returns the fine-tuned state dict."""
    model = build_model(cfg)
    model.load_state_dict(pretrained.state_dict())
    model.train()
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.finetune_wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.finetune_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.finetune_steps, cfg.warmup_frac))
    g = torch.Generator().manual_seed(seed)
    head = head.detach()
    n = len(task.train_labels)
    bar = tqdm(range(cfg.finetune_steps), desc=f"finetune {task.name}", disable=not progress, leave=False)
    ema = None
    for step in bar:
        idx = torch.randint(0, n, (cfg.finetune_batch,), generator=g)
        x, y = task.train_images[idx], task.train_labels[idx]
        logits = cfg.logit_scale * F.normalize(embed(model, x), dim=-1) @ head.T
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        a = logits.argmax(-1).eq(y).float().mean().item()
        ema = a if ema is None else 0.9 * ema + 0.1 * a
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{ema:.2f}")
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------------------

def auto_num_threads() -> int:
    """Torch threads for the demo: the cores not already busy (1-minute load average), at least 1.

    ``MASS_DEMO_THREADS`` overrides. Rationale (measured on a shared 2-core machine): with the other core busy,
    2 OpenMP threads made a fine-tuning run 5-40x slower than 1 thread (threads wait on each other at every
    op), while on idle cores 2 threads are ~1.6x faster than 1."""
    env = os.environ.get("MASS_DEMO_THREADS")
    if env:
        return max(1, int(env))
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        busy = 0.0
    return int(max(1, min(n, round(n - busy))))


def default_cache_root() -> Path:
    return Path(os.environ.get("MASS_DEMO_CACHE", Path.home() / ".cache" / "mass-demo"))


def _atomic_save(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _ft_path(d: Path, name: str) -> Path:
    return d / f"finetuned_{name}.safetensors"


# ----------------------------------------------------------------------------------------------------------
# top level
# ----------------------------------------------------------------------------------------------------------

def prepare_demo(cache_dir: Optional[Union[str, Path]] = None, quick: bool = False, n_tasks: int = 8, seed: int = 0,
                 config: Optional[DemoConfig] = None, progress: bool = True, verbose: bool = True,
                 num_threads: Optional[int] = None) -> DemoArtifacts:
    """Tasks + pretrained encoder + one fully fine-tuned encoder (and frozen head) per task, cached.

    ``cache_dir``: the directory for *this* config's files (default ``~/.cache/mass-demo/<config-hash>/``).
    Whatever is already there (pretrained model, heads, fine-tuned models) is loaded, the rest is trained and
    saved. The pretrained model and the per-task accuracies are returned in ``DemoArtifacts``.
    ``num_threads``: torch threads while preparing (default :func:`auto_num_threads`; restored afterwards).
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads or auto_num_threads())
    try:
        return _prepare_demo(cache_dir, quick, n_tasks, seed, config, progress, verbose)
    finally:
        torch.set_num_threads(prev_threads)


def _prepare_demo(cache_dir, quick, n_tasks, seed, config, progress, verbose) -> DemoArtifacts:
    cfg = config or DemoConfig.make(quick=quick, n_tasks=n_tasks, seed=seed)
    d = Path(cache_dir) if cache_dir is not None else default_cache_root() / cfg.hash()
    d.mkdir(parents=True, exist_ok=True)
    log = print if verbose else (lambda *a, **k: None)
    timings: Dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    tasks = make_tasks(cfg.n_tasks, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    timings["task_generation"] = time.perf_counter() - t0
    timings["torch_threads"] = torch.get_num_threads()
    log(f"[mass.demo] {len(tasks)} tasks generated in {timings['task_generation']:.1f}s; cache: {d}")

    meta_path = d / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    trained_anything = False

    pre_path = d / "pretrained.safetensors"
    pretrained = build_model(cfg)
    fresh_pretrain = not pre_path.exists()
    if not fresh_pretrain:
        pretrained.load_state_dict(load_file(pre_path))
        pretrained.eval()
    else:
        t0 = time.perf_counter()
        pool_x, pool_y, fams = make_pretrain_pool(cfg.pretrain_per_family, seed=cfg.seed)
        timings["pretrain_data"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pretrained, stats = pretrain(cfg, pool_x, pool_y, len(fams), progress=progress)
        timings["pretrain"] = time.perf_counter() - t0
        del pool_x
        meta["pretrain"] = {"families": list(fams), "n_images": int(len(pool_y)), **stats}
        _atomic_save(pretrained.state_dict(), pre_path, {"config": json.dumps(cfg.to_dict())})
        trained_anything = True
        log(f"[mass.demo] pretrained in {timings['pretrain']:.1f}s (+{timings['pretrain_data']:.1f}s data): "
            f"train-batch family acc {stats['fam_acc']:.2f}, rotation acc {stats['rot_acc']:.2f}")

    heads_path = d / "heads.safetensors"
    # anything derived from an older pretrained model is stale when the pretrained model was just trained
    heads: Dict[str, torch.Tensor] = load_file(heads_path) if heads_path.exists() and not fresh_pretrain else {}
    if any(t.name not in heads for t in tasks):
        for t in tasks:
            heads[t.name] = prototype_head(pretrained, t, cfg.n_proto_per_class)
        _atomic_save(heads, heads_path)

    finetuned: Dict[str, Dict[str, torch.Tensor]] = {}
    metrics: Dict[str, Dict[str, float]] = {} if fresh_pretrain else meta.get("metrics", {})
    for i, t in enumerate(tasks):
        p = _ft_path(d, t.name)
        if p.exists() and not fresh_pretrain:
            finetuned[t.name] = load_file(p)
            continue
        t0 = time.perf_counter()
        sd = finetune(cfg, pretrained, t, heads[t.name], seed=cfg.seed * 1000 + 7 + i, progress=progress)
        timings[f"finetune/{t.name}"] = time.perf_counter() - t0
        _atomic_save(sd, p)
        finetuned[t.name] = sd
        trained_anything = True
        metrics.pop(t.name, None)

    t0 = time.perf_counter()
    for t in tasks:
        if t.name in metrics:
            continue
        ft = build_model(cfg)
        ft.load_state_dict(finetuned[t.name])
        metrics[t.name] = {"pretrained_acc": evaluate(pretrained, t, heads[t.name]),
                           "finetuned_acc": evaluate(ft.eval(), t, heads[t.name])}
        log(f"[mass.demo] {t.name:14s} pretrained+head {metrics[t.name]['pretrained_acc']:.3f}  "
            f"fine-tuned {metrics[t.name]['finetuned_acc']:.3f}"
            + (f"  ({timings[f'finetune/{t.name}']:.1f}s)" if f"finetune/{t.name}" in timings else ""))
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    if trained_anything:
        meta["timings"] = timings
    meta.update(config=cfg.to_dict(), metrics=metrics, cache_version=CACHE_VERSION)
    _atomic_write_text(json.dumps(meta, indent=1), meta_path)
    log(f"[mass.demo] ready in {timings['total']:.1f}s" + ("" if trained_anything else " (all from cache)"))
    return DemoArtifacts(pretrained=pretrained.eval(), finetuned=finetuned, heads=heads, tasks=tasks, config=cfg,
                         cache_dir=d, metrics=metrics, timings=meta.get("timings", timings),
                         loaded_from_cache=not trained_anything)
