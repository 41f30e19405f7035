"""The accuracy-versus-cost curve of the first pass (issue 25; docs/router_study.md §10).

On the offline demo (the cached towers of ``mass demo --seeds 3``; nothing is retrained), per seed: support =
the first 32 of one random permutation of each task's training images, validation = the next 250
(:func:`mass.tools.demo.support_study.split_support_validation`; disjoint from the support, never a test image),
test = the test split. For every routing block l = 0..N-1 (and the pairs {l-1, l} scored in one pass) × token
(``cls``, ``mean``, ``patch_mean``) × few-example settings (rank 1/2, centred or not, whiten 0/0.2/0.5) ×
``reuse_prefix`` off/on, and for the data-free routers (fc1 basis: pretrained features with the l2 or energy
norm, TSV-M features with l2 or sv), top-1: routing accuracy, normalised accuracy (over the fine-tuned model's
accuracy on the same images) and the unknown-task detector at its default threshold (6 tasks merged and
calibrated on their support, the images of the 2 others fed as foreign).

How the normalised accuracy of hundreds of routers is read without running hundreds of second passes: with
top-1 a sample is right only when it is routed to its own task and its own task's forward predicts its label
(``mass.evaluation.protocol.routed_correct``), so the script runs, once per image, its own task's forward
(plain second pass; and with prefix reuse at every block l, θ0's or the TSV-M model's blocks ≤ l then its
task's) and scores every router by a lookup. A check at start-up compares the lookup with
``support_study.evaluate_mass`` (the full two-pass model) for one router on the test split: they must agree
exactly.

Choices are made on validation only; the test numbers of a configuration are read once, for the rows reported.
The preset rule, fixed before any test number was looked at: among every configuration (data-free or
few-example, reuse off or on), the cheapest by the FLOP model's B/32 ratio at the same share of the depth
(``bench/flop_model.py``: ``early_ratio``) whose mean validation normalised accuracy over the seeds is within
0.5 point of the best configuration's; ties in cost go to the better validation accuracy.

    python bench/early_router_study.py --out docs/router_study_early.json [--seeds 0 1 2]
    python bench/early_router_study.py --render docs/router_study_early.json --plot docs/router_study_early.png
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mass  # noqa: E402
from mass.method.router import depth_layer  # noqa: E402
from mass.method.support import fit as fit_support  # noqa: E402
from mass.nn.routing import forced_routing  # noqa: E402
from mass.nn.second_pass import run_second_pass  # noqa: E402
from mass.tools.demo.support_study import SIZES, evaluate_mass, split_support_validation  # noqa: E402
from mass.tools.demo.training import DemoConfig, prepare_demo  # noqa: E402

from flop_model import early_ratio  # noqa: E402

N_SUPPORT = 32
N_VAL = 250
TOKENS = ("cls", "mean", "patch_mean")
SETTINGS = [dict(support_rank=r, centre=c, whiten=w) for r in (1, 2) for c in (True, False) for w in (0.0, 0.2, 0.5)]
DATA_FREE = [("pretrained", "l2"), ("pretrained", "energy"), ("merged", "l2"), ("merged", "sv")]
WITHIN = 0.5  # points of validation normalised accuracy (the preset rule)
BATCH = 500
COST_MODEL = "B32"


def configurations(n_blocks: int) -> list[dict]:
    """Every router of the grid (top-1), as plain data."""
    out = []
    for l in range(n_blocks):
        for features, norm in DATA_FREE:
            out.append(dict(kind="data-free", layers=[l], token="cls", features=features, norm=norm))
        for token, s in itertools.product(TOKENS, SETTINGS):
            out.append(dict(kind="few-example", layers=[l], token=token, features="pretrained", **s))
    for l in range(1, n_blocks):
        for s in SETTINGS:
            out.append(dict(kind="few-example", layers=[l - 1, l], token="cls", features="pretrained", **s))
    return out


def name(c: dict) -> str:
    if c["kind"] == "data-free":
        return f"data-free blocks {c['layers']} {c['token']} {c['features']} {c['norm']}"
    return (f"few-example blocks {c['layers']} {c['token']} k={c['support_rank']} "
            f"{'centred' if c['centre'] else 'uncentred'} whiten={c['whiten']}")


def router(c: dict, unknown: str = "off") -> mass.RouterConfig:
    if c["kind"] == "data-free":
        return mass.RouterConfig(layers=c["layers"], token=c["token"], features=c["features"], norm=c["norm"],
                                 mode="top1", unknown=unknown)
    return mass.RouterConfig.few_example(layers=c["layers"], token=c["token"], support_rank=c["support_rank"],
                                         centre=c["centre"], whiten=c["whiten"], unknown=unknown)


def cost(c: dict, n_blocks: int, reuse: bool) -> float:
    """The FLOP model's B/32 (T = 8) ratio at the same share of the depth as the demo's routing block."""
    b32 = 12
    layer = depth_layer((c["layers"][-1] + 1) / n_blocks, b32)
    return early_ratio(COST_MODEL, 8, layer, reuse_prefix=reuse, token=c["token"], blocks_scored=len(c["layers"]))


class Seed:
    """One seed's cached benchmark, its splits, every routing feature read once, and the own-task lookups."""

    def __init__(self, seed: int, log):
        self.seed = seed
        self.art = art = prepare_demo(config=DemoConfig.make(seed=seed), progress=False, verbose=False,
                                      num_threads=1)
        self.names = names = art.task_names
        dec = mass.decompose(art.pretrained, art.finetuned, progress=False)
        self.base = mass.MASSModel(copy.deepcopy(art.pretrained), dec, router=mass.RouterConfig(layer=0),
                                   heads=art.heads)
        dec6 = mass.decompose(art.pretrained, {t: art.finetuned[t] for t in names[:6]}, progress=False)
        self.base6 = mass.MASSModel(copy.deepcopy(art.pretrained), dec6, router=mass.RouterConfig(layer=0))
        self.n_blocks = self.base.arch.n_blocks
        pools, val = split_support_validation(art, seed, N_VAL)
        val_labels = self._val_labels(val)
        self.support = {t: pools[t][:N_SUPPORT] for t in names}
        self.images = {"val": [val[t] for t in names], "test": [t.test_images for t in art.tasks]}
        self.labels = {"val": val_labels, "test": [t.test_labels for t in art.tasks]}
        self.task_of = {s: torch.cat([torch.full((x.shape[0],), i) for i, x in enumerate(imgs)])
                        for s, imgs in self.images.items()}
        t0 = time.perf_counter()
        self.feats, self.support_feats = {}, {}
        for features in ("pretrained", "merged"):
            for token in TOKENS:
                probe = self.base.with_router(mass.RouterConfig(layers=list(range(self.n_blocks)), token=token,
                                                                features=features, mode="top1"))
                for split in ("val", "test"):
                    self.feats[features, token, split] = self._first_pass(probe, torch.cat(self.images[split]))
                self.support_feats[features, token] = {t: self._first_pass(probe, self.support[t]) for t in names}
        log(f"[seed {seed}] features read in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        self.finetuned_acc = {"test": [art.metrics[t]["finetuned_acc"] for t in names], "val": self._finetuned_val()}
        self.own = {(None, None): {s: self._own_correct(s) for s in ("val", "test")}}
        for l in range(self.n_blocks):
            for features in ("pretrained", "merged"):
                self.own[l, features] = {s: self._own_correct(s, l, features) for s in ("val", "test")}
        log(f"[seed {seed}] own-task forwards in {time.perf_counter() - t0:.1f}s")
        self._check_lookup()

    def _val_labels(self, val: dict) -> list:
        """The class labels of the validation images (the same permutation as split_support_validation)."""
        g = torch.Generator().manual_seed(1000 + self.seed)
        labels = []
        for task in self.art.tasks:
            order = torch.randperm(task.train_images.shape[0], generator=g)
            idx = order[max(SIZES):max(SIZES) + N_VAL]
            if not torch.equal(task.train_images[idx], val[task.name]):
                raise RuntimeError("validation split mismatch")
            labels.append(task.train_labels[idx])
        return labels

    @torch.no_grad()
    def _first_pass(self, probe, x):
        return torch.cat([probe.first_pass(pixel_values=x[i:i + BATCH])[0] for i in range(0, x.shape[0], BATCH)], 1)

    def _predict(self, emb, t):
        head = F.normalize(self.art.heads[self.names[t]].float(), dim=-1)
        return (F.normalize(emb.float(), dim=-1) @ head.T).argmax(1)

    @torch.no_grad()
    def _finetuned_val(self) -> list:
        accs = []
        for t, name_ in enumerate(self.names):
            ft = copy.deepcopy(self.art.pretrained)
            ft.load_state_dict(self.art.finetuned[name_])
            x, y = self.images["val"][t], self.labels["val"][t]
            accs.append(float((self._predict(mass.extract_embedding(ft.eval()(pixel_values=x)), t) == y)
                              .double().mean()))
        return accs

    @torch.no_grad()
    def _own_correct(self, split, reuse_layer=None, features=None) -> torch.Tensor:
        """(images,) bool: its own task's forward predicts its label (plain second pass, or with the prefix
        ≤ ``reuse_layer`` from θ0's / the TSV-M model's first pass)."""
        model = self.base if reuse_layer is None else self.base.with_router(
            mass.RouterConfig(layer=reuse_layer, features=features, mode="top1"), reuse_prefix=True)
        out = []
        for t, (x_all, y_all) in enumerate(zip(self.images[split], self.labels[split])):
            for i in range(0, x_all.shape[0], BATCH):
                x, y = x_all[i:i + BATCH], y_all[i:i + BATCH]
                if reuse_layer is None:
                    emb = model(pixel_values=x, task_ids=t)
                else:
                    _, block = model.first_pass(pixel_values=x)
                    routing = forced_routing(model.tasks, t, x.shape[0], x.device)
                    emb = run_second_pass(model, (), {"pixel_values": x}, routing, block)
                out.append(self._predict(mass.extract_embedding(emb), t) == y)
        return torch.cat(out)

    def _check_lookup(self):
        """The lookup against the full two-pass model (evaluate_mass) for one router, test split: exact."""
        c = dict(kind="few-example", layers=[2], token="cls", features="pretrained", support_rank=1, centre=False,
                 whiten=0.2)
        ids = self.route(c, "test")
        model = self.base.with_router(router(c), support=self.fit(c, self.names))
        full = evaluate_mass(model, self.art)
        for t, name_ in enumerate(self.names):
            mask = self.task_of["test"] == t
            own = ((ids[mask] == t) & self.own[None, None]["test"][mask]).double().mean().item()
            if abs(own - full["acc"][name_]) > 0 or abs((ids[mask] == t).double().mean().item()
                                                         - full["routing"][name_]) > 0:
                raise RuntimeError(f"lookup disagrees with evaluate_mass on {name_}: {own} vs {full['acc'][name_]}")

    def fit(self, c, tasks, unknown="off"):
        r = router(c, unknown)
        feats = {t: self.support_feats[c["features"], c["token"]][t][c["layers"]] for t in tasks}
        base = self.base if len(tasks) == len(self.names) else self.base6
        fc1 = base.with_router(dataclasses.replace(r, basis="fc1", unknown="off", whiten=0.0)).routing_basis
        return fit_support(feats, tasks, r, c["layers"], fc1)

    def route(self, c, split) -> torch.Tensor:
        feats = self.feats[c["features"], c["token"], split][c["layers"]]
        if c["kind"] == "data-free":
            return self.base.with_router(router(c)).route_features(feats).task_ids[:, 0]
        model = self.base.with_router(router(c), support=self.fit(c, self.names))
        return model.route_features(feats).task_ids[:, 0]

    def unknown(self, c, split) -> tuple:
        names6 = self.names[:6]
        model = self.base6.with_router(router(c, "pretrained"), support=self.fit(c, names6, "pretrained"))
        flagged = model.route_features(self.feats[c["features"], c["token"], split][c["layers"]]).unknown
        inside = self.task_of[split] < 6
        return flagged[~inside].double().mean().item(), flagged[inside].double().mean().item()

    def measure(self, c, split) -> dict:
        ids = self.route(c, split)
        task = self.task_of[split]
        hit = ids == task
        routing = statistics.mean((hit[task == t]).double().mean().item() for t in range(len(self.names)))
        out = {"routing": routing}
        for key, own in (("normalised", self.own[None, None]),
                         ("normalised_reuse", self.own[c["layers"][-1], c["features"]])):
            out[key] = statistics.mean(((hit & own[split])[task == t]).double().mean().item()
                                       / self.finetuned_acc[split][t] for t in range(len(self.names)))
        out["foreign_flagged"], out["in_task_flagged"] = self.unknown(c, split)
        return out


def preset_rule(rows: list) -> dict:
    """The rule fixed before test: the cheapest (modelled B/32 ratio) row whose mean validation normalised
    accuracy is within WITHIN points of the best row's; ties in cost to the better validation accuracy."""
    best = max(r["val_normalised"] for r in rows)
    ok = [r for r in rows if r["val_normalised"] >= best - WITHIN]
    return min(ok, key=lambda r: (round(r["cost"], 6), -r["val_normalised"]))


def summarise(report: dict) -> dict:
    """Rows of (configuration, reuse): mean validation numbers over the seeds, the model cost; then per cell
    (blocks, token, reuse, kind) the settings chosen on validation; the preset by the rule."""
    n_blocks = report["n_blocks"]
    rows = []
    for key, c in report["configs"].items():
        val = report["val"][key]
        for reuse in (False, True):
            k = "normalised_reuse" if reuse else "normalised"
            rows.append({"key": key, "config": c, "reuse": reuse, "cost": cost(c, n_blocks, reuse),
                         "val_normalised": 100 * statistics.mean(v[k] for v in val),
                         "val_routing": 100 * statistics.mean(v["routing"] for v in val),
                         "val_foreign": 100 * statistics.mean(v["foreign_flagged"] for v in val),
                         "val_in_task": 100 * statistics.mean(v["in_task_flagged"] for v in val)})
    cells = {}
    for r in rows:
        c = r["config"]
        cell = (c["kind"], tuple(c["layers"]), c["token"], r["reuse"]) if c["kind"] == "few-example" else (
            c["kind"], tuple(c["layers"]), f"{c['features']} {c['norm']}", r["reuse"])
        if cell not in cells or r["val_normalised"] > cells[cell]["val_normalised"]:
            cells[cell] = r
    return {"rows": rows, "cells": cells, "preset": preset_rule(rows)}


def run(seeds: list, out: str, log=print) -> dict:
    torch.set_num_threads(1)
    report = {"seeds": seeds, "n_support": N_SUPPORT, "n_val": N_VAL, "within": WITHIN, "val": {}, "test": {}}
    benches = []
    for s in seeds:
        S = Seed(s, log)
        benches.append(S)
        report["n_blocks"] = S.n_blocks
        configs = configurations(S.n_blocks)
        report["configs"] = {name(c): c for c in configs}
        t0 = time.perf_counter()
        for c in configs:
            report["val"].setdefault(name(c), []).append(S.measure(c, "val"))
        log(f"[seed {s}] {len(configs)} routers on validation in {time.perf_counter() - t0:.1f}s")
    summary = summarise(report)
    # Test, read once: each cell's configuration chosen on validation, and the preset.
    for r in list(summary["cells"].values()) + [summary["preset"]]:
        if r["key"] not in report["test"]:
            report["test"][r["key"]] = [S.measure(r["config"], "test") for S in benches]
    report["preset"] = {"key": summary["preset"]["key"], "reuse": summary["preset"]["reuse"]}
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1)
    return report


