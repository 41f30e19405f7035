"""Drop-in, task-conditioned replacements for the layers of a CLIP vision encoder.

Every layer keeps the wrapped layer's parameters under their original names (so ``state_dict`` keys do not
change) and holds, as non-persistent buffers, what MASS adds: the TSV-merged weights used by the first pass
(only where the first pass runs) and a bank of per-entry deltas used by the second pass. An *entry* is one
task's block, or one slot of a cached multi-task TSV-M block (MASS.md §4). Each layer reads the current
call's :class:`~mass.nn.passes.Pass` (which weights this forward uses) from its :class:`~mass.nn.passes.PassState`,
so concurrent calls on one model never see each other's state.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import mass_kernels
from mass_kernels.cpu import bias_runs
from mass_kernels.reference import (
    dense_delta_segments_torch,
    lowrank_linear_segments_torch,
    segment_runs,
    whole_weight_segments_torch,
)

from mass.nn.passes import PassState, host_sync_allowed

def bank_layout(factors: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The memory layout a (entries, a, b) factor bank is kept in, values unchanged. On the CPU each entry is
    stored transposed (``factors[e].T`` contiguous), the operand layout of the fast path's batched matmuls;
    elsewhere row-major, the layout the Triton kernels read coalesced."""
    if factors is None:
        return None
    if factors.is_cuda:
        return factors.contiguous()
    if factors.transpose(1, 2).is_contiguous():
        return factors
    return factors.transpose(1, 2).contiguous().transpose(1, 2)


_CACHE_LOCK = threading.Lock()  # builds of lazily cached weights (rare; a module-level lock keeps layers copyable)


def _stamp(tensors) -> tuple:
    """What identifies the values of ``tensors`` cheaply: storage, in-place write count, dtype, device
    (inference tensors keep no write count; they cannot be written outside inference mode anyway)."""
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype, t.device) for t in tensors)


def _broadcast_samples(values: torch.Tensor, ndim: int, batch_axis: int) -> torch.Tensor:
    """Reshape per-sample (B, D) values to broadcast against an activation of ``ndim`` dims."""
    shape = [1] * ndim
    shape[batch_axis] = values.shape[0]
    shape[-1] = values.shape[-1]
    return values.view(shape)


class _TaskModule(nn.Module):
    """Buffers shared by all task-conditioned layers: merged values and per-entry banks."""

    def _init_task_buffers(self, state: PassState, batch_axis: int, names: tuple[str, ...]):
        self.state = state
        self.batch_axis = batch_axis
        for name in names:
            self.register_buffer(name, None, persistent=False)

    def cached_tensors(self) -> list:
        """Tensors a cache of this layer holds outside its parameters and buffers (none by default)."""
        return []

    def set_weight_deltas(self, deltas: torch.Tensor) -> None:
        """Install the bank of whole weight deltas ``(entries, *weight.shape)``."""
        self.task_weight = deltas

    def _lay_out_banks(self) -> None:
        """Put the banks in the layout their device's fast path reads (see :func:`bank_layout`)."""

    def _apply(self, fn, recurse=True):  # .to()/.cuda() keep strides: re-lay the banks out for the new device
        super()._apply(fn, recurse)
        self._lay_out_banks()
        return self

    def _require_merged(self) -> tuple:
        """The merged weight and bias, read once (another model sharing these layers may add them meanwhile)."""
        weight, bias = self.merged_weight, self.merged_bias
        if weight is None:
            raise RuntimeError(
                f"{type(self).__name__} holds no merged weights: the first pass does not reach this layer "
                f"(build with keep_merged='all' to run the whole TSV-M model)"
            )
        return weight, bias


