"""Warm-up helper (exported as ``mass_kernels.warmup``): run the Triton ops once per serving shape so
autotuning and compilation happen before serving, and time the ``lowrank_linear`` candidates (fused kernel,
vendor GEMM) per shape so the faster serves it (:mod:`mass_kernels.candidates`).

First calls are expensive (JIT compile per constexpr variant, plus autotune benchmarking of the
low-rank linear per (row bucket, out, in, rank, dtypes)). Autotune benchmarking also cannot run
inside a CUDA-graph capture, so call :func:`warmup` before capturing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from . import candidates


def warmup(
    linear_shapes: Iterable[Sequence[int]] = (),
    routing_shapes: Iterable[Sequence[int]] = (),
    batch_sizes: Iterable[int] = (1,),
    dtypes: Iterable[torch.dtype] = (torch.float16,),
    slots: Iterable[int] = (1,),
    device: str | torch.device = "cuda",
    bias: bool = True,
    task_bias: bool = False,
    row_weights: bool = False,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> int:
    """Call the Triton ops on dummy data for every combination given; returns the number of calls.

    linear_shapes: (out, in, T, k) per distinct task-specific linear layer.
    routing_shapes: (D, T, k) or stacked (G, D, T, k) per routing call.
    batch_sizes: row counts to tune for (the linear op is tuned per power-of-two bucket of rows).
    slots: K values (tasks per row) used with the linear op. ``bias``/``task_bias``/``row_weights``
    must match how the model calls the op, since they select different compiled variants.
    Tensors are synthetic (random factors, every task present); results are discarded.
    timer: ``fn → milliseconds`` used to compare the ``lowrank_linear`` candidates (default: the median of
    ``triton.testing.do_bench``); the fastest per shape is recorded (``mass_kernels.lowrank_choices()``).
    With ``MASS_LOWRANK_IMPL`` set, only that candidate is warmed and nothing is timed.
    """
    from ._triton_utils import n_bucket
    from .routing import routing_residuals_triton

    if timer is None:
        import triton.testing

        timer = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
    forced = candidates.forced_candidate()

    device = torch.device(device)
    batch_sizes = list(batch_sizes)
    dtypes, slots = list(dtypes), list(slots)
    calls = 0
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    for d_out, d_in, T, k in linear_shapes:
        for dtype in dtypes:
            W, U, S, V = rnd(d_out, d_in, dtype=dtype), rnd(T, d_out, k, dtype=dtype), rnd(T, k, dtype=dtype), rnd(T, k, d_in, dtype=dtype)
            b = rnd(d_out, dtype=dtype) if bias else None
            tb = rnd(T, d_out, dtype=dtype) if task_bias else None
            seen = set()
            for n in batch_sizes:
                for K in slots:
                    if (n_bucket(n), n_bucket(n * K), K) in seen:
                        continue  # same autotune bucket and compiled variant: already warm
                    seen.add((n_bucket(n), n_bucket(n * K), K))
                    x = rnd(n, d_in, dtype=dtype)
                    tasks = (torch.arange(n * K, device=device) % max(T, 1)).reshape(n, K)
                    w = torch.full((n, K), 0.5, device=device) if row_weights else None
                    args = (x, W, b, U, S, V, tasks if K > 1 else tasks[:, 0], w if K > 1 or w is None else w[:, 0], tb)
                    names = (forced,) if forced else candidates.LOWRANK_CANDIDATES
                    times = {}
                    for name in names:
                        fn = lambda name=name: candidates.candidate(name)(*args)  # noqa: E731
                        fn()  # compile + autotune before timing
                        calls += 1
                        if not forced:
                            times[name] = float(timer(fn))
                    if times:
                        candidates.record(candidates.shape_key(*args[:3], S, args[6], args[7], tb), times)
    for shape in routing_shapes:
        *lead, D, T, k = shape
        for dtype in dtypes:
            basis = rnd(*lead, T, k, D, dtype=dtype)
            for n in batch_sizes:
                routing_residuals_triton(rnd(*lead, n, D, dtype=dtype), basis)
                calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls
