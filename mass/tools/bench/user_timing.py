"""The ``user`` mix of ``mass bench``: the routed model timed the way a user's own timing loop times it.

A user's loop (``bench/user_loop.py``) calls ``model(images)`` under ``torch.inference_mode()``, so the model
routes by itself (on random images and random weights usually one task, or one task set, for the whole
batch), and times each model in a block: one warm-up call, then the median of N calls, the plain model before
and after the routed ones, ratio = routed median / mean of the two plain medians. The other mixes time every
row in interleaved rounds under ``no_grad`` and pair each round's ratio (``mixed`` also forces a mixed task
assignment). Issue 25 measured what separates the two (``bench/loop_vs_bench.py``, README "What the bench
times").
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from mass.tools.common import quantiles_ms


def in_inference_mode(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` called under ``torch.inference_mode()``, as a user's loop calls the model."""

    def call():
        with torch.inference_mode():
            return fn()

    return call


def _block(fn: Callable[[], object], calls: int, warmup: int, device: torch.device) -> list:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return samples


def time_user_loop(plain: Callable[[], object], routed: dict, calls: int = 7, warmup: int = 1,
                   device: torch.device = torch.device("cpu")) -> dict:
    """Time ``plain``, then each of ``routed`` (name -> callable), then ``plain`` again, each in its own block
    (``warmup`` calls, then ``calls`` timed calls), every call under inference mode. Returns name -> quantiles
    (ms), ``samples_ms`` and, for the routed rows, ``ratio_to_plain`` = median / mean of the two plain
    medians; the ``plain`` entry carries ``plain_before_ms`` and ``plain_after_ms`` (and ratio 1)."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    plain = in_inference_mode(plain)
    before = _block(plain, calls, warmup, device)
    timed = {name: _block(in_inference_mode(fn), calls, warmup, device) for name, fn in routed.items()}
    after = _block(plain, calls, warmup, device)
    medians = [quantiles_ms(s)["median_ms"] for s in (before, after)]
    floor = sum(medians) / 2
    timer = "user loop: blocks under inference_mode (plain, routed, plain), median of each block"
    out = {"plain": {**quantiles_ms(before + after), "samples_ms": [t * 1e3 for t in before + after],
                     "plain_before_ms": medians[0], "plain_after_ms": medians[1], "ratio_to_plain": 1.0,
                     "timer": timer}}
    for name, samples in timed.items():
        q = quantiles_ms(samples)
        out[name] = {**q, "samples_ms": [t * 1e3 for t in samples], "ratio_to_plain": q["median_ms"] / floor,
                     "timer": timer}
    return out


def task_sets(task_ids: torch.Tensor) -> dict:
    """How a routing split the batch: ``{"3": samples, "3+5": samples}``, one key per task set chosen."""
    sets = ["+".join(str(t) for t in sorted(row) if t >= 0) for row in task_ids.tolist()]
    return {s: sets.count(s) for s in sorted(set(sets))}
