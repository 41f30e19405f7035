"""Merge time for ``mass bench --merge``: ``mass.merge`` (decompose + build the MASS model, whose first-pass
TSV-M weights need two polar factors per matrix) with each SVD solver, on the same synthetic checkpoints.

The T fine-tuned checkpoints are written to safetensors files in a temporary folder, so the merge reads them
lazily, one tensor at a time, as it would real ones. Each 2-D delta has a slowly decaying spectrum (about
σ_i ∝ i^-1/2, like real task vectors: no gap at k), built as G₁ diag(σ) G₂ from Gaussian factors; the other
parameters get small noise. ``mode="per-block"`` times one transformer block (its six matrices, every task)
and scales by the number of blocks: an estimate for models too large to write T copies of to disk.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Optional, Sequence

import torch

from .svd_solvers import accuracy_vs_full, choose_solver


def _slow_delta(shape: tuple, gen: torch.Generator, scale: float = 1e-2) -> torch.Tensor:
    out, inp = shape
    r = min(shape)
    sigma = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    left = torch.randn(out, r, generator=gen) / out ** 0.5
    right = torch.randn(r, inp, generator=gen) / inp ** 0.5
    return scale * (left * sigma) @ right


def synthetic_task(base: dict, seed: int) -> dict:
    """One fine-tuned state dict: θ0 + a full-rank delta with a slowly decaying spectrum per matrix, small noise
    elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value
        elif value.dim() == 2:
            out[key] = (value.float() + _slow_delta(tuple(value.shape), gen)).to(value.dtype)
        else:
            out[key] = (value.float() + 1e-3 * torch.randn(value.shape, generator=gen)).to(value.dtype)
    return out


def write_tasks(base: dict, n_tasks: int, folder: str, seed: int = 0) -> dict:
    from safetensors.torch import save_file

    paths = {}
    for t in range(n_tasks):
        path = os.path.join(folder, f"task{t}.safetensors")
        save_file({k: v.contiguous() for k, v in synthetic_task(base, seed + 1 + t).items()}, path)
        paths[f"task{t}"] = path
    return paths


def _sample_keys(dec, model) -> list[str]:
    """Matrices whose accuracy is reported: the first block's q projection and fc1/fc2 of the routing block."""
    keys = [k for k in dec.lowrank if ".layers.0.self_attn.q_proj" in k]
    layer = model.routing_layer
    keys += [k for k in dec.lowrank if f".layers.{layer}.mlp.fc" in k]
    return keys


def _accuracy(dec, ref, tasks: dict, base: dict, keys: Sequence[str]) -> dict:
    """Reconstruction ratio (vs the optimum) and subspace distances of the factors, per sampled matrix and
    task; and the relative change of the TSV-M delta against the full solver's."""
    from safetensors import safe_open

    from .merging import tsv_delta

    ratios, sub_u, sub_v, tsv_change = [], [], [], []
    for key in keys:
        f = dec.lowrank[key]
        for t, path in enumerate(tasks.values()):
            with safe_open(path, framework="pt") as h:
                delta = h.get_tensor(key).float() - base[key].float()
            acc = accuracy_vs_full(delta, (f.U[t], f.S[t], f.V[t]))
            ratios.append(acc["recon_ratio"])
            sub_u.append(acc["subspace_U"])
            sub_v.append(acc["subspace_V"])
        if ref is not None:
            exact = tsv_delta(ref.lowrank[key])
            tsv_change.append(float((tsv_delta(f) - exact).norm() / exact.norm()))
    return {"matrices": list(keys), "n": len(ratios),
            "recon_ratio_median": float(torch.tensor(ratios).median()), "recon_ratio_max": max(ratios),
            "subspace_U_max": max(sub_u), "subspace_V_max": max(sub_v),
            "tsv_delta_rel_change_vs_full_max": max(tsv_change) if tsv_change else None}


def time_full_merge(name: str, n_tasks: int, solvers: Sequence[str], device: Optional[str] = None,
                    seed: int = 0, accuracy: bool = True) -> list[dict]:
    """``mass.merge`` (= decompose + MASSModel, as :func:`mass.model.merge` does) of synthetic checkpoints with
    each solver, one after the other in this process; the model and the files are shared."""
    from .bench import build_clip
    from .decompose import decompose
    from .model import MASSModel

    pretrained, _ = build_clip(name, seed=seed)
    base = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    rows, ref = [], None
    with tempfile.TemporaryDirectory(prefix="mass-merge-bench-") as folder:
        t0 = time.perf_counter()
        tasks = write_tasks(base, n_tasks, folder, seed)
        write_s = time.perf_counter() - t0
        for solver in solvers:
            t0 = time.perf_counter()
            dec = decompose(pretrained, tasks, solver=solver, device=device, progress=False)
            t1 = time.perf_counter()
            model = MASSModel(copy.deepcopy(pretrained), dec)
            t2 = time.perf_counter()
            shapes = {(tuple(f.U.shape[1:2]) + tuple(f.V.shape[2:]), f.rank) for f in dec.lowrank.values()}
            row = {"kind": "merge", "mode": "full", "model": name, "n_tasks": n_tasks, "solver": solver,
                   "device": device or "cpu", "decompose_s": t1 - t0, "first_pass_weights_s": t2 - t1,
                   "merge_s": t2 - t0, "n_matrices": len(dec.lowrank), "write_checkpoints_s": write_s,
                   "solvers_used": sorted({choose_solver(solver, s, k) for s, k in shapes})}
            if accuracy:
                row["accuracy"] = _accuracy(dec, ref, tasks, base, _sample_keys(dec, model))
            if solver == "full":
                ref = dec
            rows.append(row)
            print(f"  merge {name} T={n_tasks} solver={solver}: {row['merge_s']:.1f} s (decompose "
                  f"{row['decompose_s']:.1f} s, first-pass weights {row['first_pass_weights_s']:.1f} s)", flush=True)
            del model
    return rows


