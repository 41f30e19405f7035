"""PEFT LoRA adapter directories as fine-tuned checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``).

A LoRA adapter changes a linear layer ``W`` (out × in) by ``ΔW = scale · B A`` with ``A`` (r × in), ``B`` (out × r)
and ``scale = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), ``r`` and ``lora_alpha`` per module from
``rank_pattern`` / ``alpha_pattern`` when they name it (PEFT's own matching: a pattern matches a module path that
ends with it at a dot boundary). Layers it does not touch are unchanged. ``modules_to_save`` and ``bias="all"`` /
``"lora_only"`` save whole tensors: they replace the pretrained values of the keys they map to.

:func:`read_adapter` reads and checks the directory; :func:`lora_checkpoint` binds it to a pretrained state dict
and returns a :class:`LoraCheckpoint`: a :class:`~mass.files.checkpoints.TensorSource` whose ``get`` gives the
dense fine-tuned weights (for the static merges) and whose ``lowrank`` holds the factors, so MASS's decomposition
never forms the dense delta. Every problem is one :class:`LoraError` naming the adapter.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from .checkpoints import CheckpointError, TensorSource, all_finite, require_regular_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Options that change what the adapter computes beyond B·A·scale: refused, not ignored.
_UNSUPPORTED_TRUE = {
    "use_dora": "DoRA (use_dora=True) rescales the weight's columns, it is not a low-rank delta",
    "fan_in_fan_out": "fan_in_fan_out=True (transposed Conv1D weights) is not a layout of a CLIP vision tower",
    "lora_bias": "lora_bias=True adds a trained bias to lora_B",
    "use_qalora": "QA-LoRA (use_qalora=True) pools the input",
}
_UNSUPPORTED_SET = {
    "layer_replication": "layer_replication duplicates layers",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "trainable_token_indices": "trainable_token_indices changes embeddings",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after given tokens",
    "arrow_config": "Arrow routing between adapters is not supported",
    "monteclora_config": "MonteCLoRA is stochastic",
    "velora_config": "VeLoRA is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "kasa_config": "KaSA is not supported",
}


class LoraError(CheckpointError):
    """A LoRA adapter directory that cannot be used as a fine-tuned checkpoint."""


@dataclass
class LoraFactors:
    """ΔW = scale · B A of one linear layer: A (r, in), B (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass
class LoraAdapter:
    """What an adapter directory holds, keyed by module path relative to the model PEFT wrapped."""

    path: Path
    factors: dict  # module path -> LoraFactors
    whole: dict = field(default_factory=dict)  # state-dict key -> tensor (modules_to_save, saved biases)
    base_model: Optional[str] = None


def is_adapter_dir(source) -> bool:
    """Whether ``source`` is a directory holding a PEFT ``adapter_config.json``."""
    return isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and \
        os.path.lexists(Path(source) / CONFIG_NAME)


def pattern_value(patterns: Mapping, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern p such that the module path matches ``(.*\\.)?(p)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _fail(name: str, problem: str) -> LoraError:
    return LoraError(f"LoRA adapter {name!r}: {problem}")


def _read_config(name: str, path: Path) -> dict:
    config_path = path / CONFIG_NAME
    try:
        require_regular_file(config_path, f"LoRA adapter {name!r} config")
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(name, f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise _fail(name, f"{config_path} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise _fail(name, f"peft_type is {peft_type!r}; only LORA adapters are supported")
    for option, why in _UNSUPPORTED_TRUE.items():
        if config.get(option):
            raise _fail(name, f"unsupported option: {why}")
    for option, why in _UNSUPPORTED_SET.items():
        if config.get(option):
            raise _fail(name, f"unsupported option: {why}")
    for option in ("r", "lora_alpha"):
        value = config.get(option)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _fail(name, f"{CONFIG_NAME} needs a positive number {option!r}, got {value!r}")
    for option in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(option) or {}, dict):
            raise _fail(name, f"{option} must be an object, got {config.get(option)!r}")
    return config


def _scale(config: dict, module: str, rank: int, name: str) -> float:
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if r != rank:
        raise _fail(name, f"{module}: {CONFIG_NAME} gives rank {r} but its lora_A/lora_B tensors have rank {rank}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def read_adapter(name: str, path) -> LoraAdapter:
    """Read and check a PEFT LoRA directory (config options, tensor names, ranks, shapes, finite values)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = _read_config(name, path)
    weights = path / WEIGHTS_NAME
    if not os.path.lexists(weights):
        other = "" if not os.path.lexists(path / "adapter_model.bin") else \
            " (it has adapter_model.bin: save the adapter with safe_serialization=True)"
        raise _fail(name, f"{path} has no {WEIGHTS_NAME}{other}")
    require_regular_file(weights, f"LoRA adapter {name!r} weights")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(name, f"{weights} is truncated or corrupted ({exc})") from exc
    parts: dict = {}
    whole = {}
    for key, value in tensors.items():
        rel = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if not value.is_floating_point() or not all_finite(value):
            raise _fail(name, f"tensor {key!r} must be floating point and finite")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                         r"(?:\.[^.]+)?\.weight|(.+)\.(lora_embedding_[AB]|lora_magnitude_vector)(?:\.[^.]+)?", rel)
        if m is None:
            if ".lora_" in rel:
                raise _fail(name, f"unsupported LoRA tensor {key!r}")
            whole[re.sub(r"\.(base_layer|modules_to_save(\.[^.]+)?|original_module)(?=\.)", "", rel)] = value
            continue
        module, kind = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if kind != "lora_A" and kind != "lora_B":
            raise _fail(name, f"{module}: {kind} is not supported (LoRA on embeddings, or DoRA)")
        if value.dim() != 2:
            raise _fail(name, f"{module}: {kind} has shape {tuple(value.shape)}; only LoRA on linear layers is "
                              f"supported (not on convolutions such as the patch embedding)")
        parts.setdefault(module, {})[kind] = value
    factors = {}
    for module, p in parts.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise _fail(name, f"{module} has {sorted(p)} but needs both lora_A and lora_B")
        A, B = p["lora_A"], p["lora_B"]
        if A.shape[0] != B.shape[1]:
            raise _fail(name, f"{module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree on the rank")
        factors[module] = LoraFactors(A, B, _scale(config, module, A.shape[0], name))
    if not factors:
        raise _fail(name, f"{weights} holds no lora_A/lora_B tensors")
    return LoraAdapter(path, factors, whole, config.get("base_model_name_or_path"))


class LoraCheckpoint(TensorSource):
    """A fine-tuned checkpoint given as pretrained weights plus a LoRA adapter: ``get(key)`` is the dense
    fine-tuned value (θ0 + scale·B A, or a saved whole tensor, or θ0), ``lowrank[key]`` the factors."""

    def __init__(self, name: str, base: Mapping[str, torch.Tensor], lowrank: dict, whole: dict):
        self.lowrank = dict(lowrank)
        self.whole = dict(whole)
        self._base = base

        def get(key):
            if key in self.lowrank:
                value = base[key]
                return (value.float() + self.lowrank[key].delta()).to(value.dtype)
            return self.whole.get(key, base[key])

        super().__init__(name, list(base), get, {k: tuple(v.shape) for k, v in base.items()},
                         {k: str(v.dtype).removeprefix("torch.") for k, v in base.items()})


def lora_checkpoint(name: str, adapter: LoraAdapter, base: Mapping[str, torch.Tensor],
                    prefixes: tuple = ("",)) -> LoraCheckpoint:
    """Bind ``adapter`` to the pretrained state dict ``base``: each module path must name a 2-D weight of
    ``base`` (tried as is and under each of ``prefixes``, e.g. the vision tower's root), with matching shapes;
    each whole tensor must name a key of ``base`` of the same shape. Anything else is refused."""
    def resolve(path: str) -> Optional[str]:
        for prefix in prefixes:
            key = f"{prefix}.{path}" if prefix else path
            if key in base:
                return key
        return None

    hint = f" (the adapter was made for {adapter.base_model!r})" if adapter.base_model else ""
    lowrank = {}
    for module, f in adapter.factors.items():
        key = resolve(module + ".weight")
        if key is None:
            raise _fail(name, f"targets module {module!r}, which is not a layer of the pretrained vision model "
                              f"MASS serves (only the vision tower's linear layers can be routed){hint}")
        weight = base[key]
        if weight.dim() != 2 or tuple(weight.shape) != (f.B.shape[0], f.A.shape[1]):
            raise _fail(name, f"{module}: lora_B·lora_A is {f.B.shape[0]}×{f.A.shape[1]} but the pretrained "
                              f"weight {key!r} is {tuple(weight.shape)}: a different base model{hint}")
        lowrank[key] = LoraFactors(f.A.float(), f.B.float(), f.scale)
    whole = {}
    for rel, value in adapter.whole.items():
        key = resolve(rel)
        if key is None:
            raise _fail(name, f"saves the whole tensor {rel!r} (modules_to_save or a trained bias), which is not "
                              f"a parameter of the pretrained vision model MASS serves: MASS cannot route it{hint}")
        if tuple(value.shape) != tuple(base[key].shape):
            raise _fail(name, f"saved tensor {rel!r} has shape {tuple(value.shape)}, the pretrained {key!r} "
                              f"{tuple(base[key].shape)}: a different base model{hint}")
        if key in lowrank:
            raise _fail(name, f"{key!r} is both LoRA-adapted and saved whole")
        whole[key] = value.to(base[key].dtype)
    return LoraCheckpoint(name, base, lowrank, whole)
