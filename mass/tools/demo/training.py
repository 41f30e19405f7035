"""Per-task fine-tuning and caching of the demo's CLIP vision towers (the stand-in for T public checkpoints).

The pretrained model is the committed tiny two-tower CLIP of :mod:`mass.tools.demo.clip_pretrain` (trained
contrastively on captioned images, offline). As with real CLIP:

* **Heads** are zero-shot heads from the text tower, built with :func:`mass.zero_shot_heads` from each task's
  class names and prompt templates (:data:`mass.tools.demo.clip_pretrain.TASK_TEMPLATES`).
* **Fine-tuning** (what stands in for ``tanganke/clip-vit-base-patch32_<task>``): every weight of the vision
  tower is trained, the visual projection and the heads stay frozen, ``logits = logit_scale *
  normalize(image_embeds) @ head.T``; AdamW, linear warm-up then cosine decay, gradient clipping. The
  checkpoints are ``CLIPVisionModelWithProjection`` state dicts whose projection equals the pretrained one.

Checkpoints (per-task fine-tuned state dicts, heads) are saved with safetensors under
``~/.cache/mass-demo/<config-hash>/`` (or ``cache_dir``), written atomically, so that a second
:func:`prepare_demo` with the same config loads instead of training.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mass.nn.clip import vision_encoder
from mass.evaluation.heads import zero_shot_heads
from mass.nn.model import extract_embedding
from mass.storage.serialization import atomic_write

from . import clip_pretrain
from .schedule import warmup_cosine
from .tasks import Task, make_tasks

CACHE_VERSION = 3  # bump when the training recipe changes in a way the config does not capture


@dataclass(frozen=True)
class DemoConfig:
    router_block: int = 4  # block L whose MLP input the router reads (~3/4 depth, like 9 of 12)
    # data
    n_tasks: int = 8
    n_train: int = 4000
    n_test: int = 500
    seed: int = 0
    # fine-tuning
    finetune_steps: int = 400
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
    finetune_wd: float = 0.1
    warmup_frac: float = 0.1
    logit_scale: float = 100.0
    quick: bool = False
    pretrained_sha256: str = ""  # of the pretrained CLIP weights (part of the cache key)

    @staticmethod
    def make(quick: bool = False, n_tasks: int = 8, seed: int = 0, **overrides) -> "DemoConfig":
        base = dict(n_tasks=n_tasks, seed=seed, quick=quick)
        if quick:
            base.update(n_train=240, n_test=120, finetune_steps=20, finetune_batch=32)
        base.update(overrides)
        return DemoConfig(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        blob = json.dumps({"v": CACHE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class DemoArtifacts:
    clip: nn.Module  # the pretrained two-tower CLIPModel, eval mode
    tokenizer: object
    pretrained: nn.Module  # its vision tower with the projection (CLIPVisionModelWithProjection), eval mode
    finetuned: Dict[str, Dict[str, torch.Tensor]]  # task -> state dict (same keys as pretrained.state_dict())
    heads: Dict[str, torch.Tensor]  # task -> (C_t, D) zero-shot head, rows L2-normalised
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
        m = copy.deepcopy(self.pretrained)
        m.load_state_dict(self.finetuned[task])
        return m.eval()


# ----------------------------------------------------------------------------------------------------------
# model helpers
# ----------------------------------------------------------------------------------------------------------

def vision_tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings/encoder/post_layernorm``."""
    return getattr(model, "vision_model", model)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return vision_tower(model).encoder.layers


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image embedding (B, D) in the text space: ``image_embeds`` of a ``CLIPVisionModelWithProjection``."""
    return extract_embedding(model(pixel_values=images))


ForwardFn = Callable[[torch.Tensor], torch.Tensor]


def _as_forward(model_or_fn: Union[nn.Module, ForwardFn]) -> ForwardFn:
    if isinstance(model_or_fn, nn.Module):
        return lambda x: embed(model_or_fn, x)
    return model_or_fn


@torch.no_grad()
def evaluate(model_or_fn: Union[nn.Module, ForwardFn], task: Task, head: torch.Tensor, batch_size: int = 256,
             split: str = "test") -> float:
    """Accuracy of ``argmax normalize(forward(x)) @ head.T`` on the task's test (or train) split.

    ``model_or_fn``: a vision model (its image embedding is used) or any callable images -> (B, D)."""
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


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------

def finetune(cfg: DemoConfig, pretrained: nn.Module, task: Task, head: torch.Tensor, seed: int,
             progress: bool = True) -> Dict[str, torch.Tensor]:
    """Full fine-tuning of the vision tower (projection and head frozen); returns the state dict."""
    model = copy.deepcopy(pretrained)
    model.train()
    params = list(vision_tower(model).parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.finetune_wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.finetune_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.finetune_steps, cfg.warmup_frac))
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
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _ft_path(d: Path, name: str) -> Path:
    return d / f"finetuned_{name}.safetensors"


# ----------------------------------------------------------------------------------------------------------
# top level
# ----------------------------------------------------------------------------------------------------------

def prepare_demo(cache_dir: Optional[Union[str, Path]] = None, quick: bool = False, n_tasks: int = 8, seed: int = 0,
                 config: Optional[DemoConfig] = None, progress: bool = True, verbose: bool = True,
                 num_threads: Optional[int] = None, pretrained_dir: Optional[Union[str, Path]] = None,
                 cache_root: Optional[Union[str, Path]] = None) -> DemoArtifacts:
    """Tasks + the pretrained CLIP + its zero-shot heads + one fine-tuned vision tower per task, cached.

    ``cache_dir``: the directory for *this* config's files (default ``<cache_root>/<config-hash>/``, with
    ``cache_root`` defaulting to ``~/.cache/mass-demo`` or ``$MASS_DEMO_CACHE``).
    Whatever is already there (heads, fine-tuned models) is loaded, the rest is computed and saved.
    ``pretrained_dir``: the pretrained CLIP (default: the committed :data:`clip_pretrain.ASSET_DIR`).
    ``num_threads``: torch threads while preparing (default :func:`auto_num_threads`; restored afterwards).
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads or auto_num_threads())
    try:
        return _prepare_demo(cache_dir, quick, n_tasks, seed, config, progress, verbose, pretrained_dir, cache_root)
    finally:
        torch.set_num_threads(prev_threads)