def time_block_merge(name: str, n_tasks: int, solvers: Sequence[str], device: Optional[str] = None,
                     seed: int = 0) -> list[dict]:
    """Estimate: the SVDs of one block's six matrices (all tasks, deltas in memory) and their TSV-M
    orthogonalisations, times the number of blocks. Reading checkpoints and the non-matrix parameters are not
    counted; the first-pass weights are counted for every block (the default model keeps them only up to the
    routing block)."""
    from .bench import MODEL_CONFIGS
    from .decompose import LowRankFactors, resolve_rank
    from .merging import tsv_delta
    from .svd_solvers import topk_svd

    cfg = MODEL_CONFIGS[name]
    d, h = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = [(d, d)] * 4 + [(h, d), (d, h)]
    gen = torch.Generator().manual_seed(seed)
    deltas = [torch.stack([_slow_delta(s, gen) for _ in range(n_tasks)]) for s in shapes]
    rows = []
    for solver in solvers:
        t0 = time.perf_counter()
        factors = []
        for s, stack in zip(shapes, deltas):
            k = resolve_rank(None, s, n_tasks, str(s))
            factors.append(LowRankFactors(*(t.cpu() for t in topk_svd(stack.to(device or "cpu"), k, solver))))
        t1 = time.perf_counter()
        for f in factors:
            tsv_delta(f, device=device)
        t2 = time.perf_counter()
        blocks = cfg["num_hidden_layers"]
        row = {"kind": "merge", "mode": "per-block", "model": name, "n_tasks": n_tasks, "solver": solver,
               "device": device or "cpu", "blocks": blocks, "block_decompose_s": t1 - t0,
               "block_first_pass_weights_s": t2 - t1, "decompose_s": blocks * (t1 - t0),
               "first_pass_weights_s": blocks * (t2 - t1), "merge_s": blocks * (t2 - t0),
               "n_matrices": 6 * blocks}
        rows.append(row)
        print(f"  merge {name} T={n_tasks} solver={solver} (estimate: one block × {blocks}): {row['merge_s']:.0f} s "
              f"(one block: SVDs {t1 - t0:.2f} s, orthogonalisation {t2 - t1:.2f} s)", flush=True)
    return rows


def merge_markdown(rows: Sequence[dict]) -> list[str]:
    """Lines of the summary's merge table."""
    if not rows:
        return []
    lines = ["", "## Merge time (`mass.merge` = decompose + first-pass TSV-M weights)", "",
             "| model | T | solver | how | merge s | decompose s | first-pass weights s | recon ratio median / max "
             "| max ‖UUᵀ−ÛÛᵀ‖ | TSV-M delta change vs full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r.get("accuracy") or {}
        how = "full run, lazy reads" if r["mode"] == "full" else f"one block × {r['blocks']} (estimate)"
        recon = (f"{acc['recon_ratio_median']:.4f} / {acc['recon_ratio_max']:.4f}" if acc else "—")
        sub = f"{max(acc['subspace_U_max'], acc['subspace_V_max']):.3f}" if acc else "—"
        change = acc.get("tsv_delta_rel_change_vs_full_max")
        lines.append(f"| {r['model']} | {r['n_tasks']} | {r['solver']} | {how} | {r['merge_s']:.1f} | "
                     f"{r['decompose_s']:.1f} | {r['first_pass_weights_s']:.1f} | {recon} | {sub} | "
                     f"{'—' if change is None else f'{change:.2e}'} |")
    lines += ["", "Synthetic checkpoints: per matrix a delta with a slowly decaying spectrum (σ_i ∝ i^-1/2, no gap "
              "at k). Recon ratio: ‖Δ − U S V‖_F / ‖Δ − Δ_k‖_F over the sampled matrices (first block's q, the "
              "routing block's fc1 and fc2) and every task; 1 = optimal. Without a gap the last directions of the "
              "kept block are nearly interchangeable, so the subspace distance can be large while the "
              "reconstruction stays near-optimal."]
    return lines
