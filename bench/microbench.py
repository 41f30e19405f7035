"""Microbenchmarks of the two hot-path ops of MASS against the alternatives, at CLIP shapes.

    PYTHONPATH=. python bench/microbench.py --quick            # CPU: a few minutes
    PYTHONPATH=. python bench/microbench.py                    # full set (meant for a GPU; hours on CPU)
    PYTHONPATH=. python bench/microbench.py --models B32 --batches 8 32 --tasks 8 --topk 1 2 --mix mixed

``lowrank_linear`` (y = x W0ᵀ + b + Σ_j ((x V_tjᵀ) ⊙ S_tj) U_tjᵀ + task_bias_tj) providers, same inputs, same run:

* ``floor``        F.linear with the base weight alone: what one plain model pays.
* ``eager_loop``   PEFT-style mixed batch: per task (and slot) a boolean mask, sub-batch, two matmuls, scatter back.
* ``gather_bmm``   gather each image's factors (B, k, in) / (B, out, k) and run two bmm's (memory ∝ B·k·(in+out)).
* ``compiled``     ``torch.compile`` of the PyTorch implementation (``lowrank_linear_torch``); failures are reported.
* ``fused``        CUDA: the fused Triton candidate (shrink, then base GEMM + expand in one accumulator, one store).
* ``vendor``       CUDA: the vendor-GEMM candidate (shrink, expand + biases written into y, then cuBLAS ``addmm``).
* ``ours``         ``mass_kernels.lowrank_linear``: PyTorch path on CPU; on CUDA the candidate that
                   ``mass_kernels.warmup`` measured fastest for the shape (warm-up runs before timing).

``routing_residuals`` (‖x − Vtᵀ Vt x‖ per image and task) providers: ``floor`` (the GEMM x·Vcatᵀ alone),
``eager_loop`` (one projection per task), ``compiled``, ``ours``.

Each provider's output is checked against the fp32 (fp64 for routing) PyTorch reference before it is timed;
a mismatch marks the row ``failed`` instead of timing it. CPU: fp32, interleaved timer rounds; CUDA: bf16
(``--dtypes bf16 fp16`` for both), ``triton.testing.do_bench`` with quantiles [0.5, 0.2, 0.8].
Results: JSON (+ Markdown table) under ``--out`` (default ``bench/results``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mass_kernels  # noqa: E402
from mass.tools.common import (  # noqa: E402
    add_malloc_argument,
    device_slug,
    environment,
    malloc_setting,
    peak_memory,
    time_providers,
)
from mass_kernels.reference import lowrank_linear_torch, routing_residuals_torch  # noqa: E402

MODELS = {  # hidden, MLP, tokens per image
    "B32": (768, 3072, 50),
    "B16": (768, 3072, 197),
    "L14": (1024, 4096, 257),
}
LAYERS = {  # (out, in) as functions of (hidden, mlp)
    "attn": lambda d, m: (d, d),
    "fc1": lambda d, m: (m, d),
    "fc2": lambda d, m: (d, m),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOWRANK_PROVIDERS = ("floor", "eager_loop", "gather_bmm", "compiled", "ours")
CANDIDATE_PROVIDERS = ("fused", "vendor")  # the Triton candidates of "ours": CUDA only, no rows on a CPU run
ALL_PROVIDERS = LOWRANK_PROVIDERS[:-1] + CANDIDATE_PROVIDERS + LOWRANK_PROVIDERS[-1:]  # table/plot order
ROUTING_PROVIDERS = ("floor", "eager_loop", "compiled", "ours")


@dataclass
class LowrankCase:
    model: str
    layer: str
    batch: int
    n_tasks: int
    topk: int
    mix: str
    dtype: str

    def shapes(self):
        d, m, tok = MODELS[self.model]
        out_f, in_f = LAYERS[self.layer](d, m)
        return out_f, in_f, tok, max(1, min(out_f, in_f) // self.n_tasks)


def image_tasks(batch: int, n_tasks: int, topk: int, mix: str, device) -> torch.Tensor:
    """(B, K) task ids per image: ``mixed`` spreads images over tasks, ``homogeneous`` gives all the same."""
    i = torch.arange(batch, device=device)
    first = i % n_tasks if mix == "mixed" else torch.zeros_like(i)
    cols = [(first + j) % n_tasks for j in range(topk)]
    return torch.stack(cols, 1)


def make_lowrank_inputs(case: LowrankCase, device, seed: int = 0):
    out_f, in_f, tok, k = case.shapes()
    g = torch.Generator().manual_seed(seed)
    T = case.n_tasks
    W = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    b = torch.randn(out_f, generator=g) * 0.02
    V = torch.linalg.qr(torch.randn(T, in_f, k, generator=g))[0].transpose(1, 2).contiguous()
    U = torch.randn(T, out_f, k, generator=g) / out_f ** 0.5
    S = torch.rand(T, k, generator=g) * 0.1 + 0.01
    tb = torch.randn(T, out_f, generator=g) * 0.01
    x = torch.randn(case.batch * tok, in_f, generator=g)
    dt = DTYPES[case.dtype]
    img = image_tasks(case.batch, T, case.topk, case.mix, "cpu")
    rows = img.repeat_interleave(tok, 0)
    to = lambda t: t.to(device=device, dtype=dt)  # noqa: E731
    return dict(x=to(x), W=to(W), b=to(b), U=to(U), S=to(S), V=to(V), tb=to(tb),
                rows=rows.to(device), img=img.to(device), tok=tok)


def eager_loop_lowrank(x, W, b, U, S, V, rows, tb):
    """The PEFT-style mixed-batch loop: mask, sub-batch, two matmuls, scatter (host syncs included)."""
    y = F.linear(x, W, b)
    for slot in range(rows.shape[1]):
        for t in range(U.shape[0]):
            mask = rows[:, slot] == t
            if not bool(mask.any()):
                continue
            sub = x[mask]
            y[mask] += ((sub @ V[t].T) * S[t]) @ U[t].T + tb[t]
    return y


def gather_bmm_lowrank(x, W, b, U, S, V, img, tb, tok):
    """Gather each image's factors and bmm: per slot (B, tok, in)·(B, in, k) then ·(B, k, out)."""
    B = img.shape[0]
    y = F.linear(x, W, b).view(B, tok, -1)
    xi = x.view(B, tok, -1)
    for slot in range(img.shape[1]):
        ids = img[:, slot]
        valid = (ids >= 0).to(x.dtype).view(B, 1, 1)
        ids = ids.clamp_min(0)
        h = torch.bmm(xi, V[ids].transpose(1, 2)) * S[ids].unsqueeze(1)
        y = y + (torch.bmm(h, U[ids].transpose(1, 2)) + tb[ids].unsqueeze(1)) * valid
    return y.view(B * tok, -1)


