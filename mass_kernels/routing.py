"""Routing residuals ``‖x − Vtᵀ Vt x‖₂`` as one GEMM with a segmented-reduction epilogue.

Computes ``X · Vcatᵀ`` (Vcat = basis viewed as (T*k, D)) tile by tile and never writes the
(N, T*k) coordinates: each program owns a tile of rows and ONE task segment of k basis rows, so the
per-task sum of squares is a plain row reduction of its fp32 accumulator. ‖x‖² is accumulated in the
same loop over D from the x tile already in registers.

Grid choice: (row tiles, tasks, stacked blocks G). One task per program (segment padded to the next
power of two ≥ 16 with masked loads) rather than several tasks packed into one column tile because
(a) any k works without a segmented reduction across a shared tile (which would need an indicator
matmul or masks per task), (b) the task axis gives parallelism even at serving batch sizes (N small,
few row tiles), and (c) the result is deterministic with no atomics: each output element is written
by exactly one program. The cost is the x tile being re-read once per task (from L2 in practice) and
up to 2x padding waste for k just above a power of two (k = 33 → 64); k = in/T in MASS is typically
38…128. ‖x‖² is recomputed per task program — elementwise work on data already loaded.

Accuracy: the epilogue takes ``sqrt(max(‖x‖² − ‖Vt x‖², 0))`` (fused, no second pass over D). Its
absolute error is of order √u·‖x‖ when x lies near task t's subspace (cancellation), plus the basis'
loss of orthonormality ω (rounding a basis to bf16 gives ω ≈ 1e-2): the bound is
``mass_kernels.reference.routing_error_bound(x, basis, "fused", **kernel_roundoff(dtype))``. Routing
compares residuals across tasks, and a decision flips only where two residuals are closer than that
bound. The CPU path forms the residual vector instead (error of order u·√k·‖x‖).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_routing_args
from ._triton_utils import dot_precision, needs_bf16_upcast, next_pow2


@triton.jit(do_not_specialize=["N"])  # batch size varies at serving time: one compile
def _routing_residuals_kernel(
    x_ptr, b_ptr, out_ptr,
    N, D, K,
    stride_xg, stride_xn, stride_bg, stride_bt, stride_bk, stride_og, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    t = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, K_PAD)
    row_mask = rows < N
    rank_mask = ranks < K
    x_base = x_ptr + g * stride_xg + rows.to(tl.int64)[:, None] * stride_xn
    b_base = b_ptr + g * stride_bg + t.to(tl.int64) * stride_bt + ranks.to(tl.int64)[:, None] * stride_bk

    coords = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        xt = tl.load(x_base + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        bt = tl.load(b_base + cols[None, :], mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        xf = xt.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
        if UPCAST:  # interpreter-only bf16 workaround, see _triton_utils.needs_bf16_upcast
            xt = xf
            bt = bt.to(tl.float32)
        coords = tl.dot(xt, tl.trans(bt), coords, input_precision=PRECISION)

    explained = tl.sum(coords * coords, axis=1)  # padded ranks are exact zeros
    res = tl.sqrt(tl.maximum(sq - explained, 0.0))
    tl.store(out_ptr + g * stride_og + rows.to(tl.int64) * stride_on + t, res, mask=row_mask)


def kernel_roundoff(dtype: torch.dtype) -> dict:
    """The rounding model of this kernel for ``routing_error_bound``: fp32 accumulation, taken as 2⁻²³
    (tensor cores may truncate rather than round); 16-bit products are exact in fp32; fp32 operands go
    through TF32 (2⁻¹¹) when ``torch.get_float32_matmul_precision()`` is not "highest"."""
    tf32 = dtype == torch.float32 and dot_precision(dtype) == "tf32"
    return {"unit_roundoff": 2.0 ** -23, "input_roundoff": 2.0 ** -11 if tf32 else 0.0}


def _block_sizes(n: int, d: int, k_pad: int, fma: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps, num_stages): fixed heuristic, no autotune (one cheap GEMM).

    Keeps the fp32 accumulator (BLOCK_M x K_PAD) at ≤ 8K elements so large k does not spill. ``fma``: fp32
    operands at IEEE precision, where ``tl.dot`` runs on FMA units with both operand tiles in registers, so
    the D step is 16 (at 32-64 it spilled up to 648 B on sm_80). Every choice here is checked spill-free on
    sm_90 and sm_80 for k = 16…384 by bench/static_gpu_check.py (the routing sweep of its tables).
    """
    block_m = 16 if n <= 16 else (32 if n <= 32 or k_pad >= 256 else 64)
    block_m = min(block_m, max(16, 8192 // k_pad))
    if fma:
        block_d, num_warps = 16, 4 if block_m * k_pad < 2048 else 8
    else:
        # (BLOCK_M 16, BLOCK_D 64, K_PAD 128) kept an 8-byte stack frame on sm_90
        block_d = 64 if k_pad < 128 or (k_pad == 128 and block_m > 16) else 32
        num_warps = 4 if block_m * k_pad <= 4096 else 8
        if (block_m, k_pad) == (32, 64):  # 4 warps: ptxas held it to 64 registers and spilled 8 B on sm_90
            num_warps = 8
    block_d = min(block_d, max(16, next_pow2(d)))
    # one 16-row tile: little to pipeline; 3 stages kept an 8-byte stack frame for fp32 on sm_90
    return block_m, block_d, num_warps, 2 if block_m == 16 else 3


def routing_launch(x: torch.Tensor, basis: torch.Tensor, out: torch.Tensor) -> tuple[tuple, dict, tuple]:
    """(positional args, constexpr + launch kwargs, grid) for stacked, contiguous x (G, N, D), basis
    (G, T, k, D), out (G, N, T); shared by the launcher and the static GPU check."""
    G, N, D = x.shape
    T, K = basis.shape[1], basis.shape[2]
    k_pad = max(16, next_pow2(K))
    precision = dot_precision(x.dtype)
    block_m, block_d, num_warps, num_stages = _block_sizes(N, D, k_pad, x.dtype == torch.float32
                                                           and precision == "ieee")
    args = (x, basis, out, N, D, K, x.stride(0), x.stride(1), basis.stride(0), basis.stride(1), basis.stride(2),
            out.stride(0), out.stride(1))
    meta = dict(BLOCK_M=block_m, BLOCK_D=block_d, K_PAD=k_pad, UPCAST=needs_bf16_upcast(x.dtype),
                PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    return args, meta, (triton.cdiv(N, block_m), T, G)


def routing_residuals_triton(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Triton path of :func:`mass_kernels.routing_residuals`: (N, T) or (G, N, T) fp32 residuals."""
    check_routing_args(x, basis)
    stacked = x.dim() == 3
    if not stacked:
        x, basis = x.unsqueeze(0), basis.unsqueeze(0)
    if x.dtype != basis.dtype:  # mixed precision in → compute both in fp32 (the oracle does)
        x, basis = x.float(), basis.float()
    x, basis = x.contiguous(), basis.contiguous()  # the kernel takes unit inner strides
    G, N, D = x.shape
    T, K = basis.shape[1], basis.shape[2]
    out = torch.empty((G, N, T), device=x.device, dtype=torch.float32)
    if N == 0 or T == 0 or G == 0:
        return out if stacked else out[0]
    if K == 0 or D == 0:  # empty basis: nothing explained
        out.copy_(x.float().square().sum(-1, keepdim=True).sqrt().expand(G, N, T))
        return out if stacked else out[0]
    args, meta, grid = routing_launch(x, basis, out)
    _routing_residuals_kernel[grid](*args, **meta)
    return out if stacked else out[0]


__all__ = ["routing_residuals_triton", "routing_launch", "kernel_roundoff"]
