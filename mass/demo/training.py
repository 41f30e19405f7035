"""Pretraining, per-task fine-tuning and caching of the demo's small CLIP-style vision encoders.

This is the offline stand-in for "T CLIP ViTs fine-tuned from one pretrained CLIP": nothing can be downloaded,
so a small ``transformers.CLIPVisionModel`` (the real HF module tree: ``embeddings``, ``pre_layrnorm``,
``encoder.layers[i].{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}``,
``post_layernorm``) is trained here, on 2 CPU cores, in a few minutes.

Pretraining (what stands in for CLIP's web-scale pretraining)
    Data: :func:`mass.demo.tasks.make_pretrain_pool` -- fresh samples of *all 12* generator families (also the
    ones that are not among the ``n_tasks`` benchmark tasks) plus random crops of the two photos shipped with
    scikit-learn, drawn from a seed stream disjoint from every task's train and test split (``digits``: only
    source digits that are never used for testing). No test image is ever seen.
    Objective (exact): supervised multi-task classification of the pooled embedding (``pooler_output``) by two
    linear heads that are discarded afterwards,
        loss = CE(family head: which of the 13 families -- the "kind of image" -- the sample comes from)
             + CE(concept head: the sample's (family, class) pair among all 108 pairs of the 12 generator
               families; photo crops have no class and are ignored by this term),
    for ``pretrain_steps`` AdamW steps (short: the pretrained model knows the concepts only partly, as CLIP's
    zero-shot heads do -- measure it with the prototype heads).
    This is *not* a label-free pretext: it stands in for CLIP having seen images like these with text about
    them. Why: the MASS router can only tell tasks apart if the backbone's features already separate the domains
    (a rotation-only pretext routed at chance in MASS.md section 7), and with family + rotation only (measured:
    rotation barely learned, 0.32 train accuracy), full fine-tuning of this small ViT for a few hundred steps
    reached only 0.14-0.49 test accuracy on 4 of 8 tasks (train accuracy ~0.6 on digits/shapes at 300 steps):
    the backbone must carry generic concept features for fine-tuning to converge in the budget, as CLIP's do.

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

from mass.serialization import atomic_write

from .tasks import Task, make_pretrain_pool, make_tasks, normalize_uint8

CACHE_VERSION = 2  # bump when the training recipe changes in a way the config does not capture


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
    pretrain_steps: int = 500
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    pretrain_wd: float = 0.05
    # fine-tuning
    finetune_steps: int = 200
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
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


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------

def pretrain(cfg: DemoConfig, pool_images: np.ndarray, pool_families: np.ndarray, pool_classes: np.ndarray,
             family_names: Tuple[str, ...], progress: bool = True) -> Tuple[nn.Module, Dict[str, float]]:
    """Family + (family, class) concept classification on the pretraining pool. See the module docstring."""
    from .tasks import TASK_SPECS

    model = build_model(cfg, seed=cfg.seed)
    d = cfg.hidden_size
    n_cls = {s.name: len(s.class_names) for s in TASK_SPECS}
    offsets, off = {}, 0
    for name in family_names:
        if name in n_cls:
            offsets[name] = off
            off += n_cls[name]
    fam_off = np.array([offsets.get(n, 0) for n in family_names])
    concept = np.where(pool_classes >= 0, fam_off[pool_families] + pool_classes, -100)
    fam_head = nn.Linear(d, len(family_names))
    con_head = nn.Linear(d, off)
    params = list(model.parameters()) + list(fam_head.parameters()) + list(con_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.pretrain_wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.pretrain_steps, 0.05))
    g = torch.Generator().manual_seed(cfg.seed + 101)
    x_all = torch.from_numpy(pool_images)  # uint8 (N, H, W, 3); normalised per batch
    y_all = torch.from_numpy(pool_families)
    c_all = torch.from_numpy(concept)
    n = len(y_all)
    model.train()
    ema_f = ema_c = None
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, n, (cfg.pretrain_batch,), generator=g)
        x, y, c = normalize_uint8(x_all[idx]), y_all[idx], c_all[idx]
        e = embed(model, x)
        lf, lc = fam_head(e), con_head(e)
        loss = F.cross_entropy(lf, y) + F.cross_entropy(lc, c, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        fa = lf.argmax(-1).eq(y).float().mean().item()
        m = c >= 0
        ca = lc[m].argmax(-1).eq(c[m]).float().mean().item() if m.any() else 0.0
        ema_f = fa if ema_f is None else 0.95 * ema_f + 0.05 * fa
        ema_c = ca if ema_c is None else 0.95 * ema_c + 0.05 * ca
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", fam=f"{ema_f:.2f}", concept=f"{ema_c:.2f}")
    return model.eval(), {"fam_acc": float(ema_f or 0), "concept_acc": float(ema_c or 0)}


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
        pool_x, pool_y, pool_c, fams = make_pretrain_pool(cfg.pretrain_per_family, seed=cfg.seed)
        timings["pretrain_data"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pretrained, stats = pretrain(cfg, pool_x, pool_y, pool_c, fams, progress=progress)
        timings["pretrain"] = time.perf_counter() - t0
        del pool_x
        meta["pretrain"] = {"families": list(fams), "n_images": int(len(pool_y)), **stats}
        _atomic_save(pretrained.state_dict(), pre_path, {"config": json.dumps(cfg.to_dict())})
        trained_anything = True
        log(f"[mass.demo] pretrained in {timings['pretrain']:.1f}s (+{timings['pretrain_data']:.1f}s data): "
            f"train-batch family acc {stats['fam_acc']:.2f}, concept acc {stats['concept_acc']:.2f}")

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