def _tolerance(dtype: str):
    # A screen against wrong answers (errors of order 1), relative to max |y|, not an accuracy test (those are
    # tests/test_kernels_*.py, with bounds). The worst-case bound (mass_kernels.reference.lowrank_error_bound)
    # is (in + k)·u·M with M/max|y| of a few at these shapes: ≤ 1e-3 for fp32 at in = 4096; for 16-bit outputs
    # one ulp of y (2⁻⁸ bf16, 2⁻¹¹ fp16) plus h rounded to the dtype.
    return {"fp32": (2e-3, 2e-3), "bf16": (6e-2, 6e-2), "fp16": (1e-2, 1e-2)}[dtype]


def _check(out, ref, dtype: str):
    atol, rtol = _tolerance(dtype)
    scale = ref.abs().max().clamp_min(1.0)
    err = (out.float() - ref.float()).abs().max() / scale
    ok = bool(torch.allclose(out.float() / scale, ref.float() / scale, atol=atol, rtol=rtol))
    return ok, float(err)


_COMPILED = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _prepare(providers, reference, dtype, device, compile_cases):
    """Check every provider once against the reference; returns (callables to time, per-provider info)."""
    info, to_time = {}, {}
    for name, fn in providers.items():
        entry = {"status": "ok", "reason": None, "max_rel_err": None}
        if fn is None:
            continue
        try:
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_call_s = time.perf_counter() - t0
            if name == "compiled":
                entry["first_call_s"] = first_call_s  # includes compilation
            if name != "floor":
                ok, err = _check(out, reference, dtype)
                entry["max_rel_err"] = err
                if not ok:
                    entry.update(status="failed", reason=f"output does not match the reference (rel err {err:.3g})")
        except Exception as exc:  # noqa: BLE001 - a failing provider is a result, not a crash
            entry.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        info[name] = entry
        if entry["status"] == "ok":
            to_time[name] = fn
    return to_time, info


