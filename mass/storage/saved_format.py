"""What a saved MASS model holds, and the strict check a save and a load both apply to it.

A saved model is a JSON config plus named tensors (``base/<key>``, ``lowrank/<key>/{U,S,V}``, ``dense/<key>``,
``heads/<task>``). The check is the same on both sides, so a save writes only what a load accepts:

- the config: every field has exactly one JSON type (``true`` is not an int, ``"false"`` is not a bool, NaN and
  Infinity are not numbers), unknown and missing fields are refused, values are range-checked (the router's
  through :class:`~mass.method.router.RouterConfig`);
- the tensors against the config: the task list first (one head per task when heads are saved, the task count
  of the stacked tensors), then the set of tensors (every floating pretrained weight has its tasks' values),
  the ranks, the shapes against the pretrained weights, every floating value finite, and the per-task digests
  (``task_digests``) that bind the config's task order to the tensors;
- what serving needs with nothing else (issue 22; optional, ``null`` in files written before it): ``encoder``
  (the config to rebuild the encoder module), ``preprocess`` (the image preprocessing) and ``classes`` (each
  head's class names, one per head row).

Every refusal is a :class:`SavedModelError` naming the field or tensor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from typing import Mapping, Optional

import torch

from mass.files.checkpoints import all_finite
from mass.method.decompose import LowRankFactors, TaskDecomposition
from mass.method.router import NORMS, RouterConfig

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ARCHITECTURES = ("hf", "open_clip")
KEEP_MERGED = ("prefix", "all")

# Allowed JSON kinds per field (see json_kind).
_NUMBER = ("int", "number")
CONFIG_FIELDS = {
    "format_version": ("int",),
    "architecture": ("string",),
    "model_class": ("string",),
    "tasks": ("list",),
    "ranks": ("object",),
    "router": ("object",),
    "reuse_prefix": ("bool",),
    "keep_merged": ("string",),
    "has_heads": ("bool",),
    "storage_factor": _NUMBER,
    "support": ("object", "null"),
    "task_digests": ("object", "null"),
    "encoder": ("object", "null"),
    "preprocess": ("object", "null"),
    "classes": ("object", "null"),
    "bank_dtype": ("string", "null"),
    "rank_rule": ("string", "null"),
}
# Added by issue 22 (serving from the directory alone); a file without them is not self-contained.
SERVING_FIELDS = ("encoder", "preprocess", "classes")
ENCODER_FIELDS = {"kind": ("string",), "class": ("string",), "config": ("object",)}
PREPROCESS_FIELDS = {"shortest_edge": ("int",), "crop": ("list",), "mean": ("list",), "std": ("list",),
                     "resample": ("int",), "rescale": _NUMBER, "do_resize": ("bool",), "do_center_crop": ("bool",),
                     "do_normalize": ("bool",)}
# Added by issue 23 without a new format version; a file without them ran with these values (rank_rule null:
# "default" when every stored rank is the rule's ⌊min(out, in) / T⌋, else "fixed").
OPTIONAL_DEFAULTS = {"bank_dtype": None, "rank_rule": None}
BANK_DTYPE_NAMES = ("bfloat16", "float16")
RANK_RULES = ("default", "fixed")
V1_ONLY_FIELDS = {"tensors_sha256": ("string",)}  # format 1 kept the tensors' checksum in the config
ROUTER_FIELDS = {
    "layer": ("int", "null"),
    "token": ("string",),
    "mode": ("string",),
    "threshold": _NUMBER,
    "max_tasks": ("int",),
    "temperature": _NUMBER,
    "batch_level": ("bool",),
    "layers": ("list", "null"),
    "features": ("string",),
    "norm": ("string",),
    "basis": ("string",),
    "support_rank": ("int", "null"),
    "centre": ("bool",),
    "unknown": ("string",),
    "unknown_threshold": _NUMBER,
    "whiten": _NUMBER,
    "depth": ("int", "number", "null"),
}
# Router fields added while format 1 was current; a format-1 config without them ran with these values.
ROUTER_V1_DEFAULTS = {"layers": None, "features": "merged", "norm": "l2"}
# Added in format 2 (issue 14): a config without them (and without "support") ran with these values.
ROUTER_V2_DEFAULTS = {"basis": "fc1", "support_rank": None, "centre": False, "unknown": "off",
                      "unknown_threshold": 1.0, "whiten": 0.0, "depth": None}
SUPPORT_FIELDS = {"layers": ("list",), "features": ("string",), "token": ("string",), "n_images": ("int",),
                  "norm": ("string",), "whiten": _NUMBER}
# "support.norm" (the fc1 weighting the calibrated scale was measured with) was added after format 2 first
# shipped: a file without it ran its detector with its scales under the router's own norm, and still does.
# "router.whiten", "support.whiten" and support/whitener (the whitened support router) came later still: a file
# without them is an unwhitened one (whiten 0). "router.depth" (the early router's block as a share of the depth,
# issue 25) came after that: a file without it places its block by "layer"/"layers" (depth null).
_KIND_WORDS = {"null": "null", "bool": "a bool", "int": "an int", "number": "a number", "string": "a string",
               "list": "a list", "object": "an object"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TENSOR_KINDS = ("base", "lowrank", "dense", "heads", "support")
_SUPPORT_TENSORS = ("scale", "basis", "centre", "whitener")


class SavedModelError(ValueError):
    """A saved MASS model that cannot be written or loaded: missing, truncated, corrupted, or invalid."""


def json_kind(value) -> str:
    """The JSON kind of a Python value, exactly: subclasses (numpy scalars, bool as int) get their own name."""
    kinds = {type(None): "null", bool: "bool", int: "int", str: "string", list: "list", dict: "object"}
    if type(value) is float:
        return "number" if math.isfinite(value) else f"non-finite number {value}"
    return kinds.get(type(value), type(value).__name__)


def _check_fields(obj: dict, spec: Mapping[str, tuple], where: str) -> None:
    unknown = sorted(k for k in obj if k not in spec)
    if unknown:
        raise SavedModelError(f"saved config: unknown field(s) {', '.join(repr(where + k) for k in unknown)}")
    missing = [k for k in spec if k not in obj]
    if missing:
        raise SavedModelError(f"saved config: missing field(s) {', '.join(repr(where + k) for k in missing)}")
    for key, kinds in spec.items():
        kind = json_kind(obj[key])
        if kind not in kinds:
            want = "a number" if kinds == _NUMBER else " or ".join(_KIND_WORDS[k] for k in kinds)
            raise SavedModelError(f"saved config: field {where + key!r} must be {want}, got {obj[key]!r} ({kind})")


def _field_error(field: str, problem: str) -> SavedModelError:
    return SavedModelError(f"saved config: field {field!r} {problem}")


def parse_config(text: str) -> dict:
    """JSON text → dict, refusing NaN/Infinity and duplicate keys (json.loads accepts both silently)."""
    def no_constant(name):
        raise SavedModelError(f"saved config: {name} is not a JSON number")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise SavedModelError(f"saved config: duplicate field(s) {dup}")
        return dict(pairs)

    try:
        config = json.loads(text, parse_constant=no_constant, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise SavedModelError(f"saved config is not valid JSON ({exc}); the file may be corrupted") from exc
    if not isinstance(config, dict):
        raise SavedModelError(f"saved config must be a JSON object, got {json_kind(config)}")
    return config


def check_config(config: dict) -> dict:
    """The config, strictly checked (a normalised copy: format-1 router defaults filled in)."""
    if not isinstance(config, dict):
        raise SavedModelError(f"saved config must be a JSON object, got {json_kind(config)}")
    version = config.get("format_version")
    if json_kind(version) != "int" or version not in READABLE_VERSIONS:
        raise SavedModelError(
            f"saved config: unsupported format_version {version!r}: this version of mass reads formats "
            f"{list(READABLE_VERSIONS)} (a newer mass may have written it: upgrade mass)")
    config = dict(config)
    router = config.get("router")
    if isinstance(router, dict):
        config["router"] = {**(ROUTER_V1_DEFAULTS if version == 1 else {}), **ROUTER_V2_DEFAULTS, **router}
    config.setdefault("support", None)
    config.setdefault("task_digests", None)  # files written before the task order was bound (format 1 included)
    for name in SERVING_FIELDS:
        config.setdefault(name, None)
    for name, value in OPTIONAL_DEFAULTS.items():
        config.setdefault(name, value)
    _check_fields(config, {**CONFIG_FIELDS, **(V1_ONLY_FIELDS if version == 1 else {})}, "")
    if config["architecture"] not in ARCHITECTURES:
        raise _field_error("architecture", f"must be one of {ARCHITECTURES}, got {config['architecture']!r}")
    if not config["model_class"]:
        raise _field_error("model_class", "must not be empty")
    tasks = config["tasks"]
    if not tasks or any(json_kind(t) != "string" or not t for t in tasks):
        raise _field_error("tasks", f"must be a non-empty list of non-empty strings, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise _field_error("tasks", f"names a task twice: {tasks!r}")
    for key, rank in config["ranks"].items():
        if json_kind(rank) != "int" or rank < 1:
            raise _field_error(f"ranks.{key}", f"must be an int >= 1, got {rank!r}")
    digests = config["task_digests"]
    if digests is not None:
        if set(digests) != set(tasks):
            raise _field_error("task_digests", f"must name exactly the tasks {tasks}: missing "
                                               f"{sorted(set(tasks) - set(digests))}, extra {sorted(set(digests) - set(tasks))}")
        bad = [t for t, d in digests.items() if json_kind(d) != "string" or not _HEX64.fullmatch(d)]
        if bad:
            raise _field_error("task_digests", f"must hold a SHA-256 (64 hex digits) per task, not for {bad}")
    if config["keep_merged"] not in KEEP_MERGED:
        raise _field_error("keep_merged", f"must be one of {KEEP_MERGED}, got {config['keep_merged']!r}")
    if config["bank_dtype"] is not None and config["bank_dtype"] not in BANK_DTYPE_NAMES:
        raise _field_error("bank_dtype", f"must be null or one of {BANK_DTYPE_NAMES}, got {config['bank_dtype']!r}")
    if config["rank_rule"] is not None and config["rank_rule"] not in RANK_RULES:
        raise _field_error("rank_rule", f"must be null or one of {RANK_RULES}, got {config['rank_rule']!r}")
    if not config["storage_factor"] >= 1:
        raise _field_error("storage_factor", f"must be >= 1, got {config['storage_factor']!r}")
    router_config(config)
    support = config["support"]
    if isinstance(support, dict):
        support = config["support"] = {"norm": config["router"]["norm"], "whiten": 0.0, **support}
    if support is not None:
        _check_fields(support, SUPPORT_FIELDS, "support.")
        if not support["layers"] or any(json_kind(v) != "int" or v < 0 for v in support["layers"]):
            raise _field_error("support.layers", f"must be a non-empty list of ints >= 0, got {support['layers']!r}")
        if support["n_images"] < 2:
            raise _field_error("support.n_images", f"must be >= 2, got {support['n_images']!r}")
        if support["norm"] not in NORMS:
            raise _field_error("support.norm", f"must be one of {NORMS}, got {support['norm']!r}")
        if not 0 <= support["whiten"] < 1:
            raise _field_error("support.whiten", f"must lie in [0, 1), got {support['whiten']!r}")
    _check_serving(config)
    return config


def _check_serving(config: dict) -> None:
    """The optional serving fields: the encoder's config, the preprocessing, the heads' class names."""
    encoder = config["encoder"]
    if encoder is not None:
        _check_fields(encoder, ENCODER_FIELDS, "encoder.")
        if encoder["kind"] != config["architecture"]:
            raise _field_error("encoder.kind", f"is {encoder['kind']!r} but the architecture is "
                                               f"{config['architecture']!r}")
    if config["preprocess"] is not None:
        check_preprocess(config["preprocess"])
    classes = config["classes"]
    if classes is not None:
        if not config["has_heads"]:
            raise _field_error("classes", "names classes but the model has no heads (has_heads is false)")
        if list(classes) != list(config["tasks"]):
            raise _field_error("classes", f"must have one entry per task, in task order; got {list(classes)}")
        for task, names in classes.items():
            if json_kind(names) != "list" or not names or any(json_kind(n) != "string" or not n for n in names):
                raise _field_error(f"classes.{task}", f"must be a non-empty list of non-empty strings, got {names!r}")


def check_preprocess(pre: dict) -> None:
    """The ``preprocess`` field: the fields of :class:`mass.evaluation.data.ClipPreprocess`, JSON-typed."""
    if not isinstance(pre, dict):
        raise _field_error("preprocess", f"must be an object, got {json_kind(pre)}")
    _check_fields(pre, PREPROCESS_FIELDS, "preprocess.")
    if pre["shortest_edge"] < 1 or len(pre["crop"]) != 2 or any(json_kind(c) != "int" or c < 1 for c in pre["crop"]):
        raise _field_error("preprocess", f"needs shortest_edge >= 1 and crop [height, width] of ints >= 1, got "
                                         f"{pre['shortest_edge']!r}, {pre['crop']!r}")
    for key in ("mean", "std"):
        values = pre[key]
        if len(values) != 3 or any(json_kind(v) not in _NUMBER for v in values) or (
                key == "std" and any(v <= 0 for v in values)):
            raise _field_error(f"preprocess.{key}", f"must be 3 numbers{' > 0' if key == 'std' else ''}, "
                                                    f"got {values!r}")
    if not pre["rescale"] > 0:
        raise _field_error("preprocess.rescale", f"must be > 0, got {pre['rescale']!r}")


def check_classes(config: dict, heads: Mapping[str, torch.Tensor]) -> None:
    """Each task's class names match its head's rows (one name per class)."""
    for task, names in (config.get("classes") or {}).items():
        if len(names) != heads[task].shape[0]:
            raise _field_error(f"classes.{task}", f"names {len(names)} classes but heads/{task} has "
                                                  f"{heads[task].shape[0]} rows")


def router_config(config: dict) -> RouterConfig:
    """The :class:`RouterConfig` a checked config describes (JSON types checked here, values by RouterConfig)."""
    router = config["router"]
    _check_fields(router, ROUTER_FIELDS, "router.")
    if router["layers"] is not None and any(json_kind(v) != "int" for v in router["layers"]):
        raise _field_error("router.layers", f"must be a list of ints, got {router['layers']!r}")
    try:
        return RouterConfig(**router)
    except (TypeError, ValueError) as exc:
        raise SavedModelError(f"saved config: field 'router' is invalid: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """A saved MASS model as plain data: what :meth:`mass.MASSModel.save_pretrained` hands to the saver and what
    a load gives back before the model is built from it. ``architecture``: ``"hf"`` or ``"open_clip"``;
    ``model_class``: the wrapped encoder's class name; ``heads``: ``{task: (C, D)}`` or None; ``support``: the
    router's calibration (a :class:`~mass.method.support.SupportFit`) or None."""

    architecture: str
    model_class: str
    router: RouterConfig
    reuse_prefix: bool
    keep_merged: str
    decomposition: TaskDecomposition
    heads: Optional[Mapping[str, torch.Tensor]] = None
    support: Optional[object] = None
    encoder: Optional[dict] = None  # {"kind", "class", "config"}: rebuilds the encoder (mass.nn.encoders)
    preprocess: Optional[dict] = None  # the ClipPreprocess fields (mass.evaluation.data)
    classes: Optional[dict] = None  # {task: [class name per head row]}

    @property
    def tasks(self) -> list:
        return list(self.decomposition.tasks)


