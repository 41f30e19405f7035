"""``torch.compile`` of a whole MASSModel against eager (issue 25): the top-1 routed and forced forwards are one
graph each (``fullgraph=True``); what does compiling them buy, next to compiling the plain model?

    python bench/compile_forward.py                         # ViT-B/32, T = 8, batch 16, inductor, CPU
    python bench/compile_forward.py --model tiny --batch 4 --repeats 3 --out /tmp/x   # seconds (smoke)

Built like ``mass bench``: an HF CLIP vision encoder from a config (random weights), a random rank-k
decomposition of T tasks (:func:`mass.method.synthetic.random_decomposition`), ``MASSModel`` with the top-1
router; ``torch.randn`` images. Rows, timed in interleaved rounds in one process (median [p20, p80] ms, ratio to
the eager plain forward of the same rounds, and paired):

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
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from mass.method.router import RouterConfig
from mass.method.synthetic import random_decomposition
from mass.nn.model import MASSModel, extract_embedding
from mass.tools.bench.models import build_clip
from mass.tools.common import paired_ratio, time_providers


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def build(args):
    plain, cfg = build_clip(args.model, seed=args.seed)
    dec = random_decomposition(plain, args.tasks, seed=args.seed)
    model = MASSModel(build_clip(args.model, seed=args.seed)[0], dec, router=RouterConfig(mode="top1")).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    views = {"routed": model}
    if args.fast:
        support = {t: torch.randn(8, 3, cfg.image_size, cfg.image_size, generator=gen) for t in model.tasks}
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
    p.add_argument("--fast", action="store_true", help="also time RouterConfig.fast() (routed, early block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/cpu-compile-forward")
    args = p.parse_args(argv)
    if args.batch < 1 or args.tasks < 1 or args.repeats < 1:
        p.error("--batch, --tasks and --repeats must be >= 1")

    plain, model, views, x = build(args)
    forced = torch.arange(args.batch) % args.tasks
    eager = {"plain": lambda: extract_embedding(plain(pixel_values=x)),
             "forced": lambda: extract_embedding(model(pixel_values=x, task_ids=forced))}
    for name, view in views.items():
        eager[name] = lambda view=view: extract_embedding(view(pixel_values=x))

    compiled_modules = {"plain": torch.compile(plain, fullgraph=True, backend=args.backend),
                        "forced": torch.compile(model, fullgraph=True, backend=args.backend)}
    compiled_modules.update({name: torch.compile(view, fullgraph=True, backend=args.backend)
                             for name, view in views.items()})
    compiled, checks = {}, {}
    with torch.inference_mode():
        for name, module in compiled_modules.items():
            t0 = time.perf_counter()
            if name == "plain":
                out, want = module(pixel_values=x), plain(pixel_values=x)
            elif name == "forced":
                out, want = module(pixel_values=x, task_ids=forced), model(pixel_values=x, task_ids=forced)
            else:
                out, routing = module(pixel_values=x, return_routing=True)
                want = views[name](pixel_values=x, task_ids=routing.task_ids)
            compile_s = time.perf_counter() - t0
            got, ref = extract_embedding(out), extract_embedding(want)
            rel = float((got - ref).abs().max() / ref.abs().max())
            checks[name] = {"compile_s": compile_s, "max_rel_diff_vs_eager": rel}
            print(f"{name:>8} compiled in {compile_s:.1f}s; max |compiled - eager| / max|eager| = {rel:.2e}",
                  flush=True)
            if name == "plain":
                compiled[name + " compiled"] = lambda m=module: extract_embedding(m(pixel_values=x))
            elif name == "forced":
                compiled[name + " compiled"] = lambda m=module: extract_embedding(m(pixel_values=x, task_ids=forced))
            else:
                compiled[name + " compiled"] = lambda m=module: extract_embedding(m(pixel_values=x))

    fns = {}
    for name in eager:
        fns[name] = eager[name]
        fns[name + " compiled"] = compiled[name + " compiled"]
    with torch.inference_mode():
        timings = time_providers(fns, torch.device("cpu"), repeats=args.repeats, warmup=args.warmup)
    floor = timings["plain"]
    rows = []
    for name, t in timings.items():
        row = {"row": name, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
               "ratio_to_plain": t["median_ms"] / floor["median_ms"],
               "paired_ratio_to_plain": paired_ratio(t["samples_ms"], floor["samples_ms"]),
               "samples_ms": t["samples_ms"]}
        base = name.replace(" compiled", "")
        if name.endswith(" compiled"):
            row.update(checks[base])
            row["speedup_vs_eager"] = timings[base]["median_ms"] / t["median_ms"]
        rows.append(row)
    report = {
        "what": "torch.compile(fullgraph=True) of a MASSModel (top-1 routed / forced) against eager",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "cpu": _cpu_name(), "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(), "torch": torch.__version__, "python": sys.version.split()[0],
        "config": vars(args), "rows": rows,
    }
    report["load_average_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# torch.compile of the routed model: {c['model']}, T = {c['tasks']}, batch {c['batch']}, "
             f"backend {c['backend']}", "",
             f"{report['date']}, commit {report['commit']}, {report['cpu']}, {report['threads']} threads, torch "
             f"{report['torch']}; load average before {report['load_average_before'][0]:.2f}, after "
             f"{report['load_average_after'][0]:.2f}. Command: `python bench/compile_forward.py"
             f"{' --fast' if c['fast'] else ''}` (interleaved rounds, {c['repeats']} timed after {c['warmup']} "
             f"warm-up).", "",
             "| row | median ms [p20, p80] | × eager plain (paired) | compiled / eager speed-up | compile s | "
             "max rel diff vs eager |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        paired = r["paired_ratio_to_plain"]
        lines.append(
            f"| {r['row']} | {r['median_ms']:.1f} [{r['p20_ms']:.1f}, {r['p80_ms']:.1f}] | {r['ratio_to_plain']:.3f} "
            f"({paired['median']:.3f}) | {r.get('speedup_vs_eager', float('nan')):.3f} | "
            f"{r.get('compile_s', float('nan')):.1f} | {r.get('max_rel_diff_vs_eager', float('nan')):.1e} |"
            .replace("nan", "–"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
