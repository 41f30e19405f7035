"""Smoke test of the benchmark code paths on tiny shapes: structure of the results, not timings."""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mass.tools.bench import e2e as bench
from mass.method.synthetic import random_decomposition, tiny_hf_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_random_decomposition_shapes():
    model = tiny_hf_clip(layers=2)
    dec = random_decomposition(model, 4)
    f = dec.lowrank["encoder.layers.0.mlp.fc1.weight"]
    assert f.U.shape == (4, 64, 8) and f.S.shape == (4, 8) and f.V.shape == (4, 8, 32)
    eye = f.V[0] @ f.V[0].T
    assert torch.allclose(eye, torch.eye(8), atol=1e-5)
    assert bool((f.S > 0).all())
    assert 1.0 < dec.storage_factor() < 4.0


def test_e2e_bench_tiny(tmp_path):
    report = bench.run_bench(["--models", "tiny", "--tasks", "2", "--batches", "3", "--mix", "mixed", "router",
                              "--repeats", "2", "--warmup", "0", "--threads", "1", "--malloc", "default",
                              "--out", str(tmp_path)])
    rows = report["results"]
    assert {r["provider"] for r in rows} == set(bench.PROVIDERS)
    # ours once per router mode (both by default), in the same rounds as plain; the others name their mode
    assert sorted(r["router_mode"] for r in rows if r["provider"] == "ours") == ["top1", "top1", "topk", "topk"]
    assert all(r["router_mode"] is None for r in rows if r["provider"] in ("plain", "ensemble"))
    assert all(r["router_mode"] == "top1" for r in rows if r["provider"] in ("authors", "ours_graph"))
    for r in rows:
        if r["provider"] == "ours_graph" and not torch.cuda.is_available():
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        assert {"median_ms", "p20_ms", "p80_ms", "ratio_to_plain", "stored_vs_pretrained", "memory"} <= set(r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    plain = [r for r in rows if r["provider"] == "plain"]
    assert all(abs(r["ratio_to_plain"] - 1.0) < 1e-9 and r["stored_vs_pretrained"] == 1.0 for r in plain)
    assert all(abs(r["paired_ratio_to_plain"]["median"] - 1.0) < 1e-9 for r in plain)
    floor = {(r["batch"], r["mix"]): r["samples_ms"] for r in plain}
    for r in rows:
        if r["status"] == "ok":  # one sample per round; the paired ratio comes from those same rounds
            assert len(r["samples_ms"]) == r["n"] >= 2
            ratios = sorted(a / b for a, b in zip(r["samples_ms"], floor[r["batch"], r["mix"]]))
            assert ratios[0] <= r["paired_ratio_to_plain"]["median"] <= ratios[-1]
    assert all(r["stored_vs_pretrained"] == 2.0 for r in rows if r["provider"] == "ensemble")
    assert all("max_rel_err_vs_authors" in r for r in rows if r["provider"] == "ours" and r["router_mode"] == "top1")
    topk_mixed = [r for r in rows if r["provider"] == "ours" and r["router_mode"] == "topk" and r["mix"] == "mixed"]
    assert len(topk_mixed) == 1 and "two-task set" in topk_mixed[0]["reason"]
    assert report["env"]["malloc"] == "default"
    assert all(r["memory"]["peak_above_start_bytes"] > 0 for r in rows if r["status"] == "ok")
    for env_key in ("device", "torch", "triton", "git_commit", "date"):
        assert env_key in report["env"]
    names = os.listdir(tmp_path)
    assert any(n.endswith(".json") for n in names) and any(n.endswith(".png") for n in names)
    assert any(n.endswith("-summary.md") for n in names)


def test_e2e_bench_user_mix(tmp_path):
    """`--mix user`: plain and one ours row per router mode, each timed in its own block under inference mode,
    routed by the model itself, beside the mixed rows; well-formed in the JSON and the summary."""
    report = bench.run_bench(["--models", "tiny", "--tasks", "2", "--batches", "3", "--mix", "mixed", "user",
                              "--repeats", "2", "--warmup", "1", "--threads", "1", "--malloc", "default",
                              "--out", str(tmp_path)])
    rows = report["results"]
    assert {r["mix"] for r in rows} == {"mixed", "user"}
    user = [r for r in rows if r["mix"] == "user"]
    assert sorted((r["provider"], r["router_mode"] or "") for r in user) == [("ours", "top1"), ("ours", "topk"),
                                                                             ("plain", "")]
    plain = next(r for r in user if r["provider"] == "plain")
    assert plain["ratio_to_plain"] == 1.0 and plain["n"] == 4 and len(plain["samples_ms"]) == 4  # before + after
    floor = (plain["plain_before_ms"] + plain["plain_after_ms"]) / 2
    for r in user:
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["paired_ratio_to_plain"] is None
        assert r["memory"]["peak_above_start_bytes"] >= 0 and r["stored_vs_pretrained"] >= 1.0
        if r["provider"] == "ours":
            assert r["n"] == 2 and r["ratio_to_plain"] == pytest.approx(r["median_ms"] / floor, rel=1e-12)
            assert sum(r["task_sets"].values()) == 3 and r["task_groups"] == len(r["task_sets"])
            assert r["reason"].startswith("routed by the model: ") and r["routing_layer"] is not None
    text = next((tmp_path / n).read_text() for n in os.listdir(tmp_path) if n.endswith("-summary.md"))
    assert "Mix `user`" in text and text.count("| user |") == 3


def test_user_loop_timing_order_and_grad_mode():
    """The user's procedure: plain block, each routed block, plain block; every call under inference mode."""
    from mass.tools.bench.user_timing import task_sets, time_user_loop

    log = []

    def recorder(name):
        return lambda: log.append((name, torch.is_inference_mode_enabled()))

    out = time_user_loop(recorder("plain"), {"a": recorder("a"), "b": recorder("b")}, calls=2, warmup=1)
    assert [n for n, _ in log] == ["plain"] * 3 + ["a"] * 3 + ["b"] * 3 + ["plain"] * 3
    assert all(mode for _, mode in log)
    assert set(out) == {"plain", "a", "b"} and out["plain"]["n"] == 4 and out["a"]["n"] == 2
    with pytest.raises(ValueError, match="calls"):
        time_user_loop(recorder("plain"), {}, calls=0)
    assert task_sets(torch.tensor([[1, -1], [0, 1], [1, -1]])) == {"0+1": 1, "1": 2}


def _load_bench_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_user_loop_script_and_ab_rows_tiny(tmp_path, monkeypatch):
    """bench/user_loop.py, bench/loop_vs_bench.py and bench/warm_cache_ab.py run end to end on a tiny model
    (structure, not timings)."""
    user_loop = _load_bench_script("user_loop")
    out = user_loop.main(["--model", "tiny", "--tasks", "2", "--batch", "3", "--calls", "1"])
    assert out["top1_ratio"] > 0 and out["topk_ratio"] > 0
    assert all(sum(sets.values()) == 3 for sets in out["tasks_routed_to"].values())
    ab = _load_bench_script("loop_vs_bench")
    report = ab.main(["--model", "tiny", "--tasks", "2", "--batch", "3", "--rounds", "2", "--calls", "1",
                      "--repeat", "1", "--malloc", "default", "--out", str(tmp_path / "ab.json")])
    for mode in ("top1", "topk"):
        for row in ("bench", "forced-as-routed", "routed", "routed+inference", "merge+routed+inference"):
            r = report["runs"][0]["rows"][f"{mode}:{row}"]
            assert len(r["samples_ms"]) == 2 and r["paired_ratio_to_plain"]["median"] > 0
    assert set(report["runs"][0]["user_procedure"][0]["ratio"]) == {"top1", "topk"}
    assert (tmp_path / "ab.json").exists()
    warm = _load_bench_script("warm_cache_ab").main(["--model", "tiny", "--tasks", "2", "--batch", "3", "--rounds",
                                                     "2", "--repeat", "1", "--malloc", "default"])
    run = warm["runs"][0]
    assert all(len(s) == 2 for s in run["samples_ms"].values()) and set(run["paired_ratios"]) == set(
        _load_bench_script("warm_cache_ab").RATIOS)


def _load_microbench():
    spec = importlib.util.spec_from_file_location("microbench", os.path.join(ROOT, "bench", "microbench.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["microbench"] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_microbench_one_tiny_shape(tmp_path, monkeypatch):
    mb = _load_microbench()
    monkeypatch.setitem(mb.MODELS, "tiny", (32, 64, 5))
    args = mb.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--models", "tiny", "--layers", "fc1", "--batches", "2", "--tasks", "4", "--topk", "1", "2",
         "--mix", "mixed", "--repeats", "2", "--warmup", "0", "--no-compile", "--device", "cpu",
         "--malloc", "default", "--out", str(tmp_path)])
    args.models = ["tiny"]
    result = mb.run_microbench(args)
    rows = result["results"]
    low = [r for r in rows if r["op"] == "lowrank_linear"]
    assert {r["provider"] for r in low} == set(mb.LOWRANK_PROVIDERS)
    for r in rows:
        if r["provider"] == "compiled":
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["ratio_to_floor"] > 0
        if r["provider"] != "floor":
            assert r["max_rel_err"] < 1e-3
    assert {r["op"] for r in rows} == {"lowrank_linear", "routing_residuals"}
    files = os.listdir(tmp_path)
    assert {os.path.splitext(n)[1] for n in files} == {".json", ".md", ".png"}
    png = next(n for n in files if n.endswith(".png"))
    with open(tmp_path / png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_microbench_catches_a_wrong_provider(monkeypatch):
    mb = _load_microbench()
    ref = torch.ones(4, 4)
    to_time, info = mb._prepare({"floor": lambda: ref, "bad": lambda: ref * 2, "good": lambda: ref.clone()},
                                ref, "fp32", torch.device("cpu"), None)
    assert set(to_time) == {"floor", "good"}
    assert info["bad"]["status"] == "failed"


def test_cpu_peak_memory_counts_tensor_allocations():
    """Peak of tensors alive together during the call (frees included), whatever the allocator keeps mapped."""
    from mass.tools.common import peak_memory

    def work():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB alive
        del a
        c = torch.ones(500, 1000)  # 6 MB alive
        return b.sum() + c.sum()

    got = peak_memory(work, torch.device("cpu"))["peak_above_start_bytes"]
    assert 8_000_000 <= got < 8_100_000


def test_retain_freed_memory_in_a_fresh_process():
    """The bench's allocator setting takes effect where glibc is the C library (it is process-wide, so it is
    tried in a child process, not in the test session)."""
    import platform

    code = "from mass.tools.common import retain_freed_memory; print(retain_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    said = out.stdout.strip().splitlines()[-1]
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert said.startswith("retain"), said
    else:
        assert said.startswith("default"), said


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_is_dirty_for_code_changes_not_for_written_results(tmp_path):
    from mass.tools.common import git_commit

    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("a = 1\n")
    (repo / "bench" / "results" / "run.json").write_text("{}\n")

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    clean = git_commit(str(repo))
    assert clean is not None and len(clean) == 40
    (repo / "bench" / "results" / "run.json").write_text('{"new": 1}\n')
    assert git_commit(str(repo)) == clean
    (repo / "code.py").write_text("a = 2\n")
    assert git_commit(str(repo)) == clean + "-dirty"


def test_peak_memory_keeps_the_profilers_native_log_off_stderr():
    """In a child process, so the descriptors of the test session are not touched: nothing the profiler logs
    reaches stderr, and stderr works again afterwards."""
    code = ("import sys, torch\n"
            "from mass.tools.common import peak_memory\n"
            "got = peak_memory(lambda: torch.ones(1000, 1000).sum(), torch.device('cpu'))\n"
            "print('after', file=sys.stderr)\n"
            "print(got['peak_above_start_bytes'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stderr.strip() == "after", out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) >= 4_000_000


@pytest.mark.parametrize("estimate", [False, True])
def test_merge_time_rows(tmp_path, estimate):
    """`mass bench --merge-only`: one row per solver, phases that add up, accuracy against the full solver."""
    argv = ["--models", "tiny", "--tasks", "2", "--merge-only", "--merge-solvers", "full", "randomized",
            "--malloc", "default", "--out", str(tmp_path)] + (["--merge-estimate"] if estimate else [])
    report = bench.run_bench(argv)
    rows = report["merge"]
    assert report["results"] == [] and [r["solver"] for r in rows] == ["full", "randomized"]
    for r in rows:
        assert r["merge_s"] > 0 and r["decompose_s"] > 0
        assert r["merge_s"] == pytest.approx(r["decompose_s"] + r["first_pass_weights_s"], rel=1e-9)
    if not estimate:
        full, rand = rows
        assert full["solvers_used"] == ["full"] and rand["solvers_used"] == ["randomized"]
        assert full["accuracy"]["recon_ratio_max"] < 1 + 1e-3  # the exact truncation, up to fp32 rounding
        assert full["accuracy"]["tsv_delta_rel_change_vs_full_max"] is None
        assert rand["accuracy"]["recon_ratio_median"] >= 1 - 1e-3
        assert rand["accuracy"]["tsv_delta_rel_change_vs_full_max"] is not None
    md = next(n for n in os.listdir(tmp_path) if n.endswith("-summary.md"))
    text = (tmp_path / md).read_text()
    assert "## Merge time" in text and "| latency ms |" not in text
