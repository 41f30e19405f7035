"""pytest-benchmark view of the microbenchmarks (not collected by CI, which runs tests/ only):

    PYTHONPATH=. pytest bench/test_microbench.py --benchmark-only
    MASS_BENCH_THREADS=1 PYTHONPATH=. pytest bench/test_microbench.py --benchmark-only   # shared/busy CPU

One ViT-B/32 shape per case (fc1, batch 8, T = 8), every provider; outputs are checked against the reference
before timing. CPU only timing through pytest-benchmark's own timer (for CUDA use bench/microbench.py, which
uses triton.testing.do_bench).
"""
import importlib.util
import os
import sys

import pytest
import torch

_spec = importlib.util.spec_from_file_location("microbench", os.path.join(os.path.dirname(__file__), "microbench.py"))
mb = importlib.util.module_from_spec(_spec)
sys.modules["microbench"] = mb  # dataclasses look their module up in sys.modules
_spec.loader.exec_module(mb)

# On a shared CPU, torch's default OpenMP thread count can make many-small-op providers erratic (a descheduled
# thread stalls every parallel region): MASS_BENCH_THREADS=1 pins torch to one thread.
if os.environ.get("MASS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MASS_BENCH_THREADS"]))

CASES = {
    "B32-fc1-b8-T8-top1-mixed": mb.LowrankCase("B32", "fc1", 8, 8, 1, "mixed", "fp32"),
    "B32-fc1-b8-T8-top1-homogeneous": mb.LowrankCase("B32", "fc1", 8, 8, 1, "homogeneous", "fp32"),
    "B32-fc1-b8-T8-top2-mixed": mb.LowrankCase("B32", "fc1", 8, 8, 2, "mixed", "fp32"),
}


def _providers(case):
    i = mb.make_lowrank_inputs(case, torch.device("cpu"))
    rt1 = i["rows"] if case.topk > 1 else i["rows"][:, 0]
    args = (i["x"], i["W"], i["b"], i["U"], i["S"], i["V"])
    ref = mb.lowrank_linear_torch(*args, rt1, None, i["tb"])
    return ref, {
        "floor": lambda: torch.nn.functional.linear(i["x"], i["W"], i["b"]),
        "eager_loop": lambda: mb.eager_loop_lowrank(*args, i["rows"], i["tb"]),
        "gather_bmm": lambda: mb.gather_bmm_lowrank(*args, i["img"], i["tb"], i["tok"]),
        "ours": lambda: mb.mass_kernels.lowrank_linear(*args, rt1, None, i["tb"]),
    }


@pytest.mark.parametrize("provider", ["floor", "eager_loop", "gather_bmm", "ours"])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_lowrank_linear(benchmark, case, provider):
    ref, fns = _providers(CASES[case])
    fn = fns[provider]
    if provider != "floor":
        torch.testing.assert_close(fn(), ref, atol=2e-3, rtol=2e-3)
    benchmark.group = case
    benchmark(fn)
