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

from mass.method.svd_solvers import accuracy_vs_full, choose_solver


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

    from mass.method.merging import tsv_delta

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
    """``mass.merge`` (= decompose + MASSModel, as :func:`mass.merge` does) of synthetic checkpoints with
    each solver, one after the other in this process; the model and the files are shared."""
    from mass.tools.bench.models import build_clip
    from mass.method.decompose import decompose
    from mass.nn.model import MASSModel

    pretrained, _ = build_clip(name, seed=seed)
    base = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    rows, ref = [], None
    with tempfile.TemporaryDirectory(prefix="mass-merge-bench-") as folder:
        t0 = time.perf_counter()
        tasks = write_tasks(base, n_tasks, folder, seed)
        write_s = time.perf_counter() - t0
        for solver in solvers:
            fresh = copy.deepcopy(pretrained)  # mass.merge wraps the caller's model in place: the copy is not timed
            t0 = time.perf_counter()
            dec = decompose(pretrained, tasks, solver=solver, device=device, progress=False)
            t1 = time.perf_counter()
            model = MASSModel(fresh, dec)
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
    from mass.tools.bench.models import MODEL_CONFIGS
    from mass.method.decompose import LowRankFactors, resolve_rank
    from mass.method.merging import tsv_delta
    from mass.method.svd_solvers import topk_svd

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


