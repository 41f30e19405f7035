"""Half-precision banks on the offline demo (issue 23): accuracy change of every router row, storage factor.

Per seed of ``mass demo`` (the fine-tuned towers come from the demo cache, trained on first use), the demo's own
protocol (:func:`mass.evaluate`, the demo's routers and support images) runs twice on the same data: banks in
fp32 (the model's dtype) and in ``--bank-dtype`` (bfloat16 by default). Reported per MASS row: normalised
accuracy (merged / individual) and routing accuracy of both, and the change; and the storage factor of both.

    python bench/half_banks_demo.py --out bench/results/cpu-half-banks-demo.json [--seeds 0 1 2]
"""
import argparse
import json
import statistics
import time

import torch

import mass
from mass.tools.common import environment, git_commit
from mass.tools.demo.run import SUPPORT_PER_TASK, demo_routers
from mass.tools.demo.training import DemoConfig, prepare_demo


def run_seed(seed: int, bank_dtype: str) -> dict:
    art = prepare_demo(config=DemoConfig.make(seed=seed), progress=False, verbose=True)
    data = {t.name: torch.utils.data.TensorDataset(t.test_images, t.test_labels) for t in art.tasks}
    support = {t.name: torch.utils.data.TensorDataset(t.train_images, t.train_labels) for t in art.tasks}
    routers = demo_routers(art.config.router_block, art.pretrained.config.num_hidden_layers)
    out = {}
    for dtype in (None, bank_dtype):
        torch.manual_seed(seed)  # the same support draw for both
        t0 = time.perf_counter()
        result = mass.evaluate(art.clip, art.finetuned, data, art.heads, methods=("individual", "mass", "mass_oracle"),
                               routers=routers, batch_size=128, progress=False, latency=False,
                               support_per_task=min(SUPPORT_PER_TASK, art.config.n_train), support_data=support,
                               bank_dtype=dtype)
        rows = {row: {"normalised": result.average(row, normalized=True), "accuracy": result.average(row)}
                for row in result.rows if row.startswith("mass")}
        for router, per_task in result.routing_accuracy.items():
            rows[f"mass[{router}]"]["routing"] = statistics.fmean(per_task.values())
        out[str(dtype)] = {"rows": rows, "storage_factor": result.storage_factor, "seconds": time.perf_counter() - t0}
        print(f"seed {seed} banks {dtype}: storage {result.storage_factor:.4f}; " + ", ".join(
            f"{r} {100 * v['normalised']:.2f}" for r, v in rows.items()), flush=True)
    return out


def summary(runs: list, bank_dtype: str) -> list:
    lines = ["| row | fp32 normalised | " + bank_dtype + " normalised | change (points) | routing fp32 → " + bank_dtype + " |",
             "|---|---|---|---|---|"]
    for row in runs[0]["None"]["rows"]:
        a = [r["None"]["rows"][row]["normalised"] * 100 for r in runs]
        b = [r[bank_dtype]["rows"][row]["normalised"] * 100 for r in runs]
        d = [y - x for x, y in zip(a, b)]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        routing = ""
        if "routing" in runs[0]["None"]["rows"][row]:
            ra = statistics.fmean(r["None"]["rows"][row]["routing"] * 100 for r in runs)
            rb = statistics.fmean(r[bank_dtype]["rows"][row]["routing"] * 100 for r in runs)
            routing = f"{ra:.2f} → {rb:.2f}"
        lines.append(f"| {row} | {statistics.fmean(a):.2f} ± {sd(a):.2f} | {statistics.fmean(b):.2f} ± {sd(b):.2f} | "
                     f"{statistics.fmean(d):+.2f} (seeds: {', '.join(f'{x:+.2f}' for x in d)}) | {routing} |")
    s32 = runs[0]["None"]["storage_factor"]
    s16 = runs[0][bank_dtype]["storage_factor"]
    lines += ["", f"Storage factor (demo's tiny CLIP, T = 8): fp32 banks {s32:.3f}x, {bank_dtype} banks {s16:.3f}x."]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bank-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = p.parse_args(argv)
    runs = [run_seed(s, args.bank_dtype) for s in args.seeds]
    report = {"runs": runs, "seeds": args.seeds, "bank_dtype": args.bank_dtype, "commit": git_commit(),
              "environment": environment(torch.device("cpu")), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lines = summary(runs, args.bank_dtype)
    report["summary"] = lines
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