def _pm(values, scale=100):
    m = scale * statistics.mean(values)
    return f"{m:.1f} ± {scale * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def render(report: dict, plot=None) -> str:
    summary = summarise(report)
    test = report["test"]
    lines = [f"Preset (rule: cheapest within {report['within']} point of the best validation normalised accuracy): "
             f"**{summary['preset']['key']}, reuse_prefix={summary['preset']['reuse']}** "
             f"(B/32 FLOP ratio {summary['preset']['cost']:.3f}, validation normalised "
             f"{summary['preset']['val_normalised']:.2f}; best on validation "
             f"{max(r['val_normalised'] for r in summary['rows']):.2f})", "",
             "| blocks | token / features | reuse_prefix | chosen on validation | B/32 FLOP ratio | validation "
             "normalised | test routing | test normalised | foreign flagged | in-task flagged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(summary["cells"].items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][1], kv[0][2]))
    for (kind, layers, what, reuse), r in order:
        t = test[r["key"]]
        norm_key = "normalised_reuse" if reuse else "normalised"
        c = r["config"]
        chosen = "–" if kind == "data-free" else (f"k={c['support_rank']}, {'centred' if c['centre'] else 'uncentred'}"
                                                  f", whiten={c['whiten']}")
        lines.append(f"| {list(layers)} | {kind}: {what} | {'on' if reuse else 'off'} | {chosen} | {r['cost']:.3f} | "
                     f"{r['val_normalised']:.1f} | {_pm([x['routing'] for x in t])} | "
                     f"{_pm([x[norm_key] for x in t])} | {_pm([x['foreign_flagged'] for x in t])} | "
                     f"{_pm([x['in_task_flagged'] for x in t])} |")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        points = []
        for (kind, layers, what, reuse), r in summary["cells"].items():
            norm_key = "normalised_reuse" if reuse else "normalised"
            y = 100 * statistics.mean(x[norm_key] for x in test[r["key"]])
            points.append((r["cost"], y))
            style = {("few-example", False): ("o", "C0"), ("few-example", True): ("x", "C3"),
                     ("data-free", False): ("s", "C2"), ("data-free", True): ("+", "C1")}[kind, reuse]
            ax.scatter([r["cost"]], [y], marker=style[0], color=style[1], s=18,
                       label=f"{kind}, reuse_prefix={'on' if reuse else 'off'}")
        front, best = [], -1.0
        for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
            if y > best:
                front.append((x, y))
                best = y
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
        p = summary["preset"]
        py = 100 * statistics.mean(x["normalised_reuse" if p["reuse"] else "normalised"] for x in test[p["key"]])
        ax.scatter([p["cost"]], [py], marker="*", s=180, color="gold", edgecolor="k", zorder=5, label="fast() preset")
        handles, labels = ax.get_legend_handles_labels()
        keep = dict(zip(labels, handles))
        ax.legend(keep.values(), keep.keys(), fontsize=8, loc="lower right")
        ax.set_xlabel(f"cost: FLOP-model ratio to one plain forward (ViT-B/32, T=8, top-1) at the same depth share")
        ax.set_ylabel("normalised accuracy, test (%), mean of 3 seeds")
        ax.set_title("Accuracy vs first-pass cost (offline demo, 6 blocks; setting per point chosen on validation)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--render", metavar="JSON")
    p.add_argument("--plot", metavar="PNG")
    args = p.parse_args()
    if not (args.render or args.out):
        p.error("give --out FILE to measure, or --render FILE to print a finished run's tables")
    report = run(args.seeds, args.out, log=lambda m: print(m, flush=True)) if args.out else None
    if report is None:
        with open(args.render) as fh:
            report = json.load(fh)
    print(render(report, args.plot))


if __name__ == "__main__":
    main()
