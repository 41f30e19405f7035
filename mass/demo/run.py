"""``mass demo``: the offline multi-task benchmark — accuracy of MASS against static merges, routing accuracy,
storage and latency, with the router study of issue 6 (several blocks, feature source, token, norm).

Results go to ``out_dir`` as JSON + Markdown + PNG charts; the main table is printed at the end.
"""
from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

import mass
from mass._benchutil import git_commit, time_interleaved_cpu
from mass.merging import task_arithmetic, ties_merging, tsv_merge_from_decomposition

from .training import DemoConfig, build_model, evaluate, prepare_demo

EVAL_BATCH = 250


def _accuracy_static(art, state_dict) -> dict[str, float]:
    model = build_model(art.config)
    model.load_state_dict(state_dict)
    model.eval()
    return {t.name: evaluate(model, t, art.heads[t.name]) for t in art.tasks}


@torch.no_grad()
def _evaluate_mass(model: mass.MASSModel, art) -> dict:
    """Per task: accuracy (right head and right label), routing accuracy (true task selected), top-1 routing."""
    acc, routed, routed_top1, n_selected = {}, {}, {}, []
    for t_idx, task in enumerate(art.tasks):
        correct = hit = hit1 = 0
        for i in range(0, len(task.test_labels), EVAL_BATCH):
            x, y = task.test_images[i:i + EVAL_BATCH], task.test_labels[i:i + EVAL_BATCH]
            res = model.classify(pixel_values=x, logit_scale=art.config.logit_scale)
            ids = res.routing.task_ids
            correct += ((res.task_ids == t_idx) & (res.predictions == y)).sum().item()
            hit += (ids == t_idx).any(1).sum().item()
            hit1 += (ids[:, 0] == t_idx).sum().item()
            n_selected.append((ids >= 0).sum(1).float())
        n = len(task.test_labels)
        acc[task.name], routed[task.name], routed_top1[task.name] = correct / n, hit / n, hit1 / n
    return {"acc": acc, "routing": routed, "routing_top1": routed_top1,
            "mean_selected": torch.cat(n_selected).mean().item()}


@torch.no_grad()
def _routing_accuracy(model: mass.MASSModel, art) -> float:
    hits = total = 0
    for t_idx, task in enumerate(art.tasks):
        for i in range(0, len(task.test_labels), EVAL_BATCH):
            ids = model.route(pixel_values=task.test_images[i:i + EVAL_BATCH]).task_ids
            hits += (ids[:, 0] == t_idx).sum().item()
            total += ids.shape[0]
    return hits / total


@torch.no_grad()
def _latency_ratio(model: mass.MASSModel, plain: torch.nn.Module, images: torch.Tensor) -> float:
    """Routed MASS forward over one plain forward, same mixed batch, interleaved in the same run."""
    times = time_interleaved_cpu({"plain": lambda: plain(pixel_values=images),
                                  "ours": lambda: model(pixel_values=images)}, repeats=7, warmup=1)
    return times["ours"]["median_ms"] / times["plain"]["median_ms"]


def _mass_variants(L: int) -> dict[str, tuple[dict, dict]]:
    """name -> (RouterConfig kwargs, MASSModel kwargs) with the paper's block L. The first three are the
    issue-5 rows; the rest are the router study of issue 6."""
    multi = [max(0, L - 2), L - 1, L] if L >= 1 else [L]
    return {
        "MASS (top1)": (dict(layer=L, mode="top1"), {}),
        "MASS (topk)": (dict(layer=L), {}),
        "MASS (topk, reuse prefix)": (dict(layer=L), dict(reuse_prefix=True)),
        "router: token=mean": (dict(layer=L, token="mean"), {}),
        "router: norm=sv": (dict(layer=L, norm="sv"), {}),
        "router: features=pretrained": (dict(layer=L, features="pretrained"), {}),
        "router: features=pretrained, top1": (dict(layer=L, features="pretrained", mode="top1"), {}),
        f"router: layers={multi}": (dict(layers=multi), {}),
        f"router: layers={multi}, pretrained": (dict(layers=multi, features="pretrained"), {}),
        f"router: layers={multi}, pretrained, top1": (dict(layers=multi, features="pretrained", mode="top1"), {}),
    }


