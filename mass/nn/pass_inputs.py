"""What a MASS model is given, checked before it is used: options, heads, task names, images and task ids.

Every check raises a ``ValueError`` or ``TypeError`` that names the problem; nothing is guessed silently.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

from mass.method.router import RouterConfig
from mass.nn.samples import resize_batch, take_samples


def check_router(router) -> RouterConfig:
    if router is None:
        return RouterConfig()
    if not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a mass.RouterConfig, got {type(router).__name__}")
    return router


def check_flags(reuse_prefix, keep_merged, max_cached_combos) -> None:
    if not isinstance(reuse_prefix, (bool, np.bool_)):
        raise TypeError(f"reuse_prefix must be a bool, got {type(reuse_prefix).__name__} {reuse_prefix!r}")
    if keep_merged not in ("prefix", "all") or not isinstance(keep_merged, str):
        raise ValueError(f"keep_merged must be 'prefix' or 'all', got {keep_merged!r}")
    if isinstance(max_cached_combos, (bool, np.bool_)) or not isinstance(max_cached_combos, (int, np.integer)) \
            or max_cached_combos < 1:
        raise ValueError(f"max_cached_combos must be an int >= 1, got {max_cached_combos!r}")


def check_task_names(tasks) -> list[str]:
    tasks = list(tasks)
    if not tasks:
        raise ValueError("a MASS model needs at least one task")
    bad = [t for t in tasks if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"task names must be non-empty strings, got {bad[:5]}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be distinct, got {tasks}")
    return tasks


def check_heads(heads, tasks: list[str], width: int) -> Optional[dict[str, torch.Tensor]]:
    """One finite float (C, D) head per task, C ≥ 1 classes, D the model's embedding width; detached copies."""
    if heads is None:
        return None
    if not isinstance(heads, Mapping):
        raise TypeError(f"heads must be a dict {{task: (C, D) tensor}}, got {type(heads).__name__}")
    unknown = sorted(set(heads) - set(tasks), key=str)
    missing = [t for t in tasks if t not in heads]
    if unknown or missing:
        raise ValueError(f"heads must have one entry per task; unknown {unknown}, missing {missing}")
    out = {}
    for t in tasks:
        try:
            h = torch.as_tensor(getattr(heads[t], "weight", heads[t]))  # a mass.evaluation.heads.Head too
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"head for task {t!r} must be a (C, D) float tensor: {exc}") from None
        if h.dim() != 2 or not h.is_floating_point():
            raise ValueError(f"head for task {t!r} must be a float (C, D) tensor, got {h.dtype} {tuple(h.shape)}")
        if h.shape[0] == 0:
            raise ValueError(f"head for task {t!r} has 0 classes (shape {tuple(h.shape)}); it needs at least one")
        if h.shape[1] != width:
            raise ValueError(f"head for task {t!r} takes {h.shape[1]}-d embeddings but the model's image embedding "
                             f"is {width}-d")
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"head for task {t!r} must be finite (it contains NaN or Inf)")
        out[t] = h.detach().clone()
    return out


def check_decomposition(dec, model) -> None:
    """Every floating parameter of ``model`` has task values of matching shape for each of the T tasks."""
    T = len(dec.tasks)
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        if key in dec.lowrank:
            f = dec.lowrank[key]
            shape = (f.U.shape[0], f.U.shape[1], f.V.shape[2]) if f.U.dim() == 3 and f.V.dim() == 3 else None
            if shape != (T, *value.shape) or tuple(f.S.shape) != (T, f.U.shape[2]) or f.V.shape[:2] != f.S.shape:
                raise ValueError(f"the decomposition's factors for {key!r} do not fit the model's {tuple(value.shape)} "
                                 f"weight and {T} tasks (U {tuple(f.U.shape)}, S {tuple(f.S.shape)}, "
                                 f"V {tuple(f.V.shape)})")
        elif key in dec.dense:
            if tuple(dec.dense[key].shape) != (T, *value.shape):
                raise ValueError(f"the decomposition's values for {key!r} have shape {tuple(dec.dense[key].shape)}, "
                                 f"expected {(T, *value.shape)} ({T} tasks)")
        else:
            raise ValueError(f"the decomposition holds no task values for {key!r}: it was not made from this model")


# ---------------------------------------------------------------------------------------------- per call
def find_images(model, inputs: tuple, kwargs: dict) -> torch.Tensor:
    """The image batch of a call (the first tensor argument, else ``pixel_values``/``x``), checked: a real
    device, 4-D, the channel count the patch embedding takes."""
    images = next((v for v in inputs if isinstance(v, torch.Tensor)), None)
    if images is None:
        images = next((kwargs[k] for k in ("pixel_values", "x") if isinstance(kwargs.get(k), torch.Tensor)), None)
    if images is None:
        images = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if images is None:
        name = "pixel_values" if model.arch.kind == "hf" else "x"
        raise TypeError(f"no images given: the argument {name!r} is missing (call model({name}=images) or "
                        f"model(images) with a (batch, {model.arch.in_channels}, height, width) tensor)")
    if images.is_meta or model.banks.cls_delta.is_meta:
        raise RuntimeError("a MASSModel on the meta device holds no values and cannot run: materialise it "
                           "(e.g. load real weights) and pass real images")
    channels = model.arch.in_channels
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor (batch, {channels} channels, height, width); got shape "
                         f"{tuple(images.shape)}")
    if images.shape[1] != channels:
        raise ValueError(f"images have {images.shape[1]} channels but the model takes {channels} "
                         f"(shape {tuple(images.shape)}; expected (batch, {channels}, height, width))")
    if not images.is_floating_point() and (model.arch.kind != "hf" or images.is_complex() or images.dtype == torch.bool):
        # HF's CLIP casts integer images (uint8 pixel values, say) to float as they are, and so does MASS
        # (README, Guarantees); an open_clip tower's conv refuses them, and so does MASS, naming the dtype.
        raise TypeError(f"images are {images.dtype}: this {model.arch.kind} model takes floating-point images "
                        f"(preprocessed pixel values), e.g. images.float() after your normalisation")
    size = model.arch.image_size
    if size is not None and tuple(images.shape[-2:]) != size:
        raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but the model takes {size[0]}x{size[1]} "
                         f"images (shape {tuple(images.shape)}); resize them to the model's image size")
    return images


