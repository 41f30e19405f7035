"""The router study of issue 14 on the offline benchmark: the few-example (support-set) router against the
paper's data-free router and ``RouterConfig.recommended()``, and the unknown-task detector.

    python -m mass.tools.demo.support_study --out DIR [--seeds 1] [--cache-dir DIR] [--data-free]

Support images are drawn from each task's *training* split (nested: the first N of one random permutation per
seed), never from the test split every number is measured on. Configurations are chosen on a validation set
(the next 250 training images of each task, disjoint from the support pool); the test images are only scored.
The unknown-task detector's threshold sweep is reported as a curve; its default (1.0) was fixed beforehand.
Writes ``support_study.json``, ``support_study.md`` and PNG plots to DIR. ``--data-free`` instead measures the
calibrated data-free scores (``RouterConfig.norm``: no image builds the router) and writes ``data_free.json``/``.md``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

import mass
from mass.tools.common import git_commit

from mass.evaluation.protocol import routed_correct

from .training import DemoConfig, prepare_demo

SIZES = (4, 8, 16, 32, 64)
RANKS = (1, 2, 4, 8, 16, 32)
THRESHOLDS = (0.8, 1.0, 1.2, 1.5, 2.0, 3.0)
EVAL_BATCH = 500


@torch.no_grad()
def evaluate_mass(model: mass.MASSModel, art) -> dict:
    """Per task: accuracy (a sample counts only through its own task's head) and routing accuracy (its own
    task is among the selected ones)."""
    acc, routed = {}, {}
    for t_idx, task in enumerate(art.tasks):
        correct = hit = 0
        for i in range(0, len(task.test_labels), EVAL_BATCH):
            x, y = task.test_images[i:i + EVAL_BATCH], task.test_labels[i:i + EVAL_BATCH]
            res = model.classify(pixel_values=x, logit_scale=art.config.logit_scale)
            correct += int(routed_correct(res.task_ids, res.predictions, t_idx, y).sum())
            hit += int((res.routing.task_ids == t_idx).any(1).sum())
        acc[task.name], routed[task.name] = correct / len(task.test_labels), hit / len(task.test_labels)
    return {"acc": acc, "routing": routed}


@torch.no_grad()
def _features(model: mass.MASSModel, images: list, features: str, L: int) -> torch.Tensor:
    """First-pass routing features (1, B, D) of the images (a list of per-task tensors), read once."""
    probe = model.with_router(mass.RouterConfig(layer=L, features=features, mode="top1"))
    x = torch.cat(images)
    return torch.cat([probe.first_pass(x[i:i + EVAL_BATCH])[0] for i in range(0, x.shape[0], EVAL_BATCH)], 1)


def _routing(model: mass.MASSModel, feats: torch.Tensor) -> mass.Routing:
    """The model's own routing decision from features read by :func:`_features` (its _route_features)."""
    return model.route_features(feats)


def _confusion(routing: mass.Routing, labels: torch.Tensor, T: int) -> torch.Tensor:
    """(T, T+1) counts: true task (row) → top-1 routed task (column; the last column: flagged unknown)."""
    ids = routing.task_ids[:, 0]
    ids = torch.where(ids < 0, T, ids)
    return torch.bincount(labels * (T + 1) + ids, minlength=T * (T + 1)).view(T, T + 1)


def _top1(conf: torch.Tensor) -> float:
    return (conf.diag().sum() / conf.sum()).item()


def split_support_validation(art, seed: int, n_val: int = 250):
    """Per task: support pool (the first 64 of a permutation of the training split) and a validation set (the
    next ``n_val``), disjoint; configurations are chosen on validation, reported on test."""
    g = torch.Generator().manual_seed(1000 + seed)
    pools, val = {}, {}
    for task in art.tasks:
        order = torch.randperm(task.train_images.shape[0], generator=g)
        pools[task.name] = task.train_images[order[:max(SIZES)]]
        val[task.name] = task.train_images[order[max(SIZES):max(SIZES) + n_val]]
    return pools, val


