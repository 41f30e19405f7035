"""The paper's table on your checkpoints and data: ``evaluate(pretrained, finetuned, data, heads) -> EvalResult``.

Rows: each fine-tuned model on its own task (``individual``, the upper bound), the pretrained model
(``zero_shot``), the static merges (``task_arithmetic`` λ = 0.3, ``ties``, ``tsv``), MASS with each router asked
for (``mass[<router>]``) and MASS with every sample's own task forced (``mass_oracle``: what the low-rank blocks
keep when routing is right). Static models get each task's own head (the task is known). A MASS sample counts as
correct only if its prediction comes from its own task's head: a sample routed away (or flagged as no task by
the unknown-task detector) is wrong. Every task's data is read once; all models see the same batches.

Routers that need a few unlabelled images per task (``basis="support"``, e.g. ``"few-example"``, or the
unknown-task detector) are calibrated on ``support_per_task`` images of each task: drawn from ``support_data``
(e.g. the training split) when given, else a seeded random draw from the evaluation data itself, which is then
left out of *every* row, so no evaluated image is ever used for calibration.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mass.files.checkpoints import Checkpoint, open_finetuned
from mass.nn.clip import prepare
from mass.method.half_banks import resolve_bank_dtype, to_bank_dtype
from mass.method.decompose import Rank, decompose
from mass.evaluation.heads import head_tensors
from mass.method.merging import task_arithmetic, ties_merging, tsv_merge_from_decomposition
from mass.nn.model import MASSModel, extract_embedding
from mass.method.router import RouterConfig
from mass.method.support import DEFAULT_IMAGES, MIN_IMAGES

STATIC_METHODS = ("individual", "zero_shot", "task_arithmetic", "ties", "tsv")
METHODS = STATIC_METHODS + ("mass", "mass_oracle")
ROUTERS = {
    "paper": RouterConfig,  # top-k over the TSV-M model's features, block 3/4 deep (MASS.md defaults)
    "top1": lambda: RouterConfig(mode="top1"),
    "recommended": RouterConfig.recommended,  # θ0's features, top-1 (docs/router_study.md)
    "energy": lambda: RouterConfig.recommended(norm="energy"),  # the same, scores calibrated per task, no data
    "few-example": RouterConfig.few_example,  # a support-set basis from a few unlabelled images per task
    "fast": RouterConfig.fast,  # the same at an early block: the cheapest within 0.5 point (issue 25)
}
SUPPORT_SEED = 0  # the draw of support images from the evaluation data (when no support_data is given)


def needs_support(config: RouterConfig) -> bool:
    """Whether a router must be calibrated on support images (a support basis or the unknown-task detector)."""
    return config.basis == "support" or config.unknown != "off"


def support_indices(n_samples: int, n: int, seed: int = SUPPORT_SEED) -> list[int]:
    """The ``n`` samples (sorted indices) of a task's data that serve as its support images: a seeded random draw
    (data are often sorted by class, so the first ``n`` would be one class). Their labels are never read."""
    if n < MIN_IMAGES:
        raise ValueError(f"at least {MIN_IMAGES} support images per task are needed, got {n}")
    if n > n_samples:
        raise ValueError(f"cannot draw {n} support images from a task of {n_samples} samples")
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:n].tolist())


def take_support(data: Mapping, support_data: Optional[Mapping], tasks: Sequence[str], n: int):
    """``({task: (n, C, H, W) support images}, {task: dataset evaluated}, where they came from)``: drawn from
    ``support_data`` when given (``data`` is then evaluated whole), else from ``data``, whose evaluated part
    then leaves them out."""
    support, evaluated = {}, dict(data)
    for task in tasks:
        source = data[task] if support_data is None else support_data[task]
        picked = support_indices(len(source), n)
        if support_data is None:
            left = sorted(set(range(len(source))) - set(picked))
            if not left:
                raise ValueError(f"task {task!r}: {n} support images leave nothing to evaluate of its {len(source)} "
                                 f"samples: lower support_per_task or give support_data (e.g. the training split)")
            evaluated[task] = torch.utils.data.Subset(source, left)
        support[task] = torch.stack([torch.as_tensor(source[i][0]) for i in picked]).float()
    where = (f"{n} images per task drawn (seed {SUPPORT_SEED}) from " +
             ("the support data" if support_data is not None else "the evaluation data, then left out of every row"))
    return support, evaluated, where


def resolve_routers(routers) -> dict[str, RouterConfig]:
    """``None`` → the paper's router; names from :data:`ROUTERS`; or ``{name: RouterConfig}``."""
    if routers is None:
        routers = ["paper"]
    if isinstance(routers, str):
        routers = [routers]
    if isinstance(routers, Mapping):
        bad = {k: type(v).__name__ for k, v in routers.items() if not isinstance(v, RouterConfig)}
        if bad:
            raise TypeError(f"routers must map names to RouterConfig, got {bad}")
        if not routers:
            raise ValueError("routers names no router: give {name: RouterConfig} with at least one entry")
        return dict(routers)
    if not routers:
        raise ValueError(f"routers names no router: give some of {sorted(ROUTERS)} (or {{name: RouterConfig}})")
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; known: {sorted(ROUTERS)} (or pass {{name: RouterConfig}})")
    return {r: ROUTERS[r]() for r in routers}


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


