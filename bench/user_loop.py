"""The timing loop a user writes around a merged model, and nothing more (issue 25: what a user's loop sees).

What it builds: a ViT-B/32 HF CLIP vision encoder from its config (random weights, ``mass.tools.bench.models``),
T = 8 "fine-tuned" checkpoints made from it by adding a random rank-k delta to every matrix (the deltas of
:func:`mass.method.synthetic.random_decomposition`, k = floor(min(out, in) / T), so the SVDs recover them
exactly; the other parameters get per-task values as well), and one model through the public entry point:
``mass.merge(pretrained, finetuned, router=RouterConfig(mode="top1"))`` (defaults otherwise: the paper's
routing block, ``keep_merged="prefix"``), plus ``model.with_router(RouterConfig())`` for the paper's default
``topk``. The plain model is a copy of the pretrained encoder taken before the merge wraps it.

How it times: ``torch.randn`` images (batch 16), everything under ``torch.inference_mode()``, each model called
as ``model(images)`` (the model routes by itself), one warm-up call then 7 timed calls, the median; the plain
model is timed before and after the routed ones and the ratio is routed median / mean of the two plain
medians. No allocator setting, no interleaving, no forced tasks.

    PYTHONPATH=. python bench/user_loop.py              # ViT-B/32, T = 8, batch 16 (about 2 minutes on 2 cores)
    PYTHONPATH=. python bench/user_loop.py --model tiny --tasks 2 --batch 4 --calls 2
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import mass
from mass.method.synthetic import random_decomposition
from mass.tools.bench.models import MODEL_CONFIGS, build_clip
from mass.tools.bench.user_timing import task_sets  # reporting only: which tasks the router picked


def finetuned_from_random_deltas(pretrained, n_tasks: int, seed: int = 0) -> dict:
    """T fine-tuned state dicts: θ0 plus a random rank-k delta per matrix (whole random values elsewhere)."""
    dec = random_decomposition(pretrained, n_tasks, seed=seed)
    return {name: dec.task_state_dict(t) for t, name in enumerate(dec.tasks)}


def median_ms(fn, calls: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def user_loop(model_name: str = "B32", n_tasks: int = 8, batch: int = 16, calls: int = 7, seed: int = 0) -> dict:
    pretrained, cfg = build_clip(model_name, seed=seed)
    finetuned = finetuned_from_random_deltas(pretrained, n_tasks, seed=seed)
    plain = copy.deepcopy(pretrained)
    top1 = mass.merge(pretrained, finetuned, router=mass.RouterConfig(mode="top1"), progress=False)
    del finetuned
    topk = top1.with_router(mass.RouterConfig())
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        plain_before = median_ms(lambda: plain(images), calls)
        top1_ms = median_ms(lambda: top1(images), calls)
        topk_ms = median_ms(lambda: topk(images), calls)
        plain_after = median_ms(lambda: plain(images), calls)
        groups = {mode: task_sets(m.route(images).task_ids) for mode, m in (("top1", top1), ("topk", topk))}
    floor = (plain_before + plain_after) / 2
    return {"model": model_name, "n_tasks": n_tasks, "batch": batch, "calls": calls,
            "plain_before_ms": plain_before, "plain_after_ms": plain_after,
            "top1_ms": top1_ms, "topk_ms": topk_ms,
            "top1_ratio": top1_ms / floor, "topk_ratio": topk_ms / floor, "tasks_routed_to": groups}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="B32", choices=list(MODEL_CONFIGS))
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--calls", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = user_loop(args.model, args.tasks, args.batch, args.calls, args.seed)
    print(f"plain {out['plain_before_ms']:.1f} ms before, {out['plain_after_ms']:.1f} ms after; "
          f"top1 {out['top1_ms']:.1f} ms = {out['top1_ratio']:.2f}x, topk {out['topk_ms']:.1f} ms = "
          f"{out['topk_ratio']:.2f}x; tasks the router picked: {out['tasks_routed_to']}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