@dataclasses.dataclass
class _Bench:
    """One seed's benchmark as every study here reads it: artifacts, the paper's MASS model, the support pool and
    validation split, and the routing features (block L, CLS) of the test and validation images per source."""

    cfg: DemoConfig
    art: object
    base: mass.MASSModel
    pools: dict
    val: dict
    labels: dict
    feats: dict

    @property
    def names(self) -> list:
        return self.art.task_names

    def individual(self) -> dict:
        return {t: self.art.metrics[t]["finetuned_acc"] for t in self.names}


def _bench(seed: int, cache_root: Optional[str], quick: bool) -> _Bench:
    cfg = DemoConfig.make(quick=quick, n_tasks=8, seed=seed)
    art = prepare_demo(cache_root=cache_root, config=cfg, progress=False, verbose=False)
    names, L = art.task_names, cfg.router_block
    dec = mass.decompose(art.pretrained, art.finetuned, progress=False)
    base = mass.MASSModel(copy.deepcopy(art.pretrained), dec, router=mass.RouterConfig(layer=L), heads=art.heads)
    pools, val = split_support_validation(art, seed)
    labels = {"test": torch.cat([torch.full((t.test_images.shape[0],), i) for i, t in enumerate(art.tasks)]),
              "val": torch.cat([torch.full((val[t].shape[0],), i) for i, t in enumerate(names)])}
    feats = {f: {"test": _features(base, [t.test_images for t in art.tasks], f, L),
                 "val": _features(base, [val[t] for t in names], f, L)} for f in ("pretrained", "merged")}
    return _Bench(cfg, art, base, pools, val, labels, feats)


def _evaluator(b: _Bench, seed: int, result: dict, full_eval: bool, log):
    """evaluate(label, model, router): top-1 routing accuracy and confusion on the test features; with
    ``full_eval`` also both passes (selected-set routing accuracy, normalised accuracy). Stored in ``result``."""
    T, individual = len(b.names), b.individual()

    def evaluate(label: str, model: mass.MASSModel, router: dict):
        feats = b.feats[model.router_config.features]
        conf = _confusion(_routing(model, feats["test"]), b.labels["test"], T)
        entry = {"router": router, "routing_top1": _top1(conf),
                 "val_top1": _top1(_confusion(_routing(model, feats["val"]), b.labels["val"], T))}
        if full_eval:
            row = evaluate_mass(model, b.art)
            entry["routing"] = sum(row["routing"].values()) / T
            entry["normalized"] = sum(row["acc"][t] / individual[t] for t in b.names) / T
        result["eval"][label] = entry
        result["confusion"][label] = conf.tolist()
        log(f"[seed {seed}] {label}: {entry}")

    return evaluate