def empty_like_output(model, inputs: tuple, kwargs: dict, mode: str = "base"):
    """The output an empty batch gets: the structure, dtypes and trailing shapes of a one-sample output, with
    0 samples (one forward of a blank sample finds them)."""
    with model.state.use(mode):
        probe = model.model(*resize_batch(inputs, 1), **resize_batch(kwargs, 1))
    return take_samples(probe, torch.zeros(0, dtype=torch.long), 1)


def _index_of(value, tasks: list[str]) -> int:
    """A task given by name or index (bools refused)."""
    if isinstance(value, str):
        if value not in tasks:
            raise ValueError(f"unknown task name(s) {[value]}; known tasks: {tasks}")
        return tasks.index(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"a task is given by its name or its index, got {type(value).__name__} {value!r}")
    return int(value)


def forced_task_ids(task_ids, tasks: list[str], batch: int) -> torch.Tensor:
    """Forced tasks as a (B, K) LongTensor padded with -1. Accepted: one task name or index for the whole
    batch; a sequence with one name / index / set of them per sample; an integer tensor or numpy array (B,)
    or (B, K) with -1 as padding."""
    T = len(tasks)
    if isinstance(task_ids, np.ndarray):
        task_ids = torch.from_numpy(task_ids) if task_ids.dtype.kind in "biuf" else task_ids.tolist()
    if isinstance(task_ids, torch.Tensor) and task_ids.dim() == 0:
        task_ids = task_ids.item() if not task_ids.dtype.is_floating_point else task_ids.view(1)
    if isinstance(task_ids, (str, int, np.integer)) and not isinstance(task_ids, (bool, np.bool_)):
        index = _index_of(task_ids, tasks)
        if not 0 <= index < T:
            raise ValueError(f"task index {index} does not exist: the model has tasks 0..{T - 1} ({tasks})")
        return torch.full((batch, 1), index, dtype=torch.long)
    if isinstance(task_ids, torch.Tensor):
        if task_ids.dtype == torch.bool or task_ids.is_floating_point() or task_ids.is_complex() \
                or task_ids.dim() not in (1, 2):
            raise ValueError(f"task_ids must be an integer tensor (a LongTensor) (B,) or (B, K), got "
                             f"{task_ids.dtype} {tuple(task_ids.shape)}")
        ids = task_ids.long() if task_ids.dim() == 2 else task_ids.long().unsqueeze(1)  # (B, K); B may be 0
    elif isinstance(task_ids, (list, tuple)):
        rows = []
        for row in task_ids:
            items = [row] if isinstance(row, (str, int, np.integer)) else row
            if not isinstance(items, (list, tuple, np.ndarray, torch.Tensor)):
                raise TypeError(f"each sample's tasks must be a name, an index or a list of them, got {row!r}")
            items = items.tolist() if isinstance(items, (np.ndarray, torch.Tensor)) else list(items)
            unknown = [n for n in items if isinstance(n, str) and n not in tasks]
            if unknown:
                raise ValueError(f"unknown task name(s) {unknown}; known tasks: {tasks}")
            rows.append([_index_of(v, tasks) for v in items])
        width = max([1] + [len(r) for r in rows])  # (a list: Dynamo cannot trace max(genexpr, default=))
        ids = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long).view(len(rows), width)
    else:
        raise TypeError(f"task_ids must be a task name, an index, a list or an integer tensor, got "
                        f"{type(task_ids).__name__}")
    bad = (ids < -1) | (ids >= T)
    ordered = ids.sort(1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if torch.compiler.is_compiling():
        # Inside a compiled graph the checks run on the device (reading the values back is a graph break): a
        # bad id still fails the call, with the rule it broke, before any pass runs.
        torch._assert_async(~bad.any(), f"task_ids must lie in [-1, {T - 1}] (-1 = padding)")
        torch._assert_async(~repeated.any(), "a sample names a task twice in its set of task_ids")
    elif bool(bad.any()):
        raise ValueError(f"task_ids must lie in [-1, {T - 1}] (-1 = padding); got {ids[bad][:5].tolist()}")
    elif bool(repeated.any()):
        row = int(repeated.any(1).nonzero()[0, 0])
        raise ValueError(f"sample {row} names a task twice in its set: {ids[row].tolist()}")
    if ids.shape[0] != batch:
        raise ValueError(f"task_ids names {ids.shape[0]} samples but the batch has {batch}")
    return ids