def _finish(rows, base, to_time, info, timing_kwargs, device, memory):
    timings = time_providers(to_time, device, **timing_kwargs) if to_time else {}
    floor = timings.get("floor", {}).get("median_ms")
    for name, entry in info.items():
        rec = dict(base, provider=name, **entry)
        if name in timings:
            rec.update({k: v for k, v in timings[name].items() if k != "samples_ms"})  # quantiles suffice here
            rec["ratio_to_floor"] = rec["median_ms"] / floor if floor else None
            if memory:
                rec["memory"] = peak_memory(to_time[name], device)
        rows.append(rec)
        _print_row(rec)


def bench_lowrank(case: LowrankCase, device, args, rows: list):
    inp = make_lowrank_inputs(case, device)
    x, W, b, U, S, V, tb, rt, img, tok = (inp[k] for k in ("x", "W", "b", "U", "S", "V", "tb", "rows", "img", "tok"))
    out_f, in_f, _, k = case.shapes()
    rt1 = rt if case.topk > 1 else rt[:, 0]
    with torch.no_grad():
        ref = lowrank_linear_torch(x.float(), W.float(), b.float(), U.float(), S.float(), V.float(), rt1, None,
                                   tb.float())
    gathered = case.batch * case.topk * k * (in_f + out_f) * x.element_size()
    providers = {
        "floor": lambda: F.linear(x, W, b),
        "eager_loop": lambda: eager_loop_lowrank(x, W, b, U, S, V, rt, tb),
        "gather_bmm": (lambda: gather_bmm_lowrank(x, W, b, U, S, V, img, tb, tok))
        if gathered <= args.gather_cap_gib * 2 ** 30 else None,
        "compiled": (lambda: _compiled(lowrank_linear_torch)(x, W, b, U, S, V, rt1, None, tb))
        if not args.no_compile else None,
        "ours": lambda: mass_kernels.lowrank_linear(x, W, b, U, S, V, rt1, None, tb),
    }
    if device.type == "cuda":
        from mass_kernels.candidates import candidate

        for name in CANDIDATE_PROVIDERS:
            providers[name] = lambda fn=candidate(name): fn(x, W, b, U, S, V, rt1, None, tb)
        if "ours" in args.providers:  # let the public op pick its candidate by measurement first
            mass_kernels.warmup(linear_shapes=[(out_f, in_f, case.n_tasks, k)], batch_sizes=[x.shape[0]],
                                dtypes=[x.dtype], slots=[case.topk], device=device, task_bias=True)
    providers = {n: providers[n] for n in args.providers if n in providers}
    base = dict(op="lowrank_linear", model=case.model, layer=case.layer, out=out_f, inp=in_f, rank=k,
                batch=case.batch, tokens=tok, rows=case.batch * tok, n_tasks=case.n_tasks, topk=case.topk,
                mix=case.mix, dtype=case.dtype)
    with torch.no_grad():
        to_time, info = _prepare(providers, ref, case.dtype, device, args)
        if "gather_bmm" in args.providers and providers.get("gather_bmm") is None:
            info["gather_bmm"] = {"status": "skipped", "max_rel_err": None,
                                  "reason": f"gathered factors need {gathered / 2**30:.1f} GiB > cap {args.gather_cap_gib} GiB"}
        if "compiled" in args.providers and args.no_compile:
            info["compiled"] = {"status": "skipped", "reason": "--no-compile", "max_rel_err": None}
        _finish(rows, base, to_time, info, _timing_kwargs(args), device, args.memory)