@dataclass
class EvalResult:
    """Accuracies per method and task (fractions), routing per router, storage and latency."""

    tasks: list[str]
    rows: list[str]
    accuracy: dict[str, dict[str, float]]
    samples: dict[str, int]
    routing_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)  # router -> [true task][routed task]
    unknown_rate: dict[str, dict[str, float]] = field(default_factory=dict)  # router (detector on) -> task -> flagged
    storage_factor: Optional[float] = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # router -> plain_ms, mass_ms, ratio
    config: dict = field(default_factory=dict)

    def normalized(self) -> dict[str, dict[str, float]]:
        """Per row and task: accuracy / the individual model's accuracy (empty without the individual row)."""
        if "individual" not in self.accuracy:
            return {}
        ind = self.accuracy["individual"]
        return {row: {t: (acc[t] / ind[t] if ind[t] > 0 else math.nan) for t in self.tasks}
                for row, acc in self.accuracy.items()}

    def average(self, row: str, normalized: bool = False) -> float:
        table = self.normalized() if normalized else self.accuracy
        return statistics.fmean(table[row][t] for t in self.tasks)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["normalized"] = self.normalized()
        out["average"] = {r: self.average(r) for r in self.rows}
        if out["normalized"]:
            out["normalized_average"] = {r: self.average(r, True) for r in self.rows}
        return out

    def to_json(self, path=None) -> str:
        """Strict JSON: an undefined normalised accuracy (individual accuracy 0) is written as null."""
        text = json.dumps(_nan_to_none(self.to_dict()), indent=2, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text: str) -> "EvalResult":
        data = json.loads(text)  # fields added later (unknown_rate) may be absent from older files
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def to_markdown(self) -> str:
        norm = self.normalized()
        head = "| method | " + " | ".join(self.tasks) + " | avg | " + ("norm. avg |" if norm else "")
        lines = ["## Accuracy (%)", "", head, "|" + "---|" * (len(self.tasks) + 2 + bool(norm))]
        for row in self.rows:
            cells = [f"{100 * self.accuracy[row][t]:.1f}" for t in self.tasks] + [f"{100 * self.average(row):.1f}"]
            if norm:
                cells.append(f"{100 * self.average(row, True):.1f}")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += ["", f"Samples per task: " + ", ".join(f"{t} {self.samples[t]}" for t in self.tasks) + "."]
        if norm:
            lines.append("Normalised accuracy: per task, accuracy / the individual fine-tuned model's, then averaged.")
        if self.routing_accuracy:
            lines += ["", "## Routing accuracy (%): the router's best task is the sample's own", "",
                      "| router | " + " | ".join(self.tasks) + " | avg |", "|" + "---|" * (len(self.tasks) + 2)]
            for router, acc in self.routing_accuracy.items():
                cells = [f"{100 * acc[t]:.1f}" for t in self.tasks] + [f"{100 * statistics.fmean(acc.values()):.1f}"]
                lines.append(f"| {router} | " + " | ".join(cells) + " |")
        if self.unknown_rate:
            lines += ["", "## Flagged as no task (%): share of each task's images the unknown-task detector flagged "
                      "(counted wrong above)", "",
                      "| router | " + " | ".join(self.tasks) + " | avg |", "|" + "---|" * (len(self.tasks) + 2)]
            for router, rate in self.unknown_rate.items():
                cells = [f"{100 * rate[t]:.1f}" for t in self.tasks] + [f"{100 * statistics.fmean(rate.values()):.1f}"]
                lines.append(f"| {router} | " + " | ".join(cells) + " |")
        if self.config.get("support"):
            lines += ["", f"Support images (routers calibrated on unlabelled images): {self.config['support']}."]
        if self.storage_factor is not None:
            lines += ["", f"Storage: {self.storage_factor:.3f}x the pretrained model (θ0 + every task's factors and "
                          f"non-matrix parameters)."]
        for router, lat in self.latency.items():
            lines.append(f"Latency, router {router}: routed forward (both passes) {lat['mass_ms']:.1f} ms vs one plain "
                         f"forward {lat['plain_ms']:.1f} ms on a mixed batch of {int(lat['batch'])}: "
                         f"{lat['ratio']:.2f}x (median of {int(lat['repeats'])}, measured in this run).")
        return "\n".join(lines) + "\n"

    def plot(self, directory) -> list[Path]:
        """``accuracy.png`` (per row, mean accuracy) and ``routing_confusion_<router>.png`` per router."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(self.rows)), 4))
        means = [100 * self.average(r) for r in self.rows]
        ax.bar(range(len(self.rows)), means, color="#4c72b0")
        ax.set_xticks(range(len(self.rows)), self.rows, rotation=30, ha="right")
        ax.set_ylabel("mean accuracy over tasks (%)")
        ax.set_ylim(0, 100)
        for i, m in enumerate(means):
            ax.text(i, m + 1, f"{m:.1f}", ha="center", fontsize=8)
        fig.tight_layout()
        paths.append(directory / "accuracy.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
        for router, matrix in self.confusion.items():
            counts = torch.tensor(matrix, dtype=torch.float64)
            share = counts / counts.sum(1, keepdim=True).clamp_min(1)
            n = len(self.tasks)
            fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n))
            im = ax.imshow(share.numpy(), vmin=0, vmax=1, cmap="Blues")
            ax.set_xticks(range(n), self.tasks, rotation=45, ha="right")
            ax.set_yticks(range(n), self.tasks)
            ax.set_xlabel("routed to (best task)")
            ax.set_ylabel("true task")
            ax.set_title(f"routing, router {router}")
            for i in range(n):
                for j in range(n):
                    if counts[i, j] > 0:
                        ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if share[i, j] > 0.5 else "black")
            fig.colorbar(im, ax=ax, fraction=0.046)
            fig.tight_layout()
            paths.append(directory / f"routing_confusion_{router}.png")
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
        return paths

    def save(self, directory) -> list[Path]:
        """``results.json``, ``results.md`` and the plots in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_json(directory / "results.json")
        (directory / "results.md").write_text(self.to_markdown())
        return [directory / "results.json", directory / "results.md"] + self.plot(directory)


