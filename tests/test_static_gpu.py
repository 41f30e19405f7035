"""Static GPU check in CI: the Triton kernels compile ahead of time for sm_90 and sm_80 (no GPU needed) and
no variant a launch can pick spills registers (bench/static_gpu_check.py --ci: bf16 on sm_90, fp16 on sm_80,
T = 8 k = 96 and T = 20 k = 48, the smallest and largest tiles)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import static_gpu_check  # noqa: E402


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
    assert {(r["arch"], r["dtype"]) for r in rows} == {(90, "bf16"), (80, "fp16")}
    assert all(r["ok"] for r in rows), [r.get("error") for r in rows if not r["ok"]]
    assert [r for r in rows if r["stack"] or r["local"]] == []  # no spills
    assert proc.returncode == 0 and not result["failures"], proc.stdout[-2000:] + proc.stderr[-2000:]
    # large tiles on sm_90 use Hopper's warp-group MMA; sm_80 has none
    assert any(r["wgmma"] for r in rows if r["arch"] == 90 and r.get("config_kwargs", {}).get("BLOCK_M") == 128)
    assert not any(r["wgmma"] for r in rows if r["arch"] == 80)
    assert (tmp_path / "static-gpu-check.md").read_text().count("\n|") == len(rows) + 2


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
