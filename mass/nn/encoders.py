"""The encoder as data, so a saved model can rebuild it with nothing else (issue 22).

:func:`encoder_spec` describes a supported encoder module as ``{"kind", "class", "config"}``: an HF CLIP vision
model by its class and ``CLIPVisionConfig``; an open_clip ``VisionTransformer``-structured tower by the
constructor arguments of :class:`mass.method.synthetic.OpenCLIPStyleViT`, the replica of that structure and
forward this project uses (open_clip itself cannot be imported beside the CPU torch). An open_clip module is
described only when the replica reproduces it: the same state-dict keys and shapes, exact GELU, CLS pooling.
:func:`build_encoder` builds the module back (weights are then loaded from the saved θ0).
:func:`default_preprocess` is CLIP's image preprocessing at the encoder's image size.
"""
from __future__ import annotations

import json
import math
from typing import Optional

import torch
from torch import nn

from mass.method.synthetic import OpenCLIPStyleViT

# OpenAI CLIP's normalisation (also what a CLIP image processor configuration without its own uses).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPVisionTransformer")
OPEN_CLIP_CLASS = "OpenCLIPStyleViT"


class EncoderSpecError(ValueError):
    """An encoder description that cannot be built back into a module."""


def encoder_spec(model: nn.Module, kind: str) -> Optional[dict]:
    """``{"kind", "class", "config"}`` describing ``model`` (an unwrapped encoder of architecture ``kind``), or
    None when it cannot be described so that :func:`build_encoder` rebuilds the same module."""
    if kind == "hf":
        config = getattr(model, "config", None)
        if type(model).__name__ not in HF_CLASSES or type(config).__name__ != "CLIPVisionConfig":
            return None
        return {"kind": "hf", "class": type(model).__name__, "config": json.loads(config.to_json_string(False))}
    if kind == "open_clip":
        return _open_clip_spec(model)
    return None


def _open_clip_spec(model: nn.Module) -> Optional[dict]:
    try:
        width, _, patch, _ = model.conv1.weight.shape
        grid = math.isqrt(model.positional_embedding.shape[0] - 1)
        block = model.transformer.resblocks[0]
        config = {"image_size": int(patch * grid), "patch_size": int(patch), "width": int(width),
                  "layers": len(model.transformer.resblocks), "heads": int(block.attn.num_heads),
                  "mlp_ratio": block.mlp.c_fc.out_features / width, "output_dim": int(model.proj.shape[1]),
                  "batch_first": bool(block.attn.batch_first)}
        exact_gelu = all(type(b.mlp.gelu) is nn.GELU and b.mlp.gelu.approximate == "none"
                         for b in model.transformer.resblocks)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if not exact_gelu or getattr(model, "pool_type", "tok") != "tok" or getattr(model, "final_ln_after_pool", False):
        return None
    with torch.device("meta"):
        replica = OpenCLIPStyleViT(**config)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if mine != {k: tuple(v.shape) for k, v in replica.state_dict().items()}:
        return None
    return {"kind": "open_clip", "class": OPEN_CLIP_CLASS, "config": config}


def build_encoder(spec: dict) -> nn.Module:
    """The encoder module ``spec`` describes, in eval mode, with freshly initialised weights."""
    kind, cls, config = spec.get("kind"), spec.get("class"), spec.get("config")
    try:
        if kind == "hf" and cls in HF_CLASSES:
            import transformers

            vision_config = transformers.CLIPVisionConfig.from_dict(dict(config))
            return getattr(transformers, cls)(vision_config).eval()
        if kind == "open_clip" and cls == OPEN_CLIP_CLASS:
            return OpenCLIPStyleViT(**config).eval()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise EncoderSpecError(f"cannot build the saved {kind} encoder {cls}: {exc}") from exc
    raise EncoderSpecError(f"unsupported saved encoder kind/class {kind!r}/{cls!r} (supported: hf {HF_CLASSES}, "
                           f"open_clip {OPEN_CLIP_CLASS})")


def image_size(spec: dict) -> int:
    """The square input size the described encoder takes."""
    size = spec["config"].get("image_size")
    if type(size) is not int or size < 1:
        raise EncoderSpecError(f"the saved encoder config has no usable image_size (got {size!r})")
    return size


def default_preprocess(size: int) -> dict:
    """CLIP's preprocessing at ``size``: bicubic resize of the shortest edge, centre crop, OpenAI mean and std
    (the fields of :class:`mass.evaluation.data.ClipPreprocess`)."""
    return {"shortest_edge": size, "crop": [size, size], "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "resample": 3, "rescale": 1 / 255, "do_resize": True, "do_center_crop": True, "do_normalize": True}
