"""bench/gpu_run.py: the dry run executes the device script's whole plumbing on the CPU, so the one device call
cannot fail for a typo; the report never shows a figure that no stage measured."""
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from _tolerances import U64, gamma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_run", os.path.join(ROOT, "bench", "gpu_run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_run = _load()


def test_dry_run_runs_every_stage_and_reports_what_it_measured(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_run.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-run.json").read_text())
    assert report["dry_run"] is True
    for name in gpu_run.SEQUENTIAL:
        assert report["stages"][name]["status"] == "ok", (name, report["stages"][name])
    assert report["stages"]["tests"]["pytest"].get("passed", 0) >= 2
    assert report["stages"]["tests"]["pytest"].get("failed", 0) == 0
    assert report["stages"]["static"]["status"] in ("absent", "ok", "timeout", "failed")
    values = {t["id"]: t["value"] for t in report["targets"]}
    assert values["lowrank_vs_linear"] is not None and values["lowrank_vs_loop"] is not None  # this run's files
    assert values["routing_share"] is not None
    assert values["routed_ours_top1"] is not None and values["routed_ours_topk"] is not None
    assert values["routed_ours_graph_top1"] is None  # no CUDA graph on a CPU: not measured, not made up
    assert {c["n_tasks"] for c in report["lowrank_cases"]} == {8, 20}
    compiled = {r["row"]: r for r in report["compile"]}  # the compile stage's rows, read from its file
    assert {"plain", "plain compiled", "routed", "routed compiled", "forced", "forced compiled"} <= set(compiled)
    assert all(compiled[f"{n} compiled"]["max_rel_diff_vs_eager"] < 1e-5 for n in ("plain", "routed", "forced"))
    md = (tmp_path / "gpu-run.md").read_text()
    assert md.startswith("# Device run — DRY RUN") and "not measured" in md
    with open(tmp_path / "gpu-run.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # At most 8 files come back from the device: the stages' folders are packed into one archive.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-run-stages.tar.gz", "gpu-run.json", "gpu-run.md",
                                                          "gpu-run.png"]
    with tarfile.open(tmp_path / "gpu-run-stages.tar.gz") as tar:
        names = set(tar.getnames())
    for folder in ("tests", "micro_t8", "micro_t20", "e2e", "compile"):
        assert f"{folder}/log.txt" in names


def test_the_device_plan_uses_the_targets_shapes(tmp_path):
    plan = gpu_run.stage_plan(str(tmp_path), dry_run=False, python="python")
    micro = plan["micro_t8"][0]
    assert micro[micro.index("--models") + 1] == "B16" and micro[micro.index("--batches") + 1] == "64"
    assert micro[micro.index("--dtypes") + 1] == "bf16" and "--tiny" not in micro
    e2e = plan["e2e"][0]
    assert e2e[e2e.index("--models") + 1] == "B16" and e2e[e2e.index("--tasks") + 1] == "8"
    assert "ours_graph" in e2e and e2e[e2e.index("--dtype") + 1] == "bf16"
    compiled = plan["compile"][0]
    assert compiled[compiled.index("--model") + 1] == "B16" and compiled[compiled.index("--device") + 1] == "cuda"
    assert compiled[compiled.index("--mode") + 1] == "reduce-overhead"  # CUDA graphs of the whole routed forward
    assert all(extra.get("TRITON_INTERPRET", "absent") is None for _, extra, _ in plan.values())
    dry = gpu_run.stage_plan(str(tmp_path), dry_run=True, python="python")
    assert set(dry) == set(plan)  # the same stages, only shapes and the interpreter switch differ
    assert dry["tests"][1]["TRITON_INTERPRET"] == "1"


def test_no_figure_without_a_measurement():
    targets = gpu_run.evaluate_targets([], [])
    assert targets and all(t["value"] is None and t["met"] is None for t in targets)
    report = {"dry_run": False, "env": {"device": "GPU", "git_commit": "c", "date": "d", "torch": "t",
                                        "triton": "t"},
              "wall_s": 1.0, "stages": {"e2e": {"status": "timeout", "wall_s": 120.0, "timeout_s": 120.0}},
              "targets": targets, "lowrank_cases": [], "static": []}
    md = gpu_run.markdown(report)
    assert md.count("not measured") == len(targets)
    assert gpu_run.plot(report, os.devnull) is False


def test_targets_from_rows():
    def row(provider, ms, **kw):
        base = dict(op="lowrank_linear", model="B16", layer="fc1", n_tasks=8, batch=64, topk=1, mix="mixed",
                    dtype="bf16", status="ok", provider=provider, median_ms=ms)
        base.update(kw)
        return base

    micro = [row("floor", 1.0), row("ours", 1.1), row("eager_loop", 4.4),
             row("floor", 1.0, layer="fc2"), row("ours", 1.3, layer="fc2"), row("eager_loop", 3.0, layer="fc2"),
             row("ours", 0.5, op="routing_residuals", topk=None, mix=None)]
    e2e = [dict(provider="plain", median_ms=100.0, batch=64, n_tasks=8, model="B16", dtype="bf16"),
           dict(provider="ours", router_mode="top1", median_ms=180.0, ratio_to_plain=1.8, batch=64, n_tasks=8,
                model="B16", dtype="bf16")]
    t = {x["id"]: x for x in gpu_run.evaluate_targets(micro, e2e)}
    # each value is one quotient of the given float64 timings (one rounding, u = 2⁻⁵³), each expected literal
    # one rounding too: within γ_2(u) of each other
    approx = functools.partial(pytest.approx, rel=gamma(2, U64), abs=0)
    assert t["lowrank_vs_linear"]["value"] == approx(1.3) and t["lowrank_vs_linear"]["met"] is False
    assert t["lowrank_vs_linear"]["cases_met"] == 1 and t["lowrank_vs_linear"]["cases"] == 2
    assert t["lowrank_vs_loop"]["value"] == approx(3.0 / 1.3) and t["lowrank_vs_loop"]["met"] is False
    assert t["lowrank_vs_loop"]["cases_met"] == 1
    assert t["routing_share"]["value"] == approx(0.005) and t["routing_share"]["met"] is True
    assert t["routed_ours_top1"]["value"] == approx(1.8) and t["routed_ours_top1"]["met"] is True
    assert t["routed_ours_topk"]["value"] is None and t["routed_ours_graph_top1"]["value"] is None


def test_stale_files_are_not_read(tmp_path):
    (tmp_path / "old.json").write_text('{"results": [1]}')
    assert gpu_run.load_fresh_json(str(tmp_path), time.time() + 60) is None
    assert gpu_run.load_fresh_json(str(tmp_path), 0)["results"] == [1]
    assert gpu_run.load_fresh_json(str(tmp_path / "missing"), 0) is None


def test_a_hanging_stage_is_killed_at_its_timeout(tmp_path):
    started = time.perf_counter()
    proc = gpu_run.start_stage([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"], {},
                               str(tmp_path / "log.txt"))
    result = gpu_run.finish_stage(proc, 2.0, started)
    assert result["status"] == "timeout" and result["wall_s"] < 30
    assert proc.poll() is not None


def test_parse_pytest_summary():
    assert gpu_run.parse_pytest("....\n3 passed, 1 failed, 2 deselected in 4.10s\n") == \
        {"passed": 3, "failed": 1, "deselected": 2}
    assert gpu_run.parse_pytest("==== 2 passed, 1 error in 1s ====") == {"passed": 2, "error": 1}
    assert gpu_run.parse_pytest("killed") == {}


def test_static_summary_reduces_sm90_16bit_rows():
    rows = [dict(ok=True, arch=90, dtype="bf16", kernel="linear", T=8, k=96, K=1, regs=r, stack=s, shared=1024,
                 wgmma=w) for r, s, w in ((128, 0, True), (168, 24, False))]
    rows += [dict(ok=True, arch=80, dtype="bf16", kernel="linear", T=8, k=96, K=1, regs=255, stack=160, shared=0,
                  wgmma=False), dict(ok=False, arch=90, dtype="bf16", kernel="linear", T=8, k=96, K=1)]
    (s,) = gpu_run.static_summary({"results": rows})
    assert (s["variants"], s["regs_max"], s["stack_max"], s["wgmma_all"]) == (2, 168, 24, False)
    assert gpu_run.static_summary(None) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_refuses_to_run_for_real_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        gpu_run.run(str(tmp_path), dry_run=False)