class MASSLinear(_TaskModule):
    """``nn.Linear`` replacement: ``x W0ᵀ + b0`` plus the selected entries' low-rank blocks and bias deltas."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], state: PassState, batch_axis: int = 0):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is None or isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)
        self._init_task_buffers(
            state, batch_axis, ("merged_weight", "merged_bias", "task_U", "task_S", "task_V", "task_bias")
        )
        self.feature_index: Optional[int] = None  # set on block i's fc1: its input is block i's routing feature
        self.rank = 0  # the factors' true rank k; the banks may hold more columns (zero padding on CUDA)

    @classmethod
    def from_linear(cls, linear: nn.Linear, state: PassState, batch_axis: int = 0) -> "MASSLinear":
        return cls(linear.weight, linear.bias, state, batch_axis)

    def set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, rank: Optional[int] = None) -> None:
        """Install the bank ``(entries, out, k)``, ``(entries, k)``, ``(entries, k, in)`` in this device's layout.
        ``rank``: the true k when the bank is already padded. On CUDA the rank is zero-padded to a multiple of 16
        (:func:`mass_kernels.pad_rank`: the Triton kernels are compiled spill-free for such ranks; the zero
        columns add exact zeros and count in the model's memory)."""
        self.rank = S.shape[1] if rank is None else rank
        if U.is_cuda:
            U, S, V = mass_kernels.pad_rank(U, S, V)
        self.task_U, self.task_S, self.task_V = bank_layout(U), S, bank_layout(V)

    def true_factors(self, n_entries: Optional[int] = None) -> tuple:
        """The first ``n_entries`` (default all) entries' factors at their true rank (views, no padding)."""
        e, k = slice(n_entries), self.rank
        return self.task_U[e, :, :k], self.task_S[e, :k], self.task_V[e, :k, :]

    def _lay_out_banks(self) -> None:
        if self.task_U is not None:
            self.set_factors(self.task_U, self.task_S, self.task_V, rank=self.rank)

    def extra_repr(self) -> str:
        entries = 0 if self.task_S is None else self.task_S.shape[0]
        return f"in_features={self.in_features}, out_features={self.out_features}, entries={entries}, rank={self.rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.state.current
        if p.capture is not None and self.feature_index is not None:
            p.capture.read(self.feature_index, x)  # a first pass: this block's MLP input may be a routing feature
        if p.mode == "base":
            return F.linear(x, self.weight, self.bias)
        if p.mode == "merged":
            merged_weight, merged_bias = self._require_merged()
            return F.linear(x, merged_weight, merged_bias)
        bank = p.banks(self)
        lead = x.shape[:-1]
        segments = p.row_segments(lead, self.batch_axis)
        if segments is not None and not x.is_cuda:
            row_weights = p.segment_row_weights(lead, self.batch_axis)
            y = lowrank_linear_segments_torch(
                x.reshape(-1, self.in_features), self.weight, self.bias, bank.task_U, bank.task_S, bank.task_V,
                segments, row_weights, bank.task_bias,
            )
            return y.view(*lead, self.out_features)
        row_entries, row_weights = p.rows(lead, self.batch_axis)
        U, S, V, task_bias = bank.task_U, bank.task_S, bank.task_V, bank.task_bias
        if x.is_cuda and U.dtype != x.dtype:  # half-precision banks under a wider model: the kernels take one dtype
            U, S, V = U.to(x.dtype), S.to(x.dtype), V.to(x.dtype)
            task_bias = None if task_bias is None else task_bias.to(x.dtype)
        y = mass_kernels.lowrank_linear(
            x.reshape(-1, self.in_features), self.weight, self.bias, U, S, V,
            row_entries, row_weights.to(torch.float32), task_bias,
        )
        return y.view(*lead, self.out_features)


class MASSLayerNorm(_TaskModule):
    """``nn.LayerNorm`` replacement with per-sample affine parameters in the second pass."""

    def __init__(self, ln: nn.LayerNorm, state: PassState, batch_axis: int = 0):
        super().__init__()
        self.normalized_shape = ln.normalized_shape
        self.eps = ln.eps
        self.elementwise_affine = ln.elementwise_affine
        if not ln.elementwise_affine or ln.weight is None or ln.bias is None:
            raise NotImplementedError("MASSLayerNorm needs a LayerNorm with weight and bias")
        self.weight, self.bias = ln.weight, ln.bias
        self._init_task_buffers(state, batch_axis, ("merged_weight", "merged_bias", "task_weight", "task_bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state.current
        if state.mode == "base":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if state.mode == "merged":
            merged_weight, merged_bias = self._require_merged()
            return F.layer_norm(x, self.normalized_shape, merged_weight, merged_bias, self.eps)
        bank = state.banks(self)
        normed = self._normalise(x)
        if state.row_segments(x.shape[:-1], self.batch_axis) is not None and state._one_entry_each:
            # Top-1 on the CPU fast path: samples are grouped by entry; each run of equal groups gets its
            # entries' affine in one in-place broadcast op.
            weights = (self.weight + bank.task_weight).to(x.dtype).flatten(1)  # (entries, numel of the shape)
            biases = (self.bias + bank.task_bias).to(x.dtype).flatten(1)
            for _, sel, start, stop, m, _ in segment_runs(state.segments):
                rows = normed[start:stop].view(m, -1, weights.shape[1])
                w, b = weights[sel].unsqueeze(1), biases[sel].unsqueeze(1)
                if torch.is_grad_enabled():  # the out= form below is not differentiable
                    rows.mul_(w).add_(b)
                else:
                    torch.addcmul(b, rows, w, out=rows)
            return normed
        w = self.weight + state.sample_delta(bank.task_weight)
        b = self.bias + state.sample_delta(bank.task_bias)
        axis = self.batch_axis if x.dim() > 2 else 0
        w, b = _broadcast_samples(w, x.dim(), axis).to(x.dtype), _broadcast_samples(b, x.dim(), axis).to(x.dtype)
        return normed.mul_(w).add_(b)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm without the affine part. On the CPU it is asked for with unit weight and zero bias: PyTorch's
        CPU kernel is ~2.5x slower without them (800x768 fp32: 284 against 112 us, measured)."""
        if x.is_cuda:
            return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        D = self.normalized_shape
        return F.layer_norm(x, D, x.new_ones(D), x.new_zeros(D), self.eps)


class MASSConv2d(_TaskModule):
    """``nn.Conv2d`` replacement (the patch embedding): the 4-D task deltas are kept whole (MASS.md §1)."""

    def __init__(self, conv: nn.Conv2d, state: PassState):
        super().__init__()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        if conv.padding_mode != "zeros":
            raise NotImplementedError("MASSConv2d supports padding_mode='zeros' only")
        self.weight, self.bias = conv.weight, conv.bias
        self._init_task_buffers(state, 0, ("merged_weight", "merged_bias", "task_weight", "task_bias",
                                           "fine_tuned_weight"))
        self._fine_tuned = None  # (sources, stamp, weights): read and replaced as one value
        # (sources, stamp, {entries: index}, weights, task biases), likewise; not a buffer: it belongs to the
        # cached multi-task sets (held outside the module's tensors too) and a call must not change buffers
        self._fine_tuned_sets = None

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def set_weight_deltas(self, deltas: torch.Tensor) -> None:
        """Each entry is laid out as its flattened (out, in·kh·kw) matrix would be by :func:`bank_layout`
        (on the CPU, the patch GEMM's operand layout); shape and values unchanged."""
        if deltas is not None:
            deltas = bank_layout(deltas.reshape(*deltas.shape[:2], -1)).view(deltas.shape)
        self.task_weight = deltas
        self.fine_tuned_weight, self._fine_tuned = None, None
        self._fine_tuned_sets = None

    def _fine_tuned_weights(self, n_entries: int) -> torch.Tensor:
        """``W0 + Δ_e`` for the first ``n_entries`` entries (top-1 rows use task entries, which come first),
        flattened to (entries, out, in·kh·kw) in the bank layout. With them a top-1 patch embedding on the CPU
        fast path is one GEMM per group, as many FLOPs as the plain conv, instead of a base GEMM plus a delta
        GEMM. Costs that many patch weights of memory (ViT-B/32, T = 8: 72 MiB in fp32), held as a
        non-persistent buffer so it counts in the module's tensors; built on first use and rebuilt when more
        entries are needed or the base weight or the deltas change (new tensors, new storage, in-place writes).
        Concurrent calls: the cache is read as one value and replaced (never written in place) under a lock, so a
        call holding the previous weights keeps valid ones; it is built outside inference mode so that later
        calls outside it can use it."""

        def current(cache, sources, stamp):
            return (cache is not None and cache[2].shape[0] >= n_entries and cache[1] == stamp
                    and all(a is b for a, b in zip(cache[0], sources)))

        sources = (self.weight, self.task_weight)
        stamp = _stamp(sources)
        cache = self._fine_tuned
        if current(cache, sources, stamp):
            return cache[2]
        with _CACHE_LOCK, torch.inference_mode(False), torch.no_grad():
            cache = self._fine_tuned
            if not current(cache, sources, stamp):
                deltas = self.task_weight[:n_entries].reshape(n_entries, self.out_channels, -1)
                whole = bank_layout(self.weight.reshape(1, self.out_channels, -1) + deltas)
                cache = (sources, stamp, whole)
                self._fine_tuned, self.fine_tuned_weight = cache, whole
        return cache[2]

    def _group_whole_weights(self, bank, groups: list) -> Optional[tuple]:
        """``W0 + Σ_j Δ_ej`` and ``Σ_j b_ej`` for row groups that each add their entries with weight 1 (a cached
        multi-task set's slots, or one task), from ``bank`` (the pass's banks, extended with the sets): stacked
        (groups cached, out, in·kh·kw) in the bank layout, the summed task biases (or None), and each group's
        index in them. With them a two-slot patch embedding is one GEMM per group, as for top-1, instead of the
        base GEMM plus a delta GEMM per slot (3× the FLOPs). At most as many groups as the layer has tasks
        are cached (ViT-B/32, T = 8: up to 72 MiB more in fp32; like the cached sets' banks, not a buffer); a
        call needing others starts the cache again with its own groups, and a call with more groups than that
        gets None (the caller then runs the delta GEMMs). Rebuilt when the base weight or the
        banks change (new tensors, as a new generation of cached sets is, or in-place writes); read and replaced
        as one value under the lock, like :meth:`_fine_tuned_weights`."""
        sources = (self.weight, bank.task_weight, bank.task_bias)
        stamp = _stamp([t for t in sources if t is not None])
        wanted = list(dict.fromkeys(groups))
        if len(wanted) > self.task_weight.shape[0]:
            return None

        def current(cache):
            return cache is not None and cache[1] == stamp and all(a is b for a, b in zip(cache[0], sources))

        cache = self._fine_tuned_sets
        if not (current(cache) and all(g in cache[2] for g in wanted)):
            with _CACHE_LOCK, torch.inference_mode(False), torch.no_grad():
                cache = self._fine_tuned_sets
                if not (current(cache) and all(g in cache[2] for g in wanted)):
                    cache = self._extend_group_cache(cache if current(cache) else None, sources, stamp, wanted)
                    self._fine_tuned_sets = cache
        return cache[3], cache[4], [cache[2][g] for g in groups]

    def cached_tensors(self) -> list:
        """The per-set whole patch weights and biases cached by :meth:`_group_whole_weights` (not buffers)."""
        cache = self._fine_tuned_sets
        return [] if cache is None else [t for t in cache[3:] if t is not None]

    def _extend_group_cache(self, cache, sources: tuple, stamp: tuple, wanted: list) -> tuple:
        """A new group cache: ``cache``'s groups (if it is current and there is room) plus the missing ones of
        ``wanted`` (else ``wanted`` alone)."""
        weight, deltas, task_bias = sources
        index = dict(cache[2]) if cache is not None else {}
        if len(index) + sum(g not in index for g in wanted) > self.task_weight.shape[0]:
            cache, index = None, {}
        new = [g for g in wanted if g not in index]
        flat = deltas.reshape(deltas.shape[0], self.out_channels, -1)
        base = weight.reshape(self.out_channels, -1)
        weights = torch.stack([sum((flat[e] for e in g[1:]), base + flat[g[0]]) for g in new])
        biases = None if task_bias is None else torch.stack([sum((task_bias[e] for e in g[1:]), task_bias[g[0]])
                                                             for g in new])
        if cache is not None:
            weights = torch.cat([cache[3], weights])
            biases = None if biases is None else torch.cat([cache[4], biases])
        for g in new:
            index[g] = len(index)
        return sources, stamp, index, bank_layout(weights), biases

    def _lay_out_banks(self) -> None:
        self.set_weight_deltas(self.task_weight)

    def _patchifies(self, x: torch.Tensor) -> bool:
        """A ViT patch embedding: non-overlapping kernel-sized windows, so the conv is a GEMM over patches."""
        return (tuple(self.stride) == tuple(self.kernel_size) and self.padding in ((0, 0), "valid")
                and tuple(self.dilation) == (1, 1) and self.groups == 1 and x.dim() == 4)

    def _patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The non-overlapping patches as rows (B·gh·gw, C·kh·kw), sample-major, and ``(B, gh, gw)``."""
        kh, kw = self.kernel_size
        B, C, H, W = x.shape
        gh, gw = H // kh, W // kw
        patches = x[:, :, : gh * kh, : gw * kw].reshape(B, C, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(B * gh * gw, C * kh * kw), (B, gh, gw)

    def _unpatch(self, y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        return y.view(*grid, self.out_channels).permute(0, 3, 1, 2)  # channels-last strides, same values

    def _patch_gemm(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        """The conv as one GEMM over the patches (CPU, patchifying convs): the first pass then embeds the same
        way as the second, and on the CPU one GEMM is faster than the convolution (ViT-B/32, batch 16:
        12.8 against 15.6 ms, measured)."""
        patches, grid = self._patches(x)
        return self._unpatch(F.linear(patches, w.reshape(self.out_channels, -1), b), grid)

    def _patch_forward(self, x: torch.Tensor, segments: list, row_weights) -> torch.Tensor:
        """The task-conditioned conv as GEMMs over patches on grouped samples: for top-1, each group with its
        entry's whole weight; otherwise one base GEMM plus the weighted per-entry deltas."""
        patches, grid = self._patches(x)
        p = self.state.current
        bank = p.banks(self)
        if row_weights is None and p._one_entry_each:
            n_entries = 1 + max(entry for _, entry, _, _ in segments)  # task entries: the layer's own bank
            y = whole_weight_segments_torch(patches, self._fine_tuned_weights(n_entries), self.bias, segments,
                                            bank.task_bias)
        elif row_weights is not None or (y := self._groups_forward(patches, segments, bank)) is None:
            E = bank.task_weight.shape[0]
            y = dense_delta_segments_torch(
                patches, self.weight.reshape(self.out_channels, -1), self.bias,
                bank.task_weight.reshape(E, self.out_channels, -1), segments, row_weights, bank.task_bias,
            )
        return self._unpatch(y, grid)

    def _groups_forward(self, patches: torch.Tensor, segments, bank) -> Optional[torch.Tensor]:
        """Unit-weight rows (multi-task sets, single tasks) as one GEMM per group with its cached whole weight
        (:meth:`_group_whole_weights`); None when some rows have no entry or the groups do not fit the cache."""
        groups, group_segments, done = [], [], 0
        for start, stop, m, n, sels in bias_runs(segments):
            if start != done:
                return None  # rows without an entry in between: the base weight, not a cached group
            for i in range(m):
                group_segments.append((0, len(groups), start + i * n, start + (i + 1) * n))
                groups.append(tuple(sel.start + i * sel.step for sel in sels))
            done = stop
        if not groups or done != patches.shape[0]:
            return None
        cached = self._group_whole_weights(bank, groups)
        if cached is None:
            return None
        weights, biases, index = cached
        group_segments = [(0, index[g], start, stop) for _, g, start, stop in group_segments]
        return whole_weight_segments_torch(patches, weights, self.bias, group_segments, biases)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            got = f"{x.shape[1]} channels" if x.dim() == 4 else f"{x.dim()} dimensions"
            raise ValueError(
                f"the patch embedding expects images of shape (batch, {self.in_channels} channels, height, width); "
                f"got a tensor of shape {tuple(x.shape)} ({got})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        p = self.state.current
        if p.replay is not None:  # prefix reuse: every block it feeds is replayed, its output is never read
            return self._unread_output(x)
        if p.mode in ("base", "merged"):
            w, b = (self.weight, self.bias) if p.mode == "base" else self._require_merged()
            if not x.is_cuda and self._patchifies(x):
                return self._patch_gemm(x, w, b)
            return self._conv(x, w, b)
        if not x.is_cuda and self._patchifies(x):
            lead = (x.shape[0], x.shape[2] // self.kernel_size[0], x.shape[3] // self.kernel_size[1])
            segments = p.row_segments(lead, 0)
            if segments is not None:
                row_weights = p.segment_row_weights(lead, 0)
                return self._patch_forward(x, segments, row_weights)
            if p.entries.shape[1] == 1:  # no segments (torch.compile): the op groups the patches by entry
                return self._patch_entries(x, p)
        y = self._conv(x, self.weight, self.bias)
        entries, weights = p.entries, p.weights
        if not host_sync_allowed(x):
            return y + self._grouped_delta(x)
        bank = p.banks(self)
        # CPU: one conv per bank entry over the samples that use it.
        for e in range(bank.task_weight.shape[0]):
            coef = (weights * (entries == e)).sum(1)
            rows = coef.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            b = None if bank.task_bias is None else bank.task_bias[e]
            delta = self._conv(x.index_select(0, rows), bank.task_weight[e], b)
            y = y.index_add(0, rows, delta * coef.index_select(0, rows).to(y.dtype).view(-1, 1, 1, 1))
        return y

    def _patch_entries(self, x: torch.Tensor, p) -> torch.Tensor:
        """The patch GEMM with each sample's one entry, through ``mass_kernels.dense_delta_linear`` (CPU, no
        segments: under ``torch.compile``, where grouping in traced code would be a host sync)."""
        patches, grid = self._patches(x)
        bank = p.banks(self)
        entries, weights = p.rows(grid, 0)
        E = bank.task_weight.shape[0]
        y = mass_kernels.dense_delta_linear(
            patches, self.weight.reshape(self.out_channels, -1), self.bias,
            bank.task_weight.reshape(E, self.out_channels, -1), entries[:, 0], weights[:, 0].to(patches.dtype),
            bank.task_bias,
        )
        return self._unpatch(y, grid)

    def _unread_output(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros of the convolution's output shape, not computed: a second pass that reuses the prefix replays
        the first pass's block output for every block up to the routing block, so the patch embedding's output
        (and what the embedding stage builds from it) is never read (issue 25: no recomputed patch GEMM)."""
        if self.padding == "same":
            size = list(x.shape[2:])
        else:
            padding = (0, 0) if self.padding == "valid" else self.padding
            size = [(n + 2 * pad - dil * (k - 1) - 1) // st + 1 for n, pad, dil, k, st in zip(
                x.shape[2:], padding, self.dilation, self.kernel_size, self.stride)]
        return x.new_zeros(()).expand(x.shape[0], self.out_channels, *size)

    def _grouped_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j conv(x_b, Δ_{e_bj}) for every sample in one grouped conv, without a host sync (so the
        routed forward stays capturable in a CUDA graph); it gathers one weight delta per sample."""
        B = x.shape[0]
        p = self.state.current
        bank = p.banks(self)
        w = p.sample_delta(bank.task_weight).to(x.dtype)  # (B, out, in/groups, kh, kw)
        b = None if bank.task_bias is None else p.sample_delta(bank.task_bias).to(x.dtype).reshape(-1)
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, *w.shape[2:]), b, self.stride, self.padding,
                       self.dilation, self.groups * B)
        return out.view(B, -1, *out.shape[2:])


class MASSMultiheadAttention(_TaskModule):
    """``nn.MultiheadAttention`` replacement (open_clip): the fused ``in_proj_weight`` runs through the same
    low-rank op as :class:`MASSLinear`; ``out_proj`` becomes a :class:`MASSLinear`. Self-attention only."""

    def __init__(self, mha: nn.MultiheadAttention, state: PassState, batch_axis: int):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise NotImplementedError("separate q/k/v projection weights in nn.MultiheadAttention are not supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("add_bias_kv / add_zero_attn are not supported")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self._qkv_same_embed_dim = True
        self.in_proj_weight, self.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        self.out_proj = MASSLinear(mha.out_proj.weight, mha.out_proj.bias, state, batch_axis)
        # ``in_proj`` shares in_proj_weight/bias; it stays out of the module tree so state_dict keys do not change.
        object.__setattr__(self, "in_proj", MASSLinear(mha.in_proj_weight, mha.in_proj_bias, state, batch_axis))
        self._init_task_buffers(state, batch_axis, ())

    def _apply(self, fn, recurse=True):  # keep the hidden in_proj wrapper's buffers in step with .to()/.half()
        super()._apply(fn, recurse)
        self.in_proj._apply(fn, recurse)
        self.in_proj.weight, self.in_proj.bias = self.in_proj_weight, self.in_proj_bias
        return self

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not ((key is None or key is query) and (value is None or value is query)):
            raise NotImplementedError("MASSMultiheadAttention supports self-attention only (query is key is value)")
        x = query if self.batch_first else query.transpose(0, 1)  # (B, S, D)
        B, S, D = x.shape
        qkv = self.in_proj(query)
        if not self.batch_first:
            qkv = qkv.transpose(0, 1)
        q, k, v = qkv.view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = self._merge_masks(attn_mask, key_padding_mask, B, S, q.dtype)
        if need_weights:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            if is_causal:
                causal = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            attn = F.dropout(probs, self.dropout, self.training) @ v
        else:
            probs = None
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal and mask is None,
            )
        out = attn.transpose(1, 2).reshape(B, S, D)
        if not self.batch_first:
            out = out.transpose(0, 1)
        out = self.out_proj(out)
        if probs is not None and average_attn_weights:
            probs = probs.mean(1)
        return out, probs

    @staticmethod
    def _merge_masks(attn_mask, key_padding_mask, B, S, dtype):
        mask = None
        if attn_mask is not None:
            m = attn_mask
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            mask = m.view(B, -1, S, S) if m.dim() == 3 else m.view(1, 1, S, S)
            mask = mask.to(dtype)
        if key_padding_mask is not None:
            kp = key_padding_mask
            if kp.dtype == torch.bool:
                kp = torch.zeros(kp.shape, dtype=dtype, device=kp.device).masked_fill(kp, float("-inf"))
            kp = kp.view(B, 1, 1, S).to(dtype)
            mask = kp if mask is None else mask + kp
        return mask