def run_seed(seed: int, cache_root: Optional[str], full_eval: bool = True, log=print, quick: bool = False) -> dict:
    b = _bench(seed, cache_root, quick)
    cfg, art, base, pools, feats = b.cfg, b.art, b.base, b.pools, b.feats
    names, L, T = b.names, cfg.router_block, len(b.names)
    test_labels, val_labels = b.labels["test"], b.labels["val"]
    result = {"seed": seed, "tasks": names, "layer": L, "sweep": [], "eval": {}, "confusion": {}}
    evaluate = _evaluator(b, seed, result, full_eval, log)

    evaluate("paper (fc1, merged, topk)", base, {"layer": L})
    evaluate("recommended (fc1, pretrained, top1)", base.with_router(mass.RouterConfig.recommended(layer=L)),
             {"layer": L, "features": "pretrained", "mode": "top1"})
    # Sweep: routing accuracy (top-1) of the support router, on validation (for choosing) and test.
    for features in ("pretrained", "merged"):
        for centre in (False, True):
            for n in SIZES:
                support = {t: pools[t][:n] for t in names}
                for rank in RANKS:
                    if rank > mass.method.support.max_rank(n - 1, art.pretrained.config.hidden_size, centre):
                        continue
                    router = mass.RouterConfig(layer=L, basis="support", support_rank=rank, centre=centre,
                                               features=features, mode="top1")
                    m = base.calibrate(support, router)
                    result["sweep"].append({
                        "features": features, "centre": centre, "n": n, "rank": rank,
                        "val_top1": _top1(_confusion(_routing(m, feats[features]["val"]), val_labels, T)),
                        "routing_top1": _top1(_confusion(_routing(m, feats[features]["test"]), test_labels, T))})
                log(f"[seed {seed}] sweep {features} centre={centre} N={n}: " + ", ".join(
                    f"k={r['rank']}:{100 * r['routing_top1']:.1f}" for r in result["sweep"]
                    if (r["features"], r["centre"], r["n"]) == (features, centre, n)))
    # The configuration chosen on validation at N=32, evaluated with both passes.
    at32 = [e for e in result["sweep"] if e["n"] == 32]
    best = max(at32, key=lambda e: e["val_top1"])
    result["chosen"] = {k: best[k] for k in ("features", "centre", "rank")}
    chosen = mass.RouterConfig(layer=L, basis="support", support_rank=best["rank"], centre=best["centre"],
                               features=best["features"], mode="top1")
    for n in (8, 32):  # at N=8 the rank is capped at what 7 held-out images span
        router = dataclasses.replace(chosen, support_rank=min(best["rank"], mass.method.support.max_rank(
            n - 1, art.pretrained.config.hidden_size, best["centre"])))
        evaluate(f"support N={n} (chosen on validation)", base.calibrate({t: pools[t][:n] for t in names}, router),
                 {**result["chosen"], "rank": router.support_rank, "n": n})
    result["unknown"] = _unknown_study(art, seed, L, pools, chosen, log)
    return result


DATA_FREE_NORMS = ("l2", "sv", "energy")


def run_data_free(seed: int, cache_root: Optional[str], full_eval: bool = True, log=print,
                  quick: bool = False) -> dict:
    """Calibrated data-free scores (no image is used to build any router here): the fc1 basis with every
    ``RouterConfig.norm``, on both feature sources, top-1 and the paper's top-k, scored by top-1 routing accuracy
    on the validation and test splits. Both passes (normalised accuracy) run for the paper's router,
    ``recommended()`` and, per feature source, the top-1 norm with the best *validation* routing accuracy."""
    b = _bench(seed, cache_root, quick)
    L = b.cfg.router_block
    result = {"seed": seed, "tasks": b.names, "layer": L, "eval": {}, "confusion": {}}
    routing_only = _evaluator(b, seed, result, False, log)
    evaluate = _evaluator(b, seed, result, full_eval, log)
    named = {mass.RouterConfig(layer=L): " = paper", mass.RouterConfig.recommended(layer=L): " = recommended()"}
    models = {}
    for features in ("merged", "pretrained"):
        for mode in ("topk", "top1"):
            for norm in DATA_FREE_NORMS:
                router = mass.RouterConfig(layer=L, features=features, mode=mode, norm=norm)
                label = f"fc1, {features}, {mode}, norm={norm}{named.get(router, '')}"
                models[label] = (router, b.base.with_router(router))
                routing_only(label, models[label][1], {"features": features, "mode": mode, "norm": norm})
    chosen = set(named)
    for features in ("merged", "pretrained"):
        top1 = [lbl for lbl, (r, _) in models.items() if r.features == features and r.mode == "top1"]
        chosen.add(models[max(top1, key=lambda lbl: result["eval"][lbl]["val_top1"])][0])
    result["chosen"] = [lbl for lbl, (r, _) in models.items() if r in chosen]
    if full_eval:
        for label in result["chosen"]:
            router, model = models[label]
            evaluate(label, model, {"features": router.features, "mode": router.mode, "norm": router.norm})
    return result


