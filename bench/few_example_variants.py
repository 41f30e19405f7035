"""Few-example router variants, chosen on validation, then measured once on test (docs/router_study.md §9).

Per seed (0-2 of ``mass demo``, cached towers; nothing is retrained): support = the first 32 of one random
permutation of each task's training images, validation = the next 250 (``mass.tools.demo.support_study.split_support_validation``;
disjoint from the support, never a test image). Phase 1 (validation only): top-1 routing accuracy of every
variant (block(s), rank, centring, ``whiten``) on 8 tasks, and its unknown-task detector at the default
threshold (6 tasks merged and calibrated; the validation images of the 6 and of the 2 others). Phase 2: the
variant with the best mean validation routing at each block (4, the paper's; 5, the last) is measured on the
test images, both passes (routing, normalised accuracy), and its detector on the test images, beside the
previous ``few_example()`` rows. The detector's threshold is never tuned: it is the library's default (1.0),
which for a whitened fit is the 2% split-conformal quantile of the merged tasks' own held-out support scores.
Writes JSON (``--out``) and prints a log.

    python bench/few_example_variants.py --out /tmp/variants.json [--seeds 0 1 2]
    python bench/few_example_variants.py --render /tmp/variants.json --plot docs/router_study_whiten.png
"""
import argparse
import copy
import json
import statistics

import torch

import mass
from mass.tools.demo.support_study import evaluate_mass, split_support_validation
from mass.tools.demo.training import DemoConfig, prepare_demo

N_SUPPORT = 32
WHITEN = (0.0, 0.2, 0.5, 0.8)
VARIANTS = [dict(layers=layers, support_rank=rank, centre=centre, whiten=w)
            for layers in ((4,), (5,), (4, 5)) for rank in (1, 2) for centre in (True, False) for w in WHITEN]
PREVIOUS = {"previous few_example() (block 4)": dict(layers=(4,), support_rank=1, centre=True, whiten=0.0),
            "previous few_example(layer=5, centre=False)": dict(layers=(5,), support_rank=1, centre=False, whiten=0.0)}


def _router(v, unknown="off"):
    return mass.RouterConfig.few_example(layers=list(v["layers"]), support_rank=v["support_rank"],
                                         centre=v["centre"], whiten=v["whiten"], unknown=unknown)


def _name(v):
    return (f"blocks {list(v['layers'])}, k={v['support_rank']}, {'centred' if v['centre'] else 'uncentred'}, "
            f"whiten={v['whiten']}")


class Seed:
    """One seed's cached benchmark: the 8-task and 6-task models, support, validation and test images."""

    def __init__(self, seed):
        self.art = prepare_demo(config=DemoConfig.make(seed=seed), progress=False, verbose=False, num_threads=1)
        names = self.art.task_names
        dec = mass.decompose(self.art.pretrained, self.art.finetuned, progress=False)
        self.base = mass.MASSModel(copy.deepcopy(self.art.pretrained), dec, router=mass.RouterConfig(layer=4),
                                   heads=self.art.heads)
        dec6 = mass.decompose(self.art.pretrained, {t: self.art.finetuned[t] for t in names[:6]}, progress=False)
        self.base6 = mass.MASSModel(copy.deepcopy(self.art.pretrained), dec6, router=mass.RouterConfig(layer=4))
        pools, val = split_support_validation(self.art, seed)
        self.support = {t: pools[t][:N_SUPPORT] for t in names}
        self.images = {"val": [val[t] for t in names], "test": [t.test_images for t in self.art.tasks]}
        self.labels = {s: torch.cat([torch.full((x.shape[0],), i) for i, x in enumerate(imgs)])
                       for s, imgs in self.images.items()}
        self._feats = {}

    def feats(self, split, layers):
        key = (split, tuple(layers))
        if key not in self._feats:
            probe = self.base.with_router(mass.RouterConfig(layers=list(layers), features="pretrained", mode="top1"))
            x = torch.cat(self.images[split])
            with torch.no_grad():  # (G, B, D) routing features of the probe's blocks, read once per split
                self._feats[key] = torch.cat([probe.first_pass(pixel_values=x[i:i + 500])[0]
                                              for i in range(0, x.shape[0], 500)], 1)
        return self._feats[key]

    def routing(self, v, split):
        m = self.base.calibrate(self.support, _router(v))
        ids = m.route_features(self.feats(split, v["layers"])).task_ids[:, 0]
        return (ids == self.labels[split]).double().mean().item()

    def unknown(self, v, split):
        """(share of the 2 foreign tasks' images flagged, share of the 6 merged tasks' images flagged)."""
        names = self.art.task_names
        m = self.base6.calibrate({t: self.support[t] for t in names[:6]}, _router(v, unknown="pretrained"))
        flagged = m.route_features(self.feats(split, v["layers"])).unknown
        inside = self.labels[split] < 6
        return flagged[~inside].double().mean().item(), flagged[inside].double().mean().item()