# ---------------------------------------------------------------- accuracy of the randomised solver
def power_law_deltas(shape: tuple, n_tasks: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """T deltas (T, out, in) with σ_i = i^-exponent and random orthonormal singular vectors (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(shape)
    left = torch.linalg.qr(torch.randn(n_tasks, m, r, generator=gen)).Q
    right = torch.linalg.qr(torch.randn(n_tasks, n, r, generator=gen)).Q
    sigma = torch.arange(1, r + 1, dtype=torch.float32) ** -exponent
    return (left * sigma) @ right.mT


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def solver_effect(deltas: torch.Tensor, k: int, solver: str = "randomized", n_inputs: int = 256,
                  seed: int = 0) -> dict:
    """How the truncated solver's factors of one matrix's T deltas differ from the full SVD's (fp32 both):
    per task, the rank-k reconstruction error relative to the optimum (1 = optimal) and the sine of the largest
    principal angle between the kept left / right subspaces; the TSV-M delta's relative change; and on Gaussian
    inputs x the relative change of x·Δᵀ for each task's block and for the TSV-M delta."""
    from mass.method.decompose import LowRankFactors
    from mass.method.merging import tsv_delta
    from mass.method.svd_solvers import subspace_distance, topk_svd

    A = deltas.float()
    Uf, Sall, Vhf = torch.linalg.svd(A, full_matrices=False)
    full = LowRankFactors(Uf[..., :k].contiguous(), Sall[..., :k].contiguous(), Vhf[..., :k, :].contiguous())
    rand = LowRankFactors(*topk_svd(A, k, solver))
    x = torch.randn(n_inputs, A.shape[-1], generator=torch.Generator().manual_seed(seed))
    ratios, sub_u, sub_v, block_out = [], [], [], []
    for t in range(A.shape[0]):
        optimal = float(Sall[t, k:].norm())
        ratios.append(float((A[t] - rand.delta(t)).norm()) / optimal if optimal > 0 else 1.0)
        sub_u.append(subspace_distance(rand.U[t], full.U[t]))
        sub_v.append(subspace_distance(rand.V[t].mT, full.V[t].mT))
        block_out.append(_rel(x @ rand.delta(t).mT, x @ full.delta(t).mT))
    tsv_r, tsv_f = tsv_delta(rand), tsv_delta(full)
    tail = Sall[:, k] / Sall[:, k - 1].clamp_min(1e-30)
    return {"shape": list(A.shape[1:]), "n_tasks": A.shape[0], "k": k, "solver": solver,
            "sigma_k_over_sigma_1_median": float((Sall[:, k - 1] / Sall[:, 0]).median()),
            "gap_sigma_k1_over_sigma_k_median": float(tail.median()),
            "recon_ratio_median": float(torch.tensor(ratios).median()), "recon_ratio_max": max(ratios),
            "subspace_max": max(max(sub_u), max(sub_v)),
            "subspace_median": float(torch.tensor(sub_u + sub_v).median()),
            "block_output_change_max": max(block_out),
            "tsv_delta_change": _rel(tsv_r, tsv_f), "tsv_output_change": _rel(x @ tsv_r.mT, x @ tsv_f.mT)}


def _demo_cache(cache_root: Optional[str] = None) -> Optional[str]:
    """A cache folder of the current demo (fine-tuned from the committed pretrained CLIP), or None."""
    import json

    from mass.tools.demo import clip_pretrain

    root = os.path.expanduser(cache_root or os.environ.get("MASS_DEMO_CACHE", "~/.cache/mass-demo"))
    if not os.path.isdir(root):
        return None
    sha = clip_pretrain.weights_sha256()
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        meta = os.path.join(folder, "meta.json")
        if not os.path.exists(meta):
            continue
        config = json.load(open(meta)).get("config", {})
        n_tasks = config.get("n_tasks")
        if (config.get("pretrained_sha256") == sha and not config.get("quick") and n_tasks and
                len([f for f in os.listdir(folder) if f.startswith("finetuned_")]) == n_tasks):
            return folder
    return None


@torch.no_grad()
def demo_solver_effect(folder: str, n_images: int = 64, seed: int = 0) -> dict:
    """The demo's fine-tuned checkpoints (128-d CLIP encoder, T = 8, k = 16: ``auto`` picks the full SVD there)
    merged with the full and the randomised solver: the per-matrix statistics of :func:`solver_effect` over
    every matrix, and the whole MASS model's outputs on random images (top-1 routing agreement, relative change
    of the routed embeddings and of the TSV-M first-pass model's). The accuracy effect on the demo's test
    images is measured by ``bench/demo_solver_effect.py``."""
    from safetensors.torch import load_file

    from mass.nn.clip import vision_encoder
    from mass.tools.demo import clip_pretrain
    from mass.nn.merge import merge
    from mass.nn.model import extract_embedding

    tasks = {f[len("finetuned_"):-len(".safetensors")]: os.path.join(folder, f)
             for f in sorted(os.listdir(folder)) if f.startswith("finetuned_")}

    def pretrained():
        return vision_encoder(clip_pretrain.load_asset()[0]).eval()

    base = pretrained().state_dict()
    per_matrix = []
    loaded = {name: load_file(path) for name, path in tasks.items()}
    for key, value in base.items():
        if value.dim() != 2 or not value.is_floating_point() or key not in next(iter(loaded.values())):
            continue
        deltas = torch.stack([sd[key].float() - value.float() for sd in loaded.values()])
        k = max(1, min(value.shape) // len(tasks))
        row = solver_effect(deltas, k, "randomized", seed=seed)
        row["matrix"] = key
        per_matrix.append(row)
    size = pretrained().config.image_size
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    models = {s: merge(pretrained(), tasks, solver=s, progress=False, keep_merged="all")
              for s in ("full", "randomized")}
    routed = {s: m(pixel_values=images, return_routing=True) for s, m in models.items()}
    ids = {s: r.task_ids for s, (_, r) in routed.items()}
    forced = {s: extract_embedding(m(pixel_values=images, task_ids=ids["full"])) for s, m in models.items()}
    first = {s: extract_embedding(m.forward_merged(pixel_values=images)) for s, m in models.items()}
    same_route = float((ids["full"] == ids["randomized"]).all(1).float().mean())
    model_row = {"n_images": n_images, "route_agreement": same_route,  # same top-k sets
                 "routed_embedding_change": _rel(extract_embedding(routed["randomized"][0]),
                                                 extract_embedding(routed["full"][0])),
                 "same_tasks_embedding_change": _rel(forced["randomized"], forced["full"]),
                 "first_pass_embedding_change": _rel(first["randomized"], first["full"])}
    return {"folder": folder, "n_tasks": len(tasks), "per_matrix": per_matrix, "model": model_row}


SYNTHETIC_CASES = (((768, 768), 0.5), ((768, 768), 1.0), ((768, 768), 2.0), ((3072, 768), 1.0))


def accuracy_study(n_tasks: int = 8, cases=SYNTHETIC_CASES, demo: bool = True, seed: int = 0) -> dict:
    """:func:`solver_effect` of ``auto`` (randomised at these sizes) on power-law spectra, and of the forced
    randomised solver on the demo's checkpoints when they are cached (:func:`demo_solver_effect`)."""
    from mass.method.svd_solvers import choose_solver

    rows = []
    for shape, exponent in cases:
        k = min(shape) // n_tasks
        row = solver_effect(power_law_deltas(shape, n_tasks, exponent, seed), k, "auto", seed=seed)
        row.update(exponent=exponent, solver=choose_solver("auto", shape, k))
        rows.append(row)
        print(f"  σ_i = i^-{exponent} {shape}: recon ratio max {row['recon_ratio_max']:.4f}, TSV-M delta change "
              f"{row['tsv_delta_change']:.3f}", flush=True)
    folder = _demo_cache() if demo else None
    return {"synthetic": rows, "demo": demo_solver_effect(folder, seed=seed) if folder else None}


def accuracy_markdown(study: dict) -> list[str]:
    head = ("| spectrum | shape | k | σ_k/σ_1 | σ_k+1/σ_k | recon ratio median / max | subspace sine median / "
            "max | task block output change max | TSV-M delta change | TSV-M output change |")
    lines = ["## The randomised solver against the full SVD", "", head, "|" + "---|" * 10]

    def line(name, r):
        return (f"| {name} | {r['shape'][0]}×{r['shape'][1]} | {r['k']} | "
                f"{r['sigma_k_over_sigma_1_median']:.3f} | {r['gap_sigma_k1_over_sigma_k_median']:.3f} | "
                f"{r['recon_ratio_median']:.4f} / {r['recon_ratio_max']:.4f} | {r['subspace_median']:.3f} / "
                f"{r['subspace_max']:.3f} | {r['block_output_change_max']:.2e} | {r['tsv_delta_change']:.2e} | "
                f"{r['tsv_output_change']:.2e} |")

    lines += [line(f"σ_i = i^-{r['exponent']} ({r['solver']})", r) for r in study["synthetic"]]
    demo = study.get("demo")
    if demo:
        lines += [line(f"demo {r['matrix']} (randomized)", r) for r in demo["per_matrix"]]
        m = demo["model"]
        lines += ["", f"Demo MASS model (T = {demo['n_tasks']}), full vs randomised solver, {m['n_images']} random "
                  f"images: same top-k routing for {100 * m['route_agreement']:.1f}% of them; embedding change "
                  f"(relative, Frobenius) routed {m['routed_embedding_change']:.2e}, same tasks forced "
                  f"{m['same_tasks_embedding_change']:.2e}, first-pass (TSV-M) model {m['first_pass_embedding_change']:.2e}."]
    lines += ["", "σ's are medians over the T = 8 tasks. Recon ratio: ‖Δ − U S V‖_F / ‖Δ − Δ_k‖_F (1 = optimal). "
              "Subspace sine: ‖UUᵀ − U_kU_kᵀ‖₂ against the full SVD's top-k (left and right). Output changes: "
              "‖x(Δ̂ − Δ)ᵀ‖_F / ‖xΔᵀ‖_F on 256 Gaussian inputs, for each task's rank-k block and for the TSV-M delta."]
    return lines


def main(argv=None) -> dict:
    import argparse
    import json

    p = argparse.ArgumentParser(description="Accuracy of the randomised SVD solver against the full SVD")
    p.add_argument("--accuracy", action="store_true", help="run the accuracy study (the only mode)")
    p.add_argument("--no-demo", action="store_true", help="skip the demo's cached checkpoints")
    p.add_argument("--out", default=None, help="write JSON and Markdown to OUT.json / OUT.md")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if not args.accuracy:
        p.error("pass --accuracy (merge timing runs from `mass bench --merge-only`)")
    if args.threads:
        torch.set_num_threads(args.threads)
    study = accuracy_study(demo=not args.no_demo)
    text = "\n".join(accuracy_markdown(study)) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(study, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    return study


if __name__ == "__main__":
    main()
