"""Samples that match no task (the unknown-task detector, ``RouterConfig(unknown=...)``): an error, or the
merged / pretrained model's output for them while the others take the second pass, put back in batch order."""
from __future__ import annotations

import torch

from mass.method.router import Routing
from mass.method.support import UnknownTaskError
from mass.nn.samples import join_outputs, take_samples
from mass.nn.second_pass import run_second_pass


def unknown_pass(model, inputs: tuple, kwargs: dict, routing: Routing, block_output):
    """The output of a batch in which ``routing.unknown`` flags some samples (see the module docstring)."""
    flagged = routing.unknown
    if model.router_config.unknown == "error":
        raise UnknownTaskError(flagged.nonzero().squeeze(1).tolist())
    B = flagged.shape[0]
    lost, kept = flagged.nonzero().squeeze(1), (~flagged).nonzero().squeeze(1)
    mode = "merged" if model.router_config.unknown == "merged" else "base"
    fallback = model.single_pass(mode, take_samples(inputs, lost, B), take_samples(kwargs, lost, B))
    if kept.numel() == 0:
        return fallback
    sub = Routing(routing.task_ids[kept], routing.weights[kept], None)
    if block_output is not None:
        block_output = take_samples(block_output, kept, B, model.arch.batch_axes[model.routing_layer])
    routed = run_second_pass(model, take_samples(inputs, kept, B), take_samples(kwargs, kept, B), sub, block_output)
    joined = join_outputs(routed, fallback, kept.numel(), lost.numel())
    return take_samples(joined, torch.argsort(torch.cat([kept, lost])), B)