def run_seed(seed: int, quick: bool, n_tasks: int, cache_root: Optional[str], progress: bool = True) -> dict:
    cfg = DemoConfig.make(quick=quick, n_tasks=n_tasks, seed=seed)
    cache_dir = None if cache_root is None else Path(cache_root) / cfg.hash()
    art = prepare_demo(cache_dir=cache_dir, config=cfg, progress=progress, verbose=progress)
    names = art.task_names
    torch.manual_seed(seed)
    rows: dict[str, dict] = {}

    stage = tqdm(total=5 + len(_mass_variants(1)), desc=f"evaluate (seed {seed})", disable=not progress)
    individual = {}
    for t in art.tasks:
        individual[t.name] = art.metrics.get(t.name, {}).get("finetuned_acc")
        if individual[t.name] is None:
            individual[t.name] = evaluate(art.finetuned_model(t.name), t, art.heads[t.name])
    rows["individual (upper bound)"] = {"acc": individual}
    stage.update()
    rows["pretrained + task heads"] = {"acc": {t.name: evaluate(art.pretrained, t, art.heads[t.name])
                                                for t in art.tasks}}
    stage.update()
    rows["task arithmetic (λ=0.3)"] = {"acc": _accuracy_static(art, task_arithmetic(art.pretrained, art.finetuned))}
    stage.update()
    rows["TIES (density 0.2, λ=1)"] = {"acc": _accuracy_static(art, ties_merging(art.pretrained, art.finetuned))}
    stage.update()
    dec = mass.decompose(art.pretrained, art.finetuned, progress=False)
    rows["TSV-M"] = {"acc": _accuracy_static(art, tsv_merge_from_decomposition(dec))}
    stage.update()

    n_blocks = art.config.num_layers
    L = art.config.router_block
    batch = torch.cat([t.test_images[:8] for t in art.tasks])  # a mixed batch for latency
    plain = copy.deepcopy(art.pretrained).eval()
    for name, (router_kw, model_kw) in _mass_variants(L).items():
        model = mass.MASSModel(copy.deepcopy(art.pretrained), dec, router=mass.RouterConfig(**router_kw),
                               heads=art.heads, **model_kw)
        row = _evaluate_mass(model, art)
        row["latency_ratio"] = _latency_ratio(model, plain, batch)
        row["router"] = router_kw
        rows[name] = row
        stage.update()
    stage.close()

    # Routing accuracy per block: CLS vs mean token, TSV-M (paper) vs pretrained features (top-1).
    per_block = {f"{token}/{features}": [] for features in ("merged", "pretrained") for token in ("cls", "mean")}
    for name in per_block:
        token, features = name.split("/")
        for block in range(n_blocks):
            model = mass.MASSModel(copy.deepcopy(art.pretrained), dec, router=mass.RouterConfig(
                layer=block, token=token, mode="top1", features=features))
            per_block[name].append(_routing_accuracy(model, art))

    for row in rows.values():
        row["normalized"] = {t: row["acc"][t] / individual[t] for t in names}
        row["avg_acc"] = sum(row["acc"].values()) / len(names)
        row["avg_normalized"] = sum(row["normalized"].values()) / len(names)
        if "routing" in row:
            row["avg_routing"] = sum(row["routing"].values()) / len(names)
            row["avg_routing_top1"] = sum(row["routing_top1"].values()) / len(names)
    return {"seed": seed, "tasks": names, "config": art.config.to_dict(), "rows": rows,
            "routing_per_block": per_block, "storage_factor": dec.storage_factor(),
            "ranks": sorted(set(f.rank for f in dec.lowrank.values())),
            "timings": art.timings, "loaded_from_cache": art.loaded_from_cache}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    """Per method: mean (and std over seeds) of the averages; per task values from the first seed."""
    methods = list(runs[0]["rows"])
    summary = {}
    for m in methods:
        entry = {}
        for field in ("avg_acc", "avg_normalized", "avg_routing", "avg_routing_top1", "latency_ratio",
                      "mean_selected"):
            vals = [r["rows"][m][field] for r in runs if field in r["rows"][m]]
            if vals:
                entry[field], entry[field + "_std"] = _mean_std(vals)
        summary[m] = entry
    return summary


