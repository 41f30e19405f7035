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

Choices are made on validation only. To fit each configuration once, its test numbers are computed in the
same pass and stored, but no choice reads them; the tables report test only for the configurations chosen on
validation (one per cell, and the two rules' picks).

Cost: the FLOP model's ViT-B/32 ratio (``bench/flop_model.py``: ``early_ratio``) of the configuration placed on
B/32 by depth (:func:`preset_depth`: the demo's block l of 6 becomes B/32's block 2l of 12). Two rules, fixed
before any test number was looked at (rule A first; rule B after seed 0's validation grid showed that no
block before the last two is within 0.5 point of the best, so that rule A picks a slow router here):

* rule A (accuracy first): the cheapest configuration whose mean validation normalised accuracy over the
  seeds is within 0.5 point of the best configuration's;
* rule B (cost first, ``RouterConfig.fast()``): the best mean validation normalised accuracy among the
  configurations whose modelled B/32 ratio is at most 1.6 (the issue's latency target).

    for s in 0 1 2; do python bench/early_router_study.py --seed $s --out /tmp/early_$s.json; done
    python bench/early_router_study.py --combine /tmp/early_{0,1,2}.json --out docs/router_study_early.json \
        --plot docs/router_study_early.png
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
WITHIN = 0.5  # points of validation normalised accuracy (rule A)
COST_TARGET = 1.6  # the issue's target ratio to one plain forward, ViT-B/32 top-1 (rule B, the fast() preset)
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


def preset_depth(layer: int, n_blocks: int) -> float:
    """The ``RouterConfig.depth`` a preset routing at the demo's block ``layer`` gets: the middle of that
    block's share of the depth, ``(layer + 0.5) / n_blocks``, so the demo routes at ``layer`` and a 12-block
    ViT-B/32 at block ``2·layer`` (the first of the two B/32 blocks in the same sixth of the depth; the cheaper)."""
    return (layer + 0.5) / n_blocks


def cost(c: dict, n_blocks: int, reuse: bool) -> float:
    """The FLOP model's ViT-B/32 (T = 8, top-1) ratio to one plain forward for the configuration placed on B/32
    by :func:`preset_depth` (every scored block moved the same way)."""
    layer = depth_layer(preset_depth(c["layers"][-1], n_blocks), 12)
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
        model = self.models(c)[0]
        ids = self.route(c, "test", model)
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

    def models(self, c):
        """The 8-task routing model and the 6-task detector model of configuration ``c`` (fitted once)."""
        if c["kind"] == "data-free":
            model = self.base.with_router(router(c))
        else:
            model = self.base.with_router(router(c), support=self.fit(c, self.names))
        detector = self.base6.with_router(router(c, "pretrained"), support=self.fit(c, self.names[:6], "pretrained"))
        return model, detector

    def route(self, c, split, model=None) -> torch.Tensor:
        model = model or self.models(c)[0]
        return model.route_features(self.feats[c["features"], c["token"], split][c["layers"]]).task_ids[:, 0]

    def measure(self, c) -> dict:
        """{split: numbers} for validation and test (one fit serves both; choices read validation only)."""
        model, detector = self.models(c)
        out = {}
        for split in ("val", "test"):
            ids = self.route(c, split, model)
            task = self.task_of[split]
            hit = ids == task
            T = len(self.names)
            m = {"routing": statistics.mean(hit[task == t].double().mean().item() for t in range(T))}
            for key, own in (("normalised", self.own[None, None]),
                             ("normalised_reuse", self.own[c["layers"][-1], c["features"]])):
                m[key] = statistics.mean(((hit & own[split])[task == t]).double().mean().item()
                                         / self.finetuned_acc[split][t] for t in range(T))
            feats = self.feats[c["features"], c["token"], split][c["layers"]]
            flagged = detector.route_features(feats).unknown
            inside = task < 6
            m["foreign_flagged"] = flagged[~inside].double().mean().item()
            m["in_task_flagged"] = flagged[inside].double().mean().item()
            out[split] = m
        return out


def accuracy_rule(rows: list) -> dict:
    """Rule A, fixed before test: the cheapest (modelled B/32 ratio) row whose mean validation normalised
    accuracy is within WITHIN points of the best row's; ties in cost to the better validation accuracy."""
    best = max(r["val_normalised"] for r in rows)
    ok = [r for r in rows if r["val_normalised"] >= best - WITHIN]
    return min(ok, key=lambda r: (round(r["cost"], 6), -r["val_normalised"]))


def cost_rule(rows: list) -> dict:
    """Rule B, fixed before test (``RouterConfig.fast()``): the best mean validation normalised accuracy among
    the rows whose modelled B/32 ratio is at most COST_TARGET (the issue's latency target); ties to the cheaper."""
    ok = [r for r in rows if r["cost"] <= COST_TARGET]
    return max(ok, key=lambda r: (round(r["val_normalised"], 9), -r["cost"]))


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
    return {"rows": rows, "cells": cells, "preset": cost_rule(rows), "accuracy_first": accuracy_rule(rows)}


def run(seed: int, out: str, log=print) -> dict:
    """One seed: every configuration on validation and test (one fit each), written to ``out``."""
    torch.set_num_threads(1)
    S = Seed(seed, log)
    configs = configurations(S.n_blocks)
    result = {"seed": seed, "n_blocks": S.n_blocks, "configs": {name(c): c for c in configs}, "val": {}, "test": {}}
    t0 = time.perf_counter()
    for i, c in enumerate(configs):
        m = S.measure(c)
        result["val"][name(c)], result["test"][name(c)] = m["val"], m["test"]
        if i % 25 == 24:
            log(f"[seed {seed}] {i + 1}/{len(configs)} routers in {time.perf_counter() - t0:.1f}s")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def combine(paths: list) -> dict:
    """The seeds' results as one report: per configuration, lists over the seeds (same grid in every file)."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    report = {"seeds": [r["seed"] for r in runs], "n_blocks": runs[0]["n_blocks"], "configs": runs[0]["configs"],
              "n_support": N_SUPPORT, "n_val": N_VAL, "within": WITHIN}
    for split in ("val", "test"):
        report[split] = {k: [r[split][k] for r in runs] for k in report["configs"]}
    summary = summarise(report)
    for rule in ("preset", "accuracy_first"):
        report[rule] = {"key": summary[rule]["key"], "reuse": summary[rule]["reuse"], "cost": summary[rule]["cost"],
                        "val_normalised": summary[rule]["val_normalised"]}
    return report


def _pm(values, scale=100):
    m = scale * statistics.mean(values)
    return f"{m:.1f} ± {scale * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def render(report: dict, plot=None) -> str:
    summary = summarise(report)
    test = report["test"]
    best = max(summary["rows"], key=lambda r: r["val_normalised"])
    lines = [f"Best on validation: {best['key']}, reuse_prefix={best['reuse']} ({best['val_normalised']:.2f}, "
             f"B/32 FLOP ratio {best['cost']:.3f}).", "",
             "| rule (fixed before test) | pick | B/32 FLOP ratio | validation normalised | test routing | test "
             "normalised | foreign flagged | in-task flagged |", "|---|---|---|---|---|---|---|---|"]
    for label, r in ((f"A: cheapest within {report['within']} point of the best", summary["accuracy_first"]),
                     (f"B: best at B/32 ratio <= {COST_TARGET} (`fast()`)", summary["preset"])):
        t = test[r["key"]]
        k = "normalised_reuse" if r["reuse"] else "normalised"
        lines.append(f"| {label} | {r['key']}, reuse_prefix={'on' if r['reuse'] else 'off'} | {r['cost']:.3f} | "
                     f"{r['val_normalised']:.1f} | {_pm([x['routing'] for x in t])} | {_pm([x[k] for x in t])} | "
                     f"{_pm([x['foreign_flagged'] for x in t])} | {_pm([x['in_task_flagged'] for x in t])} |")
    lines += ["", "| blocks | token / features | reuse_prefix | chosen on validation | B/32 FLOP ratio | validation "
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
        ax.set_xlabel("cost: FLOP-model ratio to one plain forward (ViT-B/32, T=8, top-1); demo block l at B/32 block 2l")
        ax.set_ylabel("normalised accuracy, test (%), mean of 3 seeds")
        ax.set_title("Accuracy vs first-pass cost (offline demo, 6 blocks; setting per point chosen on validation)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, help="measure one seed (every configuration) into --out")
    p.add_argument("--out")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="the seeds' files: one report into --out")
    p.add_argument("--render", metavar="JSON", help="print the tables of a combined report")
    p.add_argument("--plot", metavar="PNG")
    args = p.parse_args()
    if args.seed is not None:
        run(args.seed, args.out, log=lambda m: print(m, flush=True))
    elif args.combine:
        report = combine(args.combine)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(render(report, args.plot))
    elif args.render:
        with open(args.render) as fh:
            print(render(json.load(fh), args.plot))
    else:
        p.error("give --seed S --out FILE, --combine FILES --out FILE, or --render FILE")


if __name__ == "__main__":
    main()