# ---------------------------------------------------------------------------------------------- scoring
def _calls_with_pixel_values(model: nn.Module) -> bool:
    inner = model.model if isinstance(model, MASSModel) else model
    return "pixel_values" in inspect.signature(inner.forward).parameters


def _args(model: nn.Module, x: torch.Tensor):
    return ((), {"pixel_values": x}) if _calls_with_pixel_values(model) else ((x,), {})


@torch.no_grad()
def head_logits(embedding: torch.Tensor, head: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """``logit_scale`` × cosine similarity of each embedding with each class row."""
    return logit_scale * F.normalize(embedding.float(), dim=-1) @ F.normalize(head.float(), dim=-1).T


def routed_correct(chosen_task: torch.Tensor, predictions: torch.Tensor, task: int, labels: torch.Tensor):
    """A routed sample is right only when its own task's head made the prediction and it equals the label."""
    return (chosen_task == task) & (predictions == labels)


def _median_ms(fn, repeats: int, device) -> float:
    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up (allocations, kernel compilation)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _finetuned_state(task: str, ckpt: Checkpoint, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    (_, [(_, src, key_map)]) = open_finetuned(base, {task: ckpt})
    return {k: src.get(key_map[k]) for k in base}


def _support_size(configs: Mapping[str, RouterConfig], support_per_task: Optional[int]) -> int:
    """Support images per task the routers need (0: none needs any), or a clear error."""
    if support_per_task is not None and (isinstance(support_per_task, bool) or not isinstance(support_per_task, int)):
        raise TypeError(f"support_per_task must be an int, got {type(support_per_task).__name__}")
    needing = [name for name, c in configs.items() if needs_support(c)]
    for name in needing:
        if configs[name].unknown == "error":
            raise ValueError(f"router {name!r}: unknown='error' would stop the evaluation at the first flagged "
                             f"image; use unknown='pretrained' or 'merged' (flagged images count as wrong)")
    if not needing:
        if support_per_task is not None:
            raise ValueError(f"support_per_task={support_per_task} but no router needs support images (routers "
                             f"{list(configs)}): use e.g. 'few-example', or a router with the unknown-task detector")
        return 0
    n = DEFAULT_IMAGES if support_per_task is None else support_per_task
    if n < MIN_IMAGES:
        raise ValueError(f"support_per_task must be >= {MIN_IMAGES} for router(s) {needing}, got {n}")
    return n


# ---------------------------------------------------------------------------------------------- engine
@torch.no_grad()
def evaluate(
    pretrained,
    finetuned: Mapping[str, Checkpoint],
    data: Mapping,
    heads: Mapping,
    methods: Sequence[str] = METHODS,
    routers: Union[None, Sequence[str], Mapping[str, RouterConfig]] = None,
    rank: Rank = None,
    batch_size: int = 64,
    progress: bool = True,
    latency: bool = True,
    latency_repeats: int = 5,
    device=None,
    num_workers: int = 0,
    logit_scale: float = 100.0,
    ta_scaling: float = 0.3,
    ties_density: float = 0.2,
    ties_scaling: float = 1.0,
    support_per_task: Optional[int] = None,
    support_data: Optional[Mapping] = None,
    bank_dtype=None,
) -> EvalResult:
    """Evaluate the methods on every task of ``finetuned``.

    ``pretrained``: a CLIPModel, CLIP vision model, directory or hub id (see :func:`mass.nn.clip.prepare`).
    ``finetuned``: ``{task: checkpoint}`` in any form :func:`mass.nn.clip.prepare` accepts. ``data``:
    ``{task: TaskData}`` (:mod:`mass.evaluation.data`) or any map-style dataset of ``(pixel_values, label)``.
    ``heads``: ``{task: Head | (C, D) tensor}`` (e.g. :func:`mass.evaluation.heads.zero_shot_heads`). The pretrained
    module is not modified: every method runs on its own copy. ``support_per_task`` (default 32 when a router
    needs it) and ``support_data`` (``{task: dataset}``, e.g. the training split): see the module docstring.
    ``bank_dtype``: the MASS rows' banks in ``"bfloat16"``/``"float16"`` (:mod:`mass.method.half_banks`); the
    static rows (TSV-M included) are not affected.
    """
    bank_dtype = resolve_bank_dtype(bank_dtype)
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or methods}; known: {list(METHODS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    router_configs = resolve_routers(routers) if "mass" in methods else {}
    tasks = list(finetuned)
    for what, given in (("data", data), ("heads", heads), ("support_data", support_data)):
        missing = [t for t in tasks if given is not None and t not in given]
        if missing:
            raise ValueError(f"{what} has no entry for task(s) {missing}")
    n_support = _support_size(router_configs, support_per_task)
    head = head_tensors({t: heads[t] for t in tasks})
    for t in tasks:
        classes = getattr(data[t], "classes", None)
        if classes is not None and len(classes) != head[t].shape[0]:
            raise ValueError(f"task {t!r}: the head has {head[t].shape[0]} classes, the data {len(classes)}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    support, where = None, None
    if n_support:
        support, data, where = take_support(data, support_data, tasks, n_support)
        support = {t: x.to(device) for t, x in support.items()}

    vision, ckpts = prepare(pretrained, finetuned)
    vision = copy.deepcopy(vision).eval()  # never wrap or move the caller's model
    base = {k: v.detach().clone() for k, v in vision.state_dict().items()}
    head = {t: h.to(device) for t, h in head.items()}

    def copy_with(state):
        model = copy.deepcopy(vision)
        if state is not None:
            model.load_state_dict(state)
        return model.to(device).eval()

    bar = dict(disable=not progress, leave=False)
    static: dict[str, nn.Module] = {}
    if "zero_shot" in methods:
        static["zero_shot"] = copy_with(None)
    if "task_arithmetic" in methods:
        static["task_arithmetic"] = copy_with(task_arithmetic(base, ckpts, scaling=ta_scaling))
    if "ties" in methods:
        static["ties"] = copy_with(ties_merging(base, ckpts, density=ties_density, scaling=ties_scaling))
    dec = None
    if any(m in methods for m in ("tsv", "mass", "mass_oracle")):
        dec = decompose(base, ckpts, rank=rank, progress=progress)
    if "tsv" in methods:
        static["tsv"] = copy_with(tsv_merge_from_decomposition(dec))
    if dec is not None:
        dec = to_bank_dtype(dec, bank_dtype)  # what the MASS rows store and apply
    routed: dict[str, MASSModel] = {}
    for name, config in router_configs.items():
        if needs_support(config):  # built with the paper's router, then calibrated on the support images
            plain = MASSModel(copy.deepcopy(vision), dec, heads=head,
                              keep_merged="all" if config.unknown == "merged" else "prefix").to(device).eval()
            routed[name] = plain.calibrate(support, config)
        else:
            routed[name] = MASSModel(copy.deepcopy(vision), dec, router=config, heads=head).to(device).eval()
    oracle = None
    if "mass_oracle" in methods:
        oracle = next(iter(routed.values()), None) or MASSModel(copy.deepcopy(vision), dec, heads=head).to(device)
    individual = copy_with(None) if "individual" in methods else None

    rows = [m for m in STATIC_METHODS if m in methods] + [f"mass[{r}]" for r in routed]
    rows += ["mass_oracle"] if oracle is not None else []
    correct = {row: {t: 0 for t in tasks} for row in rows}
    T = len(tasks)
    confusion = {r: [[0] * T for _ in range(T)] for r in routed}
    flagged = {r: [0] * T for r in routed if routed[r].router_config.unknown != "off"}
    samples = {t: 0 for t in tasks}
    mixed = []  # a few samples of every task, for the latency measurement
    for ti, task in enumerate(tqdm(tasks, desc="tasks", **bar)):
        if individual is not None:
            individual.load_state_dict(_finetuned_state(task, ckpts[task], base))
        dataset = data[task]
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        for x, y in tqdm(loader, desc=task, **bar):
            x, y = x.to(device), y.to(device)
            samples[task] += y.shape[0]
            if sum(m.shape[0] for m in mixed) < batch_size * (ti + 1) / T:
                mixed.append(x[: max(1, math.ceil(batch_size / T))].cpu())
            models = dict(static, **({"individual": individual} if individual is not None else {}))
            for row, model in models.items():
                args, kwargs = _args(model, x)
                pred = head_logits(extract_embedding(model(*args, **kwargs)), head[task], logit_scale).argmax(1)
                correct[row][task] += int((pred == y).sum())
            for name, model in routed.items():
                args, kwargs = _args(model, x)
                out = model.classify(*args, logit_scale=logit_scale, **kwargs)
                correct[f"mass[{name}]"][task] += int(routed_correct(out.task_ids, out.predictions, ti, y).sum())
                for b in out.routing.task_ids[:, 0].tolist():
                    if b < 0:  # flagged as no task
                        flagged[name][ti] += 1
                    else:
                        confusion[name][ti][b] += 1
            if oracle is not None:
                args, kwargs = _args(oracle, x)
                out = oracle.classify(*args, logit_scale=logit_scale, task_ids=[task] * y.shape[0], **kwargs)
                correct["mass_oracle"][task] += int((out.predictions == y).sum())
        if samples[task] == 0:
            raise ValueError(f"data for task {task!r} is empty")

    result = EvalResult(
        tasks=tasks, rows=rows,
        accuracy={row: {t: correct[row][t] / samples[t] for t in tasks} for row in rows},
        samples=samples,
        routing_accuracy={r: {t: confusion[r][i][i] / samples[t] for i, t in enumerate(tasks)} for r in routed},
        confusion=confusion,
        unknown_rate={r: {t: flagged[r][i] / samples[t] for i, t in enumerate(tasks)} for r in flagged},
        storage_factor=dec.storage_factor() if dec is not None else None,
        config=dict(methods=methods, routers={r: asdict(c) for r, c in router_configs.items()}, rank=rank,
                    batch_size=batch_size, logit_scale=logit_scale, task_arithmetic_scaling=ta_scaling,
                    ties_density=ties_density, ties_scaling=ties_scaling, device=str(device),
                    torch_threads=torch.get_num_threads(), support=where),
    )
    if latency and routed and mixed:
        batch = torch.cat(mixed)[:batch_size].to(device)
        plain = static["zero_shot"] if "zero_shot" in static else copy_with(None)
        args, kwargs = _args(plain, batch)
        plain_ms = _median_ms(lambda: plain(*args, **kwargs), latency_repeats, device)
        for name, model in routed.items():
            mass_ms = _median_ms(lambda: model(*args, **kwargs), latency_repeats, device)
            result.latency[name] = dict(plain_ms=plain_ms, mass_ms=mass_ms, ratio=mass_ms / plain_ms,
                                        batch=batch.shape[0], repeats=latency_repeats)
    return result
