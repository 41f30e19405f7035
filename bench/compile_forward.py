"""``torch.compile`` of a whole MASSModel against eager (issue 25): the top-1 routed and forced forwards are one
graph each (``fullgraph=True``); what does compiling them buy, next to compiling the plain model?

    python bench/compile_forward.py                         # ViT-B/32, T = 8, batch 16, inductor, CPU
    python bench/compile_forward.py --model tiny --batch 4 --repeats 3 --out /tmp/x   # seconds (smoke)
    python bench/compile_forward.py --device cuda --dtype bf16 --mode reduce-overhead  # GPU: CUDA graphs

Built like ``mass bench``: an HF CLIP vision encoder from a config (random weights), a random rank-k
decomposition of T tasks (:func:`mass.method.synthetic.random_decomposition`), ``MASSModel`` with the top-1
router; ``torch.randn`` images. Rows, timed in interleaved rounds in one process (median [p20, p80] ms, ratio to
the eager plain forward of the same rounds, and paired; on CUDA ``triton.testing.do_bench`` per row, no pairing):

* ``plain`` / ``plain compiled``: the pretrained encoder, eager and ``torch.compile(fullgraph=True)``;
* ``routed`` / ``routed compiled``: ``model(images)`` (first pass, router, second pass);
* ``forced`` / ``forced compiled``: ``model(images, task_ids=i mod T)`` (no first pass);
* ``fast`` / ``fast compiled`` (``--fast``): the routed forward with ``RouterConfig.fast()`` (calibrated on
  random images: its cost does not depend on what they show).

Before timing, every compiled row's output is compared with its eager row (the largest difference relative to
the output's magnitude is reported; routed rows are compared with the compiled call's own routing forced, since
a near-tie may route differently). The compile time of each row (first call) is reported too. Writes
``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from mass.method.router import RouterConfig
from mass.method.synthetic import random_decomposition
from mass.nn.model import MASSModel, extract_embedding
from mass.tools.bench.models import build_clip
from mass.tools.common import environment, paired_ratio, time_providers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    plain, cfg = build_clip(args.model, seed=args.seed)
    dec = random_decomposition(plain, args.tasks, seed=args.seed)
    plain = plain.to(device=device, dtype=dtype)
    wrapped = build_clip(args.model, seed=args.seed)[0].to(dtype=dtype)
    model = MASSModel(wrapped, dec, router=RouterConfig(mode="top1")).eval().to(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device=device, dtype=dtype)
    views = {"routed": model}
    if args.fast:
        support = {t: torch.randn(8, 3, cfg.image_size, cfg.image_size, generator=gen).to(device=device, dtype=dtype)
                   for t in model.tasks}
        views["fast"] = model.calibrate(support, RouterConfig.fast())
    return plain, model, views, x


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="B32", choices=["B32", "B16", "L14", "tiny"])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mode", default=None, choices=[None, "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--fast", action="store_true", help="also time RouterConfig.fast() (routed, early block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/cpu-compile-forward")
    args = p.parse_args(argv)
    command = " ".join(["python bench/compile_forward.py", *(sys.argv[1:] if argv is None else argv)])
    if args.batch < 1 or args.tasks < 1 or args.repeats < 1:
        p.error("--batch, --tasks and --repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")

    plain, model, views, x = build(args)
    env = environment(x.device)  # device, commit, date, threads, versions, load average before the run
    forced = (torch.arange(args.batch) % args.tasks).to(x.device)
    modules = {"plain": plain, "forced": model, **views}

    def call(name, module):
        """One timed call of a row: the forced row passes the tasks, the routed rows route themselves and return
        their routing (the signature the compile check below traces, so the timed call reuses its graph)."""
        if name == "plain":
            return lambda: extract_embedding(module(pixel_values=x))
        if name == "forced":
            return lambda: extract_embedding(module(pixel_values=x, task_ids=forced))
        return lambda: extract_embedding(module(pixel_values=x, return_routing=True)[0])

    options = dict(fullgraph=True, backend=args.backend, mode=args.mode)
    compiled_modules = {name: torch.compile(module, **options) for name, module in modules.items()}
    checks = {}
    with torch.inference_mode():
        for name, module in compiled_modules.items():
            t0 = time.perf_counter()
            if name in views:  # compared with eager on the compiled call's own routing (a near-tie may differ)
                out, routing = module(pixel_values=x, return_routing=True)
                got, want = extract_embedding(out), extract_embedding(views[name](pixel_values=x,
                                                                                  task_ids=routing.task_ids))
            else:
                got, want = call(name, module)(), call(name, modules[name])()
            rel = float((got.float() - want.float()).abs().max() / want.float().abs().max())  # (a host sync)
            compile_s = time.perf_counter() - t0
            checks[name] = {"compile_s": compile_s, "max_rel_diff_vs_eager": rel}
            print(f"{name:>8} compiled in {compile_s:.1f}s; max |compiled - eager| / max|eager| = {rel:.2e}",
                  flush=True)

    fns = {}
    for name in modules:
        fns[name] = call(name, modules[name])
        fns[name + " compiled"] = call(name, compiled_modules[name])
    with torch.inference_mode():
        timings = time_providers(fns, x.device, repeats=args.repeats, warmup=args.warmup)
    floor = timings["plain"]
    rows = []
    for name, t in timings.items():
        row = {"row": name, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
               "ratio_to_plain": t["median_ms"] / floor["median_ms"],
               "paired_ratio_to_plain": paired_ratio(t.get("samples_ms"), floor.get("samples_ms", [])),
               "samples_ms": t.get("samples_ms")}
        base = name.replace(" compiled", "")
        if name.endswith(" compiled"):
            row.update(checks[base])
            row["speedup_vs_eager"] = timings[base]["median_ms"] / t["median_ms"]
        rows.append(row)
    report = {"what": "torch.compile(fullgraph=True) of a MASSModel (top-1 routed / forced) against eager",
              "environment": env, "load_average_after": os.getloadavg(), "config": vars(args), "command": command,
              "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    c, env = report["config"], report["environment"]
    lines = [f"# torch.compile of the routed model: {c['model']}, T = {c['tasks']}, batch {c['batch']}, {c['dtype']}, "
             f"backend {c['backend']}, mode {c['mode'] or 'default'}, device {env['device']}", "",
             f"{env['date']}, commit {env['git_commit']}, {env['torch_threads']} threads, torch {env['torch']}; "
             f"load average before {env['loadavg_at_start'][0]:.2f}, after {report['load_average_after'][0]:.2f}. "
             f"Command: `{report['command']}` ("
             + ("triton.testing.do_bench per row" if env["device_type"] == "cuda" else
                f"interleaved rounds, {c['repeats']} timed after {c['warmup']} warm-up") + ").", "",
             "| row | median ms [p20, p80] | × eager plain (paired) | compiled / eager speed-up | compile s | "
             "max rel diff vs eager |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        paired = r["paired_ratio_to_plain"]
        paired = f"{paired['median']:.3f}" if paired else "–"
        lines.append(
            f"| {r['row']} | {r['median_ms']:.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}] | {r['ratio_to_plain']:.3f} "
            f"({paired}) | {r.get('speedup_vs_eager', float('nan')):.3f} | "
            f"{r.get('compile_s', float('nan')):.1f} | {r.get('max_rel_diff_vs_eager', float('nan')):.1e} |"
            .replace("nan", "–"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
