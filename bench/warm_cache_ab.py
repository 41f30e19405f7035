"""Does a forward get faster when the one before it ran the same model (warm CPU caches)? And does the grad mode
matter once the predecessor is the same? Issue 25: what a user's loop (blocks of one model) sees against
``mass bench`` (interleaved rounds, where plain always follows a routed or other call).

Each round runs one fixed sequence, so every timed call has a known predecessor (P = plain, R = the top-1 model
built by ``mass.merge`` and routed by itself; ``ng`` = ``torch.no_grad``, ``inf`` = ``torch.inference_mode``):

    R ng (after P inf) | P ng (after R) | P ng (after P) | P inf (after P) | R ng (after P) | R ng (after R) |
    R inf (after R) | P inf (after R)

Ratios within a round: the bench's situation, routed after plain over plain after routed (both "cold"), and a
block's situation, routed after routed over plain after plain (both "warm"); grad mode at equal predecessor:
P inf / P ng after P, R inf / R ng after R.

    PYTHONPATH=. python bench/warm_cache_ab.py --repeat 3 --out bench/results/cpu-2core-warm-cache-ab.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

import mass
from mass.tools.bench.models import MODEL_CONFIGS, build_clip
from mass.tools.common import add_malloc_argument, environment, malloc_setting

from user_loop import finetuned_from_random_deltas

SEQUENCE = [("R", "ng", "R ng after P"), ("P", "ng", "P ng after R"), ("P", "ng", "P ng after P"),
            ("P", "inf", "P inf after P"), ("R", "ng", "R ng after P (2)"), ("R", "ng", "R ng after R"),
            ("R", "inf", "R inf after R"), ("P", "inf", "P inf after R")]
RATIOS = {
    "cold: R after P / P after R (no_grad; the bench's interleaving)": ("R ng after P", "P ng after R"),
    "warm: R after R / P after P (no_grad; a block of one model)": ("R ng after R", "P ng after P"),
    "grad mode on plain: P inf / P ng, both after P": ("P inf after P", "P ng after P"),
    "grad mode on routed: R inf / R ng, both after R": ("R inf after R", "R ng after R"),
    "warmth on plain: P after P / P after R (no_grad)": ("P ng after P", "P ng after R"),
    "warmth on routed: R after R / R after P (no_grad)": ("R ng after R", "R ng after P"),
}


def run(args) -> dict:
    env = environment(torch.device("cpu"))
    env["malloc"] = malloc_setting(torch.device("cpu"), args.malloc)
    plain, cfg = build_clip(args.model, seed=args.seed)
    routed = mass.merge(copy.deepcopy(plain), finetuned_from_random_deltas(plain, args.tasks, seed=args.seed),
                        router=mass.RouterConfig(mode="top1"), progress=False)
    x = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    models = {"P": lambda: plain(pixel_values=x), "R": lambda: routed(pixel_values=x)}
    grads = {"ng": torch.no_grad, "inf": torch.inference_mode}
    for model, grad, _ in SEQUENCE:  # warm-up: every cache built
        with grads[grad]():
            models[model]()
    runs = []
    for rep in range(args.repeat):
        load = os.getloadavg()
        samples = {label: [] for _, _, label in SEQUENCE}
        for _ in range(args.rounds):
            for model, grad, label in SEQUENCE:
                with grads[grad]():
                    t0 = time.perf_counter()
                    models[model]()
                    samples[label].append((time.perf_counter() - t0) * 1e3)
        ratios = {name: statistics.median(a / b for a, b in zip(samples[num], samples[den]))
                  for name, (num, den) in RATIOS.items()}
        medians = {label: statistics.median(s) for label, s in samples.items()}
        print(f"repeat {rep} (load {load[0]:.2f}): " + ", ".join(f"{k} {v:.0f}" for k, v in medians.items()))
        for name, value in ratios.items():
            print(f"  {name}: {value:.4f}")
        runs.append({"loadavg_before": load, "samples_ms": samples, "median_ms": medians, "paired_ratios": ratios})
    report = {"kind": "warm-cache-ab", "env": env, "config": vars(args), "sequence": SEQUENCE, "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="predecessor and grad-mode effects on plain and routed forwards")
    p.add_argument("--model", default="B32", choices=list(MODEL_CONFIGS))
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    add_malloc_argument(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
