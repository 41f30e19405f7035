"""Task-specific linear ``y = x Wᵀ + b + Σ_j w_j (((x V_tjᵀ) ⊙ S_tj) U_tjᵀ + task_bias_tj)``.

Kernel module behind the public op ``mass_kernels.lowrank_linear`` (named ``lowrank``, not
``lowrank_linear``: importing a submodule binds its name on the package and would shadow the op).

Multi-LoRA (SGMV) pattern with large ranks (k = in/T), in two launches and ONE store of y:

1. ``_lowrank_shrink_kernel``: h[e] = (x_row V_tᵀ) ⊙ S_t ⊙ w for every (row, slot) entry e with a
   valid task, into a small fp32 (N, K, k) buffer. Entries are sorted by task on the device so a
   tile of entries shares V_t and can use ``tl.dot``.
2. ``_lowrank_linear_kernel``: base GEMM ``x Wᵀ`` for a tile of rows; then, into the SAME fp32
   accumulator, the expand ``h · U_tᵀ`` for every slot, then bias and task_bias, then one store.
   A separate expand kernel re-reading and re-writing y would cost up to ~70% extra at large batch.

Grouping on the device (no ``.item()``/``.tolist()``, CUDA-graph capturable): argsort of task keys
and ``searchsorted`` group offsets. The grids are sized by upper bounds (``cdiv(rows, BLOCK_M) +
T`` tiles: each group adds at most one partial tile); each program finds its (group, tile) from the
offsets with a small vectorised scan over the ≤ T+1 groups and exits if it has none.

K > 1 slots: rows are sorted lexicographically by their (sanitised) task tuple and GEMM tiles never
cross a slot-0 group, so slot 0 needs exactly one ``h · U_t0ᵀ`` per tile (no loop over tasks). For
slot j ≥ 1 a tile whose rows share one task there (the common case: slot 1 is the secondary sort
key) takes the same single-task path; only a tile with several tasks in slot j loops over them
(data-dependent ``while``; rows of other tasks are masked to zero in h) with an unpipelined rank
loop: a pipelined rank loop inside that ``while`` is what spilled registers (bench/static_gpu_check.py).
Worst case min(BLOCK_M, T) expand dots per tile for slot j ≥ 1 (still one store of y, exact results). Grouping by the full tuple instead would
make every slot a single dot but fragments tiles into up to (T+1)^K mostly empty groups, which
wastes the (much larger) base GEMM; that trade-off loses at K = 2, T = 8…20.

Task ids outside [-1, T) are treated as "no task" on the device (the CPU check raises for them), so
no out-of-bounds read of U/V/S/task_bias can happen on a GPU.

The expand dot casts h (fp32) to the operand dtype for fp16/bf16 inputs (tensor-core MMA with
fp32 accumulation, as punica/S-LoRA do); fp32 inputs follow ``torch.get_float32_matmul_precision``.

Two candidates serve a call (chosen per shape by measurement, :mod:`mass_kernels.candidates`): the fused
kernel above, and the vendor-GEMM one (``lowrank_linear_vendor``: the same kernel with ``HAS_BASE`` off
writes biases + expand, then cuBLAS ``addmm`` adds x Wᵀ). The launchers take contiguous operands
(:func:`plan_launch` copies others) and banks of any rank; a rank that is a multiple of 16
(:func:`mass_kernels.pad_rank`) is what the kernels are checked spill-free for.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import check_lowrank_args
from ._triton_utils import dot_precision, interpreting, n_bucket, needs_bf16_upcast, next_pow2


@triton.jit
def _group_tile_lookup(pid, offs_ptr, n_groups, BLOCK_M: tl.constexpr, G_POW2: tl.constexpr):
    """Map a flat tile id to (found, group, first sorted position, group end) from group offsets."""
    gi = tl.arange(0, G_POW2)
    gmask = gi < n_groups
    start = tl.load(offs_ptr + gi, mask=gmask, other=0)
    end = tl.load(offs_ptr + gi + 1, mask=gmask, other=0)
    ntiles = (end - start + BLOCK_M - 1) // BLOCK_M
    incl = tl.cumsum(ntiles, axis=0)
    excl = incl - ntiles
    hit = (excl <= pid) & (pid < incl)  # at most one group (empty groups have excl == incl)
    found = tl.sum(hit.to(tl.int32), axis=0)
    g = tl.sum(tl.where(hit, gi, 0), axis=0)
    tile = pid - tl.sum(tl.where(hit, excl, 0), axis=0)
    pos0 = tl.sum(tl.where(hit, start, 0), axis=0) + tile * BLOCK_M
    pos_end = tl.sum(tl.where(hit, end, 0), axis=0)
    return found, g, pos0, pos_end


@triton.jit
def _lowrank_shrink_kernel(
    x_ptr, v_ptr, s_ptr, rw_ptr, h_ptr, eperm_ptr, eoffs_ptr,
    d_in, rank, n_tasks, n_bucket,
    stride_xn, stride_vt, stride_vr, stride_st,
    K_SLOTS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, G_POW2: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """h[e, r] = (x[e // K] · V[t_e, r]) * S[t_e, r] * w[e] for one task's tile of entries."""
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    found, t, pos0, pos_end = _group_tile_lookup(pid, eoffs_ptr, n_tasks, BLOCK_M, G_POW2)
    if found == 0:
        return
    pos = pos0 + tl.arange(0, BLOCK_M)
    m_mask = pos < pos_end
    ent = tl.load(eperm_ptr + pos, mask=m_mask, other=0).to(tl.int64)
    rows = ent // K_SLOTS
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = ranks < rank
    t64 = t.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < d_in
        xt = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        vt = tl.load(v_ptr + t64 * stride_vt + ranks[:, None] * stride_vr + ks[None, :],
                     mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:  # interpreter-only bf16 workaround (see _triton_utils.needs_bf16_upcast)
            xt = xt.to(tl.float32)
            vt = vt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(vt), acc, input_precision=PRECISION)

    s = tl.load(s_ptr + t64 * stride_st + ranks, mask=r_mask, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_WEIGHTS:
        w = tl.load(rw_ptr + ent, mask=m_mask, other=0.0)
        acc = acc * w[:, None]
    tl.store(h_ptr + ent[:, None] * rank + ranks[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_task(acc, h_ptr, u_ptr, rows, j, sel, task, cols, n_mask, rank, stride_ut, stride_un,
                 K_SLOTS: tl.constexpr, BLOCK_R: tl.constexpr, RANK_STAGES: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += h[rows, slot j] · U_taskᵀ over the rank, for the rows in ``sel`` (others read h as 0)."""
    t64 = task.to(tl.int64)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=RANK_STAGES):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < rank
        ht = tl.load(h_ptr + (rows[:, None] * K_SLOTS + j) * rank + rr[None, :],
                     mask=sel[:, None] & r_mask[None, :], other=0.0)
        ut = tl.load(u_ptr + t64 * stride_ut + cols[:, None] * stride_un + rr[None, :],
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            ut = ut.to(tl.float32)
        else:
            ht = ht.to(ut.dtype)
        acc = tl.dot(ht, tl.trans(ut), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _add_task_bias(acc, tb_ptr, rw_ptr, rows, j, sel, task, cols, n_mask, stride_tbt,
                   K_SLOTS: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    """acc += w_j · task_bias[task] for the rows in ``sel``."""
    tb = tl.load(tb_ptr + task.to(tl.int64) * stride_tbt + cols, mask=n_mask, other=0.0)
    if HAS_WEIGHTS:
        wj = tl.load(rw_ptr + rows * K_SLOTS + j, mask=sel, other=0.0)
    else:
        wj = sel.to(tl.float32)
    return acc + wj[:, None] * tb.to(tl.float32)[None, :]


@triton.jit
def _lowrank_linear_kernel(
    x_ptr, w_ptr, b_ptr, u_ptr, tb_ptr, h_ptr, rw_ptr, tasks_ptr, perm_ptr, offs_ptr, y_ptr,
    d_in, d_out, rank, n_tasks, n_bucket,
    stride_xn, stride_wn, stride_ut, stride_un, stride_tbt, stride_yn,
    K_SLOTS: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TASK_BIAS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    G_POW2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (row tile, out tile) of y: base GEMM (unless HAS_BASE is off: the vendor-GEMM candidate adds it
    afterwards) + fused expand + biases, single store. Operands are contiguous (unit inner strides)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Groups are slot-0 task ids 0..T-1 plus T = "no task in slot 0".
    found, g, pos0, pos_end = _group_tile_lookup(pid_m, offs_ptr, n_tasks + 1, BLOCK_M, G_POW2)
    if found == 0:
        return
    pos = pos0 + tl.arange(0, BLOCK_M)
    m_mask = pos < pos_end
    rows = tl.load(perm_ptr + pos, mask=m_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < d_out

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < d_in
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :],
                         mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)

    # Slot 0: a tile never crosses a slot-0 group, so all its rows share task g (g == T: none).
    if g < n_tasks:
        acc = _expand_task(acc, h_ptr, u_ptr, rows, 0, m_mask, g, cols, n_mask, rank, stride_ut, stride_un,
                           K_SLOTS, BLOCK_R, 2, UPCAST, PRECISION)
        if HAS_TASK_BIAS:
            acc = _add_task_bias(acc, tb_ptr, rw_ptr, rows, 0, m_mask, g, cols, n_mask, stride_tbt, K_SLOTS,
                                 HAS_WEIGHTS)
    # Slots j ≥ 1: slot j is a secondary sort key, so a tile usually holds one task there (fast path); a
    # tile that holds several loops over them with an unpipelined rank loop (few registers, no spills).
    for j in tl.static_range(1, K_SLOTS):
        tj = tl.load(tasks_ptr + rows * K_SLOTS + j, mask=m_mask, other=n_tasks)
        lo = tl.min(tj, axis=0)
        hi = tl.max(tl.where(tj < n_tasks, tj, -1), axis=0)
        if lo == hi:
            sel = m_mask & (tj == lo)
            acc = _expand_task(acc, h_ptr, u_ptr, rows, j, sel, lo, cols, n_mask, rank, stride_ut, stride_un,
                               K_SLOTS, BLOCK_R, 2, UPCAST, PRECISION)
            if HAS_TASK_BIAS:
                acc = _add_task_bias(acc, tb_ptr, rw_ptr, rows, j, sel, lo, cols, n_mask, stride_tbt, K_SLOTS,
                                     HAS_WEIGHTS)
        else:
            cur = lo
            while cur < n_tasks:
                sel = m_mask & (tj == cur)
                acc = _expand_task(acc, h_ptr, u_ptr, rows, j, sel, cur, cols, n_mask, rank, stride_ut,
                                   stride_un, K_SLOTS, BLOCK_R, 1, UPCAST, PRECISION)
                if HAS_TASK_BIAS:
                    acc = _add_task_bias(acc, tb_ptr, rw_ptr, rows, j, sel, cur, cols, n_mask, stride_tbt,
                                         K_SLOTS, HAS_WEIGHTS)
                cur = tl.min(tl.where(tj > cur, tj, n_tasks), axis=0)

    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yn + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Autotune: a small config set per kernel and operand class (16-bit, fp32 with TF32, fp32 IEEE), pruned
# before benchmarking by problem size (BLOCK_M ≤ row bucket, BLOCK_N/BLOCK_K/BLOCK_R ≤ the padded dims) so
# the first call benchmarks only a handful; keyed on (row bucket, out, in, rank, precision) + tensor dtypes.
# Every config of a set compiles without register spills on sm_90 and sm_80 for every variant of the static
# GPU check (bench/static_gpu_check.py: slots, biases, weights, T = 8/20): ptxas picks a register target per
# kernel and may spill a few bytes to meet it, so a tile that spilled somewhere is left out of that set.
# Under the interpreter the prune returns one small config, so the autotuner skips benchmarking. Call
# mass_kernels.warmup() before serving / CUDA-graph capture: benchmarking cannot run inside a capture.

def _cfg(bm, bn, bk, br, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br},
                         num_warps=warps, num_stages=stages)


def _shrink_cfg(bm, br, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_R": br, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


_LINEAR_16 = [
    _cfg(16, 64, 64, 32, 4, 3),    # decode-like batches
    _cfg(32, 64, 64, 32, 4, 3),
    _cfg(64, 64, 32, 32, 4, 4),    # BLOCK_K 64 with 3 stages spilled 8 B on sm_80 at K = 2
    _cfg(64, 128, 32, 32, 4, 4),
    _cfg(128, 128, 32, 32, 8, 3),   # large batches
    _cfg(128, 64, 64, 32, 8, 3),   # 4 warps spilled 4 B on sm_80 at k = 48, K = 1
]
# fp32 operands: a TF32 dot keeps twice the bytes per operand tile; an IEEE dot runs on FMA units with its
# operand tiles in registers (small K steps). The 16-bit tiles left out here spilled 8-24 B (TF32) and up to
# 6 KB (IEEE) somewhere; the expand-only kernel (no K loop) spills on other tiles than the fused one.
_LINEAR_TF32 = [_cfg(16, 64, 64, 32, 8, 3), _cfg(64, 64, 64, 32, 4, 3), _LINEAR_16[4], _LINEAR_16[5]]
_EXPAND_TF32 = [_LINEAR_16[0], _LINEAR_16[5]]
_LINEAR_IEEE = [_cfg(16, 64, 32, 16, 4, 2), _cfg(32, 64, 32, 16, 8, 2)]
_EXPAND_IEEE = _LINEAR_IEEE
_SHRINK_16 = [
    _shrink_cfg(16, 64, 64, 4, 3),
    _shrink_cfg(32, 64, 64, 4, 3),
    _shrink_cfg(64, 64, 64, 4, 3),
    _shrink_cfg(64, 128, 32, 4, 4),
    _shrink_cfg(128, 64, 32, 8, 3),
]
_SHRINK_TF32 = [_SHRINK_16[i] for i in (0, 1, 2, 4)]
_SHRINK_IEEE = [_shrink_cfg(16, 64, 32, 4, 2), _SHRINK_16[4]]

CONFIG_SETS = {  # (kernel, operand class) -> autotune candidates
    ("linear", "16-bit"): _LINEAR_16, ("linear", "tf32"): _LINEAR_TF32, ("linear", "ieee"): _LINEAR_IEEE,
    ("expand", "16-bit"): _LINEAR_16, ("expand", "tf32"): _EXPAND_TF32, ("expand", "ieee"): _EXPAND_IEEE,
    ("shrink", "16-bit"): _SHRINK_16, ("shrink", "tf32"): _SHRINK_TF32, ("shrink", "ieee"): _SHRINK_IEEE,
}


def _union(*sets):
    out = []
    for c in (c for s in sets for c in s):
        if not any(c is d for d in out):
            out.append(c)
    return out


# What the autotuners hold (the linear and expand-only tuners share one list); a prune keeps one set of it.
_LINEAR_CONFIGS = _union(*(v for (kernel, _), v in CONFIG_SETS.items() if kernel != "shrink"))
_SHRINK_CONFIGS = _union(*(v for (kernel, _), v in CONFIG_SETS.items() if kernel == "shrink"))
_LINEAR_INTERPRET = _cfg(16, 32, 32, 16, 1, 1)  # small tiles: exercises multi-tile/rank loops
_SHRINK_INTERPRET = _shrink_cfg(16, 16, 32, 1, 1)


def operand_class(dtype: torch.dtype, precision: str) -> str:
    """"16-bit" for fp16/bf16 operands, else the fp32 dot precision ("tf32" or "ieee")."""
    return "16-bit" if dtype in (torch.float16, torch.bfloat16) else precision


def _candidates(kernel, named_args, kwargs):
    return CONFIG_SETS[(kernel, operand_class(named_args["x_ptr"].dtype, kwargs.get("PRECISION", "ieee")))]


def _prune_linear(configs, named_args, **kwargs):
    if interpreting():
        return [_LINEAR_INTERPRET]
    configs = _candidates("linear" if kwargs.get("HAS_BASE", True) else "expand", named_args, kwargs)
    nb, d_out, d_in = named_args["n_bucket"], named_args["d_out"], named_args["d_in"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(16, nb)
            and c.kwargs["BLOCK_N"] <= max(64, next_pow2(d_out))
            and c.kwargs["BLOCK_K"] <= max(32, next_pow2(d_in))]
    return keep or configs[:1]


def _prune_shrink(configs, named_args, **kwargs):
    if interpreting():
        return [_SHRINK_INTERPRET]
    configs = _candidates("shrink", named_args, kwargs)
    nb, rank = named_args["n_bucket"], named_args["rank"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(16, nb) and c.kwargs["BLOCK_R"] <= max(64, next_pow2(rank))]
    return keep or configs[:1]


_lowrank_shrink_tuned = triton.autotune(
    configs=_SHRINK_CONFIGS, key=["n_bucket", "d_in", "rank", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_shrink},
)(_lowrank_shrink_kernel)

# y is fully overwritten by each run, so benchmarking re-runs are harmless (no reset hooks needed).
_lowrank_linear_tuned = triton.autotune(
    configs=_LINEAR_CONFIGS, key=["n_bucket", "d_out", "d_in", "rank", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_linear},
)(_lowrank_linear_kernel)


def kernel_roundoff(dtype: torch.dtype, impl: str = "fused") -> dict:
    """The rounding model of these kernels for ``mass_kernels.reference.lowrank_error_bound``: fp32
    accumulation taken as 2⁻²³ (tensor cores may truncate), TF32 operands when fp32 matmul precision is
    not "highest", and for 16-bit inputs h rounded to the operand dtype before the expand MMA and y
    rounded to x's dtype, each taken as 2u (one ulp): the Triton interpreter converts fp32 to bf16 by
    truncation, not round-to-nearest. ``impl="vendor"`` also rounds the partial y (biases + expand, ≤ M)
    once before the GEMM adds to it."""
    low = dtype in (torch.float16, torch.bfloat16)
    u16 = torch.finfo(dtype).eps if low else 0.0
    tf32 = dtype == torch.float32 and dot_precision(dtype) == "tf32"
    return {"unit_roundoff": 2.0 ** -23, "input_roundoff": 2.0 ** -11 if tf32 else 0.0,
            "h_roundoff": u16, "out_roundoff": u16, "partial_roundoff": u16 if impl == "vendor" else 0.0}


# The expand-only kernel (vendor candidate): no K loop, so BLOCK_K is irrelevant; its own tuner/cache.
_lowrank_expand_tuned = triton.autotune(
    configs=_LINEAR_CONFIGS, key=["n_bucket", "d_out", "d_in", "rank", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_linear},
)(_lowrank_linear_kernel)


@dataclass
class LaunchPlan:
    """Everything the two kernels read, in the layout they are specialised for (contiguous, x's dtype), plus
    the device-side grouping. Built the same way for a launch and for the static GPU check (meta tensors)."""
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    task_bias: torch.Tensor | None
    tasks: torch.Tensor  # (N, K) int32, T = no task
    rw: torch.Tensor | None  # (N, K) fp32 row weights
    perm: torch.Tensor
    row_offs: torch.Tensor
    eperm: torch.Tensor
    ent_offs: torch.Tensor
    h: torch.Tensor  # (N*K, rank) fp32 shrink output
    y: torch.Tensor

    @property
    def k_slots(self) -> int:
        return self.tasks.shape[1]


def plan_launch(x, weight, bias, U, S, V, row_tasks, row_weights=None, task_bias=None) -> LaunchPlan:
    """Validated, contiguous operands and the grouping (argsort + searchsorted on the device, no sync).

    Every operand is made contiguous here: the kernels take unit inner strides (a launch with a strided
    operand would compile a variant that, on sm_90, hit 255 registers and spilled up to 1.1 KB)."""
    check_lowrank_args(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)
    N, d_out = x.shape[0], weight.shape[0]
    T, rank = S.shape
    dev, dt = x.device, x.dtype
    same = lambda t: None if t is None else t.to(dt).contiguous()  # noqa: E731 - one dtype per tl.dot
    x, weight, U, V, S = same(x), same(weight), same(U), same(V), S.contiguous()
    bias, task_bias = (None if t is None else t.contiguous() for t in (bias, task_bias))
    tasks = row_tasks if row_tasks.dim() == 2 else row_tasks.unsqueeze(1)  # (N, K); N may be 0
    if tasks.shape[1] == 0:  # (N, 0) row_tasks: no slots at all → one empty slot per row
        tasks, row_weights = torch.full((N, 1), T, device=dev, dtype=torch.int32), None
    k_slots = tasks.shape[1]
    valid = (tasks >= 0) & (tasks < T)
    tasks = torch.where(valid, tasks, T).to(torch.int32).contiguous()  # T = "no task"
    rw = None if row_weights is None else row_weights.reshape(N, k_slots).to(torch.float32).contiguous()

    if k_slots == 1:
        key = tasks[:, 0]
    else:  # lexicographic by the task tuple: slot 0 primary, then slot 1, ...
        key = torch.zeros(N, device=dev, dtype=torch.int64)
        for j in range(k_slots):
            key = key * (T + 1) + tasks[:, j].to(torch.int64)
    perm = torch.argsort(key, stable=True)
    probes = torch.arange(T + 2, device=dev, dtype=torch.int32)
    row_offs = torch.searchsorted(tasks[:, 0].index_select(0, perm).contiguous(), probes).to(torch.int32)
    flat = tasks.reshape(-1)
    eperm = torch.argsort(flat, stable=True)
    ent_offs = torch.searchsorted(flat.index_select(0, eperm).contiguous(), probes[: T + 1]).to(torch.int32)
    h = torch.empty((N * k_slots, max(rank, 1)), device=dev, dtype=torch.float32)
    y = torch.empty((N, d_out), device=dev, dtype=dt)
    return LaunchPlan(x, weight, bias, U, S, V, task_bias, tasks, rw, perm, row_offs, eperm, ent_offs, h, y)


def shrink_launch(p: LaunchPlan) -> tuple[tuple, dict, Callable]:
    """(positional args, constexpr kwargs, grid) of the shrink kernel for a plan."""
    N, d_in = p.x.shape
    T, rank = p.S.shape
    n_entries = N * p.k_slots
    args = (p.x, p.V, p.S, p.h if p.rw is None else p.rw, p.h, p.eperm, p.ent_offs,
            d_in, rank, T, n_bucket(n_entries), p.x.stride(0), p.V.stride(0), p.V.stride(1), p.S.stride(0))
    meta = dict(K_SLOTS=p.k_slots, HAS_WEIGHTS=p.rw is not None, G_POW2=max(16, next_pow2(T)),
                UPCAST=needs_bf16_upcast(p.x.dtype), PRECISION=dot_precision(p.x.dtype))
    return args, meta, lambda m: (triton.cdiv(n_entries, m["BLOCK_M"]) + T, triton.cdiv(rank, m["BLOCK_R"]))


def linear_launch(p: LaunchPlan, has_base: bool = True) -> tuple[tuple, dict, Callable]:
    """(positional args, constexpr kwargs, grid) of the base-GEMM + expand kernel for a plan; ``has_base``
    off gives the expand-only kernel of the vendor-GEMM candidate (y = biases + expand, then addmm)."""
    N, d_in = p.x.shape
    d_out = p.weight.shape[0]
    T, rank = p.S.shape
    dummy = p.h  # placeholder pointer for absent optional tensors (never read: constexpr-gated)
    tb = p.task_bias
    args = (p.x, p.weight, dummy if p.bias is None else p.bias, p.U, dummy if tb is None else tb, p.h,
            dummy if p.rw is None else p.rw, p.tasks, p.perm, p.row_offs, p.y,
            d_in, d_out, rank, T, n_bucket(N),
            p.x.stride(0), p.weight.stride(0), p.U.stride(0), p.U.stride(1), 0 if tb is None else tb.stride(0),
            p.y.stride(0))
    meta = dict(K_SLOTS=p.k_slots, HAS_BASE=has_base, HAS_BIAS=p.bias is not None, HAS_TASK_BIAS=tb is not None,
                HAS_WEIGHTS=p.rw is not None, G_POW2=max(16, next_pow2(T + 1)),
                UPCAST=needs_bf16_upcast(p.x.dtype), PRECISION=dot_precision(p.x.dtype))
    return args, meta, lambda m: (triton.cdiv(N, m["BLOCK_M"]) + T, triton.cdiv(d_out, m["BLOCK_N"]))


def _run_shrink(p: LaunchPlan) -> None:
    if p.S.shape[0] > 0 and p.S.shape[1] > 0:
        args, meta, grid = shrink_launch(p)
        _lowrank_shrink_tuned[grid](*args, **meta)


def lowrank_linear_triton(x, weight, bias, U, S, V, row_tasks, row_weights=None, task_bias=None) -> torch.Tensor:
    """Triton path of :func:`mass_kernels.lowrank_linear` (fused candidate): same contract, no host sync."""
    p = plan_launch(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)
    if p.y.numel() == 0:
        return p.y
    _run_shrink(p)
    args, meta, grid = linear_launch(p)
    _lowrank_linear_tuned[grid](*args, **meta)
    return p.y


def lowrank_linear_vendor(x, weight, bias, U, S, V, row_tasks, row_weights=None, task_bias=None) -> torch.Tensor:
    """Vendor-GEMM candidate: the shrink, then the expand kernel writes ``y = b + Σ expand + task bias``
    (no base GEMM), then ``y += x Wᵀ`` by ``addmm`` (cuBLAS on CUDA, beta = 1). y is stored twice (once
    by each), the price of the vendor GEMM; for 16-bit dtypes y is rounded once more."""
    p = plan_launch(x, weight, bias, U, S, V, row_tasks, row_weights, task_bias)
    if p.y.numel() == 0:
        return p.y
    _run_shrink(p)
    args, meta, grid = linear_launch(p, has_base=False)
    _lowrank_expand_tuned[grid](*args, **meta)
    return p.y.addmm_(p.x, p.weight.t())


__all__ = ["lowrank_linear_triton", "lowrank_linear_vendor", "n_bucket", "kernel_roundoff", "plan_launch",
           "shrink_launch", "linear_launch"]
