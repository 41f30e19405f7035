"""``mass demo``: the offline benchmark in CLIP's regime, run through the ``mass eval`` engine.

Per seed: the tasks are generated, one vision tower per task is fine-tuned from the committed tiny CLIP (zero-shot
text heads frozen), and :func:`mass.evaluate` produces the paper's table (individual, zero-shot, task arithmetic,
TIES, TSV-M, MASS with several routers, MASS with every sample's own task forced). The regime criteria below are
fixed in advance and reported with the results; a run whose models miss them is labelled as such.

Results go to ``out_dir`` as JSON + Markdown + PNG; the main table is printed at the end.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

import mass
from mass.tools.common import git_commit

from .training import DemoConfig, auto_num_threads, prepare_demo

#: The paper's regime, fixed before any merge result was looked at (issue 13): fine-tuned models far above the
#: pretrained model's zero-shot heads.
CRITERIA = {"individual_mean_min": 0.90, "individual_task_min": 0.80, "zero_shot_normalised_max": 0.65}

ROW_LABELS = {
    "individual": "individual (upper bound)",
    "zero_shot": "zero-shot (pretrained + text heads)",
    "task_arithmetic": "task arithmetic (λ=0.3)",
    "ties": "TIES (density 0.2, λ=1)",
    "tsv": "TSV-M",
    "mass[paper]": "MASS, paper's router (topk, merged features)",
    "mass[top1]": "MASS, top-1 (merged features)",
    "mass[recommended]": "MASS, recommended router (θ0 features, top-1)",
    "mass[energy]": "MASS, recommended + per-task energy calibration (no data)",
    "mass[few-example]": "MASS, few-example router (32 unlabelled images per task)",
    "mass[few-example-last]": "MASS, few-example router at the last block (whitened, centred)",
    "mass[fast]": "MASS, RouterConfig.fast() (few-example router at an early block: a short first pass)",
    "mass_oracle": "MASS, own task forced (routing oracle)",
}


#: Unlabelled training images per task that calibrate the few-example router (never test images).
SUPPORT_PER_TASK = 32


def demo_routers(layer: int, n_blocks: int) -> dict:
    """The routers the demo compares, reading the input of block ``layer``'s MLP (the paper's block), and the
    few-example router at the last block, whose centring and whitening a validation split (training images,
    seeds 0-2; docs/router_study.md, section 9) chose: a longer first pass for fewer routing errors; and
    ``RouterConfig.fast()``, the early few-example router (section 10): a shorter first pass for more errors."""
    return {"paper": mass.RouterConfig(layer=layer), "top1": mass.RouterConfig(layer=layer, mode="top1"),
            "recommended": mass.RouterConfig.recommended(layer=layer),
            "energy": mass.RouterConfig.recommended(layer=layer, norm="energy"),
            "few-example": mass.RouterConfig.few_example(layer=layer),
            "few-example-last": mass.RouterConfig.few_example(layer=n_blocks - 1, centre=True, whiten=0.5),
            "fast": mass.RouterConfig.fast()}


def regime(result: mass.EvalResult) -> dict:
    """The criteria of :data:`CRITERIA` measured on one seed's result, and whether they all hold."""
    individual = result.accuracy["individual"]
    measured = {"individual_mean": statistics.fmean(individual.values()),
                "individual_task_min": min(individual.values()),
                "zero_shot_normalised": result.average("zero_shot", normalized=True)}
    measured["holds"] = bool(measured["individual_mean"] >= CRITERIA["individual_mean_min"]
                             and measured["individual_task_min"] >= CRITERIA["individual_task_min"]
                             and measured["zero_shot_normalised"] <= CRITERIA["zero_shot_normalised_max"])
    return measured


