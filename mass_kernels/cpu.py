"""The CPU (PyTorch) production paths of the two hot-path ops: the accurate routing residuals, the masked
``lowrank_linear`` (any K; also the PyTorch fallback on CUDA) and the grouped fast path over row segments that
``mass.layers`` calls directly, and ``dense_delta_linear`` (whole per-row weight deltas, grouped inside the op).
The test oracles and error bounds live apart, in :mod:`mass_kernels.reference`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def unit_row_tolerance(dtype: torch.dtype) -> float:
    """Rows of a routing basis whose squared norm is within this of 1 count as unit rows: a unit vector
    rounded entrywise to ``dtype`` has |‖b‖² − 1| ≤ 2u + u² (u = eps/2), and an fp32 SVD's rows are unit to
    about 1e-6; 2⁻¹² also covers that, and a weight that close to 1 changes a residual² by ≤ 2⁻¹²·(v·x)²."""
    return max(2.0 * torch.finfo(dtype).eps, 2.0 ** -12)


def row_weights_of(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions, weights) of a routing basis whose rows are ``√w_i · v_i`` (v_i orthonormal, 0 ≤ w_i ≤ 1;
    ``norm="sv"`` scales them so, the plain router has w = 1): w_i = ‖b_i‖² in fp64, snapped to 1 within
    :func:`unit_row_tolerance` (such rows are used as stored), other rows divided by their norm (zero rows
    stay zero). Directions in the basis' dtype promoted to at least fp32, weights fp64."""
    dirs = basis.to(torch.promote_types(basis.dtype, torch.float32))
    w = dirs.square().sum(-1, dtype=torch.float64)  # squares rounded once (relative u), summed in fp64
    unit = (w - 1.0).abs() <= unit_row_tolerance(basis.dtype)
    if bool(unit.all()):  # the plain router: nothing to rescale (one host sync; this is the CPU path)
        return dirs, torch.ones_like(w)
    w = torch.where(unit, torch.ones_like(w), w)
    scale = torch.where(unit | (w == 0), torch.ones_like(w), w.rsqrt()).to(dirs.dtype)
    return dirs * scale.unsqueeze(-1), w