def render_data_free(report: dict) -> str:
    runs = report["runs"]
    lines = [f"Data-free routers (fc1 basis, block {runs[0]['layer']}, CLS), offline benchmark, 8 tasks, "
             f"{len(runs)} seed(s); commit `{report['commit']}`, {report['date']}. Validation: training images "
             f"disjoint from every test image (only for choosing).", "",
             "| router | routing top-1, validation | routing top-1, test | routing (selected set) | normalised acc |",
             "|---|---|---|---|---|"]
    for label in runs[0]["eval"]:
        vals = [r["eval"][label] for r in runs]
        cells = [_pct(*_mean([v[k] for v in vals])) if k in vals[0] else "–"
                 for k in ("val_top1", "routing_top1", "routing", "normalized")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _unknown_study(art, seed: int, L: int, pools: dict, chosen: mass.RouterConfig, log) -> list:
    """Merge the first 6 tasks, calibrate on 32 support images each, flag the test images of the other 2."""
    names = art.task_names
    inside, outside = names[:6], names[6:]
    dec = mass.decompose(art.pretrained, {t: art.finetuned[t] for t in inside}, progress=False)
    model = mass.MASSModel(copy.deepcopy(art.pretrained), dec, router=mass.RouterConfig(layer=L))
    support = {t: pools[t][:32] for t in inside}
    rows = []
    for label, router in (
        (f"support, chosen ({chosen.features}, k={chosen.support_rank}, centre={chosen.centre})",
         dataclasses.replace(chosen, unknown="pretrained")),
        ("support centred (pretrained, k=8)", mass.RouterConfig(layer=L, basis="support", features="pretrained",
                                                                mode="top1", centre=True, support_rank=8,
                                                                unknown="pretrained")),
        ("fc1 (pretrained, top1)", mass.RouterConfig(layer=L, features="pretrained", mode="top1",
                                                     unknown="pretrained")),
    ):
        calibrated = model.calibrate(support, router)
        f_in = _features(model, [t.test_images for t in art.tasks if t.name in inside], router.features, L)
        f_out = _features(model, [t.test_images for t in art.tasks if t.name in outside], router.features, L)
        for thr in THRESHOLDS:
            m = calibrated.with_router(dataclasses.replace(router, unknown_threshold=thr))
            row = {"router": label, "threshold": thr,
                   "foreign_flagged": _routing(m, f_out).unknown.float().mean().item(),
                   "in_task_flagged": _routing(m, f_in).unknown.float().mean().item()}
            rows.append(row)
            log(f"[seed {seed}] unknown {row}")
    return rows


def _mean(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(m, s=None):
    return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s else "")


def render_markdown(report: dict) -> str:
    runs = report["runs"]
    first = runs[0]
    lines = [f"Offline benchmark, 8 tasks, {len(runs)} seed(s); commit `{report['commit']}`, {report['date']}.", "",
             "| router | routing acc (top-1) | routing acc (selected set) | normalised acc |", "|---|---|---|---|"]
    for label in first["eval"]:
        vals = [r["eval"][label] for r in runs]
        cells = [_pct(*_mean([v[k] for v in vals])) if k in vals[0] else "–"
                 for k in ("routing_top1", "routing", "normalized")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Support router sweep, routing accuracy (top-1, %) by images per task N (rows) and rank k "
              "(columns):", ""]
    for features in ("pretrained", "merged"):
        for centre in (False, True):
            lines += [f"features={features}, centre={centre}:", "",
                      "| N | " + " | ".join(f"k={k}" for k in RANKS) + " |", "|---|" + "---|" * len(RANKS)]
            for n in SIZES:
                cells = []
                for k in RANKS:
                    vals = [e["routing_top1"] for r in runs for e in r["sweep"]
                            if (e["features"], e["centre"], e["n"], e["rank"]) == (features, centre, n, k)]
                    cells.append(_pct(*_mean(vals)) if vals else "–")
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["Unknown task (6 tasks merged, test images of the other 2 fed; 32 support images per merged task):",
              "", "| router | threshold | foreign flagged | in-task flagged |", "|---|---|---|---|"]
    for i, row in enumerate(first["unknown"]):
        f = _mean([r["unknown"][i]["foreign_flagged"] for r in runs])
        w = _mean([r["unknown"][i]["in_task_flagged"] for r in runs])
        lines.append(f"| {row['router']} | {row['threshold']} | {_pct(*f)} | {_pct(*w)} |")
    return "\n".join(lines) + "\n"


def render_plots(report: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    first = runs[0]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for features in ("pretrained", "merged"):
        for centre in (False, True):
            best = []
            for n in SIZES:  # per N, the rank with the best validation accuracy; its test accuracy plotted
                entries = [e for e in runs[0]["sweep"] if (e["features"], e["centre"], e["n"]) == (features, centre, n)]
                pick = max(entries, key=lambda e: e["val_top1"])
                best.append(100 * statistics.mean(e["routing_top1"] for r in runs for e in r["sweep"] if (
                    e["features"], e["centre"], e["n"], e["rank"]) == (features, centre, n, pick["rank"])))
            ax.plot(SIZES, best, "-o" if features == "pretrained" else "--s",
                    label=f"support, {features}{', centred' if centre else ''} (k chosen on validation)")
    for label, style in (("paper (fc1, merged, topk)", ":"), ("recommended (fc1, pretrained, top1)", "-.")):
        ax.axhline(100 * statistics.mean(r["eval"][label]["routing_top1"] for r in runs), ls=style, color="gray",
                   label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(SIZES, [str(n) for n in SIZES])
    ax.set_xlabel("unlabelled support images per task (N)")
    ax.set_ylabel("routing accuracy (top-1, %)")
    ax.legend(fontsize=7)
    ax.set_title("Few-example router: routing accuracy vs N")
    fig.tight_layout()
    vs_n = out / "router_study_support_vs_n.png"
    fig.savefig(vs_n, dpi=120)
    plt.close(fig)

    labels = ["paper (fc1, merged, topk)", "recommended (fc1, pretrained, top1)",
              "support N=32 (chosen on validation)"]
    names = first["tasks"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, label in zip(axes, labels):
        conf = torch.tensor(first["confusion"][label], dtype=torch.float)[:, :len(names)]
        share = 100 * conf / conf.sum(1, keepdim=True)
        ax.imshow(share, vmin=0, vmax=100, cmap="Blues")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 50 else "black")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("routed task (top-1)")
        ax.set_title(f"{label}: {100 * _top1(conf.long()):.1f}%", fontsize=9)
    axes[0].set_ylabel("true task")
    fig.tight_layout()
    confusion = out / "router_study_confusion.png"
    fig.savefig(confusion, dpi=110)
    plt.close(fig)
    return [str(vs_n), str(confusion)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="mass_support_study")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--routing-only", action="store_true", help="skip the two-pass accuracy evaluation")
    parser.add_argument("--quick", action="store_true", help="the small smoke-test benchmark (numbers meaningless)")
    parser.add_argument("--data-free", action="store_true",
                        help="only the calibrated data-free routers (RouterConfig.norm), to data_free.{json,md}")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    start = time.perf_counter()
    if args.data_free:
        return _write(args.out, "data_free", [run_data_free(s, args.cache_dir, full_eval=not args.routing_only,
                                                           quick=args.quick) for s in range(args.seeds)],
                      start, render_data_free)
    runs = [run_seed(s, args.cache_dir, full_eval=not args.routing_only, quick=args.quick) for s in range(args.seeds)]
    return _write(args.out, "support_study", runs, start, render_markdown, render_plots)


def _write(out, stem: str, runs: list, start: float, render, plots=None) -> dict:
    """The report of ``runs`` as ``stem``.json and ``stem``.md (and ``plots``' PNGs) in ``out``; printed too."""
    report = {"commit": git_commit() or "unknown", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "runs": runs, "seconds": time.perf_counter() - start}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    markdown = render(report)
    (out / f"{stem}.md").write_text(markdown)
    written = [str(out / f"{stem}.json"), str(out / f"{stem}.md")] + (plots(report, out) if plots else [])
    print(markdown)
    print(f"written: {', '.join(written)} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