def config_of(saved: SavedModel) -> dict:
    """The format-2 config describing ``saved`` (not yet checked: :func:`check_config` does that)."""
    dec = saved.decomposition
    # Every field of the dataclass: one that ROUTER_FIELDS does not know is refused by the check, not dropped.
    router = {f.name: getattr(saved.router, f.name) for f in dataclasses.fields(saved.router)}
    if isinstance(router["layers"], tuple):
        router["layers"] = list(router["layers"])
    return {
        "format_version": FORMAT_VERSION,
        "architecture": saved.architecture,
        "model_class": saved.model_class,
        "tasks": list(dec.tasks),
        "ranks": {key: f.rank for key, f in dec.lowrank.items()},
        "router": router,
        "reuse_prefix": saved.reuse_prefix,
        "keep_merged": saved.keep_merged,
        "has_heads": saved.heads is not None,
        "storage_factor": dec.storage_factor(),
        "support": None if saved.support is None else saved.support.meta(),
        "encoder": saved.encoder,
        "preprocess": saved.preprocess,
        "classes": None if saved.classes is None else {t: list(names) for t, names in saved.classes.items()},
        "bank_dtype": None if dec.bank_dtype is None else str(dec.bank_dtype).removeprefix("torch."),
        "rank_rule": dec.rank_rule,
    }


