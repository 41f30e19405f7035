"""Measure the demo benchmark: per-task accuracies and what the MASS router would see.

``python -m mass.demo.report [--quick] [--n-tasks 8] [--cache-dir DIR]``

Router check (data-free projection router, MASS.md section 3, simplest variant): for block L and task t, take
the fine-tuned-minus-pretrained delta of ``encoder.layers[L].mlp.fc1.weight`` (out x in), SVD it and keep the
top ``k = floor(min(out, in) / T)`` right singular vectors ``V_t`` (k x in). For each test image of every task,
read the input of that block's fc1 (the output of ``layer_norm2``; forward hook on ``mlp.fc1``) through the
**pretrained** model, take the CLS token (or the mean over all tokens), and predict
``argmin_t ||x - V_t^T V_t x||``. Routing accuracy = fraction of test images sent to their own task.
(MASS proper reads the features from the TSV-merged model; the pretrained model is the simplest stand-in.)
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .tasks import Task
from .training import DemoArtifacts, encoder_layers, prepare_demo


def _key(sd: Dict[str, torch.Tensor], suffix: str) -> str:
    ks = [k for k in sd if k.endswith(suffix)]
    if len(ks) != 1:
        raise KeyError(f"{suffix!r}: {ks}")
    return ks[0]


def fc1_bases(pretrained_sd: Dict[str, torch.Tensor], finetuned: Dict[str, Dict[str, torch.Tensor]],
              names: Sequence[str], block: int, k: Optional[int] = None) -> torch.Tensor:
    """Stacked right-singular bases (T, k, in) of each task's fc1 weight delta at ``block``."""
    key = _key(pretrained_sd, f"encoder.layers.{block}.mlp.fc1.weight")
    w0 = pretrained_sd[key].float()
    if k is None:
        k = min(w0.shape) // len(names)
    vs = []
    for n in names:
        _, _, vh = torch.linalg.svd(finetuned[n][key].float() - w0, full_matrices=False)
        vs.append(vh[:k])
    return torch.stack(vs)


@torch.no_grad()
def fc1_inputs(model: torch.nn.Module, images: torch.Tensor, blocks: Sequence[int], batch_size: int = 256
               ) -> Dict[int, Dict[str, torch.Tensor]]:
    """For each block: {"cls": (N, D), "mean": (N, D)} of the input of ``mlp.fc1`` (= layer_norm2 output)."""
    layers = encoder_layers(model)
    store: Dict[int, Dict[str, List[torch.Tensor]]] = {b: {"cls": [], "mean": []} for b in blocks}
    hooks = []
    for b in blocks:
        def hook(mod, inp, out, b=b):
            h = inp[0]  # (B, S, D), batch first in HF CLIP
            store[b]["cls"].append(h[:, 0].float())
            store[b]["mean"].append(h.mean(1).float())
        hooks.append(layers[b].mlp.fc1.register_forward_hook(hook))
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(pixel_values=images[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {b: {t: torch.cat(v) for t, v in d.items()} for b, d in store.items()}


def residuals(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(N, T) residual norms ||x - V_t^T V_t x|| = sqrt(||x||^2 - ||V_t x||^2), fp32."""
    x = x.float()
    proj = torch.einsum("nd,tkd->ntk", x, V.float()).pow(2).sum(-1)
    return (x.pow(2).sum(-1, keepdim=True) - proj).clamp_min(0).sqrt()


def routing_table(art: DemoArtifacts, blocks: Optional[Sequence[int]] = None) -> Dict[str, object]:
    names = art.task_names
    T = len(names)
    blocks = list(range(art.config.num_layers)) if blocks is None else list(blocks)
    x = torch.cat([t.test_images for t in art.tasks])
    y = torch.cat([torch.full((len(t.test_labels),), i) for i, t in enumerate(art.tasks)])
    feats = fc1_inputs(art.pretrained, x, blocks)
    sd0 = art.pretrained.state_dict()
    acc: Dict[str, Dict[int, float]] = {"cls": {}, "mean": {}}
    per_task: Dict[str, Dict[int, List[float]]] = {"cls": {}, "mean": {}}
    zsum = {"cls": 0, "mean": 0}
    for b in blocks:
        V = fc1_bases(sd0, art.finetuned, names, b)
        for tok in ("cls", "mean"):
            r = residuals(feats[b][tok], V)
            pred = r.argmin(-1)
            acc[tok][b] = pred.eq(y).float().mean().item()
            per_task[tok][b] = [pred[y == i].eq(i).float().mean().item() for i in range(T)]
            s = -r
            zsum[tok] = zsum[tok] + (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + 1e-6)
    multi = {tok: zsum[tok].argmax(-1).eq(y).float().mean().item() for tok in ("cls", "mean")}
    return {"blocks": blocks, "acc": acc, "per_task": per_task, "multi_block": multi, "k": min(
        sd0[_key(sd0, "encoder.layers.0.mlp.fc1.weight")].shape) // T, "chance": 1.0 / T}


def format_report(art: DemoArtifacts, rt: Dict[str, object]) -> str:
    names = art.task_names
    lines = ["| task | stands in for | classes | pretrained + head | fine-tuned |", "|---|---|---|---|---|"]
    for t in art.tasks:
        m = art.metrics[t.name]
        lines.append(f"| {t.name} | {t.description.replace('stand-in for ', '')} | {t.num_classes} | "
                     f"{m['pretrained_acc']:.3f} | {m['finetuned_acc']:.3f} |")
    pa = sum(art.metrics[n]["pretrained_acc"] for n in names) / len(names)
    fa = sum(art.metrics[n]["finetuned_acc"] for n in names) / len(names)
    lines.append(f"| **mean** | | | **{pa:.3f}** | **{fa:.3f}** |")
    lines += ["", f"Routing accuracy (pretrained-model features, fc1 input, k = {rt['k']}, T = {len(names)}, "
              f"chance = {rt['chance']:.3f}):", "",
              "| block | " + " | ".join(str(b) for b in rt["blocks"]) + " |",
              "|---|" + "---|" * len(rt["blocks"])]
    for tok in ("cls", "mean"):
        lines.append(f"| {tok} | " + " | ".join(f"{rt['acc'][tok][b]:.3f}" for b in rt["blocks"]) + " |")
    lines += ["", f"Sum of standardised scores over all blocks: CLS {rt['multi_block']['cls']:.3f}, "
              f"mean {rt['multi_block']['mean']:.3f}.", "",
              f"Per-task routing accuracy, CLS, block {art.config.router_block} (the default L):", "",
              "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
              "| " + " | ".join(f"{v:.2f}" for v in rt["per_task"]["cls"][art.config.router_block]) + " |"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-tasks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    art = prepare_demo(cache_dir=a.cache_dir, quick=a.quick, n_tasks=a.n_tasks, seed=a.seed,
                       progress=not a.no_progress, num_threads=a.threads)
    t1 = time.perf_counter()
    rt = routing_table(art)
    t2 = time.perf_counter()
    print(format_report(art, rt))
    tm = art.timings
    print("\nTimings of the run that trained (s): " + ", ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in tm.items()))
    print(f"This call: prepare_demo {t1 - t0:.1f}s, routing check {t2 - t1:.1f}s"
          + (" (loaded from cache)" if art.loaded_from_cache else ""))


if __name__ == "__main__":
    main()
