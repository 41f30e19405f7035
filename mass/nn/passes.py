"""Per-call pass state and the hooks that read it (thread-safe by construction).

A forward of a :class:`~mass.nn.model.MASSModel` is one or two *passes* over the wrapped encoder. What a pass
uses (θ0, the TSV-M weights or per-sample bank entries; which features the first pass reads; which block
output the second pass replays) is a :class:`Pass`, created for that call and published through a
thread-local slot owned by the model's :class:`PassState`. Layers and hooks read the current pass from it,
so two threads running the same model each see their own pass, and nothing shared is mutated per call: the
hooks and block gates below are installed once, when the model is wrapped. (A forward never yields control
mid-call, so asyncio tasks, which run one forward at a time on their thread, cannot see each other's pass
either.) A thread-local is also what ``torch.compile`` can trace: Dynamo follows the slot's writes and reads
inside one graph (a ``ContextVar`` is a graph break), so the routed forward compiles with ``fullgraph=True``.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

MODES = ("base", "merged", "tasks")


def host_sync_allowed(x: torch.Tensor) -> bool:
    """Whether a pass may read values back to the host to pick a faster path (group the rows of a CPU batch by
    task). Never on CUDA (the routed forward stays capturable in a CUDA graph) and never under ``torch.compile``
    (a data-dependent branch is a graph break): both take the gather paths, which read nothing back."""
    return not x.is_cuda and not torch.compiler.is_compiling()


@dataclass
class FirstPassCapture:
    """What a first pass reads: the routing features of ``layers`` (token chosen by ``token``) and, with prefix
    reuse, the output of block ``stop``. The pass ends (:class:`StopForward`) as soon as it has them."""

    layers: frozenset
    stop: int
    reuse_prefix: bool
    trim: bool  # CLS token: the routing block computes only what the CLS row's MLP input needs
    token: Callable[[torch.Tensor, int], torch.Tensor]
    trimmed_feature: Callable[[int, torch.Tensor], Optional[torch.Tensor]]
    captured: dict = field(default_factory=dict)

    def read(self, index: int, fc1_input: torch.Tensor) -> None:
        """Called by block ``index``'s fc1 with its input: keep the feature if this block is scored, and stop
        the pass at the last scored block unless the block's output is needed too."""
        if index not in self.layers:
            return
        self.captured[index] = self.token(fc1_input, index)
        if index == self.stop and not self.reuse_prefix:
            raise StopForward(self)


class StopForward(Exception):
    """Ends a first pass once its features are read. It carries the capture it belongs to, so a call only ever
    swallows its own stop (never one raised for another call)."""

    def __init__(self, capture: FirstPassCapture):
        self.capture = capture  # (no super().__init__(message): Dynamo cannot trace that call; __str__ says it)

    def __str__(self) -> str:
        return "first pass stopped after the routing block"


