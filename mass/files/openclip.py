"""open_clip vision checkpoints → HF ``CLIPVisionModel`` key names (and tensor layouts)."""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

from mass.files.checkpoints import CheckpointError, check_unmapped

_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_RENAMES = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def is_openclip_state_dict(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any("transformer.resblocks." in k for k in keys) and any(k.endswith("conv1.weight") for k in keys)


def _bare_openclip(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The vision tower's keys without their parent prefix such as ``visual.``, and that prefix. A state dict
    holding the tower twice (``visual.`` and ``ema.visual.``, say) is refused: which copy is meant is not ours
    to guess."""
    prefixes = sorted(k[: -len("conv1.weight")] for k in sd if k.endswith("conv1.weight"))
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if len(prefixes) != 1:
        raise CheckpointError(
            f"open_clip checkpoint holds {len(prefixes)} vision towers (prefixes {prefixes} before 'conv1.weight'); "
            f"pass a state dict with exactly one")
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix


def openclip_to_hf(sd: Mapping[str, torch.Tensor], target_keys: Iterable[str],
                   name: str = "open_clip checkpoint") -> dict[str, torch.Tensor]:
    """Rename (and split the fused q/k/v, transpose ``proj``) so the result has exactly ``target_keys``.

    Nothing is dropped unseen: a vision key left over (a block of a deeper tower, a ``proj`` the target lacks)
    is refused, named; keys outside the vision tower must be a full CLIP model's text tower (skipped with a
    warning, :func:`mass.files.checkpoints.check_unmapped`)."""
    bare, prefix = _bare_openclip(sd)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in bare.items():
        origin_key = prefix + key
        if key in _RENAMES:
            out[_RENAMES[key]] = value
            origin[_RENAMES[key]] = origin_key
        elif key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
            origin["visual_projection.weight"] = origin_key
        elif (m := _BLOCK.match(key)) is not None:
            i, rest = m.groups()
            base = f"encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{proj}.{kind}"] = part.contiguous()
                    origin[f"{base}self_attn.{proj}.{kind}"] = origin_key
                continue
            module, _, param = rest.rpartition(".")
            if module not in _BLOCK_RENAMES:
                raise CheckpointError(f"open_clip key {key!r} has no HF CLIP counterpart")
            out[f"{base}{_BLOCK_RENAMES[module]}.{param}"] = value
            origin[f"{base}{_BLOCK_RENAMES[module]}.{param}"] = origin_key
        else:
            raise CheckpointError(f"open_clip key {key!r} has no HF CLIP counterpart")
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for target in target_keys:
        hits = [b for b in out if target == b or target.endswith("." + b)]
        if len(hits) != 1:
            raise CheckpointError(f"cannot map HF key {target!r} from the open_clip checkpoint ({len(hits)} candidates)")
        mapped[target] = out[hits[0]]
        used.add(hits[0])
    left = {origin[k] for k in out if k not in used} - {origin[k] for k in used}
    outside = {k for k in sd if not k.startswith(prefix)}
    check_unmapped(name, left | outside, prefix, what=" (open_clip names)")
    return mapped
