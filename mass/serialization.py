"""``save_pretrained`` / ``from_pretrained``: a JSON config plus one safetensors file, no pickle.

Files are written under temporary names and renamed; the config (written last) records the SHA-256 of the
tensor file, so a truncated or corrupted file is reported instead of loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .decompose import LowRankFactors, TaskDecomposition
from .router import RouterConfig

FORMAT_VERSION = 1
CONFIG_NAME = "mass_config.json"
TENSORS_NAME = "mass_factors.safetensors"


class SavedModelError(ValueError):
    """A saved MASS directory that cannot be loaded (missing, truncated, corrupted, or mismatched)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(tmp_name)`` then rename: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def decomposition_tensors(dec: TaskDecomposition, heads: dict | None) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in dec.base.items():
        tensors[f"base/{key}"] = value
    for key, f in dec.lowrank.items():
        tensors[f"lowrank/{key}/U"], tensors[f"lowrank/{key}/S"], tensors[f"lowrank/{key}/V"] = f.U, f.S, f.V
    for key, value in dec.dense.items():
        tensors[f"dense/{key}"] = value
    for task, head in (heads or {}).items():
        tensors[f"heads/{task}"] = head
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_mass(model, directory) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dec = model.decomposition()
    heads = None if model.heads is None else {t: model.head(t) for t in model.tasks}
    tensors = decomposition_tensors(dec, heads)
    tensor_path = directory / TENSORS_NAME
    atomic_write(tensor_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "mass", "version": "1"}))
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": model.arch.kind,
        "model_class": type(model.model).__name__,
        "tasks": list(model.tasks),
        "ranks": model.ranks,
        "router": dataclasses.asdict(model.router_config),
        "reuse_prefix": model.reuse_prefix,
        "keep_merged": model.keep_merged,
        "has_heads": heads is not None,
        "storage_factor": dec.storage_factor(),
        "tensors_sha256": _sha256(tensor_path),
    }
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def read_saved(directory) -> tuple[dict, TaskDecomposition, dict | None]:
    """Config, decomposition and heads of a saved MASS directory, after checking its integrity."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, tensor_path = directory / CONFIG_NAME, directory / TENSORS_NAME
    if not config_path.exists() or not tensor_path.exists():
        raise SavedModelError(f"{directory} is not a saved MASS model (needs {CONFIG_NAME} and {TENSORS_NAME})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise SavedModelError(f"{config_path} is not valid JSON ({exc}); the save may have been interrupted") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise SavedModelError(f"{config_path}: unsupported format version {config.get('format_version')!r}")
    if _sha256(tensor_path) != config.get("tensors_sha256"):
        raise SavedModelError(f"{tensor_path} is truncated or corrupted (its SHA-256 differs from the saved one)")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:
        raise SavedModelError(f"cannot read {tensor_path}: {exc}") from exc
    base, lowrank_parts, dense, heads = {}, {}, {}, {}
    for name, value in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "base":
            base[rest] = value
        elif kind == "lowrank":
            key, _, part = rest.rpartition("/")
            lowrank_parts.setdefault(key, {})[part] = value
        elif kind == "dense":
            dense[rest] = value
        elif kind == "heads":
            heads[rest] = value
    lowrank = {k: LowRankFactors(p["U"], p["S"], p["V"]) for k, p in lowrank_parts.items()}
    dec = TaskDecomposition(tasks=config["tasks"], base=base, lowrank=lowrank, dense=dense)
    return config, dec, (heads if config.get("has_heads") else None)


def load_mass(directory, base_model: nn.Module, **overrides):
    from .model import MASSModel

    config, dec, heads = read_saved(directory)
    try:
        base_model.load_state_dict(dec.base, strict=True)
    except RuntimeError as exc:
        raise SavedModelError(f"base_model does not match the saved model's architecture: {exc}") from exc
    kwargs = {
        "router": RouterConfig(**config["router"]),
        "heads": heads,
        "reuse_prefix": config["reuse_prefix"],
        "keep_merged": config["keep_merged"],
    }
    kwargs.update(overrides)
    return MASSModel(base_model, dec, **kwargs)
