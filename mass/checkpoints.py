"""Reading fine-tuned checkpoints lazily and checking them against the pretrained model.

A checkpoint is a module, a state dict, a safetensors file, a HF model directory, or a ``.pt`` state dict
(loaded with ``weights_only=True``). Sources are read one tensor at a time, so decomposing T models keeps
about one layer in memory when they come from safetensors files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch
from torch import nn

Checkpoint = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be merged: missing, corrupted, or not matching the pretrained model."""


class TensorSource:
    """Read-only, key-addressed access to the tensors of one checkpoint."""

    def __init__(self, name: str, keys: Iterable[str], getter, shapes: Mapping[str, tuple]):
        self.name = name
        self._keys = list(keys)
        self._get = getter
        self._shapes = dict(shapes)

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        tensor = self._get(key)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {self.name!r}: tensor {key!r} contains NaN or Inf")
        return tensor


def _from_state_dict(name: str, sd: Mapping[str, torch.Tensor]) -> TensorSource:
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {name!r}: entries are not tensors: {bad[:5]}")
    return TensorSource(name, sd.keys(), lambda k: sd[k].detach(), {k: tuple(v.shape) for k, v in sd.items()})


def _from_safetensors(name: str, path: Path) -> TensorSource:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        keys = list(handle.keys())
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    except Exception as exc:  # safetensors raises several types for corrupted headers
        raise CheckpointError(f"checkpoint {name!r}: cannot read safetensors file {path}: {exc}") from exc

    def get(key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {name!r}: cannot read tensor {key!r} from {path}: {exc}") from exc

    return TensorSource(name, keys, get, shapes)


def _from_torch_file(name: str, path: Path) -> TensorSource:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {name!r}: cannot load {path} as a weights-only state dict ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pickled modules are refused; save a state dict."
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {name!r}: {path} does not hold a state dict (got {type(obj).__name__})")
    return _from_state_dict(name, obj)


def open_checkpoint(name: str, ckpt: Checkpoint) -> TensorSource:
    """A :class:`TensorSource` for any supported checkpoint form."""
    if isinstance(ckpt, nn.Module):
        return _from_state_dict(name, ckpt.state_dict())
    if isinstance(ckpt, Mapping):
        return _from_state_dict(name, ckpt)
    if isinstance(ckpt, (str, os.PathLike)):
        path = Path(ckpt)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) == 1:
                return _from_safetensors(name, files[0])
            if not files and (path / "pytorch_model.bin").exists():
                return _from_torch_file(name, path / "pytorch_model.bin")
            raise CheckpointError(
                f"checkpoint {name!r}: directory {path} must hold exactly one .safetensors file "
                f"(found {len(files)}); sharded checkpoints are not supported"
            )
        if not path.exists():
            raise CheckpointError(f"checkpoint {name!r}: no such file {path}")
        if path.suffix == ".safetensors":
            return _from_safetensors(name, path)
        if path.suffix in (".pt", ".pth", ".bin"):
            return _from_torch_file(name, path)
        raise CheckpointError(f"checkpoint {name!r}: unknown file type {path.suffix!r} (want .safetensors or .pt)")
    raise CheckpointError(f"checkpoint {name!r}: unsupported type {type(ckpt).__name__}")


def match_keys(source: TensorSource, reference_keys: list[str]) -> dict[str, str]:
    """Map the pretrained model's keys to the source's keys, allowing one prefix difference.

    Fine-tuned checkpoints are often saved from a parent model (``visual.`` in open_clip, ``vision_model.``
    in HF) or from a child; this finds the one prefix that, added or removed, makes the key sets agree.
    Keys of the source outside that prefix (a text tower, say) are ignored.
    """
    src = set(source.keys())
    ref = list(reference_keys)
    mapping = None
    if set(ref) == src:
        mapping = {r: r for r in ref}
    elif ref:
        r0 = ref[0]
        for k in sorted(src, key=len):
            if k != r0 and k.endswith(r0):  # the source adds a prefix
                p = k[: len(k) - len(r0)]
                owned = {s for s in src if s.startswith(p)}
                if owned == {p + r for r in ref}:
                    mapping = {r: p + r for r in ref}
                    break
            if k != r0 and r0.endswith(k):  # the source lacks a prefix
                p = r0[: len(r0) - len(k)]
                if all(r.startswith(p) for r in ref) and {r[len(p):] for r in ref} == src:
                    mapping = {r: r[len(p):] for r in ref}
                    break
    if mapping is None:
        missing = sorted(set(ref) - src)
        unexpected = sorted(src - set(ref))
        raise CheckpointError(
            f"checkpoint {source.name!r} does not match the pretrained model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    return mapping


def check_shapes(source: TensorSource, key_map: Mapping[str, str], reference_shapes: Mapping[str, tuple]) -> None:
    for ref_key, src_key in key_map.items():
        got = tuple(source.shape(src_key))
        want = tuple(reference_shapes[ref_key])
        if got != want:
            raise CheckpointError(
                f"checkpoint {source.name!r}: tensor {src_key!r} has shape {got}, the pretrained model has {want}"
            )
