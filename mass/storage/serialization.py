"""The saved model's file: one safetensors file, written all or nothing, no pickle. The model builds a
:class:`~mass.storage.saved_format.SavedModel` (plain data) and hands it to :func:`save_artifact`;
:func:`read_artifact` gives one back after every check. Nothing here imports the model.

Format 2 (written): ``<dir>/mass_model.safetensors`` holds the tensors, and its metadata holds the JSON config
and a SHA-256 over the config text and every tensor (name, dtype, shape, bytes), so neither can change unseen.
A save checks the config and tensors exactly as a load would, then writes a hidden temporary file in the same
directory (mode from the umask), fsyncs it, renames it over ``mass_model.safetensors`` (the one commit point)
and fsyncs the directory. Until that rename the previous model is untouched; after it the new one is complete.
An interrupted save leaves at most a hidden ``.mass_model.safetensors.*.tmp`` file, which no load reads.

The config's ``task_digests`` (one SHA-256 per task over that task's entries of every stacked tensor) bind the
task order to the tensors: a reordered task list fails to load even when the checksum was recomputed.

Format 1 (read only): ``mass_config.json`` + ``mass_factors.safetensors`` with the tensors' SHA-256 in the
config. Its config is not covered by a checksum and nothing in it binds the task order (no per-task digest,
and the stacked tensors carry no task names), so a reordered task list cannot be detected: it is refused unless
loaded with ``trust_task_order=True`` (with the same strict checks, and a warning); saving it again upgrades
it (and removes the old files). A format-2 file written before ``task_digests`` existed is treated the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Mapping

import torch

from mass.files.atomic import atomic_write, file_sha256, fsync_path, regular_file_problem
from mass.storage.saved_format import (
    SavedModel, SavedModelError, check_config, config_of, decomposition_from_tensors, decomposition_tensors,
    parse_config, router_config, support_from_tensors, task_digests,
)

__all__ = ["MODEL_NAME", "SavedModelError", "read_artifact", "read_saved", "save_artifact"]

MODEL_NAME = "mass_model.safetensors"
LEGACY_CONFIG_NAME = "mass_config.json"  # format 1
LEGACY_TENSORS_NAME = "mass_factors.safetensors"  # format 1
_FILE_FORMAT = {"format": "mass", "format_version": "2"}


# ---------------------------------------------------------------------------------------------- checksum
def content_sha256(config_text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the config text and every tensor's name, dtype, shape and bytes (in name order)."""
    digest = hashlib.sha256(b"mass-format-2\0")
    digest.update(config_text.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- save
def save_artifact(saved: SavedModel, directory) -> None:
    """Write ``saved`` to ``directory`` all or nothing (see the module docstring)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = config_of(saved)
    tensors = decomposition_tensors(saved.decomposition, saved.heads, saved.support)
    config["task_digests"] = task_digests(config["tasks"], tensors)  # binds the task order to the tensors
    try:  # the checks a load applies, before anything is written
        check_config(config)
        text = json.dumps(config, indent=1, allow_nan=False)
        decomposition_from_tensors(parse_config(text), tensors)
        support_from_tensors(check_config(parse_config(text)), tensors)
    except SavedModelError as exc:
        raise ValueError(f"cannot save this model: {exc}") from exc
    metadata = {**_FILE_FORMAT, "config": text, "sha256": content_sha256(text, tensors)}
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save to {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / MODEL_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    # Committed. Format-1 files of an earlier save are now shadowed by the new file; remove them.
    removed = False
    for name in (LEGACY_CONFIG_NAME, LEGACY_TENSORS_NAME):
        if (directory / name).is_file():
            os.unlink(directory / name)
            removed = True
    if removed:
        fsync_path(directory)


# ---------------------------------------------------------------------------------------------- load
def _require_file(path: Path) -> None:
    problem = regular_file_problem(path)
    if problem is not None:
        raise SavedModelError(f"cannot load the saved model: {problem}")


def _read_tensors(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file; anything unreadable is reported as corruption."""
    from safetensors import safe_open

    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise SavedModelError(f"{path} is truncated or corrupted (cannot read it: {exc})") from exc
    return metadata, tensors


def _read_v2(path: Path):
    metadata, tensors = _read_tensors(path)
    if metadata.get("format") != "mass":
        raise SavedModelError(f"{path} is not a MASS model file (its metadata has no 'format': 'mass')")
    if metadata.get("format_version") != _FILE_FORMAT["format_version"]:
        raise SavedModelError(f"{path}: unsupported format_version {metadata.get('format_version')!r} "
                              f"(this mass writes and reads 2, and reads 1): upgrade mass")
    text, digest = metadata.get("config"), metadata.get("sha256")
    if text is None or digest is None:
        raise SavedModelError(f"{path} is truncated or corrupted (its metadata lacks the config or checksum)")
    if content_sha256(text, tensors) != digest:
        raise SavedModelError(f"{path} is truncated or corrupted (its SHA-256 differs from the saved one)")
    config = check_config(parse_config(text))
    if config["format_version"] != 2:
        raise SavedModelError(f"{path}: the config says format_version {config['format_version']}, the file is 2")
    return config, *decomposition_from_tensors(config, tensors), support_from_tensors(config, tensors)


def _read_v1(directory: Path):
    config_path, tensor_path = directory / LEGACY_CONFIG_NAME, directory / LEGACY_TENSORS_NAME
    _require_file(config_path)
    _require_file(tensor_path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SavedModelError(f"cannot read {config_path}: {exc}") from exc
    config = check_config(parse_config(text))
    if config["format_version"] != 1:
        raise SavedModelError(f"{config_path}: format_version {config['format_version']} is written as "
                              f"{MODEL_NAME}, not {LEGACY_CONFIG_NAME}")
    if file_sha256(tensor_path) != config["tensors_sha256"]:
        raise SavedModelError(f"{tensor_path} is truncated or corrupted (its SHA-256 differs from the saved one)")
    _, tensors = _read_tensors(tensor_path)
    dec, heads = decomposition_from_tensors(config, tensors)
    return config, dec, heads, None


def _unbound(directory: Path, version: int) -> str:
    what = ("a format-1 MASS model: its config is not covered by a checksum and its task order is not bound to "
            "its tensors" if version == 1 else
            "a MASS model saved before each task's name was bound to its tensors (its config has no task_digests)")
    return (f"{directory} is {what}, so a reordered task list would run one task's blocks under another's name "
            f"unseen")


def _read(directory, trust_task_order: bool = False) -> tuple:
    """(config, decomposition, heads or None, router calibration or None), after checking all of it. A file
    whose task order is not bound to its tensors (format 1, or format 2 without ``task_digests``) is refused
    unless ``trust_task_order``; then it loads with a warning, and saving it again binds the order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SavedModelError(f"{directory} is not a saved MASS model (not a directory)")
    if os.path.lexists(directory / MODEL_NAME):
        read = _read_v2(directory / MODEL_NAME)
    elif os.path.lexists(directory / LEGACY_CONFIG_NAME):
        read = _read_v1(directory)
    else:
        raise SavedModelError(f"{directory} is not a saved MASS model (it has no {MODEL_NAME})")
    config = read[0]
    if config["task_digests"] is None:
        if not trust_task_order:
            raise SavedModelError(
                f"{_unbound(directory, config['format_version'])}. If you trust this directory, load it with "
                f"MASSModel.from_pretrained(..., trust_task_order=True) and call save_pretrained again: the new "
                f"file binds the order")
        warnings.warn(f"{_unbound(directory, config['format_version'])}; loaded as trusted "
                      f"(trust_task_order=True). Call save_pretrained again to upgrade it.", UserWarning, stacklevel=4)
    return read


def read_saved(directory, trust_task_order: bool = False) -> tuple:
    """(config, decomposition, heads or None) of a saved MASS directory, after checking all of it."""
    return _read(directory, trust_task_order)[:3]


def read_artifact(directory, trust_task_order: bool = False) -> SavedModel:
    """The :class:`SavedModel` in ``directory``, after checking all of it (:class:`SavedModelError` if not);
    ``trust_task_order``: see :func:`_read`."""
    config, dec, heads, support = _read(directory, trust_task_order)
    return SavedModel(architecture=config["architecture"], model_class=config["model_class"],
                      router=router_config(config), reuse_prefix=config["reuse_prefix"],
                      keep_merged=config["keep_merged"], decomposition=dec, heads=heads, support=support,
                      encoder=config["encoder"], preprocess=config["preprocess"], classes=config["classes"])
