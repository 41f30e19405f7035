"""Static GPU check: compile every Triton kernel of mass_kernels ahead of time for CUDA targets (no GPU needed)
and report registers, spills, shared memory and whether Hopper's wgmma is used.

    PYTHONPATH=. python bench/static_gpu_check.py --quick --out DIR     # a representative subset
    PYTHONPATH=. python bench/static_gpu_check.py --out DIR             # every kernel x config x dtype x arch x variant

Writes ``DIR/static-gpu-check.json`` and ``.md``. Each combination is specialised exactly as a launch specialises
it: the launchers' own argument builders (``plan_launch``/``shrink_launch``/``linear_launch``, ``routing_launch``)
run on meta tensors of the variant's shapes, and Triton's own specialisation rule turns each argument into its
signature type, a ``constexpr`` 1, or a divisibility-by-16 hint. ``cuobjdump --dump-resource-usage`` (shipped in
the triton wheel) gives REG, STACK (bytes of local stack per thread: spills) and SHARED; the PTX tells whether
``wgmma`` (sm_90 warp-group MMA) or ``mma.sync`` is used. Exit status 1 if a compile fails or a variant a
launch can pick spills (routing, and the low-rank kernels' autotune candidates of every dtype at a rank that is
a multiple of 16), unless ``--no-fail``.

Variants: kernels ``linear`` (fused base GEMM + expand), ``expand`` (the vendor candidate's expand-only kernel),
``shrink`` and ``routing``; every autotune candidate of the dtype (routing: its block-size heuristic at 1, 32
and 128 rows, and in the full set at k = 16…384);
dtypes bf16, fp16, fp32 with TF32 and fp32 IEEE; sm_90 and sm_80; K slots 1 and 2; bias / task bias / row
weights on and off; T = 8 with k = 96 and T = 20 with k = 38 (as decomposed) and k = 48 (padded by
``mass_kernels.pad_rank``), at ViT-B/16 fc1 (768 → 3072, 64 images x 197 tokens).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("bf16", "fp16", "fp32-tf32", "fp32-ieee")
ARCHS = (90, 80)
SHAPES = ((8, 96), (20, 38), (20, 48))  # (T, k); 48 = 38 padded to a multiple of 16
D_IN, D_OUT, ROWS = 768, 3072, 64 * 197
FLAGS = ((True, False, False), (True, True, True), (False, False, False), (True, True, False))  # bias, tb, weights


ROUTING_K = (16, 32, 38, 48, 64, 96, 128, 256, 384)  # full set: the routing tile heuristic over k (K_PAD 16…512)


def operand_class(dtype: str) -> str:
    return "16-bit" if dtype in ("bf16", "fp16") else dtype[len("fp32-"):]


def candidates(kernel: str, dtype: str) -> list[int]:
    """Indices, in the autotuner's config list, of the configs a launch may pick for this kernel and dtype
    (``mass_kernels.lowrank.CONFIG_SETS``)."""
    from mass_kernels import lowrank

    full = lowrank._SHRINK_CONFIGS if kernel == "shrink" else lowrank._LINEAR_CONFIGS
    return [next(i for i, d in enumerate(full) if d is c)
            for c in lowrank.CONFIG_SETS[(kernel, operand_class(dtype))]]


def _routing(arch, dtype, k, rows, T=None):
    return dict(kernel="routing", arch=arch, dtype=dtype, T=T or max(1, D_IN // k), k=k, rows=rows, config=None,
                K=1, bias=False, task_bias=False, weights=False)


def _lowrank(kernel, arch, dtype, T, k, K, flags, config):
    return dict(kernel=kernel, arch=arch, dtype=dtype, T=T, k=k, K=K, bias=flags[0], task_bias=flags[1],
                weights=flags[2], config=config, rows=ROWS)


def ci_extra() -> list[dict]:
    """What the CI subset adds to its bf16 sm_90 / fp16 sm_80 core: the 16-bit variants that spilled before a
    fix, and every fp32 autotune candidate once, at a variant where an earlier fp32 candidate spilled."""
    b = FLAGS[0]
    out = [_lowrank("linear", 80, "fp16", 8, 96, 2, b, candidates("linear", "fp16")[2])]  # 8 B: 64x64x64 tile
    for dtype, (arch, T, k, K) in (("fp32-tf32", (80, 8, 96, 2)), ("fp32-ieee", (90, 20, 48, 1))):
        out += [_lowrank(kernel, arch, dtype, T, k, K, b, c) for kernel in ("linear", "expand", "shrink")
                for c in candidates(kernel, dtype)]
    # routing: 32-row tile at k = 48 (8-24 B on sm_90), IEEE at k = 96 (up to 648 B on sm_80)
    out += [_routing(90, "fp32-tf32", 48, 32, 20)] + [_routing(80, "fp32-ieee", 96, n, 8) for n in (32, 128)]
    return out


def variants(subset: str = "full") -> list[dict]:
    """Every combination to compile, as plain dicts (they travel to worker processes). ``subset``: "full",
    "quick" (16-bit on both archs and TF32 on sm_90, the smallest and largest tiles), "ci" (bf16 on sm_90 and
    fp16 on sm_80 with the smallest and largest tiles, plus :func:`ci_extra`)."""
    out = []
    if subset == "full":
        combos = list(itertools.product(ARCHS, DTYPES, SHAPES))
        slots, lin_flags, other_flags, rows, pick = (1, 2), FLAGS, (FLAGS[0], FLAGS[1]), (1, 32, 128), None
        out += [_routing(a, d, k, n) for a, d in itertools.product(ARCHS, DTYPES) for k in ROUTING_K
                if k not in {k for _, k in SHAPES} for n in rows]
    else:
        dtypes = (("bf16", 90), ("fp16", 80)) if subset == "ci" else \
            tuple((d, a) for a in ARCHS for d in ("bf16", "fp16")) + (("fp32-tf32", 90),)
        combos = [(a, d, sh) for d, a in dtypes for sh in ((8, 96), (20, 48))]
        slots, lin_flags, other_flags, rows = (2,) if subset == "ci" else (1, 2), FLAGS[1:2], FLAGS[1:2], (1, 32, 128)
        pick = lambda c: list(dict.fromkeys((c[0], c[-1])))  # noqa: E731 - smallest and largest tile
    for arch, dtype, (T, k) in combos:
        out += [_routing(arch, dtype, k, n, T) for n in rows]
        for K in slots:
            for kernel, flags in (("linear", lin_flags), ("expand", other_flags), ("shrink", other_flags)):
                cfgs = candidates(kernel, dtype)
                cfgs = cfgs if pick is None else pick(cfgs)[: 1 if kernel == "expand" else 2]
                out += [_lowrank(kernel, arch, dtype, T, k, K, f, c) for f, c in itertools.product(flags, cfgs)]
    return out + (ci_extra() if subset == "ci" else [])


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


def _launch(v: dict):
    """(jit function, positional args, constexpr/launch kwargs) of a variant, from the launchers' builders."""
    import torch

    from mass_kernels import lowrank, routing

    dt, meta_dev = _torch_dtype(v["dtype"]), torch.device("meta")
    T, k = v["T"], v["k"]
    if v["kernel"] == "routing":
        x = torch.empty(1, v["rows"], D_IN, dtype=dt, device=meta_dev)
        basis = torch.empty(1, T, k, D_IN, dtype=dt, device=meta_dev)
        out = torch.empty(1, v["rows"], T, dtype=torch.float32, device=meta_dev)
        args, meta, _ = routing.routing_launch(x, basis, out)
        return routing._routing_residuals_kernel, args, meta
    n, K = v["rows"], v["K"]
    e = lambda *s, d=dt: torch.empty(*s, dtype=d, device=meta_dev)  # noqa: E731
    plan = lowrank.plan_launch(e(n, D_IN), e(D_OUT, D_IN), e(D_OUT) if v["bias"] else None, e(T, D_OUT, k),
                               e(T, k), e(T, k, D_IN), e(n, K, d=torch.int64),
                               e(n, K, d=torch.float32) if v["weights"] else None,
                               e(T, D_OUT) if v["task_bias"] else None)
    if v["kernel"] == "shrink":
        cfg = lowrank._SHRINK_CONFIGS[v["config"]]
        args, meta, _ = lowrank.shrink_launch(plan)
        fn = lowrank._lowrank_shrink_kernel
    else:
        cfg = lowrank._LINEAR_CONFIGS[v["config"]]
        args, meta, _ = lowrank.linear_launch(plan, has_base=v["kernel"] == "linear")
        fn = lowrank._lowrank_linear_kernel
    return fn, args, dict(meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def specialise(fn, args, meta):
    """Triton's launch-time specialisation of ``args`` for ``fn``: (signature, constexprs, attrs)."""
    import torch
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import MockTensor, native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    positional = iter(args)
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", meta[name]
            continue
        arg = next(positional)
        if isinstance(arg, torch.Tensor):
            arg = MockTensor(arg.dtype)  # data_ptr 0: aligned, as torch's allocations are
        ty, key = native_specialize_impl(CUDABackend, arg, param.is_const, not param.do_not_specialize,
                                         not param.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", key
        else:
            signature[name] = ty
            if key and "D" in key:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_available() -> bool:
    return os.access(_tool("ptxas"), os.X_OK) and os.access(_tool("cuobjdump"), os.X_OK)


def compile_variant(v: dict) -> dict:
    """Compile one variant; returns it with regs / stack / shared / wgmma / mma_sync / compile_s or an error."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    prec = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if v["dtype"] == "fp32-tf32" else "highest")
        fn, args, meta = _launch(v)
        signature, constexprs, attrs = specialise(fn, args, meta)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", v["arch"], 32),
                                options=dict(num_warps=meta["num_warps"], num_stages=meta["num_stages"]))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        ptx = kernel.asm["ptx"]
        return dict(v, ok=True, regs=int(m[1]), stack=int(m[2]), local=int(m[4]),
                    shared=int(kernel.metadata.shared), wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
                    config_kwargs={k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_D",
                                                        "K_PAD") if k in meta},
                    num_warps=meta["num_warps"], num_stages=meta["num_stages"],
                    compile_s=round(time.perf_counter() - t0, 2))
    except Exception as exc:  # noqa: BLE001 - a failing compile is a result
        return dict(v, ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                    compile_s=round(time.perf_counter() - t0, 2))
    finally:
        torch.set_float32_matmul_precision(prec)


def spills(r: dict) -> bool:
    return r.get("stack", 0) > 0 or r.get("local", 0) > 0


def failures(results: list[dict]) -> list[str]:
    """What makes the check fail: compile errors, and spills in any variant a launch can pick (fp32 configs
    that spill are not autotune candidates, so they are not compiled here). Low-rank kernels at a rank that
    is not a multiple of 16 are reported but do not fail: CUDA banks are padded (``mass_kernels.pad_rank``),
    and unpadded k = 38 spills on sm_80 in the largest tiles."""
    bad = []
    for r in results:
        if not r["ok"]:
            bad.append(f"compile failed: {_label(r)}: {r['error']}")
        elif spills(r) and (r["kernel"] == "routing" or r["k"] % 16 == 0):
            bad.append(f"spills {r['stack']} B: {_label(r)}")
    return bad


def _label(r: dict) -> str:
    flags = "".join(c for c, on in zip("btw", (r["bias"], r["task_bias"], r["weights"])) if on) or "-"
    cfg = f"cfg{r['config']}" if r["config"] is not None else f"rows{r['rows']}"
    return f"{r['kernel']} sm_{r['arch']} {r['dtype']} T{r['T']} k{r['k']} K{r['K']} {flags} {cfg}"


def run(subset: str, jobs: int) -> list[dict]:
    todo = variants(subset)
    if jobs <= 1:
        return [compile_variant(v) for v in todo]
    with cf.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_variant, todo, chunksize=4))


def markdown(result: dict) -> str:
    rows = result["results"]
    lines = [f"# Static GPU check — triton {result['triton']}, commit {result.get('commit')}, {result['date']}", "",
             f"{len(rows)} compilations ({result['subset']} set), "
             f"{sum(not r['ok'] for r in rows)} failed, {sum(r['ok'] and spills(r) for r in rows)} with spills "
             f"({sum(r['ok'] and spills(r) and r['dtype'] in ('bf16', 'fp16') for r in rows)} of them 16-bit, "
             f"{sum(r['ok'] and spills(r) and r['kernel'] != 'routing' and r['k'] % 16 != 0 for r in rows)} at an "
             "unpadded rank, which the library does not launch on CUDA: banks are padded by mass_kernels.pad_rank). "
             f"Lowrank kernels at {D_IN} → {D_OUT}, {ROWS} rows; routing at D = {D_IN}. Stack = bytes of local stack "
             "per thread (spills). Each dtype's rows list its autotune candidates only (mass_kernels.lowrank."
             "CONFIG_SETS: fp32 at TF32 and at IEEE precision has its own sets, without the tiles that spill).", "",
             "| kernel | arch | dtype | T | k | K | b/tb/w | config | warps/stages | regs | stack B | shared B | "
             "wgmma | mma.sync |", "|" + "---|" * 14]
    for r in rows:
        flags = "/".join("1" if r[f] else "0" for f in ("bias", "task_bias", "weights"))
        cfg = (" ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in r.get("config_kwargs", {}).items())
               or "-")
        if r["ok"]:
            lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['dtype']} | {r['T']} | {r['k']} | {r['K']} | {flags} "
                         f"| {cfg} | {r['num_warps']}/{r['num_stages']} | {r['regs']} | {r['stack']} | {r['shared']} "
                         f"| {'yes' if r['wgmma'] else 'no'} | {'yes' if r['mma_sync'] else 'no'} |")
        else:
            lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['dtype']} | {r['T']} | {r['k']} | {r['K']} | {flags} "
                         f"| {r['config']} | | FAILED: {r['error']} | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a representative subset (minutes on 2 cores)")
    p.add_argument("--ci", action="store_true", help="the smallest subset (the CPU test)")
    p.add_argument("--out", required=True, help="output directory for static-gpu-check.json/.md")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even with failures or 16-bit spills")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter does not compile for a GPU")
    if not ptxas_available():
        print(f"ptxas/cuobjdump not found under {_tool('')}: cannot compile for CUDA", file=sys.stderr)
        return 2
    import triton

    t0 = time.perf_counter()
    subset = "ci" if args.ci else "quick" if args.quick else "full"
    results = run(subset, args.jobs)
    from mass.tools.common import git_commit

    result = {"kind": "static-gpu-check", "triton": triton.__version__, "subset": subset, "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.perf_counter() - t0, 1),
              "shapes": {"d_in": D_IN, "d_out": D_OUT, "rows": ROWS}, "results": results,
              "failures": failures(results)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "static-gpu-check.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "static-gpu-check.md"), "w") as f:
        f.write(markdown(result))
    print(f"{len(results)} compilations in {result['wall_s']} s; {len(result['failures'])} failures")
    for line in result["failures"][:40]:
        print("  " + line)
    return 1 if result["failures"] and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
