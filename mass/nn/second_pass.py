"""The second pass: every sample runs the encoder with its selected tasks' blocks (MASS.md §4), one batched
forward for a mixed batch. Rows that select several tasks under TSV-M semantics use that set's cached blocks
(:mod:`mass.nn.set_cache`); on the CPU the batch is grouped by task first so each task's rows are one slice."""
from __future__ import annotations

import torch

from mass_kernels.reference import group_rows

from mass.method.router import Routing
from mass.nn.passes import host_sync_allowed
from mass.nn.samples import take_samples


def bank_entries(model, routing: Routing):
    """Bank entries, weights and the set-cache generation (or None) for the second pass. Rows that select
    several tasks under TSV-M semantics (``topk``, or forced sets) use that set's cached TSV-M blocks (a
    host sync finds them)."""
    ids, weights = routing.task_ids, routing.weights
    if model.router_config.mode == "weighted" and routing.residuals is not None:
        return ids, weights, None
    n_selected = (ids >= 0).sum(1)
    if ids.shape[1] == 1 or not bool((n_selected > 1).any()):
        return ids, (ids >= 0).to(weights.dtype), None
    rows = [tuple(sorted(t for t in r if t >= 0)) for r in ids.tolist()]
    generation = model.banks.combos.resolve({c for c in rows if len(c) > 1})
    width = ids.shape[1]
    entries = [(generation.entries[c] if len(c) > 1 else list(c)) for c in rows]
    entries = torch.tensor([e + [-1] * (width - len(e)) for e in entries], dtype=torch.long, device=ids.device)
    return entries, (entries >= 0).to(weights.dtype), generation


def run_second_pass(model, inputs: tuple, kwargs: dict, routing: Routing, block_output):
    """``model``'s encoder with each sample's selected blocks; with prefix reuse (``block_output`` not None) it
    starts after the routing block from the first pass's activations."""
    entries, weights, generation = bank_entries(model, routing)
    order, segments = None, None
    if host_sync_allowed(entries):
        # CPU fast path: each entry's samples become one slice (order None: already in entry order)
        order, segments = group_rows(entries)
    elif not entries.is_cuda and entries.shape[0] > 1:
        # CPU under torch.compile: no host sync, so no segments, but the batch is still sorted by entry (a
        # traced argsort): each layer's op then finds its rows already in order and permutes nothing.
        order = torch.argsort(entries[:, 0], stable=True)
    if order is not None:
        B = entries.shape[0]
        inputs, kwargs = take_samples(inputs, order, B), take_samples(kwargs, order, B)
        entries, weights = entries[order], weights[order]
        if block_output is not None:
            block_output = take_samples(block_output, order, B, model.arch.batch_axes[model.routing_layer])
    replay = None if block_output is None else (model.routing_layer, block_output)
    with model.state.use("tasks", entries, weights, segments, extension=generation, replay=replay):
        out = model.model(*inputs, **kwargs)
    if order is not None:
        out = take_samples(out, torch.argsort(order), entries.shape[0])
    return out