def _prepare_demo(cache_dir, quick, n_tasks, seed, config, progress, verbose, pretrained_dir,
                  cache_root) -> DemoArtifacts:
    clip, tokenizer = clip_pretrain.load_asset(pretrained_dir)
    sha = clip_pretrain.weights_sha256(pretrained_dir)
    cfg = config or DemoConfig.make(quick=quick, n_tasks=n_tasks, seed=seed)
    cfg = dataclasses.replace(cfg, pretrained_sha256=sha)
    d = Path(cache_dir) if cache_dir is not None else Path(cache_root or default_cache_root()) / cfg.hash()
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
    pretrained = vision_encoder(clip).eval()

    heads_path = d / "heads.safetensors"
    heads: Dict[str, torch.Tensor] = load_file(heads_path) if heads_path.exists() else {}
    if any(t.name not in heads for t in tasks):
        made = zero_shot_heads(clip, tokenizer, {t.name: t.class_names for t in tasks},
                               templates={t.name: clip_pretrain.TASK_TEMPLATES[t.name] for t in tasks})
        heads = made.as_tensors()
        _atomic_save(heads, heads_path)

    finetuned: Dict[str, Dict[str, torch.Tensor]] = {}
    metrics: Dict[str, Dict[str, float]] = meta.get("metrics", {})
    for i, t in enumerate(tasks):
        p = _ft_path(d, t.name)
        if p.exists():
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
        ft = copy.deepcopy(pretrained)
        ft.load_state_dict(finetuned[t.name])
        metrics[t.name] = {"pretrained_acc": evaluate(pretrained, t, heads[t.name]),
                           "finetuned_acc": evaluate(ft.eval(), t, heads[t.name])}
        log(f"[mass.demo] {t.name:14s} zero-shot {metrics[t.name]['pretrained_acc']:.3f}  "
            f"fine-tuned {metrics[t.name]['finetuned_acc']:.3f}"
            + (f"  ({timings[f'finetune/{t.name}']:.1f}s)" if f"finetune/{t.name}" in timings else ""))
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    if trained_anything:
        meta["timings"] = timings
    meta.update(config=cfg.to_dict(), metrics=metrics, cache_version=CACHE_VERSION)
    _atomic_write_text(json.dumps(meta, indent=1), meta_path)
    log(f"[mass.demo] ready in {timings['total']:.1f}s" + ("" if trained_anything else " (all from cache)"))
    return DemoArtifacts(clip=clip, tokenizer=tokenizer, pretrained=pretrained, finetuned=finetuned, heads=heads,
                         tasks=tasks, config=cfg, cache_dir=d, metrics=metrics,
                         timings=meta.get("timings", timings), loaded_from_cache=not trained_anything)