def _pct(values):
    m = 100 * statistics.mean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def render(report: dict, plot=None) -> str:
    """Markdown tables (validation grid, then test rows) of a report; optionally a PNG of the validation grid."""
    lines = ["| variant (validation) | routing top-1 | foreign flagged | in-task flagged |", "|---|---|---|---|"]
    for name, row in report["validation"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(row[k]) for k in ("routing", "foreign_flagged",
                                                                          "in_task_flagged")) + " |")
    lines += ["", "| router (test) | routing | normalised | foreign flagged | in-task flagged | per seed (routing / "
                  "normalised / foreign / in-task) |", "|---|---|---|---|---|---|"]
    for key, row in report["test"].items():
        runs = row["runs"]
        per_seed = "; ".join(f"{100 * r['routing']:.1f} / {100 * r['normalized']:.1f} / {100 * r['foreign_flagged']:.1f}"
                             f" / {100 * r['in_task_flagged']:.1f}" for r in runs)
        lines.append(f"| {key}: {row['name']} | " + " | ".join(_pct([r[k] for r in runs]) for k in (
            "routing", "normalized", "foreign_flagged", "in_task_flagged")) + f" | {per_seed} |")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, row in report["validation"].items():
            v = row["variant"]
            if v["support_rank"] != 1 or not v["centre"]:
                continue
            x = v["whiten"]
            label = f"blocks {v['layers']}"
            for ax, key in zip(axes, ("routing", "foreign_flagged")):
                ax.errorbar([x], [100 * statistics.mean(row[key])], yerr=[100 * statistics.stdev(row[key])],
                            fmt="o", color={"[4]": "C0", "[5]": "C1", "[4, 5]": "C2"}[str(v["layers"])],
                            label=label, capsize=3)
        for ax, title in zip(axes, ("routing accuracy, 8 tasks (validation, %)",
                                    "foreign images flagged at threshold 1 (validation, %)")):
            handles, labels = ax.get_legend_handles_labels()
            keep = {lbl: h for h, lbl in zip(handles, labels)}
            ax.legend(keep.values(), keep.keys())
            ax.set_xlabel("RouterConfig.whiten (rank 1, centred)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--render", metavar="JSON", help="print the tables of a finished run instead of measuring")
    p.add_argument("--plot", metavar="PNG", help="with --render: also plot the validation grid")
    args = p.parse_args()
    if args.render:
        with open(args.render) as fh:
            print(render(json.load(fh), args.plot))
        return
    if not args.out:
        p.error("--out is required to measure")
    torch.set_num_threads(1)
    seeds = {s: Seed(s) for s in args.seeds}
    val = {}
    for v in VARIANTS:
        rows = [(seeds[s].routing(v, "val"), *seeds[s].unknown(v, "val")) for s in args.seeds]
        val[_name(v)] = {"variant": {**v, "layers": list(v["layers"])}, "routing": [r[0] for r in rows],
                         "foreign_flagged": [r[1] for r in rows], "in_task_flagged": [r[2] for r in rows]}
        print("val", _name(v), json.dumps({k: [round(100 * x, 2) for x in val[_name(v)][k]]
                                          for k in ("routing", "foreign_flagged", "in_task_flagged")}), flush=True)
    chosen = {}
    for layers in ((4,), (5,)):
        cands = [v for v in VARIANTS if v["layers"] == layers]
        chosen[f"chosen at block {layers[0]}"] = max(cands, key=lambda v: statistics.mean(val[_name(v)]["routing"]))
        print("chosen at", layers, _name(chosen[f"chosen at block {layers[0]}"]), flush=True)
    test = {}
    for key, v in list(chosen.items()) + list(PREVIOUS.items()):
        rows = []
        for s in args.seeds:
            S = seeds[s]
            full = evaluate_mass(S.base.calibrate(S.support, _router(v)), S.art)
            names = S.art.task_names
            norm = sum(full["acc"][t] / S.art.metrics[t]["finetuned_acc"] for t in names) / len(names)
            f, w = S.unknown(v, "test")
            rows.append({"seed": s, "routing": sum(full["routing"].values()) / len(names), "normalized": norm,
                         "routing_per_task": full["routing"], "foreign_flagged": f, "in_task_flagged": w})
            print("test", key, _name(v), {k: x for k, x in rows[-1].items() if k != "routing_per_task"}, flush=True)
        test[key] = {"variant": {**v, "layers": list(v["layers"])}, "name": _name(v), "runs": rows}
    with open(args.out, "w") as fh:
        json.dump({"validation": val, "chosen": {k: _name(v) for k, v in chosen.items()}, "test": test}, fh, indent=1)


if __name__ == "__main__":
    main()