def routing_residuals_torch(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Routing residuals ``r_t(x) = sqrt(‖x‖² − ‖B_t x‖²)`` for every row of ``x`` and task t, in fp32 (CPU path).

    x: (N, D) or stacked (G, N, D); basis: (T, k, D) or stacked (G, T, k, D) with rows ``√w_i · v_i``
    (v_i orthonormal, w_i ≤ 1: the plain router's V with w = 1, or ``norm="sv"``'s scaled rows; see
    :func:`row_weights_of`). Returns (N, T) or (G, N, T) fp32. One GEMM gives c = V x and
    ``r² = ‖x‖² − Σ c² + Σ (1 − w) c²``; where that subtraction cancels (r² < ‖x‖²/4: x near task t's
    subspace, typically one task per row) r² is recomputed without cancellation as
    ``‖x − Vᵀc‖² + Σ (1 − w) c²`` (one small GEMM per task over those rows). Absolute error O(u·√k·‖x‖)
    instead of O(√u·‖x‖): see :func:`mass_kernels.reference.routing_error_bound` ("direct").
    """
    dirs, w = row_weights_of(basis)
    dirs, rest = dirs.float(), (1.0 - w).float()
    xf = x.float()
    *lead, T, k, D = dirs.shape
    N = xf.shape[-2]
    coords = (xf @ dirs.reshape(*lead, T * k, D).transpose(-1, -2)).reshape(*lead, N, T, k)
    sq = coords.square()
    total = xf.square().sum(-1, keepdim=True)  # (..., N, 1)
    r2 = (total - sq.sum(-1)).add_((sq * rest.unsqueeze(-3)).sum(-1))  # (..., N, T)
    need = r2 < 0.25 * total
    if bool(need.any()):
        xg, cg, dg, rg = xf.reshape(-1, N, D), coords.reshape(-1, N, T, k), dirs.reshape(-1, T, k, D), rest.reshape(-1, T, k)
        r2g, needg = r2.view(-1, N, T), need.reshape(-1, N, T)
        for g, t in needg.any(1).nonzero().tolist():
            rows = needg[g, :, t].nonzero().squeeze(1)
            c = cg[g, rows, t]  # (m, k)
            resid = xg[g].index_select(0, rows) - c @ dg[g, t]
            r2g[g, rows, t] = resid.square().sum(-1) + (c.square() * rg[g, t]).sum(-1)
    return r2.clamp_min_(0.0).sqrt_()


def lowrank_linear_torch(x, weight, bias, U, S, V, row_tasks, row_weights=None, task_bias=None) -> torch.Tensor:
    """``x Wᵀ + b + Σ_j w_j (((x V_tjᵀ) ⊙ S_tj) U_tjᵀ + task_bias_tj)`` with inputs already validated.

    Rows are grouped by task on the device (one mask per task and slot); there is no loop over rows
    and no ``.item()``. Accumulates in fp32 and returns ``x.dtype``.
    """
    xf = x.float()
    y = F.linear(xf, weight.float(), None if bias is None else bias.float())
    if row_tasks.dim() == 1:
        row_tasks = row_tasks[:, None]
        row_weights = None if row_weights is None else row_weights[:, None]
    n_tasks = U.shape[0]
    Uf, Sf, Vf = U.float(), S.float(), V.float()
    for slot in range(row_tasks.shape[1]):
        slot_tasks = row_tasks[:, slot]
        for t in range(n_tasks):
            rows = (slot_tasks == t).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = (xf.index_select(0, rows) @ Vf[t].T) * Sf[t]
            delta = h @ Uf[t].T
            if task_bias is not None:
                delta = delta + task_bias[t].float()
            if row_weights is not None:
                delta = delta * row_weights.index_select(0, rows)[:, slot, None].float()
            y.index_add_(0, rows, delta)
    return y.to(x.dtype)


def lowrank_linear_grouped_torch(x, weight, bias, U, S, V, row_tasks, row_weights=None,
                                 task_bias=None) -> torch.Tensor:
    """CPU path of ``lowrank_linear`` for one task per row: rows are sorted by task (one host sync, free on
    the CPU), each task's rows run as one segment of :func:`lowrank_linear_segments_torch`, and the output
    rows are put back in order. Computes in fp32 for other dtypes and for mixed ones (fp32 activations with an
    fp16 bank, say), like the reference and the Triton path (which casts the weights to x's dtype)."""
    tasks = row_tasks.reshape(-1)
    dtype = x.dtype
    operands = (x, weight, bias, U, S, V, task_bias)
    if any(t is not None and t.dtype != torch.float32 for t in operands):
        x, weight, U, S, V = (t.float() for t in (x, weight, U, S, V))
        bias = None if bias is None else bias.float()
        task_bias = None if task_bias is None else task_bias.float()
    weights = None if row_weights is None else row_weights.reshape(-1, 1)
    y = rows_by_entry(x, tasks, weights, lambda xs, segments, ws: lowrank_linear_segments_torch(
        xs, weight, bias, U, S, V, segments, ws, task_bias))
    return y.to(dtype)


def rows_by_entry(x: torch.Tensor, entries: torch.Tensor, row_weights, run) -> torch.Tensor:
    """``run(x_sorted, segments, row_weights_sorted)`` over the rows of x sorted by their one entry (N,), stably
    (one host sync, :func:`group_rows`), its output rows put back in x's order. Rows already in entry order
    (e.g. a task-homogeneous batch, or a batch sorted beforehand) are not copied."""
    order, segments = group_rows(entries.reshape(-1, 1))
    if order is None:
        return run(x, segments, row_weights)
    row_weights = None if row_weights is None else row_weights.index_select(0, order)
    y_sorted = run(x.index_select(0, order), segments, row_weights)
    return torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)


def group_rows(ids: torch.Tensor) -> tuple:
    """Order rows by their slot-0 id (stable) and list each slot's runs as ``(slot, id, start, stop)`` over
    the ordered rows (id -1 = none: no segment). One host sync. ``order`` is None when the rows are already in
    that order (nothing to permute); ``(None, None)`` when an id of a later slot is split over several runs,
    so its rows are not one slice."""
    first = ids[:, 0]
    if bool((first[1:] >= first[:-1]).all()):
        order, ordered = None, ids
    else:
        order = torch.argsort(first, stable=True)
        ordered = ids.index_select(0, order)
    segments = []
    for slot in range(ids.shape[1]):
        values, counts = torch.unique_consecutive(ordered[:, slot], return_counts=True)
        values, counts = values.tolist(), counts.tolist()
        if len(set(values)) != len(values):
            return None, None
        start = 0
        for value, count in zip(values, counts):
            if value >= 0:
                segments.append((slot, value, start, start + count))
            start += count
    return order, segments


def segment_runs(segments) -> tuple:
    """:func:`_segment_runs`, memoised: every layer of a forward asks for the same few groupings."""
    return _segment_runs(tuple(segments))


def _continues(tasks: list, t: int) -> bool:
    """``t`` extends ``tasks`` as an increasing arithmetic progression (so the run's banks are one strided view)."""
    return t > tasks[-1] and (len(tasks) == 1 or t - tasks[-1] == tasks[1] - tasks[0])


def _as_slice(tasks: list) -> slice:
    step = tasks[1] - tasks[0] if len(tasks) > 1 else 1
    return slice(tasks[0], tasks[-1] + 1, step)


@functools.lru_cache(maxsize=256)
def _segment_runs(segments: tuple[tuple[int, int, int, int], ...]) -> tuple:
    """Merge consecutive ``(slot, task, start, stop)`` row segments of one slot that have the same length, follow
    each other and whose tasks increase by a constant step into runs ``(slot, sel, start, stop, tasks in the
    run, rows per task)``, each one batched matmul. ``sel`` is a slice of the banks (a view, never a copy: a
    cached two-task set's slots sit at entries e, e + 1, so the slot-0 entries of adjacent sets step by 2)."""
    runs: list[list] = []
    for slot, t, start, stop in segments:
        last = runs[-1] if runs else None
        if last is not None and last[0] == slot and last[3] == start and stop - start == last[4] \
                and _continues(last[1], t):
            last[1].append(t)
            last[3] = stop
        else:
            runs.append([slot, [t], start, stop, stop - start])
    return tuple((slot, _as_slice(tasks), start, stop, len(tasks), n) for slot, tasks, start, stop, n in runs)


def bias_runs(segments) -> tuple:
    """:func:`_bias_runs`, memoised."""
    return _bias_runs(tuple(segments))


@functools.lru_cache(maxsize=256)
def _bias_runs(segments: tuple[tuple[int, int, int, int], ...]) -> tuple:
    """The rows' bias pattern: the row ranges over which every slot's task is constant (one task per row for
    top-1, a set's slots for rows on a multi-task set), those with at least one task merged into runs
    ``(start, stop, groups in the run, rows per group, sels)`` like :func:`_segment_runs` (same length, adjacent,
    each slot's tasks an increasing progression); ``sels`` holds one bank slice per slot the rows use."""
    cuts = sorted({p for _, _, start, stop in segments for p in (start, stop)})
    by_slot = sorted(segments)
    runs: list[list] = []
    for a, b in zip(cuts, cuts[1:]):
        tasks = tuple((slot, t) for slot, t, start, stop in by_slot if start <= a and b <= stop)
        if not tasks:
            continue
        last = runs[-1] if runs else None
        if last is not None and last[1] == a and b - a == last[2] and tuple(s for s, _ in tasks) == last[3] \
                and all(_continues(seq, t) for seq, (_, t) in zip(last[4], tasks)):
            for seq, (_, t) in zip(last[4], tasks):
                seq.append(t)
            last[1] = b
        else:
            runs.append([a, b, b - a, tuple(s for s, _ in tasks), [[t] for _, t in tasks]])
    return tuple((a, b, len(seqs[0]), n, tuple(_as_slice(seq) for seq in seqs)) for a, b, n, _, seqs in runs)


def _run_bias(bias, task_bias, sels, m: int):
    """Bias of each of a run's ``m`` row groups, (m, out): the shared bias plus the group's task biases, one per
    slot in ``sels`` (None if there is neither)."""
    if task_bias is None:
        return None if bias is None else bias.expand(m, -1)
    total = task_bias[sels[0]]
    for sel in sels[1:]:
        total = total + task_bias[sel]
    return total if bias is None else total + bias


def _base_output(x, weight, bias, task_bias, segments, row_weights) -> tuple[torch.Tensor, bool]:
    """``x Wᵀ + b``, with every row's task biases (all its slots: a multi-task set's are summed per row group)
    already in it when no row weights apply: the biases are written first and the GEMM accumulates onto them,
    one pass over ``y`` per slot fewer. Returns ``(y, task biases included)``."""
    if task_bias is None or row_weights is not None:
        return F.linear(x, weight, bias), False
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)

    def fill_base(rows: torch.Tensor):
        if bias is None:
            rows.zero_()
        else:
            rows.copy_(bias.expand_as(rows))

    done = 0
    for start, stop, m, n, sels in bias_runs(segments):
        if start > done:
            fill_base(y[done:start])
        y[start:stop].view(m, n, -1).copy_(_run_bias(bias, task_bias, sels, m).unsqueeze(1).expand(m, n, -1))
        done = stop
    if done < y.shape[0]:
        fill_base(y[done:])
    return y.addmm_(x, weight.T), True


