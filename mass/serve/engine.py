"""One served model without Ray: load a self-contained directory, run a batch of images of any tasks as one
routed forward, and turn each image's share of it into its JSON answer.

A batch may mix images that the router places and images whose request forces a task: the routed ones run as
one routed forward (whatever their tasks), the forced ones as one forward with their tasks given. A request
that runs alone in a batch therefore runs exactly ``model.classify(images)`` (or with ``task_ids=``), and its
answer is bit-equal to the in-process call. Inside a larger batch its rows meet others in the same GEMMs; CPU
BLAS kernels pick their blocking by the number of rows (a one-row product runs as a GEMV), so an image's
logits may then differ in the last bits (bounded by the forward error bound of ``tests/_tolerances.py``), and a
routing decision can change only where two tasks' scores tie within that bound.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mass.evaluation.data import ClipPreprocess
from mass.nn.model import MASSModel, extract_embedding
from mass.storage.saved_format import SavedModelError, check_config, parse_config
from mass.storage.serialization import MODEL_NAME, read_saved

LOGIT_SCALE = 100.0


@dataclass
class Item:
    """One image of a request: its (3, H, W) input and the task it forces (None: routed)."""

    pixels: torch.Tensor
    task: Optional[str] = None


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def servable_problems(config: dict) -> list:
    """What a checked saved config lacks for ``mass serve``."""
    missing = []
    if config.get("encoder") is None:
        missing.append("the encoder's config")
    if config["has_heads"] and config.get("classes") is None:
        missing.append("the class names of its heads")
    if config.get("preprocess") is None:
        missing.append("the image preprocessing")
    return missing


def saved_config(directory) -> dict:
    """The checked config of a saved directory; the tensors are read (and checksummed) only for format 1."""
    path = Path(directory) / MODEL_NAME
    if not path.is_file():
        return read_saved(directory)[0]
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get("config")
    except Exception as exc:  # safetensors raises several types for damaged files
        raise SavedModelError(f"{path} is truncated or corrupted (cannot read it: {exc})") from exc
    if text is None:
        raise SavedModelError(f"{path} is not a MASS model file (its metadata holds no config)")
    return check_config(parse_config(text))


def check_servable(directory) -> None:
    """Refuse, with one message naming everything missing, a directory that cannot be served as it is (read
    from the config alone: a replica checks the tensors and the checksum when it loads the model)."""
    missing = servable_problems(saved_config(directory))
    if missing:
        raise SavedModelError(
            f"{directory} cannot be served: it lacks {', '.join(missing)} (saved by an older mass, or from an encoder "
            f"mass cannot describe). Load it with mass.MASSModel.from_pretrained(dir, base_model=<the pretrained "
            f"encoder>), set model.class_names = {{task: [...]}} if it has heads, and save_pretrained again")


def load_servable(directory) -> MASSModel:
    """The model of a self-contained directory (every check of a load, then :func:`check_servable`'s)."""
    model = MASSModel.from_pretrained(directory)
    check_servable(directory)
    return model


class Engine:
    """A loaded model and the two batched calls the server makes (thread-safe, as MASSModel is)."""

    def __init__(self, directory, threads: Optional[int] = None, logit_scale: float = LOGIT_SCALE):
        if threads is not None:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.directory = str(directory)
        self.model = load_servable(directory)
        self.tasks = list(self.model.tasks)
        self.preprocess = ClipPreprocess.from_spec(self.model.preprocessing)
        self.logit_scale = logit_scale
        self.load_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict:
        m = self.model
        return {
            "tasks": self.tasks,
            "classes": m.class_names,
            "router": _jsonable(m.router_config),
            "calibrated": m.support is not None,
            "storage_factor": m.storage_factor(),
            "architecture": m.arch.kind,
            "encoder": m.encoder_spec,
            "preprocess": m.preprocessing,
            "embedding_dim": m.arch.output_dim,
            "has_heads": m.heads is not None,
        }

    def summary(self) -> str:
        r = self.model.router_config
        return (f"loaded {self.directory} in {self.load_seconds:.1f}s: {len(self.tasks)} tasks {self.tasks}, "
                f"router mode={r.mode} features={r.features} basis={r.basis} layer(s)={self.model.routing_layers}"
                f" unknown={r.unknown}, heads={'yes' if self.model.heads is not None else 'no'}, storage factor "
                f"{self.model.storage_factor():.3f}, {torch.get_num_threads()} thread(s), resident memory "
                f"{rss_bytes() / 2**20:.0f} MiB")

    # ------------------------------------------------------------------ batches
    def classify(self, items: Sequence[Item]) -> list:
        """Per item, (logits of its head (C,), task index or -1, routing row (ids, weights), unknown flag)."""
        return self._groups(items, self._classify_rows)

    def embed(self, items: Sequence[Item]) -> list:
        """Per item, (embedding (D,), routing row, unknown flag)."""
        return self._groups(items, self._embed_rows)

    def _groups(self, items, run) -> list:
        """Routed items as one call, forced items as another; results in item order."""
        out = [None] * len(items)
        routed = [i for i, it in enumerate(items) if it.task is None]
        forced = [i for i, it in enumerate(items) if it.task is not None]
        for rows, tasks in ((routed, None), (forced, [items[i].task for i in forced])):
            if rows:
                x = torch.stack([items[i].pixels for i in rows])
                for i, result in zip(rows, run(x, tasks)):
                    out[i] = result
        return out

    def _classify_rows(self, x: torch.Tensor, tasks) -> list:
        c = self.model.classify(pixel_values=x, task_ids=tasks, logit_scale=self.logit_scale) \
            if self.model.arch.kind == "hf" else self.model.classify(x, task_ids=tasks, logit_scale=self.logit_scale)
        sizes = {t: self.model.head(n).shape[0] for t, n in enumerate(self.tasks)}
        out = []
        for b in range(x.shape[0]):
            t = int(c.task_ids[b])
            logits = c.logits[b, :sizes[t]] if t >= 0 else c.logits[b, :0]
            out.append((logits, t, _routing_row(c.routing, b)))
        return out

    def _embed_rows(self, x: torch.Tensor, tasks) -> list:
        out, routing = (self.model(pixel_values=x, task_ids=tasks, return_routing=True)
                        if self.model.arch.kind == "hf" else self.model(x, task_ids=tasks, return_routing=True))
        emb = extract_embedding(out)
        return [(emb[b], _routing_row(routing, b)) for b in range(x.shape[0])]


def _routing_row(routing, b: int):
    unknown = bool(routing.unknown[b]) if routing.unknown is not None else False
    return routing.task_ids[b].tolist(), routing.weights[b].tolist(), unknown


def _jsonable(config) -> dict:
    import dataclasses

    out = dataclasses.asdict(config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def classify_answer(result, tasks: Sequence[str], class_names, top_k: int, forced: bool, batch_size: int) -> dict:
    logits, t, (ids, weights, unknown) = result
    probs = F.softmax(logits.double(), dim=0) if logits.numel() else logits
    answer = {"task": tasks[t] if t >= 0 else None, "forced": forced, "unknown": unknown,
              "routing": {tasks[i]: w for i, w in zip(ids, weights) if i >= 0}, "batch_size": batch_size}
    if t < 0:
        answer.update(label=None, probability=None, top_k=[], logits=[])
        return answer
    names = class_names[tasks[t]]
    order = torch.argsort(probs, descending=True, stable=True)[:top_k].tolist()
    answer.update(label=names[order[0]], probability=float(probs[order[0]]),
                  top_k=[{"label": names[i], "index": i, "probability": float(probs[i])} for i in order],
                  logits=logits.tolist())
    return answer


def embed_answer(result, tasks: Sequence[str], forced: bool, batch_size: int) -> dict:
    emb, (ids, weights, unknown) = result
    return {"embedding": emb.tolist(), "forced": forced, "unknown": unknown,
            "routing": {tasks[i]: w for i, w in zip(ids, weights) if i >= 0}, "batch_size": batch_size}