def bench_routing(model: str, batch: int, n_tasks: int, dtype: str, device, args, rows: list):
    d = MODELS[model][0]
    k = d // n_tasks
    g = torch.Generator().manual_seed(1)
    dt = DTYPES[dtype]
    x = torch.randn(batch, d, generator=g).to(device=device, dtype=dt)
    basis = torch.linalg.qr(torch.randn(n_tasks, d, k, generator=g))[0].transpose(1, 2).contiguous()
    basis = basis.to(device=device, dtype=dt)
    flat = basis.reshape(n_tasks * k, d)
    with torch.no_grad():
        ref = routing_residuals_torch(x.double(), basis.double())

    def eager():
        total = x.float().square().sum(1)
        cols = [(total - (x.float() @ basis[t].float().T).square().sum(1)).clamp_min(0).sqrt() for t in range(n_tasks)]
        return torch.stack(cols, 1)

    providers = {
        "floor": lambda: x @ flat.T,
        "eager_loop": eager,
        "compiled": (lambda: _compiled(routing_residuals_torch)(x, basis)) if not args.no_compile else None,
        "ours": lambda: mass_kernels.routing_residuals(x, basis),
    }
    providers = {n: providers[n] for n in args.providers if n in providers}
    base = dict(op="routing_residuals", model=model, layer=f"fc1 input, CLS token", out=n_tasks, inp=d, rank=k,
                batch=batch, tokens=1, rows=batch, n_tasks=n_tasks, topk=None, mix=None, dtype=dtype)
    with torch.no_grad():
        to_time, info = _prepare(providers, ref, dtype, device, args)
        if "compiled" in args.providers and args.no_compile:
            info["compiled"] = {"status": "skipped", "reason": "--no-compile", "max_rel_err": None}
        _finish(rows, base, to_time, info, _timing_kwargs(args), device, args.memory)


def _timing_kwargs(args):
    return dict(repeats=args.repeats, warmup=args.warmup, min_time_s=args.min_time, max_time_s=args.max_time)


def _print_row(r):
    if r["status"] != "ok":
        print(f"  {r['op']:17s} {r['model']} {r['layer'][:4]:4s} B={r['batch']:<3d} T={r['n_tasks']:<2d} "
              f"top{r['topk']} {r['mix']} {r['provider']:10s} {r['status'].upper()}: {r['reason']}", flush=True)
        return
    ratio = r.get("ratio_to_floor")
    print(f"  {r['op']:17s} {r['model']} {r['layer'][:4]:4s} B={r['batch']:<3d} T={r['n_tasks']:<2d} "
          f"top{r['topk']} {r['mix']} {r['provider']:10s} {r['median_ms']:9.3f} ms "
          f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]  x{ratio:.2f} of floor", flush=True)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--quick", action="store_true", help="a small CPU-friendly subset (a few minutes)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="output directory (JSON + Markdown)")
    p.add_argument("--tag", default=None, help="file-name tag (default: device slug + microbench[-quick])")
    p.add_argument("--ops", nargs="+", default=["lowrank_linear", "routing_residuals"])
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    p.add_argument("--layers", nargs="+", default=None, choices=list(LAYERS))
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--tasks", nargs="+", type=int, default=None)
    p.add_argument("--topk", nargs="+", type=int, default=None, choices=[1, 2])
    p.add_argument("--mix", nargs="+", default=None, choices=["mixed", "homogeneous"])
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--providers", nargs="+", default=list(ALL_PROVIDERS), choices=list(ALL_PROVIDERS),
                   help="fused/vendor (the Triton candidates) run on CUDA only")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=None, help="CPU: minimum timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="CPU: warm-up rounds")
    p.add_argument("--min-time", type=float, default=0.0, help="CPU: keep timing until this many seconds")
    p.add_argument("--max-time", type=float, default=None, help="CPU: stop after this many seconds (>= 3 rounds)")
    p.add_argument("--gather-cap-gib", type=float, default=4.0, help="skip gather_bmm above this gathered size")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    add_malloc_argument(p)
    return p


