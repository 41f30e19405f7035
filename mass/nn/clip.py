"""Turning what CLIP users have into what :func:`mass.merge` takes.

Users hold a full ``CLIPModel`` (or its hub id / directory), a ``CLIPVisionModel(WithProjection)``, fine-tuned
vision towers saved as HF directories (FusionBench's hold no ``visual_projection``), ``.safetensors`` / ``.pt``
files, open_clip-named state dicts, or hub ids. :func:`prepare` maps all of these onto one vision encoder whose
output lives in the text embedding space, and onto fine-tuned state dicts with that encoder's key names.
Parameters a fine-tuned checkpoint lacks outside the transformer blocks count as unchanged (one warning names
them); safetensors files are memory-mapped, so T checkpoints do not sit in memory at once.
"""
from __future__ import annotations

import copy
import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from mass.nn.adapters import detect
from mass.files.checkpoints import (
    Checkpoint, CheckpointError, check_unmapped, copies_of_model, match_keys, open_checkpoint,
)
from mass.files.hub import from_hub, is_hub_id
from mass.files.lora import is_adapter_dir, lora_checkpoint, read_adapter

def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    class _Quiet:
        def __enter__(self):
            self.level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()

        def __exit__(self, *exc):
            hf_logging.set_verbosity(self.level)

    return _Quiet()


# ---------------------------------------------------------------------------------------------- encoders
def is_clip_model(model) -> bool:
    """A two-tower CLIP model: HF ``CLIPModel`` or an open_clip ``CLIP`` (``visual`` + ``token_embedding``)."""
    return isinstance(model, nn.Module) and (
        (hasattr(model, "vision_model") and hasattr(model, "text_model") and hasattr(model, "visual_projection"))
        or (hasattr(model, "visual") and hasattr(model, "token_embedding"))
    )


