"""The one device run: everything a CUDA GPU should measure for this project, in one call of ≤ 8 minutes.

    python bench/gpu_run.py                          # on a CUDA machine; writes to $OUT (or --out, or bench/results)
    python bench/gpu_run.py --dry-run --out /tmp/x   # the same plumbing on the CPU: interpreter, tiny shapes, ~1 min

Stages, each a child process with its own time budget and a hard timeout (its process group is killed), so a
hang in one cannot eat the lease; a stage that fails or times out is recorded and the next one runs:

* ``static``  ``bench/static_gpu_check.py --quick`` (if present): registers, spills, shared memory and wgmma
              use of the kernels, compiled ahead of time; CPU only, so it runs beside the other stages.
* ``tests``   a representative subset of the Triton kernel tests, compiled for the GPU (no interpreter).
* ``micro_t8`` / ``micro_t20``  ``bench/microbench.py`` at the targets' shapes: ViT-B/16 attention, fc1 and
              fc2 layers, 64 images × 197 tokens, T = 8 and 20, top-1 and top-2, mixed and homogeneous, bf16,
              every provider but ``torch.compile`` (its compile time does not fit); routing at batch 64/128.
* ``e2e``     ``mass bench``: ViT-B/16 bf16, batch 64, T = 8, mixed batch: one plain forward, MASS top-1 and
              topk, and MASS top-1 with the second pass in a CUDA graph.
* ``compile`` ``bench/compile_forward.py``: ViT-B/16 bf16, batch 64, T = 8: the plain model and the top-1 routed
              and forced MASS forwards, eager and ``torch.compile(fullgraph=True, mode="reduce-overhead")``
              (inductor with CUDA graphs: the whole routed forward, first pass and router included, replayed).

Writes ``gpu-run.json`` (every stage's status, time, log and parsed figures), ``gpu-run.md`` (the targets:
``lowrank_linear`` top-1 ≤ 1.2× ``F.linear`` and ≥ 3× faster than the eager loop; routing ≤ 2% of a forward;
routed forward ≤ 1.9× one plain forward; the static check's numbers beside them) and ``gpu-run.png``, plus each
stage's own files and log in a sub-folder, with device, commit and date. Every figure in the report is read
from a file a stage wrote during this run; a missing one is reported as not measured, never filled in.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOTAL_BUDGET_S = 450.0  # 7.5 minutes for the stages; the report takes seconds
REPORT_RESERVE_S = 10.0
BUDGETS_S = {"static": 300.0, "tests": 100.0, "micro_t8": 150.0, "e2e": 120.0, "compile": 150.0, "micro_t20": 90.0}
DRY_BUDGETS_S = {"static": 120.0, "tests": 120.0, "micro_t8": 90.0, "e2e": 120.0, "compile": 120.0,
                 "micro_t20": 90.0}
SEQUENTIAL = ("tests", "micro_t8", "e2e", "compile", "micro_t20")  # by importance; static runs beside them
TARGETS = {"lowrank_vs_linear": 1.2, "lowrank_speedup_vs_loop": 3.0, "routing_share": 0.02, "routed_vs_plain": 1.9}
TINY_MICRO_MODEL = (32, 64, 5)  # hidden, MLP, tokens: the dry run's shapes

KERNEL_TESTS = ["tests/test_kernels_lowrank.py", "tests/test_kernels_routing.py"]
KERNEL_TESTS_K = ("(matches_reference and bfloat16) or noncontiguous or deterministic or K2_slot1 "
                  "or same_task_in_both_slots or (stacked_blocks_one_launch and bfloat16) "
                  "or (selection_agrees and bfloat16)")
DRY_KERNEL_TESTS_K = "(matches_reference and N1_T1_k51 and float32) or routing_is_deterministic"


def micro_argv(T: int, out: str, dry_run: bool) -> list[str]:
    if dry_run:
        return ["--models", "tiny", "--layers", "fc1", "--batches", "2", "--tasks", str(T), "--topk", "1", "2",
                "--mix", "mixed", "--dtypes", "fp32", "--device", "cpu", "--no-compile", "--repeats", "2",
                "--warmup", "0", "--no-memory", "--malloc", "default", "--out", out, "--tag", f"microbench-t{T}"]
    return ["--models", "B16", "--layers", "attn", "fc1", "fc2", "--batches", "64", "--tasks", str(T), "--topk",
            "1", "2", "--mix", "mixed", "homogeneous", "--dtypes", "bf16", "--no-compile", "--out", out,
            "--tag", f"microbench-t{T}"]


def e2e_argv(out: str, dry_run: bool) -> list[str]:
    common = ["--mix", "mixed", "--router-mode", "top1", "topk", "--providers", "plain", "ours", "ours_graph",
              "--out", out, "--tag", "e2e-b16"]
    if dry_run:
        return ["--models", "tiny", "--tasks", "8", "--batches", "2", "--dtype", "fp32", "--device", "cpu",
                "--repeats", "2", "--warmup", "0", "--no-memory", "--malloc", "default"] + common
    return ["--models", "B16", "--tasks", "8", "--batches", "64", "--dtype", "bf16", "--device", "cuda"] + common


def compile_argv(out: str, dry_run: bool) -> list[str]:
    target = ["--out", os.path.join(out, "compile-forward")]
    if dry_run:  # aot_eager: the whole graph capture without inductor's C++ build (minutes on a small CPU)
        return ["--model", "tiny", "--batch", "2", "--repeats", "2", "--warmup", "0", "--backend", "aot_eager"] + target
    return ["--model", "B16", "--batch", "64", "--dtype", "bf16", "--device", "cuda", "--mode", "reduce-overhead",
            "--repeats", "20"] + target


def stage_plan(out: str, dry_run: bool, python: str = sys.executable) -> dict:
    """name -> (argv, extra environment, output folder). The dry run differs only in shapes, device and the
    interpreter switch; the commands, folders and parsers are the same."""
    me = os.path.abspath(__file__)
    interp = {"TRITON_INTERPRET": "1"} if dry_run else {"TRITON_INTERPRET": None}
    plan = {}
    static = os.path.join(ROOT, "bench", "static_gpu_check.py")
    if os.path.exists(static):
        plan["static"] = ([python, static, "--ci" if dry_run else "--quick", "--no-fail",
                           "--out", os.path.join(out, "static")], {"TRITON_INTERPRET": None}, "static")
    tests_k = DRY_KERNEL_TESTS_K if dry_run else KERNEL_TESTS_K
    plan["tests"] = ([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *KERNEL_TESTS, "-k", tests_k],
                     interp, "tests")
    for T in (8, 20):
        folder = os.path.join(out, f"micro_t{T}")
        argv = ([python, me, "--child-microbench"] + (["--tiny"] if dry_run else []) + ["--"]
                + micro_argv(T, folder, dry_run))
        plan[f"micro_t{T}"] = (argv, interp, f"micro_t{T}")
    plan["e2e"] = ([python, "-m", "mass.tools.bench.e2e"] + e2e_argv(os.path.join(out, "e2e"), dry_run), interp, "e2e")
    plan["compile"] = ([python, os.path.join(ROOT, "bench", "compile_forward.py")]
                       + compile_argv(os.path.join(out, "compile"), dry_run), interp, "compile")
    return plan


# ---------------------------------------------------------------- running stages
def start_stage(argv: list, env_extra: dict, log_path: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in env_extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "w")
    try:  # a new session: on timeout the whole process group (workers included) is killed, nothing else
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def finish_stage(proc: subprocess.Popen, timeout_s: float, started: float) -> dict:
    status = "ok"
    try:
        rc = proc.wait(timeout=max(timeout_s, 0.0))
    except subprocess.TimeoutExpired:
        status = "timeout"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = proc.wait()
    if status == "ok" and rc != 0:
        status = "failed"
    return {"status": status, "rc": rc, "wall_s": round(time.perf_counter() - started, 1),
            "timeout_s": round(timeout_s, 1)}


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------- reading what the stages wrote
def load_fresh_json(folder: str, since: float) -> Optional[dict]:
    """The JSON a stage wrote in ``folder`` during this run (modified after ``since``), else None."""
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".json") and os.path.getmtime(path) >= since:
            with open(path) as f:
                return json.load(f)
    return None


def parse_pytest(log_text: str) -> dict:
    """Counts from pytest's last summary line ("3 passed, 1 failed, 2 deselected in 4.1s")."""
    counts = {}
    lines = [l for l in log_text.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b", l)]
    if lines:
        for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", lines[-1]):
            counts[word.rstrip("s") if word.startswith("error") else word] = int(n)
    return counts


def lowrank_cases(micro: list[dict]) -> list[dict]:
    """Per microbench case: ours / F.linear and eager loop / ours (both from this run's medians)."""
    by_case: dict = {}
    for r in micro:
        if r.get("op") != "lowrank_linear" or r.get("status") != "ok" or r.get("median_ms") is None:
            continue
        key = (r["model"], r["layer"], r["n_tasks"], r["batch"], r["topk"], r["mix"], r["dtype"])
        by_case.setdefault(key, {})[r["provider"]] = r["median_ms"]
    out = []
    for (model, layer, T, batch, topk, mix, dtype), ms in sorted(by_case.items()):
        if "ours" not in ms or "floor" not in ms:
            continue
        out.append({"model": model, "layer": layer, "n_tasks": T, "batch": batch, "topk": topk, "mix": mix,
                    "dtype": dtype, "ours_ms": ms["ours"], "linear_ms": ms["floor"], "loop_ms": ms.get("eager_loop"),
                    "ratio_to_linear": ms["ours"] / ms["floor"],
                    "speedup_vs_loop": ms["eager_loop"] / ms["ours"] if "eager_loop" in ms else None})
    return out


def evaluate_targets(micro: list[dict], e2e: list[dict]) -> list[dict]:
    """The issue's targets, from measured rows only; ``value`` None when a stage did not produce it."""
    rows = []
    top1 = [c for c in lowrank_cases(micro) if c["topk"] == 1]
    worst = max(top1, key=lambda c: c["ratio_to_linear"]) if top1 else None
    rows.append({"id": "lowrank_vs_linear",
                 "target": f"lowrank_linear top-1 ≤ {TARGETS['lowrank_vs_linear']}× F.linear (worst case)",
                 "value": worst["ratio_to_linear"] if worst else None, "limit": TARGETS["lowrank_vs_linear"],
                 "met": None if worst is None else worst["ratio_to_linear"] <= TARGETS["lowrank_vs_linear"],
                 "detail": _case_label(worst) if worst else "",
                 "cases_met": sum(c["ratio_to_linear"] <= TARGETS["lowrank_vs_linear"] for c in top1),
                 "cases": len(top1)})
    loop = [c for c in top1 if c["speedup_vs_loop"] is not None]
    slowest = min(loop, key=lambda c: c["speedup_vs_loop"]) if loop else None
    rows.append({"id": "lowrank_vs_loop",
                 "target": f"lowrank_linear top-1 ≥ {TARGETS['lowrank_speedup_vs_loop']}× faster than the eager "
                           "loop (worst case)",
                 "value": slowest["speedup_vs_loop"] if slowest else None, "limit": TARGETS["lowrank_speedup_vs_loop"],
                 "met": None if slowest is None else slowest["speedup_vs_loop"] >= TARGETS["lowrank_speedup_vs_loop"],
                 "detail": _case_label(slowest) if slowest else "",
                 "cases_met": sum(c["speedup_vs_loop"] >= TARGETS["lowrank_speedup_vs_loop"] for c in loop),
                 "cases": len(loop)})
    plain = next((r for r in e2e if r.get("provider") == "plain" and r.get("median_ms")), None)
    batch = plain["batch"] if plain else None
    routing = [r for r in micro if r.get("op") == "routing_residuals" and r.get("provider") == "ours"
               and r.get("median_ms") and r.get("n_tasks") == (plain or {}).get("n_tasks") and r.get("batch") == batch]
    share = routing[0]["median_ms"] / plain["median_ms"] if routing and plain else None
    rows.append({"id": "routing_share", "target": f"routing ≤ {TARGETS['routing_share']:.0%} of a plain forward",
                 "value": share, "limit": TARGETS["routing_share"],
                 "met": None if share is None else share <= TARGETS["routing_share"],
                 "detail": (f"routing_residuals {routing[0]['median_ms']:.4f} ms / plain {plain['median_ms']:.2f} ms, "
                            f"batch {batch}, T={plain['n_tasks']}") if share is not None else ""})
    for provider, mode in (("ours", "top1"), ("ours_graph", "top1"), ("ours", "topk")):
        r = next((r for r in e2e if r.get("provider") == provider and r.get("router_mode") == mode
                  and r.get("ratio_to_plain") is not None), None)
        label = f"{provider} [{mode}]"
        rows.append({"id": f"routed_{provider}_{mode}",
                     "target": f"routed forward {label} ≤ {TARGETS['routed_vs_plain']}× one plain forward"
                               + (" (every sample on a two-task set)" if mode == "topk" else ""),
                     "value": r["ratio_to_plain"] if r else None, "limit": TARGETS["routed_vs_plain"],
                     "met": None if r is None else r["ratio_to_plain"] <= TARGETS["routed_vs_plain"],
                     "detail": (f"{r['median_ms']:.2f} ms, {r['model']} batch {r['batch']} T={r['n_tasks']} "
                                f"{r['dtype']}") if r else ""})
    return rows


def _case_label(c: dict) -> str:
    loop = f", eager loop {c['loop_ms']:.4f} ms" if c.get("loop_ms") is not None else ""
    return (f"{c['model']} {c['layer']} T={c['n_tasks']} batch {c['batch']} {c['mix']} {c['dtype']}: "
            f"ours {c['ours_ms']:.4f} ms, F.linear {c['linear_ms']:.4f} ms{loop}")


def static_summary(static: Optional[dict]) -> list[dict]:
    """sm_90 16-bit rows of the static check, reduced per kernel/dtype/T/k/K: max registers and stack, max
    shared memory, and whether every config uses wgmma."""
    if not static:
        return []
    groups: dict = {}
    for r in static.get("results", []):
        if not r.get("ok") or r.get("arch") != 90 or r.get("dtype") not in ("bf16", "fp16"):
            continue
        key = (r["kernel"], r["dtype"], r["T"], r["k"], r["K"])
        groups.setdefault(key, []).append(r)
    return [{"kernel": k[0], "dtype": k[1], "T": k[2], "k": k[3], "K": k[4], "variants": len(rs),
             "regs_max": max(r["regs"] for r in rs), "stack_max": max(r["stack"] for r in rs),
             "shared_max": max(r["shared"] for r in rs), "wgmma_all": all(r["wgmma"] for r in rs)}
            for k, rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))]