def _add_task_bias(ys: torch.Tensor, task_bias, sel, w) -> None:
    """Add a run's task biases (times the rows' weights ``w``, if any) to its output rows ``ys`` (m, n, out)."""
    if task_bias is not None:
        tb = task_bias[sel].unsqueeze(1)
        ys.add_(tb if w is None else w * tb)


def _segment_weights(row_weights, start, stop, slot, m, n, dtype):
    return None if row_weights is None else row_weights[start:stop, slot].reshape(m, n, 1).to(dtype)


def _as(entries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bank entries in x's dtype (a copy only when they differ: half-precision banks under an fp32 model)."""
    return entries if entries.dtype == x.dtype else entries.to(x.dtype)


def lowrank_linear_segments_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    row_weights: torch.Tensor | None = None,
    task_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU fast path of ``lowrank_linear`` when rows are already grouped: ``segments`` lists
    ``(slot, task, start, stop)`` row ranges. Equal-length segments that follow each other run as one
    ``bmm`` (shrink) and one in-place ``baddbmm_`` on the output (expand): no gather/scatter of rows, and a
    few large calls instead of many small ones. Fastest when the banks are stored so that ``V[t].T`` and
    ``U[t].T`` are contiguous (see ``mass.layers.bank_layout``). Same result as
    :func:`lowrank_linear_torch` for the same grouping. Factors in another dtype than x (half-precision banks)
    are upcast entry by entry, only the selected ones: the products run in x's precision."""
    y, biased = _base_output(x, weight, bias, task_bias, segments, row_weights)
    runs = segment_runs(segments)
    for slot, sel, start, stop, m, n in runs:
        h = torch.bmm(x[start:stop].reshape(m, n, -1), _as(V[sel], x).transpose(1, 2))  # (m, n, k)
        h.mul_(S[sel].unsqueeze(1))
        w = _segment_weights(row_weights, start, stop, slot, m, n, h.dtype)
        if w is not None:
            h.mul_(w)
        ys = y[start:stop].view(m, n, -1)
        ys.baddbmm_(h, _as(U[sel], x).transpose(1, 2))
        if not biased:
            _add_task_bias(ys, task_bias, sel, w)
    return y


def dense_delta_segments_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    row_weights: torch.Tensor | None = None,
    task_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + Σ_j w_j (x Δ_tjᵀ + task_bias_tj)`` over grouped rows, for whole (not low-rank) weight
    deltas ``(T, out, in)`` such as the patch embedding's; runs of equal segments are one ``baddbmm_``."""
    y, biased = _base_output(x, weight, bias, task_bias, segments, row_weights)
    runs = segment_runs(segments)
    for slot, sel, start, stop, m, n in runs:
        xs, ys = x[start:stop].reshape(m, n, -1), y[start:stop].view(m, n, -1)
        w = _segment_weights(row_weights, start, stop, slot, m, n, y.dtype)
        if w is None:
            ys.baddbmm_(xs, _as(deltas[sel], x).transpose(1, 2))
        else:
            ys.add_(torch.bmm(xs, _as(deltas[sel], x).transpose(1, 2)).mul_(w))
        if not biased:
            _add_task_bias(ys, task_bias, sel, w)
    return y


def whole_weight_segments_torch(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    segments: list[tuple[int, int, int, int]],
    task_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W_tᵀ + b + task_bias_t`` over grouped rows with one whole weight ``(T, out, in)`` per entry: a
    top-1 grouping (each row in exactly one slot-0 segment). One batched GEMM per run of equal segments, the
    biases written first: as many FLOPs as a plain linear, where base plus delta costs twice that."""
    runs = segment_runs(segments)
    if any(run[0] != 0 for run in runs) or sum(stop - start for _, _, start, stop, _, _ in runs) != x.shape[0] \
            or any(a[3] != b[2] for a, b in zip(runs, runs[1:])) or (runs and runs[0][2] != 0):
        raise ValueError("whole_weight_segments_torch needs every row in exactly one slot-0 segment, in order")
    y = torch.empty(x.shape[0], weights.shape[1], dtype=x.dtype, device=x.device)
    for _, sel, start, stop, m, n in runs:
        xs, ys = x[start:stop].reshape(m, n, -1), y[start:stop].view(m, n, -1)
        b = _run_bias(bias, task_bias, (sel,), m)
        if b is None:
            torch.bmm(xs, weights[sel].transpose(1, 2), out=ys)
        else:
            ys.copy_(b.unsqueeze(1).expand(m, n, -1)).baddbmm_(xs, weights[sel].transpose(1, 2))
    return y



def dense_delta_linear_torch(x, weight, bias, deltas, row_entries, row_weights, task_bias=None) -> torch.Tensor:
    """``x Wᵀ + b + w_r (x Δ_{e_r}ᵀ + task_bias_{e_r})`` per row r, one entry per row (-1 = none), for whole weight
    deltas ``(E, out, in)`` (the patch embedding's): rows grouped by entry (one host sync, free on the CPU; the
    op is opaque to ``torch.compile``), each group one GEMM of :func:`dense_delta_segments_torch`, the rows put
    back in order. Row weights of 1 are not applied."""
    weights = None if bool((row_weights == 1).all()) else row_weights.view(-1, 1)
    return rows_by_entry(x, row_entries, weights, lambda xs, segments, ws: dense_delta_segments_torch(
        xs, weight, bias, deltas, segments, ws, task_bias))
