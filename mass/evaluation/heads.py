"""Zero-shot classification heads from a CLIP text tower, carrying their class names.

Per class: embed every prompt template filled with the class name (text tower + text projection), normalise
each embedding, average over templates, normalise again. A head is the (C, D) stack of these unit vectors;
``classify`` scores an L2-normalised image embedding against it (times the logit scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

#: Generic prompt templates (used for tasks without templates of their own).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
)

Templates = Union[None, Sequence[str], Mapping[str, Sequence[str]]]


@dataclass(frozen=True, eq=False)
class Head:
    """One task's classifier: unit-norm class embeddings (C, D) and the C class names, in label order."""

    classes: tuple[str, ...]
    weight: torch.Tensor

    def __post_init__(self):
        if self.weight.dim() != 2 or self.weight.shape[0] != len(self.classes):
            raise ValueError(f"a head needs one (D,) row per class: {len(self.classes)} classes, weight "
                             f"{tuple(self.weight.shape)}")


class Heads(dict):
    """``{task: Head}``. :meth:`as_tensors` gives what ``mass.merge(heads=...)`` and ``MASSModel`` take."""

    def as_tensors(self) -> dict[str, torch.Tensor]:
        return {task: head.weight for task, head in self.items()}

    def classes(self, task: str) -> list[str]:
        return list(self[task].classes)

    def labels(self, task_ids: torch.Tensor, predictions: torch.Tensor, tasks: Sequence[str]) -> list[Optional[str]]:
        """Class names of predictions made by the heads of ``task_ids`` (``Classification.task_ids`` and
        ``.predictions`` of a MASSModel whose task order is ``tasks``); None where no head was chosen."""
        out = []
        for t, p in zip(task_ids.tolist(), predictions.tolist()):
            out.append(self[tasks[t]].classes[p] if t >= 0 else None)
        return out


def head_tensors(heads: Mapping) -> dict[str, torch.Tensor]:
    """``{task: (C, D) tensor}`` from :class:`Heads`, ``{task: Head}`` or ``{task: tensor}``."""
    return {t: (h.weight if isinstance(h, Head) else torch.as_tensor(h)) for t, h in heads.items()}


def templates_for(task: str, templates: Templates) -> list[str]:
    """The prompt templates a head of ``task`` is built from (``templates`` as :func:`zero_shot_heads` takes it)."""
    if templates is None:
        from mass.evaluation.presets import task_templates

        chosen = task_templates(task) or DEFAULT_TEMPLATES
    elif isinstance(templates, Mapping):
        if task not in templates:
            raise ValueError(f"templates has no entry for task {task!r} (tasks with templates: {sorted(templates)})")
        chosen = templates[task]
    elif isinstance(templates, str):
        raise TypeError("templates must be a list of strings such as ['a photo of a {}.'], not one string")
    else:
        chosen = templates
    chosen = list(chosen)
    bad = [t for t in chosen if not isinstance(t, str) or t.count("{}") != 1]
    if not chosen or bad:
        raise ValueError(f"templates for task {task!r} must be non-empty strings with exactly one '{{}}', got {bad or chosen}")
    return chosen


@torch.no_grad()
def encode_text(clip_model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-norm text embeddings (N, D) in the image embedding space: HF ``CLIPModel`` (text tower + text
    projection, tokenizer called with padding) or an open_clip model (``encode_text`` of the token ids)."""
    device = next(clip_model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        if hasattr(clip_model, "text_model") and hasattr(clip_model, "text_projection"):
            tokens = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt").to(device)
            pooled = clip_model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens.get("attention_mask")).pooler_output
            emb = clip_model.text_projection(pooled)
        elif hasattr(clip_model, "encode_text"):
            emb = clip_model.encode_text(tokenizer(chunk).to(device))
        else:
            raise TypeError(f"{type(clip_model).__name__} has no text tower (want a CLIPModel or an open_clip CLIP)")
        out.append(F.normalize(emb.float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def zero_shot_heads(
    clip_model,
    tokenizer,
    class_names: Mapping[str, Sequence[str]],
    templates: Templates = None,
    batch_size: int = 256,
) -> Heads:
    """Per task, the zero-shot head of its classes: normalised mean over templates of the normalised text
    embeddings. ``templates``: None (each known task's own, else :data:`DEFAULT_TEMPLATES`), one list for
    every task, or ``{task: [...]}``. Each template holds one ``{}`` for the class name."""
    if not isinstance(class_names, Mapping) or not class_names:
        raise ValueError("class_names must be a non-empty dict: task -> list of class names")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    heads = Heads()
    for task, classes in class_names.items():
        if isinstance(classes, str):
            raise TypeError(f"class names of task {task!r} must be a list of strings, not one string")
        classes = tuple(classes)
        bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
        if not classes or bad:
            raise ValueError(f"task {task!r} needs non-empty class-name strings, got {bad or list(classes)}")
        tpls = templates_for(task, templates)
        prompts = [tpl.format(c) for c in classes for tpl in tpls]
        emb = encode_text(clip_model, tokenizer, prompts, batch_size).view(len(classes), len(tpls), -1)
        heads[task] = Head(classes, F.normalize(emb.mean(1), dim=-1).cpu())
    return heads