# ---------------------------------------------------------------- report
def _fmt(v, spec=".3f") -> str:
    return "not measured" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    env = report["env"]
    head = "DRY RUN on the CPU (Triton interpreter, tiny shapes): plumbing only, no GPU figures" \
        if report["dry_run"] else f"{env['device']}"
    lines = [f"# Device run — {head}", "",
             f"commit `{env['git_commit']}`, {env['date']}, torch {env['torch']}, triton {env['triton']}; "
             f"{report['wall_s']:.0f} s in all. Every figure below was read from a file a stage wrote in this run.",
             "", "## Stages", "", "| stage | status | wall s | budget s | note |", "|---|---|---|---|---|"]
    for name, st in report["stages"].items():
        note = st.get("note", "")
        if name == "tests" and st.get("pytest"):
            note = ", ".join(f"{n} {w}" for w, n in st["pytest"].items())
        lines.append(f"| {name} | {st['status']} | {st.get('wall_s', '—')} | {st.get('timeout_s', '—')} | {note} |")
    lines += ["", "## Targets", "", "| target | measured | limit | met | detail |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        extra = f" ({t['cases_met']}/{t['cases']} cases met)" if t.get("cases") else ""
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['limit']} | {met} | {t['detail']}{extra} |")
    cases = report.get("lowrank_cases") or []
    if cases:
        lines += ["", "## lowrank_linear per case (medians of this run)", "",
                  "| layer | T | top-k | mix | ours ms | F.linear ms | × F.linear | eager loop / ours |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in cases:
            lines.append(f"| {c['layer']} | {c['n_tasks']} | {c['topk']} | {c['mix']} | {c['ours_ms']:.4f} | "
                         f"{c['linear_ms']:.4f} | {c['ratio_to_linear']:.3f} | {_fmt(c['speedup_vs_loop'], '.2f')} |")
    compiled = report.get("compile") or []
    if compiled:
        lines += ["", "## torch.compile (fullgraph) against eager", "",
                  "| row | median ms | × eager plain | compiled / eager speed-up | compile s |", "|---|---|---|---|---|"]
        for r in compiled:
            lines.append(f"| {r['row']} | {r['median_ms']:.3f} | {r['ratio_to_plain']:.3f} | "
                         f"{_fmt(r.get('speedup_vs_eager'))} | {_fmt(r.get('compile_s'), '.1f')} |")
    static = report.get("static") or []
    lines += ["", "## Static check (sm_90, 16-bit; compiled ahead of time)", ""]
    if static:
        lines += ["| kernel | dtype | T | k | K | variants | regs max | stack B max | shared B max | wgmma in all |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in static:
            lines.append(f"| {s['kernel']} | {s['dtype']} | {s['T']} | {s['k']} | {s['K']} | {s['variants']} | "
                         f"{s['regs_max']} | {s['stack_max']} | {s['shared_max']} | {'yes' if s['wgmma_all'] else 'no'} |")
    else:
        lines.append(f"Not available: {report['stages'].get('static', {}).get('status', 'absent')}.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> bool:
    cases = report.get("lowrank_cases") or []
    e2e = [t for t in report["targets"] if t["id"].startswith("routed_") and t["value"] is not None]
    if not cases and not e2e:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{c['layer']} T{c['n_tasks']} k{c['topk']} {c['mix'][:3]}" for c in cases]
    axes[0].bar(range(len(cases)), [c["ratio_to_linear"] for c in cases],
                color=["C0" if c["topk"] == 1 else "C1" for c in cases])
    axes[0].axhline(TARGETS["lowrank_vs_linear"], color="k", ls="--", lw=0.8)
    axes[0].set_xticks(range(len(cases)), labels, rotation=90, fontsize=7)
    axes[0].set_ylabel("lowrank_linear / F.linear (blue top-1, orange top-2)")
    axes[1].bar(range(len(e2e)), [t["value"] for t in e2e])
    axes[1].axhline(TARGETS["routed_vs_plain"], color="k", ls="--", lw=0.8)
    axes[1].set_xticks(range(len(e2e)), [t["id"][len("routed_"):] for t in e2e], fontsize=8)
    axes[1].set_ylabel("routed forward / plain forward")
    title = "DRY RUN (CPU, not GPU figures)" if report["dry_run"] else report["env"]["device"]
    fig.suptitle(f"{title} — {report['env']['git_commit']} {report['env']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main
def run(out: str, dry_run: bool, total_budget_s: float = TOTAL_BUDGET_S, stages=None, budgets=None) -> dict:
    import torch

    from mass.tools.common import environment

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_run.py: no CUDA GPU here (use --dry-run to rehearse on the CPU)")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    clock0 = time.perf_counter()
    deadline = clock0 + total_budget_s
    env = environment(torch.device("cpu" if dry_run else "cuda"))
    plan = stage_plan(out, dry_run)
    wanted = list(stages) if stages else ["static", *SEQUENTIAL]
    budgets = dict(DRY_BUDGETS_S if dry_run else BUDGETS_S, **(budgets or {}))
    report = {"kind": "gpu-run", "dry_run": dry_run, "env": env, "stages": {}, "total_budget_s": total_budget_s}
    print(f"gpu_run: {'DRY RUN on the CPU' if dry_run else env['device']}, commit {env['git_commit']}", flush=True)

    def remaining():
        return deadline - time.perf_counter() - REPORT_RESERVE_S

    background = None
    if "static" in wanted:
        if "static" in plan:
            argv, extra, folder = plan["static"]
            started = time.perf_counter()
            background = (start_stage(argv, extra, os.path.join(out, folder, "log.txt")), started)
        else:
            report["stages"]["static"] = {"status": "absent", "note": "bench/static_gpu_check.py not in this tree"}
    for name in [s for s in SEQUENTIAL if s in wanted]:
        argv, extra, folder = plan[name]
        timeout = min(budgets[name], remaining())
        if timeout < 5:
            report["stages"][name] = {"status": "not run", "note": "no time left in the total budget"}
            continue
        print(f"[{name}] up to {timeout:.0f} s: {' '.join(argv[1:])[:200]}", flush=True)
        started = time.perf_counter()
        log = os.path.join(out, folder, "log.txt")
        report["stages"][name] = finish_stage(start_stage(argv, extra, log), timeout, started)
        report["stages"][name]["log"] = os.path.relpath(log, out)
        if name == "tests":
            report["stages"][name]["pytest"] = parse_pytest(_tail(log, 200))
        print(f"[{name}] {report['stages'][name]['status']} in {report['stages'][name]['wall_s']} s", flush=True)
        if report["stages"][name]["status"] != "ok":
            print(_tail(log), flush=True)
    if background is not None:
        proc, started = background
        timeout = min(budgets["static"] - (time.perf_counter() - started), remaining())
        report["stages"]["static"] = finish_stage(proc, timeout, started)
        report["stages"]["static"]["log"] = os.path.join("static", "log.txt")
    micro = []
    for T in (8, 20):
        data = load_fresh_json(os.path.join(out, f"micro_t{T}"), t_start)
        micro += (data or {}).get("results", [])
    e2e = (load_fresh_json(os.path.join(out, "e2e"), t_start) or {}).get("results", [])
    report["targets"] = evaluate_targets(micro, e2e)
    report["lowrank_cases"] = lowrank_cases(micro)
    report["static"] = static_summary(load_fresh_json(os.path.join(out, "static"), t_start))
    report["compile"] = (load_fresh_json(os.path.join(out, "compile"), t_start) or {}).get("rows", [])
    report["wall_s"] = time.perf_counter() - clock0
    with open(os.path.join(out, "gpu-run.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "gpu-run.md"), "w") as f:
        f.write(markdown(report))
    report["plot"] = plot(report, os.path.join(out, "gpu-run.png"))
    print(markdown(report), flush=True)
    pack_stage_folders(out, [folder for _, _, folder in plan.values()])
    return report


def pack_stage_folders(out: str, folders) -> None:
    """Move the stages' folders (logs, JSON, plots) into one ``gpu-run-stages.tar.gz``: the device tool brings
    back at most 8 files from $OUT, so the run leaves four (the report's JSON, Markdown, PNG and this archive)."""
    import shutil
    import tarfile

    present = [f for f in dict.fromkeys(folders) if os.path.isdir(os.path.join(out, f))]
    with tarfile.open(os.path.join(out, "gpu-run-stages.tar.gz"), "w:gz") as tar:
        for folder in present:
            tar.add(os.path.join(out, folder), arcname=folder)
    for folder in present:
        shutil.rmtree(os.path.join(out, folder))


def child_microbench(argv: list, tiny: bool) -> int:
    """Run bench/microbench.py in this (child) process; ``tiny`` adds the dry run's tiny model first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("microbench", os.path.join(ROOT, "bench", "microbench.py"))
    mb = importlib.util.module_from_spec(spec)
    sys.modules["microbench"] = mb  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mb)
    if tiny:
        mb.MODELS["tiny"] = TINY_MICRO_MODEL
    parser = mb.add_arguments(argparse.ArgumentParser(prog="microbench"))
    for action in parser._actions:  # let the tiny model through the --models choices
        if action.dest == "models" and action.choices is not None:
            action.choices = list(mb.MODELS)
    mb.run_microbench(parser.parse_args(argv))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: interpreter, tiny shapes")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results", "gpu-run"),
                   help="output folder (default: $OUT, else bench/results/gpu-run)")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all stages together")
    p.add_argument("--stages", nargs="+", default=None, choices=["static", *SEQUENTIAL])
    p.add_argument("--child-microbench", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_microbench:
        return child_microbench([a for a in args.rest if a != "--"], args.tiny)
    run(args.out, args.dry_run, args.budget, args.stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
