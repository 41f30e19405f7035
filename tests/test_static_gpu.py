"""Static GPU check in CI: the Triton kernels compile ahead of time for sm_90 and sm_80 (no GPU needed) and
no variant a launch can pick spills registers (bench/static_gpu_check.py --ci: bf16 on sm_90 and fp16 on sm_80
at T = 8 k = 96 and T = 20 k = 48 with the smallest and largest tiles, the 16-bit variants that spilled before
a fix, and every fp32 autotune candidate once)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import static_gpu_check  # noqa: E402

FP32 = ("fp32-tf32", "fp32-ieee")


def test_static_gpu_check_ci_subset(tmp_path):
    if not static_gpu_check.ptxas_available():
        pytest.skip("ptxas/cuobjdump are missing from the triton wheel: cannot compile for CUDA")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest turns the interpreter on
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "static_gpu_check.py"), "--ci", "--jobs", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    result = json.loads((tmp_path / "static-gpu-check.json").read_text())
    rows = result["results"]
    assert {r["kernel"] for r in rows} == {"linear", "expand", "shrink", "routing"}
    assert {(r["arch"], r["dtype"]) for r in rows} >= {(90, "bf16"), (80, "fp16"), (80, "fp32-tf32"), (90, "fp32-ieee")}
    assert all(r["ok"] for r in rows), [r.get("error") for r in rows if not r["ok"]]
    # every row is a variant a launch can pick (padded ranks, each dtype's own candidates): none may spill
    assert [static_gpu_check._label(r) for r in rows if r["stack"] or r["local"]] == []
    assert proc.returncode == 0 and not result["failures"], proc.stdout[-2000:] + proc.stderr[-2000:]
    # ... including the ones that spilled before a fix: the 32-row routing tile at K_PAD 64 on sm_90 (8 B) and the
    # fused linear's 64x64 tile on sm_80 with two slots (8 B; now BLOCK_K 32, 4 stages)
    assert any(r["kernel"] == "routing" and r["arch"] == 90 and r["dtype"] == "bf16"
               and r["config_kwargs"] == {"BLOCK_M": 32, "BLOCK_D": 64, "K_PAD": 64} for r in rows)
    assert any(r["kernel"] == "linear" and r["arch"] == 80 and r["dtype"] == "fp16" and r["K"] == 2
               and (r["config_kwargs"]["BLOCK_M"], r["config_kwargs"]["BLOCK_N"]) == (64, 64) for r in rows)
    # every fp32 autotune candidate that remains was compiled (and, above, found spill-free)
    for kernel in ("linear", "expand", "shrink"):
        for dtype in FP32:
            got = {r["config"] for r in rows if (r["kernel"], r["dtype"]) == (kernel, dtype)}
            assert got == set(static_gpu_check.candidates(kernel, dtype)), (kernel, dtype)
    # large tiles on sm_90 use Hopper's warp-group MMA; sm_80 has none
    assert any(r["wgmma"] for r in rows if r["arch"] == 90 and r.get("config_kwargs", {}).get("BLOCK_M") == 128)
    assert not any(r["wgmma"] for r in rows if r["arch"] == 80)
    assert (tmp_path / "static-gpu-check.md").read_text().count("\n|") == len(rows) + 2


@pytest.mark.parametrize("dtype,precision,cls", [(torch.bfloat16, "ieee", "16-bit"), (torch.float16, "ieee", "16-bit"),
                                                 (torch.float32, "tf32", "tf32"), (torch.float32, "ieee", "ieee")])
def test_autotuners_pick_only_the_checked_set(monkeypatch, dtype, precision, cls):
    """The prunes hand the autotuners one set of mass_kernels.lowrank.CONFIG_SETS per kernel and operand class,
    the very sets the static check compiles: a tile that spills for a dtype can never be benchmarked for it."""
    from mass_kernels import lowrank

    monkeypatch.setattr(lowrank, "interpreting", lambda: False)  # conftest runs the interpreter
    x = torch.empty(0, dtype=dtype)
    for n_bucket in (16, 8192):
        args = dict(x_ptr=x, n_bucket=n_bucket, d_out=3072, d_in=768, rank=96)
        for kernel, has_base in (("linear", True), ("expand", False)):
            got = lowrank._prune_linear(lowrank._LINEAR_CONFIGS, args, PRECISION=precision, HAS_BASE=has_base)
            allowed = lowrank.CONFIG_SETS[(kernel, cls)]
            assert got and all(any(c is a for a in allowed) for c in got), (kernel, n_bucket)
        got = lowrank._prune_shrink(lowrank._SHRINK_CONFIGS, args, PRECISION=precision)
        assert got and all(any(c is a for a in lowrank.CONFIG_SETS[("shrink", cls)]) for c in got)
    # and the autotuners hold every config of every set
    for (kernel, _), configs in lowrank.CONFIG_SETS.items():
        held = lowrank._SHRINK_CONFIGS if kernel == "shrink" else lowrank._LINEAR_CONFIGS
        assert all(any(c is h for h in held) for c in configs)


def test_pad_rank_adds_exact_zeros():
    import mass_kernels
    from mass_kernels.reference import lowrank_error_bound, lowrank_linear_exact

    gen = torch.Generator().manual_seed(0)
    U, S, V = torch.randn(3, 10, 38, generator=gen), torch.rand(3, 38, generator=gen), torch.randn(3, 38, 12, generator=gen)
    Up, Sp, Vp = mass_kernels.pad_rank(U, S, V)
    assert Up.shape == (3, 10, 48) and Sp.shape == (3, 48) and Vp.shape == (3, 48, 12)
    assert torch.equal(Up[..., :38], U) and torch.equal(Sp[:, :38], S) and torch.equal(Vp[:, :38], V)
    assert not Up[..., 38:].any() and not Sp[:, 38:].any() and not Vp[:, 38:].any()
    x, W, tasks = torch.randn(5, 12, generator=gen), torch.randn(10, 12, generator=gen), torch.tensor([0, 2, -1, 1, 0])
    # both within lowrank_error_bound (fp32, CPU path) of the same exact value (the padding adds exact zeros)
    bound = lowrank_error_bound(x, W, None, U, S, V, tasks)
    exact = lowrank_linear_exact(x, W, None, U, S, V, tasks)
    for factors in ((U, S, V), (Up, Sp, Vp)):
        assert bool(((mass_kernels.lowrank_linear(x, W, None, *factors, tasks).double() - exact).abs() <= bound).all())
    assert mass_kernels.pad_rank(Up, Sp, Vp)[0] is Up
    with pytest.raises(ValueError, match="pad_rank"):
        mass_kernels.pad_rank(U, S[:, :5], V)
