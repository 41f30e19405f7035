"""Where the first pass stops: the merged (or pretrained) encoder runs until the last routing block's MLP input
(MASS.md §3) and no further. A :class:`~mass.nn.passes.FirstPassCapture` collects each routing block's feature
(the CLS token's, or the token mean) and, with prefix reuse, the routing block's output; the pass ends with
:class:`~mass.nn.passes.StopForward` as soon as it has them, so no block after the routing block runs.
"""
from __future__ import annotations

import torch

from mass.method.decompose import LowRankFactors
from mass.method.router import norm_weights
from mass.nn.adapters import cls_mlp_input
from mass.nn.passes import FirstPassCapture, StopForward


def routing_basis(factors: list[LowRankFactors], norm: str) -> torch.Tensor:
    """(G, T, k, D): per routing block, each task's right-singular basis of the fc1 delta, rows scaled by
    √w for ``norm`` (:func:`mass.method.router.norm_weights`: ‖Vx‖² becomes Σ w_i (v_i·x)², still ≤ ‖x‖²)."""
    bases = []
    for f in factors:
        V = f.V.float()
        w = norm_weights(f.S, norm)
        if w is not None:
            V = V * w.sqrt().unsqueeze(-1)
        bases.append(V)
    return torch.stack(bases)


def routing_token(model, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The routing feature of block ``layer``'s MLP input ``x``: the CLS token's row, the mean over tokens, or
    the mean over the patch tokens (all but the first; the sequence axis depends on the block's batch-first or
    sequence-first layout)."""
    seq_axis = 1 - model.arch.batch_axes[layer]
    token = model.router_config.token
    if token == "cls":
        return x.select(seq_axis, 0)
    if token == "patch_mean" and x.shape[seq_axis] > 1:
        return x.narrow(seq_axis, 1, x.shape[seq_axis] - 1).mean(seq_axis)
    return x.mean(seq_axis)


def run_first_pass(model, inputs: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
    """Run ``model``'s (a :class:`~mass.nn.model.MASSModel`) first pass until the last routing block's MLP input
    (or, with prefix reuse, that block's output). Returns the routing features (G, B, D) and the block output
    (or None). With the CLS token the routing block computes only that token's row after its keys and values."""
    capture = FirstPassCapture(
        layers=frozenset(model.routing_layers), stop=model.routing_layer, reuse_prefix=model.reuse_prefix,
        trim=model.router_config.token == "cls" and model.trim_routing_block,
        token=lambda x, layer: routing_token(model, x, layer),
        trimmed_feature=lambda index, hidden: cls_mlp_input(model.arch, index, hidden),
    )
    mode = "base" if model.router_config.features == "pretrained" else "merged"
    try:
        with model.state.use(mode, capture=capture):
            model.model(*inputs, **kwargs)
    except StopForward as stop:
        if stop.capture is not capture:
            raise
    captured = capture.captured
    if any(layer not in captured for layer in model.routing_layers):
        raise RuntimeError("the first pass never reached the routing layer")
    return torch.stack([captured[layer] for layer in model.routing_layers]), captured.get("block")