def decomposition_tensors(dec: TaskDecomposition, heads: Optional[Mapping[str, torch.Tensor]],
                          support=None) -> dict:
    """The named tensors of the saved format (contiguous CPU copies); ``support``: a SupportFit or None."""
    tensors = {f"support/{name}": value for name, value in (support.tensors() if support is not None else {}).items()}
    for key, value in dec.base.items():
        tensors[f"base/{key}"] = value
    for key, f in dec.lowrank.items():
        tensors[f"lowrank/{key}/U"], tensors[f"lowrank/{key}/S"], tensors[f"lowrank/{key}/V"] = f.U, f.S, f.V
    for key, value in dec.dense.items():
        tensors[f"dense/{key}"] = value
    for task, head in (heads or {}).items():
        tensors[f"heads/{task}"] = head
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _split_names(tensors: Mapping[str, torch.Tensor]):
    base, parts, dense, heads = {}, {}, {}, {}
    for name, value in tensors.items():
        kind, _, rest = name.partition("/")
        if kind not in _TENSOR_KINDS or not rest:
            raise SavedModelError(f"saved tensors: unexpected tensor {name!r} (not base/, lowrank/, dense/, heads/, "
                                  f"support/)")
        if kind == "support":
            if rest not in _SUPPORT_TENSORS:
                raise SavedModelError(f"saved tensors: unexpected tensor {name!r} (support/ holds {_SUPPORT_TENSORS})")
            continue  # read by support_from_tensors
        if kind == "lowrank":
            key, _, part = rest.rpartition("/")
            if part not in ("U", "S", "V") or not key:
                raise SavedModelError(f"saved tensors: unexpected tensor {name!r} (low-rank parts are U, S, V)")
            parts.setdefault(key, {})[part] = value
        else:
            {"base": base, "dense": dense, "heads": heads}[kind][rest] = value
    return base, parts, dense, heads


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        if value.is_floating_point() and not all_finite(value):
            raise SavedModelError(f"saved tensors: {name!r} contains NaN or Inf")