def run_seed(seed: int, quick: bool, n_tasks: int, cache_root: Optional[str], progress: bool = True,
             pretrained_dir: Optional[str] = None) -> tuple[dict, mass.EvalResult]:
    cfg = DemoConfig.make(quick=quick, n_tasks=n_tasks, seed=seed)
    art = prepare_demo(cache_root=cache_root, config=cfg, progress=progress, verbose=progress,
                       pretrained_dir=pretrained_dir)
    data = {t.name: torch.utils.data.TensorDataset(t.test_images, t.test_labels) for t in art.tasks}
    support = {t.name: torch.utils.data.TensorDataset(t.train_images, t.train_labels) for t in art.tasks}
    torch.manual_seed(seed)
    routers = demo_routers(art.config.router_block, art.pretrained.config.num_hidden_layers)
    result = mass.evaluate(art.clip, art.finetuned, data, art.heads, routers=routers,
                           batch_size=128, progress=progress, latency_repeats=5,
                           support_per_task=min(SUPPORT_PER_TASK, art.config.n_train), support_data=support)
    run = {"seed": seed, "result": json.loads(result.to_json()), "regime": regime(result),
           "config": art.config.to_dict(), "timings": art.timings, "loaded_from_cache": art.loaded_from_cache}
    return run, result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    """Per row: mean and std over seeds of the average accuracy and of the normalised average; per router: of
    the routing accuracy and the latency ratio."""
    summary = {}
    for row in runs[0]["result"]["rows"]:
        entry = {}
        for key, field in (("avg_acc", "average"), ("avg_normalized", "normalized_average")):
            entry[key], entry[key + "_std"] = _mean_std([r["result"][field][row] for r in runs])
        if row.startswith("mass["):
            router = row[5:-1]
            entry["avg_routing"], entry["avg_routing_std"] = _mean_std(
                [statistics.fmean(r["result"]["routing_accuracy"][router].values()) for r in runs])
            entry["latency_ratio"], entry["latency_ratio_std"] = _mean_std(
                [r["result"]["latency"][router]["ratio"] for r in runs])
        summary[row] = entry
    return summary


