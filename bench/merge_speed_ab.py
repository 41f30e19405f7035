"""Merge time of two source trees, measured interleaved on one machine (A/B), for a shared, noisy CPU.

Each round runs ``mass.tools.bench.svd_merge.time_block_merge`` (one transformer block's SVDs and TSV-M
orthogonalisations, all tasks, times the number of blocks) or ``time_full_merge`` (``--full``: ``mass.merge`` of
synthetic checkpoints with lazy reads) once per tree, in a fresh process whose ``PYTHONPATH`` is that tree,
alternating the order every round; the report gives each tree's median and range and the median of the per-round
ratios. Example (the tree before a change, from git, against the working tree)::

    git archive HEAD~1 mass mass_kernels | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python bench/merge_speed_ab.py /tmp/before . --rounds 5 --threads 2

On a CPU shared with other jobs, ``--threads 1`` gives far steadier ratios: measured here at load 5–8, one
block's SVDs took 3–42 s per round with 2 threads (OpenMP regions stall whenever a core is taken) but varied by
a few per cent with 1 thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, torch
torch.set_num_threads({threads})
from mass.tools.bench.svd_merge import time_block_merge, time_full_merge
if {full}:
    rows = time_full_merge({model!r}, {tasks}, [{solver!r}], accuracy=False)
else:
    rows = time_block_merge({model!r}, {tasks}, [{solver!r}])
print("ROW " + json.dumps(rows[0]))
"""


def run_one(tree: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS=str(args.threads))
    code = CHILD.format(threads=args.threads, full=args.full, model=args.model, tasks=args.tasks, solver=args.solver)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW ")))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tree_a", help="source tree A (holds mass/), e.g. the code before a change")
    p.add_argument("tree_b", help="source tree B, e.g. the working tree")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="B32")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--solver", default="auto", choices=["auto", "full", "randomized"])
    p.add_argument("--full", action="store_true", help="time the whole merge (writes T checkpoints), not one block")
    p.add_argument("--json", default=None, help="write the rows and the summary here")
    args = p.parse_args(argv)
    rows = {"A": [], "B": []}
    for r in range(args.rounds):
        order = (("A", args.tree_a), ("B", args.tree_b)) if r % 2 == 0 else (("B", args.tree_b), ("A", args.tree_a))
        for name, tree in order:
            rows[name].append(run_one(tree, args))
        print(f"round {r + 1}: A {rows['A'][-1]['merge_s']:.1f} s, B {rows['B'][-1]['merge_s']:.1f} s", flush=True)
    summary = {}
    for key in ("merge_s", "decompose_s", "first_pass_weights_s"):
        a = [row[key] for row in rows["A"]]
        b = [row[key] for row in rows["B"]]
        summary[key] = {"A_median": statistics.median(a), "A_min": min(a), "A_max": max(a),
                        "B_median": statistics.median(b), "B_min": min(b), "B_max": max(b),
                        "B_over_A_median_of_rounds": statistics.median(y / x for x, y in zip(a, b))}
        s = summary[key]
        print(f"{key}: A median {s['A_median']:.1f} s [{s['A_min']:.1f}, {s['A_max']:.1f}], B median "
              f"{s['B_median']:.1f} s [{s['B_min']:.1f}, {s['B_max']:.1f}], B/A per round (median) "
              f"{s['B_over_A_median_of_rounds']:.3f}")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report = {"args": vars(args), "load_at_end": load, "rows": rows, "summary": summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
