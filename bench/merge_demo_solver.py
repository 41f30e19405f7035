"""The demo's accuracy with the full and the randomised SVD solver, on the demo's cached checkpoints.

``mass.demo`` decomposes with ``solver="auto"``, which is the exact SVD at its 128-d size; this forces each solver
and evaluates the same MASS model (paper router) and the TSV-M model on the demo's test sets. It trains nothing:
it works on a copy of the cache folder of the config it is given and stops if a checkpoint is missing.

    python bench/merge_demo_solver.py [--cache ~/.cache/mass-demo] [--seed 0] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def main(argv=None) -> dict:
    import mass
    from mass.demo.run import _accuracy_static, _evaluate_mass
    from mass.demo.training import DemoConfig, prepare_demo
    from mass.merging import tsv_merge_from_decomposition

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="~/.cache/mass-demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = DemoConfig.make(quick=args.quick, n_tasks=8, seed=args.seed)
    source = Path(os.path.expanduser(args.cache)) / cfg.hash()
    if not (source / "pretrained.safetensors").exists() or not any(source.glob("finetuned_*.safetensors")):
        raise SystemExit(f"no cached demo checkpoints for this config in {source}")
    report = {"cache": str(source), "config_hash": cfg.hash(), "rows": {}}
    with tempfile.TemporaryDirectory(prefix="mass-demo-copy-") as tmp:
        copy_dir = Path(tmp) / cfg.hash()
        shutil.copytree(source, copy_dir)
        art = prepare_demo(cache_dir=copy_dir, config=cfg, progress=False, verbose=False)
        for solver in ("full", "randomized"):
            dec = mass.decompose(art.pretrained, art.finetuned, progress=False, solver=solver)
            tsv = _accuracy_static(art, tsv_merge_from_decomposition(dec))
            model = mass.MASSModel(copy.deepcopy(art.pretrained), dec, heads=art.heads)
            row = _evaluate_mass(model, art)
            row = {"tsv_acc": tsv, "mass_acc": row["acc"], "routing": row["routing"]}
            for key in ("tsv_acc", "mass_acc", "routing"):
                row[key + "_mean"] = sum(row[key].values()) / len(row[key])
            report["rows"][solver] = row
            print(f"{solver:10s}: MASS accuracy {100 * row['mass_acc_mean']:.2f}%, TSV-M {100 * row['tsv_acc_mean']:.2f}%,"
                  f" routing {100 * row['routing_mean']:.2f}%", flush=True)
    full, rand = report["rows"]["full"], report["rows"]["randomized"]
    report["mass_points_difference"] = 100 * (rand["mass_acc_mean"] - full["mass_acc_mean"])
    report["tsv_points_difference"] = 100 * (rand["tsv_acc_mean"] - full["tsv_acc_mean"])
    print(f"randomized − full: MASS {report['mass_points_difference']:+.2f} points, "
          f"TSV-M {report['tsv_points_difference']:+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("MASS_THREADS", torch.get_num_threads())))
    main()
