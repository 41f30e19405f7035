"""The samples of an encoder's inputs and outputs, moved as a batch: reordered, joined, resized. The second pass
groups a mixed batch by task and puts it back in order with these; the unknown-task pass joins two outputs."""
from __future__ import annotations

import torch


def take_samples(obj, order: torch.Tensor, batch: int, axis: int = 0):
    """Reorder the samples of every tensor in ``obj`` (tensors, tuples, dicts, HF ModelOutputs)."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() > axis and obj.shape[axis] == batch:
            return obj.index_select(axis, order.to(obj.device))
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(take_samples(v, order, batch, axis) for v in obj)
    if isinstance(obj, list):
        return [take_samples(v, order, batch, axis) for v in obj]
    if isinstance(obj, dict):
        items = {k: take_samples(v, order, batch, axis) for k, v in obj.items()}
        return type(obj)(**items) if type(obj) is not dict else items
    return obj


def join_outputs(a, b, n_a: int, n_b: int):
    """Two outputs of one model on disjoint sample subsets (n_a then n_b samples) as one output."""
    if isinstance(a, torch.Tensor):
        if a.dim() > 0 and a.shape[0] == n_a and isinstance(b, torch.Tensor) and b.dim() > 0 and b.shape[0] == n_b:
            return torch.cat([a, b.to(a.dtype)], 0)
        return a
    if isinstance(a, tuple) and not hasattr(a, "_fields"):
        return tuple(join_outputs(x, y, n_a, n_b) for x, y in zip(a, b))
    if isinstance(a, list):
        return [join_outputs(x, y, n_a, n_b) for x, y in zip(a, b)]
    if isinstance(a, dict):
        items = {k: join_outputs(v, b[k], n_a, n_b) if k in b else v for k, v in a.items()}
        return type(a)(**items) if type(a) is not dict else items
    return a


def resize_batch(obj, size: int):
    """Every tensor with an empty batch (dim 0 of size 0) replaced by zeros with ``size`` samples."""
    if isinstance(obj, torch.Tensor):
        return obj.new_zeros((size, *obj.shape[1:])) if obj.dim() > 0 and obj.shape[0] == 0 else obj
    if isinstance(obj, tuple):
        return tuple(resize_batch(v, size) for v in obj)
    if isinstance(obj, list):
        return [resize_batch(v, size) for v in obj]
    if isinstance(obj, dict):
        return {k: resize_batch(v, size) for k, v in obj.items()}
    return obj