def _pct(x: Optional[float], std: Optional[float] = None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def render_markdown(report: dict) -> str:
    runs, summary = report["runs"], report["summary"]
    first = runs[0]
    names = first["tasks"]
    seeds = len(runs)
    lines = [f"# MASS offline demo ({'quick' if report['quick'] else 'full'}, {len(names)} tasks, "
             f"{seeds} seed{'s' if seeds > 1 else ''})", "",
             f"commit `{report['commit']}`, {report['date']}, {report['machine']}, torch {report['torch']}", "",
             f"Absolute accuracy per task (%, seed {first['seed']}), average, and normalised accuracy "
             f"(merged / individual, averaged over tasks){'; ± is the std over seeds' if seeds > 1 else ''}.", ""]
    head = "| method | " + " | ".join(names) + " | avg acc | **normalised** | routing acc | latency ×plain |"
    lines += [head, "|" + "---|" * (len(names) + 5)]
    for m, entry in summary.items():
        row = first["rows"][m]
        cells = [_pct(row["acc"][t]) for t in names]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_pct(entry['avg_acc'], entry.get('avg_acc_std'))} | "
                     f"**{_pct(entry['avg_normalized'], entry.get('avg_normalized_std'))}** | "
                     f"{_pct(entry.get('avg_routing'), entry.get('avg_routing_std'))} | "
                     + (f"{entry['latency_ratio']:.2f}" if "latency_ratio" in entry else "–") + " |")
    lines += ["", f"Storage: θ0 + task factors = **{first['storage_factor']:.3f}×** the pretrained model "
                  f"(ranks k = {first['ranks']}).",
              "Routing acc: share of test images whose selected task set contains their task. "
              "Latency: routed MASS forward / one plain forward, same mixed batch of "
              f"{8 * len(names)} images, same run, CPU.", "",
              "Routing accuracy (top-1, %) per block whose MLP input is read"
              + (f", mean ± std over {seeds} seeds" if seeds > 1 else "") + ":", ""]
    n_blocks = len(next(iter(first["routing_per_block"].values())))
    lines += ["| token / features | " + " | ".join(f"block {b}" for b in range(n_blocks)) + " |",
              "|" + "---|" * (n_blocks + 1)]
    for name in first["routing_per_block"]:
        cells = []
        for b in range(n_blocks):
            m, sd = _mean_std([r["routing_per_block"][name][b] for r in runs])
            cells.append(_pct(m, sd if seeds > 1 else None))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_plots(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    methods = list(summary)
    vals = [100 * summary[m]["avg_normalized"] for m in methods]
    errs = [100 * summary[m].get("avg_normalized_std", 0.0) for m in methods]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(methods) + 1.2))
    colors = ["#888" if not m.startswith(("MASS", "router")) else "#2b7bba" for m in methods]
    ax.barh(methods[::-1], vals[::-1], xerr=errs[::-1], color=colors[::-1])
    for y, v in enumerate(vals[::-1]):
        ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    ax.axvline(100, color="k", lw=0.8, ls="--")
    ax.set_xlabel("normalised accuracy (% of the individual fine-tuned models)")
    ax.set_xlim(0, max(vals) + 12)
    ax.set_title("MASS offline demo: merged accuracy relative to the fine-tuned models")
    fig.tight_layout()
    acc_png = out_dir / "accuracy.png"
    fig.savefig(acc_png, dpi=120)
    plt.close(fig)

    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"cls/merged": "-o", "mean/merged": "--s", "cls/pretrained": "-^", "mean/pretrained": "--v"}
    for name, per_seed in runs[0]["routing_per_block"].items():
        per = [statistics.mean(r["routing_per_block"][name][b] for r in runs) for b in range(len(per_seed))]
        ax.plot(range(len(per)), [100 * p for p in per], styles.get(name, "-"), label=name)
    ax.axhline(100 / len(runs[0]["tasks"]), color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("block whose MLP input is read")
    ax.set_ylabel("routing accuracy (top-1, %)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("Router: accuracy per block")
    fig.tight_layout()
    blocks_png = out_dir / "routing_per_block.png"
    fig.savefig(blocks_png, dpi=120)
    plt.close(fig)
    return [str(acc_png), str(blocks_png)]


def run_demo(out_dir: str = "mass_demo_out", quick: bool = False, cache_dir: Optional[str] = None,
             n_tasks: int = 8, seeds: int = 1, progress: bool = True) -> dict:
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if n_tasks < 2:
        raise ValueError("--tasks must be >= 2")
    start = time.perf_counter()
    runs = [run_seed(seed, quick, n_tasks, cache_dir, progress) for seed in range(seeds)]
    report = {
        "quick": quick, "n_tasks": n_tasks, "seeds": seeds, "commit": git_commit() or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
        platform.machine(), "torch": torch.__version__, "runs": runs, "summary": summarize(runs),
    }
    report["seconds"] = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    (out / "results.md").write_text(markdown)
    pngs = render_plots(report, out)
    print()
    print(markdown)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}, {', '.join(pngs)} "
          f"({report['seconds']:.0f} s)")
    return report