class Pass:
    """Which weights one forward uses: ``base`` (θ0), ``merged`` (TSV-M), ``tasks`` (θ0 + per-sample entries).
    In ``tasks`` mode, ``entries`` (B, K) index the layers' banks (-1 = none) with ``weights`` (B, K);
    ``extension`` holds the banks extended with cached multi-task sets when entries point past the tasks.
    A first pass carries its ``capture`` (what to read, where to stop); a second pass that reuses the prefix
    carries ``replay`` = (block L, the first pass's block-L output). A Pass belongs to one call: its row cache
    is filled lazily by that call's layers only."""

    __slots__ = ("mode", "entries", "weights", "segments", "extension", "capture", "replay", "_row_cache")

    def __init__(self, mode: str = "base", entries: Optional[torch.Tensor] = None,
                 weights: Optional[torch.Tensor] = None, segments: Optional[list] = None, extension=None,
                 capture: Optional[FirstPassCapture] = None, replay: Optional[tuple] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "tasks" and (entries is None or weights is None):
            raise ValueError("a 'tasks' pass needs entries and weights")
        self.mode, self.entries, self.weights, self.segments = mode, entries, weights, segments
        self.extension, self.capture, self.replay = extension, capture, replay
        self._row_cache: dict = {}

    def banks(self, layer):
        """The bank holder of ``layer`` for this pass: the layer itself, or its extended banks."""
        return layer if self.extension is None else self.extension.of(layer)

    @property
    def unit_weights(self) -> bool:
        """Every selected entry has weight 1 (top-1 and TSV-M sets): weights need not be applied."""
        if "unit" not in self._row_cache:
            valid = self.entries >= 0
            self._row_cache["unit"] = bool((self.weights[valid] == 1).all())
        return self._row_cache["unit"]

    @property
    def _one_entry_each(self) -> bool:
        """Every sample uses exactly one entry with weight 1 (top-1): a per-sample delta is one gather. Asked
        only on the CPU fast path, which has already synchronised with the host."""
        if "one" not in self._row_cache:
            self._row_cache["one"] = self.entries.shape[1] == 1 and bool((self.entries >= 0).all()) and self.unit_weights
        return self._row_cache["one"]

    def row_segments(self, lead_shape: tuple, batch_axis: int) -> Optional[tuple]:
        """Sample segments scaled to rows, when each sample's rows are contiguous (batch axis first)."""
        if self.segments is None or batch_axis != 0 or lead_shape[0] != self.batch_size:
            return None
        per_sample = math.prod(lead_shape[1:])
        key = ("segments", per_sample)
        if key not in self._row_cache:
            self._row_cache[key] = tuple((slot, e, a * per_sample, b * per_sample) for slot, e, a, b in self.segments)
        return self._row_cache[key]

    def segment_row_weights(self, lead_shape: tuple, batch_axis: int) -> Optional[torch.Tensor]:
        """Per-row weights (N, K) for the segment fast path; None when every weight is 1 (nothing to apply)."""
        return None if self.unit_weights else self.rows(lead_shape, batch_axis)[1]

    @property
    def batch_size(self) -> int:
        return self.entries.shape[0]

    def rows(self, lead_shape: tuple, batch_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row entries and weights for an activation whose leading dims are ``lead_shape``."""
        key = (tuple(lead_shape), batch_axis)
        if key not in self._row_cache:
            B = self.batch_size
            if lead_shape[batch_axis] != B:
                raise RuntimeError(
                    f"activation of shape {tuple(lead_shape)} has no batch of {B} samples on axis {batch_axis}"
                )
            view = [1] * len(lead_shape)
            view[batch_axis] = B
            sample = torch.arange(B, device=self.entries.device).view(view).expand(lead_shape).reshape(-1)
            self._row_cache[key] = (self.entries.index_select(0, sample), self.weights.index_select(0, sample))
        return self._row_cache[key]

    def sample_delta(self, bank: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j bank[e_j] per sample: (B, *bank.shape[1:]). Slots with entry -1 add nothing."""
        if self.segments is not None and self._one_entry_each:
            return bank.index_select(0, self.entries[:, 0])
        valid = self.entries >= 0
        picked = bank[self.entries.clamp_min(0)]  # (B, K, *shape)
        w = (self.weights * valid).to(bank.dtype).view(*self.entries.shape, *([1] * (bank.dim() - 1)))
        return (picked * w).sum(1)


_BASE = Pass("base")


class _Slot(threading.local):
    """One thread's current pass. Every thread's slot starts at the base pass (``__init__`` runs once per thread),
    so what a compiled graph guards on (the slot holds the base pass when the call starts) is the same on every
    thread and before and after any eager call: a compiled model is not recompiled per thread or per call."""

    def __init__(self):
        self.current = _BASE


class PassState:
    """The channel through which a model's layers see the current call's :class:`Pass`. One per wrapped model;
    each call sets its own pass on its own thread (a ``threading.local`` slot) and puts back what was there
    when it ends, so a nested call (a hook running another pass) and a failed call leave no trace."""

    def __init__(self):
        self._local = _Slot()

    @property
    def current(self) -> Pass:
        return self._local.current

    @contextlib.contextmanager
    def use(self, mode: str, entries: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
            segments: Optional[list] = None, **extras):
        """Run the body with a new :class:`Pass` (``extras``: ``extension``, ``capture``, ``replay``)."""
        previous = self._local.current
        current = Pass(mode, entries, weights, segments, **extras)
        self._local.current = current
        try:
            yield current
        finally:
            self._local.current = previous

    def __deepcopy__(self, memo):  # a copied model gets its own channel (a thread-local cannot be copied)
        return PassState()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


# ---------------------------------------------------------------------------------------------- persistent hooks
# (Routing features are read by the fc1 layers themselves, after any user hook: MASSLinear.feature_index.)
_MASK_KWARGS = ("attention_mask", "causal_attention_mask", "attn_mask", "k_x", "v_x")


class BlockGate:
    """Stands in for one transformer block's ``forward`` (set once as an instance attribute when the model is
    wrapped; a failed wrap puts back what was there).
    Outside a MASS pass, or when the pass has nothing to do with this block, it calls the block's own forward.
    A second pass that reuses the prefix gets the first pass's block-L output for blocks ≤ L; a first pass
    ending at this block returns its CLS feature from the trimmed block (or reads the block output)."""

    def __init__(self, block: nn.Module, state: PassState, index: int):
        self.block, self.state, self.index = block, state, index
        self.previous = block.__dict__.get("forward")  # an instance-level forward set before (kept, restored)

    def _forward(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.block).forward(self.block, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        p = self.state.current
        if p.replay is not None and self.index <= p.replay[0]:
            return p.replay[1]
        capture = p.capture
        if capture is None or self.index != capture.stop:
            return self._forward(*args, **kwargs)
        if capture.trim and not capture.reuse_prefix:
            hidden = args[0] if args else next((kwargs[k] for k in ("hidden_states", "x", "q_x") if k in kwargs), None)
            # Masks, separate key/value inputs, anything beyond the hidden states: run the whole block instead.
            extra = list(args[1:]) + [kwargs.get(k) for k in _MASK_KWARGS]
            if hidden is not None and all(e is None for e in extra):
                feature = capture.trimmed_feature(self.index, hidden)
                if feature is not None:
                    capture.captured[self.index] = feature
                    raise StopForward(capture)
        out = self._forward(*args, **kwargs)
        if capture.reuse_prefix:
            capture.captured["block"] = out
            raise StopForward(capture)
        return out


class TokenDeltas:
    """Forward pre-hook on the pre-norm, installed once: adds the current pass's class-token and positional
    deltas (merged, or each sample's entries) to the token sequence."""

    def __init__(self, state: PassState, banks):
        self.state, self.banks = state, banks

    def __call__(self, module, args):
        p = self.state.current
        if p.mode == "base":
            return None
        x, banks = args[0], self.banks
        if p.mode == "merged":
            delta = banks.merged_pos_delta.unsqueeze(0).clone()
            delta[:, 0] += banks.merged_cls_delta
        else:
            holder = p.banks(banks)
            delta = p.sample_delta(holder.pos_delta)
            delta[:, 0] += p.sample_delta(holder.cls_delta)
        if x.shape[1:] != delta.shape[1:]:
            raise RuntimeError(
                f"token layout {tuple(x.shape)} does not match the stored positional embedding "
                f"{tuple(banks.pos_delta.shape[1:])} (interpolated positions and patch dropout are not supported)"
            )
        return (x + delta.to(x.dtype),) + tuple(args[1:])


class ProjSwitch:
    """The task-conditioned projection of a wrapped open_clip root, in two parts installed once. Its class is
    swapped for a subclass whose ``proj`` attribute consults the current pass (:meth:`resolve`): θ0's parameter
    in a base pass or outside MASS, ``None`` inside a MASS pass, so the root's own ``pooled @ self.proj`` is
    skipped; and this object, as a forward hook on the root, then applies the MASS projection layer (which reads
    the current pass itself) to the pooled output. (A stand-in object with ``__rmatmul__`` did the same in one
    part, but ``torch.compile`` cannot trace a matmul with a non-tensor operand.)"""

    def __init__(self, state: PassState, layer):
        self.state, self.layer = state, layer

    def resolve(self, param):
        return param if self.state.current.mode == "base" else None

    def __call__(self, module, args, output):
        if self.state.current.mode == "base":
            return None
        if isinstance(output, tuple):  # (pooled, tokens) with output_tokens=True: the tokens are not projected
            return (self.layer(output[0]),) + output[1:]
        return self.layer(output)


_PROJ_CLASSES: dict = {}
_PROJ_LOCK = threading.Lock()


def _proj_getattr(self, name: str):
    value = nn.Module.__getattr__(self, name)
    if name == "proj" and value is not None:
        switch = self.__dict__.get("_mass_proj")
        if switch is not None:
            return switch.resolve(value)
    return value


def proj_class(cls: type) -> type:
    """The subclass of ``cls`` whose ``proj`` attribute follows the current pass (same name; cached per class)."""
    with _PROJ_LOCK:
        if cls not in _PROJ_CLASSES:
            _PROJ_CLASSES[cls] = type(cls.__name__, (cls,), {
                "__getattr__": _proj_getattr, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                "_mass_original_class": cls,
            })
        return _PROJ_CLASSES[cls]
