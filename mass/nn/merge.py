"""``mass.merge``: the one entry point from a pretrained CLIP and T fine-tuned checkpoints to a :class:`MASSModel`.

What users hold is mapped onto one vision encoder (:func:`mass.nn.clip.prepare`), everything checkable is checked
before the SVDs, the deltas are decomposed (:func:`mass.method.decompose.decompose`), the encoder is wrapped, and
the router is calibrated when support images are given.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from mass.files.checkpoints import Checkpoint
from mass.method.decompose import Rank, decompose, resolve_rank
from mass.method.half_banks import resolve_bank_dtype, to_bank_dtype
from mass.method.router import RouterConfig
from mass.method.support import check_support
from mass.nn.adapters import detect
from mass.nn.clip import prepare
from mass.nn.model import MASSModel
from mass.nn.pass_inputs import check_flags, check_heads, check_router, check_task_names


def merge(
    pretrained,
    finetuned: Mapping[str, Checkpoint],
    rank: Rank = None,
    router: Optional[RouterConfig] = None,
    heads: Optional[Mapping[str, torch.Tensor]] = None,
    reuse_prefix: bool = False,
    keep_merged: str = "prefix",
    progress: bool = True,
    support: Optional[Mapping[str, torch.Tensor]] = None,
    solver: str = "auto",
    device=None,
    bank_dtype=None,
) -> MASSModel:
    """Decompose T fine-tuned checkpoints of ``pretrained`` and wrap it (in place) as a :class:`MASSModel`.

    ``pretrained``: a CLIP vision model, a ``CLIPModel`` (its vision tower with the projection is wrapped, sharing
    the CLIP model's modules), an open_clip-structured tower, or a directory / hub id of one
    (:func:`mass.nn.clip.prepare`); ``finetuned``: ``{task: module, state dict, file, directory or hub id}``.
    Everything that can be checked without the SVDs (model structure, router layers against the depth, heads
    against the tasks and the embedding width, task names, options, the support images) is checked before
    they run. ``support={task: (N, C, H, W) images}`` calibrates the router on them (:meth:`MASSModel.calibrate`):
    needed for ``RouterConfig(basis="support")`` and the unknown-task detector. ``solver`` and ``device`` choose
    how and where the SVDs run (see :func:`mass.decompose`). ``bank_dtype``: None (the tasks' values in the
    model's dtype), ``"bfloat16"`` or ``"float16"``: the task factors and per-task values are stored and applied
    in that precision while θ0 keeps its dtype (:mod:`mass.method.half_banks`: the error bound)."""
    bank_dtype = resolve_bank_dtype(bank_dtype)
    pretrained, finetuned = prepare(pretrained, finetuned)
    arch = detect(pretrained)  # unsupported or already wrapped
    router = check_router(router)
    router.resolved_layers(arch.n_blocks)
    check_flags(reuse_prefix, keep_merged, 64)
    if isinstance(finetuned, Mapping) and finetuned:
        tasks = check_task_names(list(finetuned))
        check_heads(heads, tasks, arch.output_dim)
        if support is not None:
            check_support(support, tasks)
        for key, value in pretrained.state_dict().items():  # the rank fits every matrix
            if value.is_floating_point() and value.dim() == 2:
                resolve_rank(rank, tuple(value.shape), len(tasks), key)
    if support is None and (router.basis == "support" or router.unknown != "off"):
        raise ValueError("RouterConfig(basis='support') and the unknown-task detector need support={task: images}")
    dec = to_bank_dtype(decompose(pretrained, finetuned, rank=rank, progress=progress, solver=solver,
                                  device=device), bank_dtype)
    if support is None:
        return MASSModel(pretrained, dec, router=router, heads=heads, reuse_prefix=reuse_prefix,
                         keep_merged=keep_merged)
    norm = "l2" if router.basis == "support" else router.norm
    plain = dataclasses.replace(router, basis="fc1", unknown="off", norm=norm, whiten=0.0)
    model = MASSModel(pretrained, dec, router=plain, heads=heads, reuse_prefix=reuse_prefix, keep_merged=keep_merged)
    return model.calibrate(support, router)