def task_digests(tasks: list, tensors: Mapping[str, torch.Tensor]) -> dict:
    """{task: SHA-256 of that task's own entries of every stacked tensor (``lowrank/``, ``dense/``), in name
    order}: the config stores them, so its task order is bound to the tensors (a reordered task list fails to
    load even when its file checksum was recomputed)."""
    stacked = sorted(n for n in tensors if n.startswith(("lowrank/", "dense/")))
    out = {}
    for t, task in enumerate(tasks):
        digest = hashlib.sha256(b"mass-task\0")
        for name in stacked:
            entry = tensors[name].detach()[t].cpu().contiguous()
            digest.update(f"\0{name}\0{entry.dtype}\0{tuple(entry.shape)}\0".encode("utf-8"))
            digest.update(entry.reshape(-1).view(torch.uint8).numpy())
        out[task] = digest.hexdigest()
    return out


def _check_task_order(config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """The config's task order is the one the tensors were saved in (its per-task digests), when it has them."""
    saved = config["task_digests"]
    if saved is None:
        return
    tasks = config["tasks"]
    found = task_digests(tasks, tensors)
    wrong = [t for t in tasks if found[t] != saved[t]]
    if wrong:
        owner = {d: t for t, d in saved.items()}
        held = [owner.get(found[t]) for t in tasks]
        if None in held:
            raise SavedModelError(f"saved tensors: the entries of task(s) {[t for t, h in zip(tasks, held) if h is None]} "
                                  f"differ from the tensors they were saved with (per-task digests): the file was edited")
        raise _field_error("tasks", f"is not in the order the tensors were saved in: the entries listed as {wrong} "
                                    f"hold the tensors of {[h for t, h in zip(tasks, held) if t in wrong]} (per-task "
                                    f"digests); the task list {tasks} was reordered (the tensors' order is {held})")


def _stacked_count(parts: Mapping[str, dict], dense: Mapping[str, torch.Tensor]) -> tuple[int, str]:
    """How many tasks the stacked tensors hold (their first dimension, where they agree), and one of them."""
    for key, p in parts.items():
        for part in "USV":
            if part in p and p[part].dim() >= 1:
                return p[part].shape[0], f"lowrank/{key}/{part}"
    for key, value in dense.items():
        if value.dim() >= 1:
            return value.shape[0], f"dense/{key}"
    return -1, ""


def _check_task_list(config: dict, parts, dense, heads) -> None:
    """Before any shape: the task list against the heads' names and the stacked tensors' task count, naming
    what is missing or extra (an extra task in a config would otherwise be blamed on some tensor's shape)."""
    tasks = config["tasks"]
    if config["has_heads"] and set(heads) != set(tasks):
        raise _field_error("tasks", f"does not match the saved heads {sorted(heads)}: tasks without a head "
                                    f"{[t for t in tasks if t not in heads]}, heads of no listed task "
                                    f"{sorted(set(heads) - set(tasks))}")
    count, name = _stacked_count(parts, dense)
    if count >= 0 and count != len(tasks):
        raise _field_error("tasks", f"lists {len(tasks)} tasks {tasks} but the saved tensors hold {count} "
                                    f"(the first dimension of {name}): "
                                    + ("the list names tasks that were not saved" if count < len(tasks)
                                       else "the list lacks saved tasks"))


def _check_tensor_set(base: Mapping[str, torch.Tensor], lowrank: Mapping, dense: Mapping) -> None:
    """Every floating pretrained weight has its tasks' values: the factors of a matrix (``lowrank/``), the whole
    values of anything else (``dense/``); name what is missing."""
    missing = [f"lowrank/{k}" if v.dim() == 2 else f"dense/{k}" for k, v in base.items()
               if v.is_floating_point() and k not in lowrank and k not in dense]
    if missing:
        raise SavedModelError(f"saved tensors: missing {_some(missing)}: every floating pretrained weight needs "
                              f"its tasks' values (factors for a matrix, whole values otherwise)")


def _some(names, n: int = 5) -> str:
    names = sorted(names)
    return f"{names[:n]}" + (f" and {len(names) - n} more" if len(names) > n else "")


def decomposition_from_tensors(config: dict, tensors: Mapping[str, torch.Tensor]):
    """(TaskDecomposition, heads or None) from a checked config and the saved tensors, after checking that
    they agree: the task list first (heads, task count, the per-task digests that bind its order), then the
    set of tensors, ranks and shapes."""
    base, parts, dense, heads = _split_names(tensors)
    T = len(config["tasks"])
    if not base:
        raise SavedModelError("saved tensors: no pretrained weights (base/...)")
    if not parts:
        raise SavedModelError("saved tensors: no low-rank factors (lowrank/...)")
    _check_task_list(config, parts, dense, heads)
    lowrank = {}
    for key, p in parts.items():
        missing = [x for x in "USV" if x not in p]
        if missing:
            raise SavedModelError(f"saved tensors: lowrank/{key} lacks part(s) {missing}")
        U, S, V = p["U"], p["S"], p["V"]
        if key not in base or base[key].dim() != 2:
            raise SavedModelError(f"saved tensors: lowrank/{key} has no 2-D pretrained weight base/{key}")
        out, inp = base[key].shape
        k = config["ranks"].get(key)
        if k is None:
            raise _field_error("ranks", f"lacks the matrix {key!r} that the tensors hold")
        want = {"U": (T, out, k), "S": (T, k), "V": (T, k, inp)}
        for part, value in (("U", U), ("S", S), ("V", V)):
            if tuple(value.shape) != want[part] or not value.is_floating_point():
                raise SavedModelError(
                    f"saved tensors: lowrank/{key}/{part} has shape {tuple(value.shape)} ({value.dtype}), expected "
                    f"a floating tensor of shape {want[part]} (tasks={T}, rank={k}, weight {tuple(base[key].shape)})")
        lowrank[key] = LowRankFactors(U, S, V)
    extra_ranks = sorted(set(config["ranks"]) - set(lowrank))
    if extra_ranks:
        raise _field_error("ranks", f"names matrices the tensors do not hold: {extra_ranks[:5]}")
    for key, value in dense.items():
        if key in lowrank or key not in base:
            raise SavedModelError(f"saved tensors: dense/{key} has no pretrained counterpart or is also low-rank")
        want = (T, *base[key].shape)
        if tuple(value.shape) != want or not value.is_floating_point():
            raise SavedModelError(
                f"saved tensors: dense/{key} has shape {tuple(value.shape)} ({value.dtype}), expected {want}")
    _check_tensor_set(base, lowrank, dense)
    _check_finite(tensors)
    _check_task_order(config, tensors)
    if config["has_heads"]:
        for task, head in heads.items():
            if head.dim() != 2 or not head.is_floating_point():
                raise SavedModelError(f"saved tensors: heads/{task} must be a 2-D floating tensor, "
                                      f"got {tuple(head.shape)} {head.dtype}")
        check_classes(config, heads)
    elif heads:
        raise _field_error("has_heads", f"is false but the tensors hold heads {sorted(heads)[:5]}")
    bank_dtype = None if config["bank_dtype"] is None else getattr(torch, config["bank_dtype"])
    if bank_dtype is not None:
        wrong = [f"lowrank/{key}/{part}" for key, f in lowrank.items() for part, t in zip("USV", (f.U, f.S, f.V))
                 if t.dtype != bank_dtype] + [f"dense/{key}" for key, v in dense.items() if v.dtype != bank_dtype]
        if wrong:
            raise _field_error("bank_dtype", f"is {config['bank_dtype']!r} but {wrong[0]} is not")
    rule = config["rank_rule"]
    if rule is None:  # written before the field: the rank rule is read off the ranks
        rule = "default" if all(f.rank == max(1, min(base[key].shape) // T) for key, f in lowrank.items()) \
            else "fixed"
    dec = TaskDecomposition(tasks=list(config["tasks"]), base=base, lowrank=lowrank, dense=dense,
                            bank_dtype=bank_dtype, rank_rule=rule)
    if dec.storage_factor() != config["storage_factor"]:
        raise _field_error("storage_factor", f"is {config['storage_factor']!r} but the tensors give "
                                             f"{dec.storage_factor()!r}")
    return dec, ({t: heads[t] for t in config["tasks"]} if config["has_heads"] else None)


def support_from_tensors(config: dict, tensors: Mapping[str, torch.Tensor]):
    """The router calibration (a :class:`mass.method.support.SupportFit`) of a checked config, or None, after checking
    that the support/ tensors agree with it: scale (G, T), basis (G, T, k, D) and centre (G, T, D) optional."""
    from mass.method.support import SupportFit

    found = {name.partition("/")[2]: value for name, value in tensors.items() if name.startswith("support/")}
    meta = config["support"]
    if meta is None:
        if found:
            raise _field_error("support", f"is null but the tensors hold support/{sorted(found)[0]}")
        return None
    G, T = len(meta["layers"]), len(config["tasks"])
    if "scale" not in found:
        raise SavedModelError("saved tensors: a calibrated router lacks support/scale")
    for name, value in found.items():
        ok = value.is_floating_point() and {
            "scale": value.shape == (G, T),
            "basis": value.dim() == 4 and value.shape[:2] == (G, T) and value.shape[2] >= 1,
            "centre": value.dim() == 3 and value.shape[:2] == (G, T),
            "whitener": value.dim() == 3 and value.shape[0] == G and value.shape[1] == value.shape[2],
        }[name]
        if not ok:
            raise SavedModelError(f"saved tensors: support/{name} has shape {tuple(value.shape)} ({value.dtype}); "
                                  f"expected a floating tensor with {G} block(s) x {T} tasks")
    if "centre" in found and ("basis" not in found or found["centre"].shape[2] != found["basis"].shape[3]):
        raise SavedModelError("saved tensors: support/centre needs a support/basis of the same width")
    if ("whitener" in found) != (meta["whiten"] > 0) or ("whitener" in found and (
            "basis" not in found or found["whitener"].shape[2] != found["basis"].shape[3])):
        raise SavedModelError(f"saved tensors: support/whitener must be present exactly when support.whiten > 0 "
                              f"(it is {meta['whiten']!r}), with a support/basis of the same width")
    _check_finite({f"support/{k}": v for k, v in found.items()})
    return SupportFit.from_tensors(found, meta)
