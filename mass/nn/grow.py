"""Grow and shrink a built MASS model (``MASSModel.add_tasks`` / ``remove_tasks``) without merging again.

Only the new tasks' deltas are decomposed; every other task's factors are read back from the model and reused,
sliced when the rank rule asks for less (:mod:`mass.method.task_sets` states the policy). The result is a new
:class:`~mass.nn.model.MASSModel` on a fresh copy of the encoder, built exactly as a merge builds one from the
combined decomposition: the first-pass TSV-M weights from the stored factors, the banks, the heads, the routing
basis. The model it starts from is only read: if anything fails it is as it was, and it stays usable.

Router calibrations (``support``): a fit is a function of every task's support images through the first pass,
which the task set changes (the TSV-M weights, the fc1 ranks, the whitener's pooled covariance), so a new one is
fitted on ``support={task: images}`` for every task of the new model. One case needs no images: removing tasks
from a fit of θ0's features (``features="pretrained"``) without whitening, whose per-task parts do not depend on
the other tasks; they are sliced. A router that needs a calibration is refused without one.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from mass.files.checkpoints import Checkpoint
from mass.method.decompose import TaskDecomposition, decompose
from mass.method.half_banks import to_bank_dtype
from mass.method.support import check_support
from mass.method.task_sets import grown_ranks, joined, sliced, without
from mass.nn.adapters import detect
from mass.nn.clip import prepare
from mass.nn.pass_inputs import check_heads, check_task_names


def fresh_encoder(model, dec: TaskDecomposition, base_model: Optional[nn.Module] = None) -> nn.Module:
    """An unwrapped encoder of ``model``'s architecture holding θ0: ``base_model`` (θ0 is loaded into it; it
    is refused if it is already wrapped or does not take θ0's keys), else a new instance of a HF model's class
    built from its config without initialising weights."""
    wrapped = model.model
    if base_model is None:
        config = getattr(wrapped, "config", None)
        if config is None or not hasattr(type(wrapped), "config_class"):
            raise ValueError(f"cannot build a fresh {type(wrapped).__name__} to hold the new model: pass "
                             f"base_model=<a fresh copy of the pretrained encoder>")
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from transformers.modeling_utils import no_init_weights
        with no_init_weights():
            base_model = type(wrapped)(config)
        for name, buffer in base_model.named_buffers():  # non-persistent buffers (position ids): the model's
            buffer.copy_(wrapped.get_buffer(name))
    detect(base_model)
    reference = next(v for v in dec.base.values() if v.is_floating_point())
    base_model.to(device=reference.device, dtype=reference.dtype)  # built in the default dtype
    try:
        base_model.load_state_dict(dec.base, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"base_model does not match the model's architecture: {exc}") from exc
    return base_model.eval()


def _calibration(model, new_tasks: list, support, exact_slice: Optional[list]):
    """(support images to calibrate on, or None; a fit carried over, or None) for the new model (see above)."""
    router = model.router_config
    needs = router.basis == "support" or router.unknown != "off"
    if support is not None:
        return check_support(support, new_tasks), None
    fit = model.support
    if not needs:
        return None, None
    if exact_slice is not None and fit is not None and fit.features == "pretrained" and fit.whiten == 0:
        idx = torch.tensor(exact_slice)
        pick = lambda t, axis: None if t is None else t.index_select(axis, idx.to(t.device))  # noqa: E731
        return None, dataclasses.replace(fit, basis=pick(fit.basis, 1), centre=pick(fit.centre, 1),
                                         scale=pick(fit.scale, 1))
    what = "basis='support'" if router.basis == "support" else f"unknown={router.unknown!r}"
    raise ValueError(f"this model's router (RouterConfig({what})) is calibrated on support images, and its fit "
                     f"depends on the set of tasks: pass support={{task: (N, C, H, W) images}} for every task of "
                     f"the new model {new_tasks}")


def _rebuild(model, dec: TaskDecomposition, heads, support, fit, base_model, class_names=None):
    """The new model: ``dec`` on a fresh encoder, ``model``'s settings (router, flags, image preprocessing), the
    given heads and class names, calibrated on ``support`` or given ``fit``."""
    encoder = fresh_encoder(model, dec, base_model)
    router = model.router_config
    kwargs = dict(heads=heads, reuse_prefix=model.reuse_prefix, keep_merged=model.keep_merged,
                  max_cached_combos=model.max_cached_combos, class_names=class_names,
                  preprocessing=model.preprocessing)
    if support is None:
        return type(model)(encoder, dec, router=router, support=fit, **kwargs)
    norm = "l2" if router.basis == "support" else router.norm
    plain = dataclasses.replace(router, basis="fc1", unknown="off", norm=norm, whiten=0.0)
    return type(model)(encoder, dec, router=plain, **kwargs).calibrate(support, router)


def _heads_of(model) -> Optional[dict]:
    return None if model.heads is None else {t: model.head(t) for t in model.tasks}


def _class_names_of(model, tasks: list, new: Optional[Mapping] = None, new_heads=None) -> Optional[dict]:
    """The new model's class names: ``model``'s for the tasks it keeps, and for added tasks ``new`` (or the class
    names ``mass.Heads`` carry). A model with class names needs them for every added task: a partial set would
    leave the saved directory unable to label those tasks, so it is refused rather than dropped. A model without
    class names stays without (``new`` given for it is refused by MASSModel as a partial set)."""
    old = model.class_names
    if old is None:
        return new
    added = [t for t in tasks if t not in model.tasks]
    if new is None and new_heads is not None and added and all(hasattr(new_heads[t], "classes") for t in added):
        new = {t: new_heads[t].classes for t in added}
    if added and (new is None or any(t not in new for t in added)):
        raise ValueError(f"this model has class names: pass class_names={{task: [names]}} for the new task(s) "
                         f"{added} (or heads built by mass.zero_shot_heads, which carry them)")
    return {t: (old[t] if t in old else list(new[t])) for t in tasks}


@torch.no_grad()
def add_tasks(model, finetuned: Mapping[str, Checkpoint], heads: Optional[Mapping[str, torch.Tensor]] = None,
              support: Optional[Mapping[str, torch.Tensor]] = None, solver: str = "auto", device=None,
              progress: bool = False, base_model: Optional[nn.Module] = None,
              class_names: Optional[Mapping[str, Sequence[str]]] = None):
    """A new model with ``finetuned``'s tasks added after ``model``'s (see the module docstring)."""
    if not isinstance(finetuned, Mapping) or not finetuned:
        raise ValueError("finetuned must be a non-empty dict: task name -> checkpoint")
    clash = [t for t in finetuned if t in model.tasks]
    if clash:
        raise ValueError(f"task(s) {clash} are already in the model (remove them first to replace them)")
    tasks = check_task_names(list(model.tasks) + list(finetuned))
    old_heads = _heads_of(model)
    if (old_heads is None) != (heads is None):
        raise ValueError("the model has heads: pass heads={task: (C, D) tensor} for the new tasks" if heads is None
                         else "the model has no heads: heads for the new tasks cannot be added")
    all_heads = None if heads is None else {**old_heads, **dict(heads)}
    names = _class_names_of(model, tasks, class_names, heads)
    if all_heads is not None:
        check_heads(all_heads, tasks, model.arch.output_dim)
    images, fit = _calibration(model, tasks, support, None)
    dec = model.decomposition()
    ranks = grown_ranks(dec, len(tasks))
    # The new tasks' checkpoints, mapped onto the encoder's keys against θ0 (a fresh encoder: the model's own
    # is wrapped); the same mapping a merge applies.
    scratch = fresh_encoder(model, dec, base_model)
    _, aligned = prepare(scratch, finetuned)
    new = decompose(scratch, aligned, rank=None, ranks=ranks, progress=progress, solver=solver, device=device)
    if dec.bank_dtype is not None:
        new = to_bank_dtype(new, dec.bank_dtype)
    new = dataclasses.replace(new, rank_rule=dec.rank_rule)
    grown = joined(sliced(dec, ranks), new)
    return _rebuild(model, grown, all_heads, images, fit, scratch, names)


@torch.no_grad()
def remove_tasks(model, names: Sequence[str], support: Optional[Mapping[str, torch.Tensor]] = None,
                 base_model: Optional[nn.Module] = None):
    """A new model without the tasks ``names`` (see the module docstring)."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of task names, got {names!r}")
    dec = without(model.decomposition(), names)
    keep = [model.tasks.index(t) for t in dec.tasks]
    images, fit = _calibration(model, dec.tasks, support, keep)
    old_heads = _heads_of(model)
    heads = None if old_heads is None else {t: old_heads[t] for t in dec.tasks}
    return _rebuild(model, dec, heads, images, fit, base_model, _class_names_of(model, dec.tasks))


@torch.no_grad()
def with_bank_dtype(model, dtype, base_model: Optional[nn.Module] = None):
    """A new model whose banks hold ``model``'s task values rounded to ``dtype`` (:mod:`mass.method.half_banks`).
    Its router calibration, if any, is carried over: it was fitted on features of the unrounded model, which
    the rounding moves by about u_h relative; ``calibrate(support)`` refits it exactly."""
    dec = to_bank_dtype(model.decomposition(), dtype)
    return _rebuild(model, dec, _heads_of(model), None, model.support, base_model,
                    _class_names_of(model, model.tasks))