def _pct(x: Optional[float], std: Optional[float] = None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def _regime_lines(report: dict) -> list[str]:
    c = CRITERIA
    lines = [f"Regime criteria (fixed in advance): individual fine-tuned accuracy ≥ {100 * c['individual_mean_min']:.0f}% "
             f"on average and ≥ {100 * c['individual_task_min']:.0f}% on every task; pretrained model with zero-shot "
             f"heads ≤ {100 * c['zero_shot_normalised_max']:.0f}% normalised.", ""]
    for r in report["runs"]:
        g = r["regime"]
        lines.append(f"- seed {r['seed']}: individual mean {_pct(g['individual_mean'])}, lowest task "
                     f"{_pct(g['individual_task_min'])}, zero-shot {_pct(g['zero_shot_normalised'])} normalised: "
                     f"**{'criteria hold' if g['holds'] else 'criteria NOT met'}**")
    if not report["regime_holds"]:
        lines += ["", "**The models of this run do not meet the regime criteria: its numbers say little about the "
                      "method" + (" (a smoke run: `--quick` trains for seconds)" if report["quick"] else "") + ".**"]
    return lines + [""]


def render_markdown(report: dict) -> str:
    runs, summary = report["runs"], report["summary"]
    first = runs[0]["result"]
    names = first["tasks"]
    seeds = len(runs)
    kind = "quick smoke run" if report["quick"] else "full"
    lines = [f"# MASS offline demo ({kind}, {len(names)} tasks, {seeds} seed{'s' if seeds > 1 else ''})", "",
             f"commit `{report['commit']}`, {report['date']}, {report['machine']}, torch {report['torch']}, "
             f"{report['seconds']:.0f} s", ""]
    lines += _regime_lines(report)
    lines += [f"Accuracy per task (%, seed {runs[0]['seed']}), average, and normalised accuracy (accuracy / the "
              f"individual model's, averaged over tasks){'; ± is the std over seeds' if seeds > 1 else ''}. "
              "A routed sample counts only if its own task's head made the prediction.", ""]
    lines += ["| method | " + " | ".join(names) + " | avg acc | **normalised** | routing acc | latency ×plain |",
              "|" + "---|" * (len(names) + 5)]
    for row, entry in summary.items():
        cells = [_pct(first["accuracy"][row][t]) for t in names]
        lat = f"{entry['latency_ratio']:.2f}" if "latency_ratio" in entry else "–"
        lines.append(f"| {ROW_LABELS.get(row, row)} | " + " | ".join(cells)
                     + f" | {_pct(entry['avg_acc'], entry['avg_acc_std'])} | "
                     f"**{_pct(entry['avg_normalized'], entry['avg_normalized_std'])}** | "
                     f"{_pct(entry.get('avg_routing'), entry.get('avg_routing_std'))} | {lat} |")
    lines += ["", f"Storage: θ0 + task factors = **{first['storage_factor']:.3f}×** the pretrained vision tower.",
              "Routing acc: share of test images whose best-scored task is their own. Latency: routed MASS forward "
              "over one plain forward, same mixed batch, same run, CPU "
              f"({runs[0]['result']['config']['torch_threads']} torch thread(s)).", ""]
    return "\n".join(lines) + "\n"


def render_plot(report: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    rows = list(summary)
    labels = [ROW_LABELS.get(r, r) for r in rows]
    vals = [100 * summary[r]["avg_normalized"] for r in rows]
    errs = [100 * summary[r]["avg_normalized_std"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.4))
    colors = ["#2b7bba" if r.startswith("mass") else "#888" for r in rows]
    ax.barh(labels[::-1], vals[::-1], xerr=errs[::-1], color=colors[::-1])
    for y, v in enumerate(vals[::-1]):
        ax.text(v + 1, y, f"{v:.1f}", va="center", fontsize=8)
    ax.axvline(100, color="k", lw=0.8, ls="--")
    ax.axvline(100 * CRITERIA["zero_shot_normalised_max"], color="#c44", lw=0.8, ls=":",
               label="regime: zero-shot must stay left of this line")
    ax.set_xlabel("normalised accuracy (% of the individual fine-tuned models)")
    ax.set_xlim(0, max(vals) + 14)
    ax.legend(loc="lower right", fontsize=8)
    seeds = len(report["runs"])
    ax.set_title(f"MASS offline demo ({seeds} seed{'s' if seeds > 1 else ''}; bars: mean, whiskers: std)")
    fig.tight_layout()
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(out_dir: str = "mass_demo_out", quick: bool = False, cache_dir: Optional[str] = None,
             n_tasks: int = 8, seeds: int = 1, progress: bool = True, pretrained_dir: Optional[str] = None) -> dict:
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if n_tasks < 2:
        raise ValueError("--tasks must be >= 2")
    start = time.perf_counter()
    commit = git_commit() or "unknown"  # the code that runs (taken before, not after, the minutes of work)
    runs, results = [], []
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(auto_num_threads())  # busy cores make extra OpenMP threads slow everything down
    try:
        for seed in range(seeds):
            run, result = run_seed(seed, quick, n_tasks, cache_dir, progress, pretrained_dir)
            runs.append(run)
            results.append(result)
    finally:
        torch.set_num_threads(prev_threads)
    report = {
        "quick": quick, "n_tasks": n_tasks, "seeds": seeds, "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "criteria": CRITERIA, "regime_holds": all(r["regime"]["holds"] for r in runs),
        "runs": runs, "summary": summarize(runs),
    }
    report["seconds"] = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    (out / "results.md").write_text(markdown)
    pngs = [render_plot(report, out)]
    pngs += [p for p in results[0].plot(out / f"seed{runs[0]['seed']}") if "confusion" in p.name]
    print()
    print(markdown)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}, {', '.join(map(str, pngs))} "
          f"({report['seconds']:.0f} s)")
    return report