def vision_encoder(model: nn.Module) -> nn.Module:
    """The vision tower of ``model`` with its projection, so its output lives in the text embedding space.

    A HF ``CLIPModel`` becomes a ``CLIPVisionModelWithProjection`` that *shares* the CLIP model's modules
    (wrapping it for MASS changes the CLIP model's vision tower too; nothing is copied); an open_clip ``CLIP``
    gives its ``visual``. Vision models are returned as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a CLIP model (nn.Module), got {type(model).__name__}")
    if hasattr(model, "visual") and hasattr(model, "token_embedding"):
        return model.visual
    if not is_clip_model(model):
        return model
    from transformers import CLIPVisionModelWithProjection

    vision_config = copy.deepcopy(model.config.vision_config)
    vision_config.projection_dim = model.config.projection_dim
    with torch.device("meta"):  # no weights are allocated: every submodule is replaced by the CLIP model's
        tower = CLIPVisionModelWithProjection(vision_config)
    tower.vision_model = model.vision_model
    tower.visual_projection = model.visual_projection
    return tower.train(model.training)


def load_clip(source, **kwargs) -> nn.Module:
    """A full HF ``CLIPModel`` (vision + text towers) from a module, a local directory or a hub id."""
    if isinstance(source, nn.Module):
        return source
    from transformers import AutoConfig, CLIPModel

    def load():
        config = AutoConfig.from_pretrained(str(source), **kwargs)
        if config.model_type != "clip":  # transformers would build a random text tower around a vision model
            raise CheckpointError(f"{source!r} holds a {config.model_type!r} model, not a full CLIP model "
                                  f"(vision and text towers)")
        with _quiet_transformers():
            return CLIPModel.from_pretrained(str(source), config=config, **kwargs).eval()

    if is_hub_id(source):
        return from_hub("CLIP model", source, load)
    if not Path(source).is_dir():
        raise CheckpointError(f"CLIP model {source!r}: no such directory (and not a hub id)")
    return load()


def load_vision(source, **kwargs) -> nn.Module:
    """A vision encoder whose output is the image embedding, from a module, a local directory or a hub id.

    Directories and hub ids may hold a ``CLIPModel`` (its vision tower and projection are loaded, not the
    text tower), a ``CLIPVisionModelWithProjection`` or a ``CLIPVisionModel``."""
    if isinstance(source, nn.Module):
        return vision_encoder(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a module, a directory or a hub id, got {type(source).__name__}")
    source = str(source)
    from transformers import AutoConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    def load():
        config = AutoConfig.from_pretrained(source, **kwargs)
        with _quiet_transformers():
            if config.model_type == "clip":
                vision_config = config.vision_config
                vision_config.projection_dim = config.projection_dim
                return CLIPVisionModelWithProjection.from_pretrained(source, config=vision_config, **kwargs).eval()
            if config.model_type != "clip_vision_model":
                raise CheckpointError(f"{source!r} holds a {config.model_type!r} model, not a CLIP model")
            archs = " ".join(getattr(config, "architectures", None) or [])
            cls = CLIPVisionModelWithProjection if "WithProjection" in archs else CLIPVisionModel
            return cls.from_pretrained(source, **kwargs).eval()

    if is_hub_id(source):
        return from_hub("pretrained model", source, load)
    if not (Path(source) / "config.json").exists():
        raise CheckpointError(f"pretrained model {source!r}: not a HF model directory (no config.json) nor a hub id")
    return load()


# ---------------------------------------------------------------------------------------------- checkpoints
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def mmap_safetensors(path, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a copy-on-write memory map: nothing is read until used,
    and the pages stay evictable file cache."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (n,) = struct.unpack("<Q", mm[:8])
        if n > len(mm) - 8:
            raise ValueError("header length beyond the end of the file")
        header = json.loads(mm[8:8 + n])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {name!r}: cannot read safetensors file {path}: {exc}") from exc
    start, out = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        if dtype is None or start + end > len(mm) or end < begin:
            raise CheckpointError(f"checkpoint {name!r}: tensor {key!r} in {path} has a bad dtype or offsets")
        if end == begin:
            out[key] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=start + begin)
        if (start + begin) % dtype.itemsize:
            raw = raw.clone()  # unaligned tensor: copy it rather than view it
        out[key] = raw.view(dtype).view(info["shape"])
    return out


def _read_all(name: str, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint file or directory (safetensors memory-mapped)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if len(files) == 1 and files[0].suffix == ".safetensors":
        return mmap_safetensors(files[0], name)
    src = open_checkpoint(name, path)  # .pt / .bin (weights-only, memory-mapped) and its errors
    return {k: src.get(k) for k in src.keys()}


def _state_dict_of(name: str, source: Checkpoint) -> dict[str, torch.Tensor]:
    """A fine-tuned checkpoint of any supported form as a (lazy where possible) state dict."""
    if isinstance(source, nn.Module):
        return dict(vision_encoder(source).state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint {name!r}: unsupported type {type(source).__name__}")
    if is_hub_id(source):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "pytorch_model.bin"]
        source = from_hub(f"fine-tuned checkpoint {name!r}", source,
                          lambda: snapshot_download(str(source), allow_patterns=patterns))
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint {name!r}: no such file {path}")
    return _read_all(name, path)


def _alignments(ref: list[str], src: set[str]):
    """Candidate maps ref key → source key, each with the prefix the source's vision tower sits under: identity,
    or one prefix added to / removed from the ref keys."""
    yield "", lambda r: r
    seen = set()
    for r in ref[:8]:
        for s in src:
            if s != r and s.endswith("." + r):
                p = s[: len(s) - len(r)]
                if ("add", p) not in seen:
                    seen.add(("add", p))
                    yield p, lambda r, p=p: p + r
            if s != r and r.endswith("." + s):
                p = r[: len(r) - len(s)]
                if ("drop", p) not in seen:
                    seen.add(("drop", p))
                    yield "", lambda r, p=p: r[len(p):] if r.startswith(p) else None


def _inside_tower(arch, key: str) -> bool:
    """Whether ``key`` belongs to the vision transformer itself (not a projection put on top of it)."""
    if key == arch.proj_key:
        return False
    return not arch.root_name or key.startswith(arch.root_name + ".")


def align_state_dict(name: str, sd: Mapping[str, torch.Tensor], pretrained: nn.Module,
                     reference: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[dict, list[str]]:
    """``sd`` re-keyed to ``pretrained``'s state-dict keys; keys it lacks take the pretrained value.

    open_clip names are converted first. Parameters on top of the vision transformer (``visual_projection``,
    open_clip's ``proj``) may be missing: they count as unchanged (returned in the list). A missing key of the
    transformer itself or a shape mismatch is an error, and so is a key that maps to nothing in the model (an
    extra block, a projection the model lacks; a full CLIP model's text tower is skipped with a warning).
    """
    from mass.files.openclip import is_openclip_state_dict, openclip_to_hf

    reference = dict(pretrained.state_dict()) if reference is None else reference
    ref = list(reference)
    arch = detect(pretrained)
    if is_openclip_state_dict(sd.keys()) and arch.kind == "hf":
        try:
            sd = openclip_to_hf(sd, ref, name)
        except CheckpointError:  # open_clip without ``proj``: map the tower's keys only
            sd = openclip_to_hf(sd, [k for k in ref if _inside_tower(arch, k)], name)
    src = set(sd)
    best: dict[str, str] = {}
    prefix = ""
    for under, align in _alignments(ref, src):
        found = {r: s for r in ref if (s := align(r)) is not None and s in src}
        if len(found) > len(best):
            best, prefix = found, under
    missing = [r for r in ref if r not in best]
    inside = [k for k in missing if _inside_tower(arch, k)]
    if inside or not best:
        raise CheckpointError(
            f"checkpoint {name!r} does not match the pretrained model: {len(missing)} missing keys "
            f"(e.g. {(inside or missing)[:3]}) of its {len(ref)}; only parameters on top of the vision transformer "
            f"(such as visual_projection) may be absent. Its keys look like {sorted(src)[:3]}"
        )
    copies_of_model(name, src, [r for r in ref if r in best])  # a projection may be absent, a second copy not
    check_unmapped(name, src - set(best.values()), prefix)  # and nothing may be left over (text tower: warned)
    out = {}
    for r in ref:
        value = sd[best[r]] if r in best else reference[r]
        if tuple(value.shape) != tuple(reference[r].shape):
            raise CheckpointError(
                f"checkpoint {name!r}: tensor {best[r]!r} has shape {tuple(value.shape)}, the pretrained model "
                f"has {tuple(reference[r].shape)}"
            )
        out[r] = value
    return out, missing


def _passes_through(name: str, source, ref: list[str]) -> bool:
    """Whether ``mass.merge`` already reads ``source`` as it is (a path or dict whose keys match exactly,
    up to one prefix): then it is handed on untouched, with mass.files.checkpoints' lazy reading. Unreadable
    sources raise mass.files.checkpoints' own errors here."""
    if is_clip_model(source) or is_hub_id(source):
        return False
    opened = open_checkpoint(name, source)
    try:
        match_keys(opened, ref, warn=False)  # the merge's own reading warns, once
    except CheckpointError:
        return False
    return True


def prepare(pretrained, finetuned: Mapping[str, Checkpoint]) -> tuple[nn.Module, dict[str, Checkpoint]]:
    """``(vision encoder, {task: checkpoint})`` that :func:`mass.merge` and the static merges accept.

    ``pretrained``: a CLIPModel (its vision tower with the projection, sharing its modules), a vision model,
    a directory or a hub id. ``finetuned``: per task a module, state dict, file, directory, PEFT LoRA adapter
    directory (:mod:`mass.files.lora`) or hub id, HF- or open_clip-named; a projection on top of the tower that it lacks takes the pretrained value (one warning
    names the keys and tasks).
    """
    model = load_vision(pretrained)
    if not isinstance(finetuned, Mapping) or not finetuned:
        raise CheckpointError("finetuned must be a non-empty dict: task name -> module, state dict, path or hub id")
    reference = dict(model.state_dict())
    ref = list(reference)
    out, lacking = {}, {}
    for name, source in finetuned.items():
        if is_adapter_dir(source):  # a PEFT LoRA adapter: θ0 plus its factors, bound to this model's keys
            out[name] = lora_checkpoint(name, read_adapter(name, source), reference,
                                        prefixes=("", detect(model).root_name))
            continue
        if _passes_through(name, source, ref):
            out[name] = source
            continue
        out[name], missing = align_state_dict(name, _state_dict_of(name, source), model, reference)
        if missing:
            lacking[name] = missing
    if lacking:
        keys = sorted({k for m in lacking.values() for k in m})
        warnings.warn(
            f"fine-tuned checkpoint(s) {sorted(lacking)} lack {keys}: these count as unchanged (pretrained values)",
            stacklevel=2,
        )
    return model, out
