"""The router inside the model: routing features to a :class:`~mass.method.router.Routing` (scores through the
fused ``routing_residuals`` op, task selection by :func:`~mass.method.router.select_tasks`), the unknown-task
flags when the detector is on, and the routings of forced tasks and of empty batches."""
from __future__ import annotations

import torch

from mass.method.router import Routing, select_tasks
from mass.method.support import residuals as routing_residuals
from mass.method.support import unknown_scores
from mass.nn.pass_inputs import forced_task_ids


def route_features(model, features: torch.Tensor) -> Routing:
    """Route ``features`` (G, B, D) with ``model``'s router: residuals against its routing basis (centred and
    whitened when the router is), the selection its mode makes, and, with the unknown-task detector on, the
    samples whose score passes the threshold flagged (task -1, weight 0)."""
    router = model.router_config
    residuals = routing_residuals(features, model.routing_basis, model.routing_centre, model.routing_whitener)
    if residuals.shape[0] == 1:
        residuals = residuals[0]
    routing = select_tasks(residuals, router)
    if router.unknown == "off":
        return routing
    scores = unknown_scores(residuals, routing.task_ids[:, 0], model.routing_scale,
                            squared=model.routing_whitener is not None)
    flagged = scores > router.unknown_threshold
    return Routing(task_ids=routing.task_ids.masked_fill(flagged.unsqueeze(1), -1),
                   weights=routing.weights.masked_fill(flagged.unsqueeze(1), 0.0),
                   residuals=residuals, unknown=flagged, unknown_scores=scores)


def forced_routing(tasks: list, task_ids, batch: int, device) -> Routing:
    """The routing of tasks the caller forces (uniform weights over each sample's set; no residuals)."""
    ids = forced_task_ids(task_ids, tasks, batch).to(device)
    valid = ids >= 0
    weights = valid.float() / valid.sum(1, keepdim=True).clamp_min(1)
    return Routing(task_ids=ids, weights=weights, residuals=None)


def empty_routing(model, images: torch.Tensor, task_ids) -> Routing:
    """The routing of an empty batch: the shapes a routed or forced batch has, with 0 samples."""
    if task_ids is not None:
        ids = forced_task_ids(task_ids, model.tasks, 0).to(images.device)
        return Routing(ids, ids.new_zeros(ids.shape, dtype=torch.float32), None)
    K, T, G = model.router_config.slots, len(model.tasks), len(model.routing_layers)
    shape = (0, T) if G == 1 else (G, 0, T)
    return Routing(torch.zeros(0, K, dtype=torch.long, device=images.device),
                   torch.zeros(0, K, device=images.device), torch.zeros(shape, device=images.device))
