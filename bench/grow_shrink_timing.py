"""Adding one task to a MASS model and removing one, against a full re-merge, in one process (issue 23).

A ViT-B/32-sized tower built from its config (as ``mass bench --merge-only``), T = 8 synthetic fine-tuned
checkpoints written to a temporary folder (``mass.tools.bench.svd_merge.write_tasks``: slowly decaying
spectra), the default solver (``auto``), the paper's router (``--router recommended``: θ0 features, so no
first-pass TSV-M weights to rebuild). Timed, one after the other:

1. full merge of tasks 0-6 (decompose + MASSModel; copying the pretrained module is not timed): the
   re-merge that removing task 7 from an 8-task model replaces;
2. ``add_tasks({task7})`` on that model (everything counted: reading the model's factors, building a fresh
   encoder, decomposing the one new task, slicing, TSV-M first-pass weights, wrapping);
3. full merge of tasks 0-7: the re-merge that adding a task replaces;
4. ``remove_tasks([task7])`` on that model.

The CPU is shared with other work: only the ratios, taken in this one run, mean anything.

    python bench/grow_shrink_timing.py --out bench/results/cpu-2core-grow-shrink-b32
"""
import argparse
import copy
import json
import subprocess
import tempfile
import time

import torch

from mass.method.decompose import decompose
from mass.method.router import RouterConfig
from mass.nn.model import MASSModel
from mass.tools.bench.models import build_clip
from mass.tools.bench.svd_merge import write_tasks
from mass.tools.common import environment, git_commit


def full_merge(pretrained, tasks: dict, router) -> tuple:
    fresh = copy.deepcopy(pretrained)
    t0 = time.perf_counter()
    model = MASSModel(fresh, decompose(pretrained, tasks, progress=False), router=router)
    return model, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="path stem: writes STEM.json and STEM.md")
    p.add_argument("--model", default="B32")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--router", default="paper", choices=["paper", "recommended"],
                   help="paper: RouterConfig() (the first pass runs TSV-M weights, rebuilt on every change); "
                        "recommended: RouterConfig.recommended() (θ0 features: no first-pass weights)")
    args = p.parse_args(argv)
    router = RouterConfig() if args.router == "paper" else RouterConfig.recommended()
    torch.set_num_threads(args.threads)
    pretrained, _ = build_clip(args.model)
    base = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mass-grow-bench-") as folder:
        paths = write_tasks(base, args.tasks, folder)
        names = list(paths)
        first, last = {n: paths[n] for n in names[:-1]}, names[-1]
        small, rows["merge_T-1_s"] = full_merge(pretrained, first, router)
        print(f"full merge T={len(first)}: {rows['merge_T-1_s']:.1f} s", flush=True)
        t0 = time.perf_counter()
        grown = small.add_tasks({last: paths[last]})
        rows["add_one_s"] = time.perf_counter() - t0
        print(f"add one task (T={len(first)} -> {len(grown.tasks)}): {rows['add_one_s']:.1f} s", flush=True)
        del small, grown
        full, rows["merge_T_s"] = full_merge(pretrained, paths, router)
        print(f"full merge T={args.tasks}: {rows['merge_T_s']:.1f} s", flush=True)
        t0 = time.perf_counter()
        shrunk = full.remove_tasks([last])
        rows["remove_one_s"] = time.perf_counter() - t0
        print(f"remove one task (T={args.tasks} -> {len(shrunk.tasks)}): {rows['remove_one_s']:.1f} s", flush=True)
    rows["add_speedup_vs_merge_T"] = rows["merge_T_s"] / rows["add_one_s"]
    rows["remove_speedup_vs_merge_T-1"] = rows["merge_T-1_s"] / rows["remove_one_s"]
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    report = {"model": args.model, "n_tasks": args.tasks, "threads": args.threads, "solver": "auto",
              "router": args.router, **rows,
              "cpu": cpu, "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "environment": environment(torch.device("cpu")), "load_average": list(__import__("os").getloadavg())}
    with open(args.out + ".json", "w") as fh:
        json.dump(report, fh, indent=1)
    md = [f"# Add / remove one task vs a full re-merge ({args.model}, T = {args.tasks}, {args.router} router, one run)",
          "",
          f"{cpu}; {args.threads} threads; commit {report['commit']}; {report['date']}; load average "
          f"{', '.join(f'{x:.1f}' for x in report['load_average'])} (the CPU was shared: compare the ratios).", "",
          "| operation | seconds | re-merge it replaces | speed-up |", "|---|---|---|---|",
          f"| add_tasks(1 task) to T = {args.tasks - 1} | {rows['add_one_s']:.1f} | merge T = {args.tasks}: "
          f"{rows['merge_T_s']:.1f} s | {rows['add_speedup_vs_merge_T']:.1f}x |",
          f"| remove_tasks(1 task) from T = {args.tasks} | {rows['remove_one_s']:.1f} | merge T = {args.tasks - 1}: "
          f"{rows['merge_T-1_s']:.1f} s | {rows['remove_speedup_vs_merge_T-1']:.1f}x |", "",
          f"Command: `python bench/grow_shrink_timing.py --router {args.router} --out {args.out}`"]
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