def resolve(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        defaults = dict(models=["B32"], layers=["fc1", "fc2"], batches=[8, 32], tasks=[8], topk=[1, 2],
                        mix=["mixed", "homogeneous"], repeats=7, max_time=20.0)
    else:
        defaults = dict(models=list(MODELS), layers=list(LAYERS), batches=[1, 8, 32, 128], tasks=[8, 14, 20],
                        topk=[1, 2], mix=["mixed", "homogeneous"], repeats=10, max_time=60.0)
    defaults["dtypes"] = ["fp32"] if cpu else ["bf16"]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return device


def run_microbench(args) -> dict:
    device = resolve(args)
    env = environment(device)
    env["malloc"] = malloc_setting(device, args.malloc)
    print(f"microbench on {env['device']} (torch {env['torch']}, triton {env['triton']}, malloc {env['malloc']})",
          flush=True)
    rows: list = []
    t0 = time.perf_counter()
    for dtype in args.dtypes:
        if "lowrank_linear" in args.ops:
            for model in args.models:
                for layer in args.layers:
                    for T in args.tasks:
                        for batch in args.batches:
                            for topk in args.topk:
                                for mix in args.mix:
                                    if args.quick and topk == 2 and mix == "homogeneous":
                                        continue  # quick: top-2 on mixed batches only
                                    bench_lowrank(LowrankCase(model, layer, batch, T, topk, mix, dtype), device,
                                                  args, rows)
        if "routing_residuals" in args.ops:
            for model in args.models:
                for T in args.tasks:
                    for batch in sorted(set(args.batches) | {128}):
                        bench_routing(model, batch, T, dtype, device, args, rows)
    choices = {" ".join(map(str, key)): value for key, value in mass_kernels.lowrank_choices().items()}
    result = {"kind": "microbench", "env": env, "quick": bool(args.quick), "wall_s": time.perf_counter() - t0,
              "lowrank_choices": choices,  # shape key (rows bucket, out, in, T, k, K, dtype, b, w, tb) → choice
              "config": {k: v for k, v in vars(args).items() if k != "func"}, "results": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = args.tag or f"{device_slug(device)}-microbench{'-quick' if args.quick else ''}"
        with open(os.path.join(args.out, tag + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, tag + ".md"), "w") as f:
            f.write(markdown(result))
        plot(result, os.path.join(args.out, tag + ".png"))
        print(f"wrote {os.path.join(args.out, tag)}.json/.md/.png")
    return result


def _fmt(r):
    if r["status"] != "ok":
        return f"{r['status']}: {r['reason']}"
    return f"{r['median_ms']:.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}] ×{r['ratio_to_floor']:.2f}"


def _case(r) -> tuple:
    """What identifies a benchmark case: every row of one case shares it, one row per provider."""
    return r["op"], r["model"], r["layer"], r["batch"], r["n_tasks"], r["topk"], r["mix"], r["dtype"]


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# Microbenchmarks — {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['torch_threads']} threads, commit "
             f"`{env['git_commit']}`, {env['date']}, load average at start {env['loadavg_at_start']}, "
             f"C allocator {env.get('malloc', 'default')}.", "",
             "Cells: median ms [p20, p80] ×ratio to the floor (F.linear with the base weight alone; for routing "
             "the GEMM x·Vcatᵀ alone). Every provider was checked against the reference before timing.", ""]
    groups: dict = {}
    for r in result["results"]:
        groups.setdefault(_case(r), {})[r["provider"]] = r
    provs = [p for p in ALL_PROVIDERS if any(p in g for g in groups.values())]
    lines.append("| op | model | layer | batch | T | top | mix | dtype | " + " | ".join(provs) + " |")
    lines.append("|" + "---|" * (8 + len(provs)))
    for key, g in groups.items():
        op, model, layer, batch, T, topk, mix, dtype = key
        cells = [_fmt(g[p]) if p in g else "—" for p in provs]
        lines.append(f"| {op} | {model} | {layer} | {batch} | {T} | {topk or ''} | {mix or ''} | {dtype} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _panel(r) -> str:
    if r["op"] == "routing_residuals":
        return "routing_residuals"
    return f"lowrank_linear, top-{r['topk']}, {r['mix']}"


def plot(result: dict, path: str) -> None:
    """Ratio to the floor against the floor's own latency (problem size), one panel per op kind, one colour
    per provider: a grid of hundreds of cells is easier to read as where each provider's points lie."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floors = {_case(r): r for r in result["results"] if r["provider"] == "floor" and r["status"] == "ok"}
    points: dict = {}
    for r in result["results"]:
        if r["provider"] == "floor" or r["status"] != "ok" or _case(r) not in floors:
            continue
        points.setdefault(_panel(r), {}).setdefault(r["provider"], []).append(
            (floors[_case(r)]["median_ms"], r["ratio_to_floor"]))
    if not points:
        return
    panels = sorted(points)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    colours = dict(zip(ALL_PROVIDERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, panel in zip(axes.flat, panels):
        for prov in ALL_PROVIDERS:
            if prov in points[panel]:
                x, y = zip(*sorted(points[panel][prov]))
                ax.plot(x, y, "o", ms=3.5, alpha=0.75, color=colours[prov], label=prov)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("floor latency, ms (problem size)")
        ax.set_ylabel("latency / floor")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    env = result["env"]
    fig.suptitle(f"{env['device'][:60]}, {', '.join(sorted({r['dtype'] for r in result['results']}))}, "
                 f"commit {str(env['git_commit'])[:7]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)
    run_microbench(args)


if __name__ == "__main__":
    main()
