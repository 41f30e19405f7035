"""Effect of the SVD solver on the offline demo's accuracy (issue 16 §4).

For each seed of ``mass demo`` (the cached fine-tuned towers), decompose with the exact SVD and with the
randomized range finder forced (``auto`` picks the exact SVD for the demo's 128-d matrices), then measure on the
same 4,000 test images: MASS with three routers and the TSV-M merge. Prints and writes JSON + Markdown.

    python bench/demo_solver_effect.py --seeds 0,1,2 --out bench/results/cpu-demo-solver-effect
"""
import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import mass
from mass.tools.common import git_commit
from mass.tools.demo.run import demo_routers
from mass.tools.demo.training import DemoConfig, prepare_demo
from mass.evaluation.protocol import head_logits, routed_correct
from mass.method.merging import tsv_merge_from_decomposition
from mass.nn.model import extract_embedding

ROUTERS = ("paper", "top1", "recommended")


@torch.no_grad()
def accuracy(art, model, router: bool) -> float:
    correct = total = 0
    for ti, task in enumerate(art.tasks):
        for i in range(0, len(task.test_labels), 250):
            x, y = task.test_images[i:i + 250], task.test_labels[i:i + 250]
            if router:
                out = model.classify(pixel_values=x)
                correct += int(routed_correct(out.task_ids, out.predictions, ti, y).sum())
            else:
                pred = head_logits(extract_embedding(model(pixel_values=x)), art.heads[task.name]).argmax(1)
                correct += int((pred == y).sum())
            total += len(y)
    return correct / total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seeds": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        art = prepare_demo(config=DemoConfig.make(seed=seed), progress=False, verbose=False)
        routers = {k: v for k, v in demo_routers(art.config.router_block, art.pretrained.config.num_hidden_layers).items() if k in ROUTERS}
        per_solver = {}
        for solver in ("full", "randomized"):
            dec = mass.decompose(art.pretrained, art.finetuned, solver=solver, progress=False)
            row = {}
            for name, config in routers.items():
                model = mass.MASSModel(copy.deepcopy(art.pretrained), dec, router=config, heads=art.heads).eval()
                row[f"MASS {name}"] = accuracy(art, model, router=True)
            tsv = copy.deepcopy(art.pretrained)
            tsv.load_state_dict(tsv_merge_from_decomposition(dec))
            row["TSV-M"] = accuracy(art, tsv.eval(), router=False)
            per_solver[solver] = row
            print(seed, solver, row, flush=True)
        result["seeds"][seed] = per_solver
    rows = list(next(iter(result["seeds"].values()))["full"])
    lines = [f"# Randomized vs exact SVD on the offline demo (commit `{result['commit']}`, {result['date']})", "",
             "Accuracy over the 8 tasks' 4,000 test images (%); Δ = randomized − exact, in points.", "",
             "| method | " + " | ".join(f"seed {s} exact / rand. / Δ" for s in result["seeds"]) + " | mean Δ |",
             "|" + "---|" * (len(result["seeds"]) + 2)]
    for r in rows:
        deltas = [100 * (v["randomized"][r] - v["full"][r]) for v in result["seeds"].values()]
        cells = [f"{100 * v['full'][r]:.2f} / {100 * v['randomized'][r]:.2f} / {d:+.2f}"
                 for v, d in zip(result["seeds"].values(), deltas)]
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {statistics.fmean(deltas):+.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(text)


if __name__ == "__main__":
    main()
