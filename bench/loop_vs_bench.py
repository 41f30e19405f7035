"""Why ``mass bench`` and a user's timing loop (``bench/user_loop.py``) report different routed / plain ratios:
controlled A/B rows that change one thing at a time between the bench's way and the user's way (issue 25).

One process builds the model both ways (the bench's ``MASSModel(wrapped, random_decomposition(...),
keep_merged="all")``, a copy of it for the routed rows, and the user's ``mass.merge(pretrained, finetuned)``
on checkpoints made from the same random factors), then times, in the same interleaved rounds (one call of
each row per round, the rows' order rotated every round), these rows (ratios: to the plain model under the
same grad mode, paired within a round):

    plain@no_grad, plain@inference             the floor, under each grad mode
    <mode>:bench                               route() paid, then tasks forced: sample i -> task i mod T (top1),
                                               set {i, i+1 mod T} (topk); bench model, no_grad (mass bench's row)
    <mode>:forced-as-routed                    route() paid, then the router's own decision forced (the forced
                                               path with the routed task mix)
    <mode>:routed                              model(x): the model routes (task mix and path of a user's loop)
    <mode>:routed+inference                    the same under torch.inference_mode
    <mode>:merge+routed+inference              the model built by mass.merge (the user's loop, interleaved)

After the rounds, the user's own procedure runs on the last rows' callables (``--blocks`` times; the
procedure of ``mass bench --mix user``): plain, top1, topk, plain, each one warm-up call then the median of
``--calls``, ratio to the mean of the two plain medians; so the effect of timing in blocks instead of
interleaved rounds is measured on the same objects. Rounds and procedure run ``--repeat`` times (the spread
from run to run). The allocator setting is process-wide: run once per ``--malloc`` value.

Caveat (found with these rows): rotation keeps neighbours, so ``plain@inference`` runs right after
``plain@no_grad`` in all but one of every 12 rounds, with the plain weights still partly in the CPU caches,
while ``plain@no_grad`` runs after a routed row. The ``no_grad -> inference_mode`` row difference therefore
mixes grad mode with that warmth; ``bench/warm_cache_ab.py`` fixes each call's predecessor and separates the
two.

    PYTHONPATH=. python bench/loop_vs_bench.py --out bench/results/cpu-2core-loop-vs-bench-1.json
    PYTHONPATH=. python bench/loop_vs_bench.py --summarize bench/results/cpu-2core-loop-vs-bench-*.json \
        --out bench/results/cpu-2core-loop-vs-bench.md
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time

import torch

import mass
from mass.method.synthetic import random_decomposition
from mass.nn.model import MASSModel
from mass.tools.bench.models import MODEL_CONFIGS, build_clip
from mass.tools.bench.user_timing import task_sets, time_user_loop
from mass.tools.common import add_malloc_argument, environment, malloc_setting, paired_ratio, quantiles_ms


def _embedding(out):
    return mass.extract_embedding(out)


def _call(fn, grad: str):
    ctx = torch.inference_mode if grad == "inference" else torch.no_grad

    def call():
        with ctx():
            return _embedding(fn())

    return call


def _forced_pairs(ids: torch.Tensor, n_tasks: int) -> torch.Tensor:
    return torch.stack([ids, (ids + 1) % n_tasks], 1)


def build_rows(model_name: str, n_tasks: int, batch: int, seed: int, modes=("top1", "topk")) -> tuple:
    """The callables of every row (name -> call), what each routed row routes to, and the models."""
    plain, cfg = build_clip(model_name, seed=seed)
    dec = random_decomposition(plain, n_tasks, seed=seed)
    bench_model = MASSModel(copy.deepcopy(plain), dec, router=mass.RouterConfig(mode="top1"), keep_merged="all")
    # The routed rows get their own copy: the CPU patch embedding caches at most T task-set weights, and the
    # forced sets (T of them) and the routed ones together would evict each other on every call.
    routed_model = copy.deepcopy(bench_model)
    finetuned = {name: dec.task_state_dict(t) for t, name in enumerate(dec.tasks)}
    merged = mass.merge(copy.deepcopy(plain), finetuned, router=mass.RouterConfig(mode="top1"), progress=False)
    del finetuned
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    rows = {"plain@no_grad": _call(lambda: plain(pixel_values=x), "no_grad"),
            "plain@inference": _call(lambda: plain(pixel_values=x), "inference")}
    mixes = {}
    for mode in modes:
        router = dataclasses.replace(bench_model.router_config, mode=mode)
        forced_view, view = bench_model.with_router(router), routed_model.with_router(router)
        user = merged.with_router(dataclasses.replace(merged.router_config, mode=mode))
        with torch.no_grad():
            routed_ids = view.route(pixel_values=x).task_ids
        mixed = torch.arange(batch) % n_tasks
        forced = mixed if mode == "top1" else _forced_pairs(mixed, n_tasks)

        def forced_call(view=forced_view, ids=forced):
            view.route(pixel_values=x)
            return view(pixel_values=x, task_ids=ids)

        def as_routed(view=view, ids=routed_ids):
            view.route(pixel_values=x)
            return view(pixel_values=x, task_ids=ids)

        rows[f"{mode}:bench"] = _call(forced_call, "no_grad")
        rows[f"{mode}:forced-as-routed"] = _call(as_routed, "no_grad")
        rows[f"{mode}:routed"] = _call(lambda view=view: view(x), "no_grad")
        rows[f"{mode}:routed+inference"] = _call(lambda view=view: view(x), "inference")
        rows[f"{mode}:merge+routed+inference"] = _call(lambda user=user: user(x), "inference")
        mixes[mode] = {"bench": task_sets(forced.view(batch, -1)), "routed": task_sets(routed_ids)}
    return rows, mixes, (plain, bench_model, routed_model, merged, x)


def time_rotated(rows: dict, rounds: int, warmup: int) -> dict:
    """Interleaved rounds, one call of every row per round, the order rotated each round (no row always runs
    after the same one). Returns name -> per-round samples (ms)."""
    names = list(rows)
    for _ in range(warmup):
        for name in names:
            rows[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            rows[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def block_procedure(rows: dict, calls: int, modes) -> dict:
    """The user's loop on the user's rows (:func:`mass.tools.bench.user_timing.time_user_loop`, the procedure
    of ``mass bench --mix user``): plain, each mode, plain; one warm-up and the median of ``calls`` each."""
    out = time_user_loop(rows["plain@inference"], {m: rows[f"{m}:merge+routed+inference"] for m in modes},
                         calls=calls, warmup=1)
    plain = out["plain"]
    return {"plain_before_ms": plain["plain_before_ms"], "plain_after_ms": plain["plain_after_ms"],
            "routed_ms": {m: out[m]["median_ms"] for m in modes}, "ratio": {m: out[m]["ratio_to_plain"] for m in modes}}


def run(args) -> dict:
    env = environment(torch.device("cpu"))
    env["malloc"] = malloc_setting(torch.device("cpu"), args.malloc)
    t0 = time.perf_counter()
    rows, mixes, _keep = build_rows(args.model, args.tasks, args.batch, args.seed, args.modes)
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.0f}s; load {env['loadavg_at_start']}; malloc {env['malloc']}", flush=True)
    runs = []
    for rep in range(args.repeat):
        load = os.getloadavg()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        samples = time_rotated(rows, args.rounds, args.warmup)
        busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        print(f"repeat {rep}: load {load[0]:.2f} before; this process kept {busy:.2f} CPUs busy "
              f"({torch.get_num_threads()} threads)", flush=True)
        results = {}
        for name, s in samples.items():
            floor = samples["plain@inference" if "inference" in name else "plain@no_grad"]
            results[name] = {**quantiles_ms([v / 1e3 for v in s]), "samples_ms": s,
                             "paired_ratio_to_plain": paired_ratio(s, floor),
                             "floor": "plain@inference" if "inference" in name else "plain@no_grad"}
            pr = results[name]["paired_ratio_to_plain"]
            print(f"  {name:32s} {results[name]['median_ms']:8.1f} ms  paired x{pr['median']:.3f} "
                  f"[{pr['p20']:.3f}, {pr['p80']:.3f}]", flush=True)
        blocks = [block_procedure(rows, args.calls, args.modes) for _ in range(args.blocks)]
        for b in blocks:
            print("  user's procedure: " + ", ".join(f"{m} x{r:.3f}" for m, r in b["ratio"].items()) +
                  f" (plain {b['plain_before_ms']:.0f} / {b['plain_after_ms']:.0f} ms)", flush=True)
        runs.append({"loadavg_before": load, "cpu_busy_during_rounds": busy, "rows": results,
                     "user_procedure": blocks})
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    report = {"kind": "loop-vs-bench", "env": env, "loadavg_at_end": load_end, "build_s": build_s,
              "config": vars(args), "task_mix": mixes, "runs": runs}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return report


FACTORS = [  # (what changes, row A, row B): B differs from A in that one thing
    ("bench's forced task mix -> the router's own mix, through the forced path", "bench", "forced-as-routed"),
    ("forced path (route(), then task_ids=) -> model(x)", "forced-as-routed", "routed"),
    ("no_grad -> inference_mode (plain floor likewise)", "routed", "routed+inference"),
    ("MASSModel(random_decomposition, keep_merged='all') -> mass.merge", "routed+inference",
     "merge+routed+inference"),
    ("all together: mass bench's row -> the user's row, both interleaved", "bench", "merge+routed+inference"),
]


def summary_markdown(reports: list) -> str:
    """Every factor's effect on the paired ratio (B - A within each repeat), over all repeats of ``reports``,
    and the user's procedure against the interleaved user row."""
    runs = [(rep, run) for rep in reports for run in rep["runs"]]
    first = reports[0]
    env = first["env"]
    lines = [f"# `mass bench` against a user's loop: one factor at a time ({env['device']})", "",
             f"ViT-{first['config']['model'].replace('B', 'B/').replace('L', 'L/')}, T = {first['config']['tasks']}, "
             f"batch {first['config']['batch']}, "
             f"{env['torch_threads']} threads, fp32, commit `{env['git_commit']}`, {env['date']}; "
             f"{len(reports)} process(es) x repeats = {len(runs)} runs of {first['config']['rounds']} interleaved "
             f"rounds each. Allocator per process: " + "; ".join(sorted({r['env']['malloc'] for r in reports}))
             + ". Load average (1 min) before each run: "
             + ", ".join(f"{run['loadavg_before'][0]:.2f}" for _, run in runs) + ".", "",
             "Task mix of each row on these random images (task set: samples):", ""]
    for mode, mixes in first["task_mix"].items():
        lines.append(f"- {mode}: bench {mixes['bench']}; routed by the model {mixes['routed']}")
    lines += ["", "Paired ratio to the plain forward (median over the rounds of a run); per run, then min-max:", "",
              "| row | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | min-max |",
              "|---|" + "---|" * (len(runs) + 1)]
    for name in first["runs"][0]["rows"]:
        if name.startswith("plain"):
            continue
        vals = [run["rows"][name]["paired_ratio_to_plain"]["median"] for _, run in runs]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {min(vals):.3f}-{max(vals):.3f} |")
    for mode in first["task_mix"]:
        vals = [b["ratio"][mode] for _, run in runs for b in run["user_procedure"]]
        lines.append(f"| {mode}: user's procedure (blocks, same callables as merge+routed+inference) | "
                     + " | ".join(f"{v:.3f}" for v in vals) + f" | {min(vals):.3f}-{max(vals):.3f} |")
    lines += ["", "Effect of each factor on the ratio (row B - row A within each run; min-max over runs):", "",
              "| factor | " + " | ".join(f"{m}" for m in first["task_mix"]) + " |", "|---|"
              + "---|" * len(first["task_mix"])]
    for label, a, b in FACTORS + [("interleaved rounds -> the user's blocks (same callables)", None, None)]:
        cells = []
        for mode in first["task_mix"]:
            if a is None:
                d = [blk["ratio"][mode] - run["rows"][f"{mode}:merge+routed+inference"]["paired_ratio_to_plain"]
                     ["median"] for _, run in runs for blk in run["user_procedure"]]
            else:
                d = [run["rows"][f"{mode}:{b}"]["paired_ratio_to_plain"]["median"]
                     - run["rows"][f"{mode}:{a}"]["paired_ratio_to_plain"]["median"] for _, run in runs]
            cells.append(f"{statistics.mean(d):+.3f} ({min(d):+.3f} to {max(d):+.3f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Caveat: in the rotated order plain@inference runs right after plain@no_grad in most rounds (warm "
              "CPU caches), so the no_grad -> inference_mode row mixes grad mode with that warmth, and the blocks "
              "row compares two warm floors; bench/warm_cache_ab.py separates them (the module docstring)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="A/B rows between mass bench's timing and a user's loop")
    p.add_argument("--model", default="B32", choices=list(MODEL_CONFIGS))
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["top1", "topk"], choices=["top1", "topk"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--calls", type=int, default=7, help="the user's procedure: timed calls per block")
    p.add_argument("--blocks", type=int, default=1, help="times the user's procedure runs after the rounds")
    p.add_argument("--repeat", type=int, default=3, help="rounds + user's procedure, this many times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                   help="write the factor table of these reports (to --out, Markdown) instead of measuring")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    if args.summarize:
        text = summary_markdown([json.load(open(path)) for path in args.summarize])
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(text)
        return {"markdown": text}
    return run(args)


if __name__ == "__main__":
    main()
