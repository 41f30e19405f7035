"""FLOP model of a MASS forward against one plain forward of a CLIP ViT (issue 16, part 5).

What the math needs, counting a multiply-add as 2 FLOPs and leaving out the elementwise work (LayerNorm, GELU,
softmax, residual adds, biases: O(tokens·width) per op against O(tokens·width²) for the GEMMs). Per image, with
N = (image/patch)² + 1 tokens, width D, MLP width F, P = 3·patch² patch pixels, L blocks:

* plain:     patch GEMM 2·(N−1)·P·D, per block 2·N·(4D² + 2DF) for q, k, v, out, fc1, fc2 and 4·N²·D for the
             attention products (QKᵀ and AV).
* top-1:     first pass: the patch GEMM, ``routing_layer`` whole blocks, then the routing block's keys and
             values for every token (2·2·N·D²) and its CLS row (query, attention, output projection: O(N·D));
             the router 2·T·k·D. Second pass: the patch GEMM with the task's whole patch weight (as many FLOPs
             as the plain one), every linear ``in → out`` as its base GEMM plus a rank-k block
             2·N·k·(in + out), the attention as plain.
* two-slot (``topk`` on a two-task set, TSV-M over the pair): the same first pass; in the second pass each
             linear carries two rank-k slots, i.e. rank 2k (2·N·2k·(in + out)). The patch embedding is the
             base GEMM plus one delta GEMM per slot (3× the plain patch GEMM) unless a whole patch weight
             is cached per set (then 1×, at out·in·4 bytes per cached set).

For ViT-B/32, T = 8 (k = 96), any batch (``python bench/flop_model.py``): plain 8.82 GFLOP per image; top-1
1.951× plain (first pass 0.770×, second pass 1.181×); two-slot 2.184× with delta patch GEMMs, 2.132× with a
whole patch weight per set. HF CLIP has separate q, k, v projections, so the rank-k blocks add 18·k·D FLOPs
per token and block against 12·D² (+18.75% of the linear FLOPs at T = 8; 16·k·D, +16.7%, the issue's 1.167×,
with open_clip's fused in_proj) for top-1, twice that for two slots.

Early routers (issue 25, ``early_ratio``; ``python bench/flop_model.py --early``): routing at block l
costs the patch GEMM, l whole blocks and the (trimmed) routing block before the whole second pass; with prefix
reuse the second pass runs only the blocks after l, so the total is about one forward plus the router and the
rank-k blocks of the blocks after l.

``annotate(report)`` adds the model's ratio and measured/model to the ``ours`` rows of a ``mass bench``
report; ``python bench/flop_model.py --report FILE.json`` prints them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mass.tools.bench.models import MODEL_CONFIGS  # noqa: E402

GFLOP = 1e9


@dataclass(frozen=True)
class Shape:
    """A CLIP ViT's GEMM-relevant sizes."""

    width: int
    mlp: int
    layers: int
    image: int
    patch: int

    @classmethod
    def of(cls, name: str) -> "Shape":
        c = MODEL_CONFIGS[name]
        return cls(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["image_size"],
                   c["patch_size"])

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear of a block: q, k, v, out projection, fc1, fc2."""
        D, F = self.width, self.mlp
        return [(D, D)] * 4 + [(D, F), (F, D)]


def patch_flops(s: Shape) -> float:
    return 2.0 * (s.tokens - 1) * 3 * s.patch ** 2 * s.width


def block_flops(s: Shape, rank: int = 0) -> float:
    """One block over one image: the base GEMMs, a rank-``rank`` block on every linear, the attention."""
    N = s.tokens
    linear = sum(2.0 * N * (i * o + rank * (i + o)) for i, o in s.linears())
    return linear + 4.0 * N * N * s.width


def routing_block_flops(s: Shape) -> float:
    """The trimmed routing block of the first pass: keys and values for every token, the CLS row's query,
    attention and output projection (its MLP input is the feature: fc1 is not run)."""
    N, D = s.tokens, s.width
    return 2.0 * 2 * N * D * D + 2.0 * 2 * D * D + 4.0 * N * D


def plain_flops(s: Shape, batch: int) -> float:
    return batch * (patch_flops(s) + s.layers * block_flops(s))


def first_pass_flops(s: Shape, batch: int, routing_layer: int, n_tasks: int) -> float:
    """Patch GEMM, ``routing_layer`` whole blocks, the trimmed routing block and the router's one GEMM."""
    rank = s.width // n_tasks
    router = 2.0 * n_tasks * rank * s.width
    return batch * (patch_flops(s) + routing_layer * block_flops(s) + routing_block_flops(s) + router)


def second_pass_flops(s: Shape, batch: int, n_tasks: int, slots: int = 1, patch_whole: bool = True) -> float:
    """Every linear with ``slots`` rank-k blocks (k = width / T); the patch embedding as one GEMM with a
    whole weight (``patch_whole``) or the base GEMM plus one delta GEMM per slot."""
    rank = s.width // n_tasks
    patch = patch_flops(s) * (1 if patch_whole else 1 + slots)
    return batch * (patch + s.layers * block_flops(s, slots * rank))


def model_ratios(name: str = "B32", n_tasks: int = 8, batch: int = 16, routing_layer: int | None = None) -> dict:
    """FLOPs of each mode and its ratio to one plain forward (the ratio does not depend on the batch)."""
    s = Shape.of(name)
    L = routing_layer if routing_layer is not None else _paper_layer(s.layers)
    plain = plain_flops(s, batch)
    first = first_pass_flops(s, batch, L, n_tasks)
    modes = {
        "top1": second_pass_flops(s, batch, n_tasks, 1, True),
        "topk (two-slot, delta patch GEMMs)": second_pass_flops(s, batch, n_tasks, 2, False),
        "topk (two-slot, whole patch weight per set)": second_pass_flops(s, batch, n_tasks, 2, True),
    }
    out = {"model": name, "n_tasks": n_tasks, "batch": batch, "routing_layer": L, "plain_gflop": plain / GFLOP,
           "first_pass_ratio": first / plain, "modes": {}}
    for mode, second in modes.items():
        out["modes"][mode] = {"gflop": (first + second) / GFLOP, "second_pass_ratio": second / plain,
                              "ratio": (first + second) / plain}
    return out


def _paper_layer(n_blocks: int) -> int:
    """The router's default block (``RouterConfig``: 9 of 12, 20 of 24, else 3/4 of the depth)."""
    from mass.method.router import RouterConfig

    return RouterConfig().resolved_layers(n_blocks)[-1]


def attention_part_flops(s: Shape) -> float:
    """A whole block up to its MLP input (q, k, v, out projection and the attention, every token): the routing
    block of a first pass that reads a token mean (all rows are needed, so it cannot be trimmed to the CLS row)."""
    N, D = s.tokens, s.width
    return 2.0 * N * 4 * D * D + 4.0 * N * N * D


def early_ratio(name: str, n_tasks: int, routing_layer: int, reuse_prefix: bool = False, token: str = "cls",
                blocks_scored: int = 1) -> float:
    """Top-1 routed forward over one plain forward with the routing block at ``routing_layer`` (issue 25).

    Without prefix reuse: the first pass runs the patch GEMM and ``routing_layer`` whole blocks, then the routing
    block trimmed to the CLS row (``token="cls"``) or up to its MLP input for every token (a token mean); the
    router's GEMM per scored block; the second pass is the whole top-1 pass. With prefix reuse: the first pass
    runs the routing block whole (its output is replayed), the second pass only the blocks after it (no patch
    GEMM: the replayed blocks and the embedding are skipped)."""
    s = Shape.of(name)
    rank = s.width // n_tasks
    router = 2.0 * n_tasks * rank * s.width * blocks_scored
    plain = plain_flops(s, 1)
    if reuse_prefix:
        first = patch_flops(s) + (routing_layer + 1) * block_flops(s) + router
        second = (s.layers - routing_layer - 1) * block_flops(s, rank)
    else:
        routing_block = routing_block_flops(s) if token == "cls" else attention_part_flops(s)
        first = patch_flops(s) + routing_layer * block_flops(s) + routing_block + router
        second = second_pass_flops(s, 1, n_tasks, 1, True)
    return (first + second) / plain


def model_ratio(name: str, n_tasks: int, router_mode: str, routing_layer: int | None = None,
                patch_whole_for_sets: bool = True) -> float:
    """The FLOP model's ratio to plain for one ``mass bench`` row (``top1``; ``topk``/``weighted``: two slots)."""
    r = model_ratios(name, n_tasks, 1, routing_layer)["modes"]
    if router_mode == "top1":
        return r["top1"]["ratio"]
    key = "whole patch weight per set" if patch_whole_for_sets else "delta patch GEMMs"
    return r[f"topk (two-slot, {key})"]["ratio"]


def annotate(report: dict, patch_whole_for_sets: bool = True) -> list[dict]:
    """Add ``flop_model_ratio`` and ``measured_over_model`` to each timed ``ours`` row of a bench report
    (mixed batches: the two-slot rows put every sample on a pair). ``patch_whole_for_sets``: the CPU path
    since the set patch-weight cache (at most T groups per call, which the bench's rows never exceed);
    False for the code before it. Returns the annotated rows."""
    rows = []
    for r in report.get("results", []):
        if r.get("provider") != "ours" or r.get("ratio_to_plain") is None or r.get("model") not in MODEL_CONFIGS:
            continue
        if r.get("reuse_prefix"):
            model = early_ratio(r["model"], r["n_tasks"], r["routing_layer"], reuse_prefix=True)
        else:
            model = model_ratio(r["model"], r["n_tasks"], r.get("router_mode") or "top1", r.get("routing_layer"),
                                patch_whole_for_sets)
        r["flop_model_ratio"] = model
        r["measured_over_model"] = r["ratio_to_plain"] / model
        rows.append(r)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="B32", choices=[m for m in MODEL_CONFIGS if m != "tiny"])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--report", default=None, help="a mass bench JSON: print measured against the model")
    p.add_argument("--patch-delta-for-sets", dest="patch_whole_for_sets", action="store_false",
                   help="model the two-slot patch embedding as base + one delta GEMM per slot (code before the "
                        "set patch-weight cache)")
    p.add_argument("--early", action="store_true", help="the top-1 ratio per routing block, with and without "
                                                         "prefix reuse (issue 25)")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            report = json.load(f)
        for r in annotate(report, args.patch_whole_for_sets):
            print(f"{r['model']} T={r['n_tasks']} B={r['batch']:<3d} {r['mix']:6s} {r.get('router_mode') or '':6s} "
                  f"{r.get('variant') or '':9s} block {r.get('routing_layer')!s:3s} "
                  f"measured {r['ratio_to_plain']:.3f}x  model {r['flop_model_ratio']:.3f}x  "
                  f"measured/model {r['measured_over_model']:.3f}")
        return
    if args.early:
        s = Shape.of(args.model)
        print(f"{args.model}, T={args.tasks}, top-1, routing block l (0-based) of {s.layers}: ratio to one plain "
              f"forward (FLOPs)")
        print("   l   cls    mean   cls+reuse_prefix")
        for l in range(s.layers):
            print(f"  {l:2d}  {early_ratio(args.model, args.tasks, l):.3f}  "
                  f"{early_ratio(args.model, args.tasks, l, token='mean'):.3f}  "
                  f"{early_ratio(args.model, args.tasks, l, reuse_prefix=True):.3f}")
        return
    m = model_ratios(args.model, args.tasks, args.batch)
    print(f"{m['model']}, T={m['n_tasks']}, batch {m['batch']}, routing block {m['routing_layer']}: "
          f"plain {m['plain_gflop']:.1f} GFLOP; first pass {m['first_pass_ratio']:.3f}x plain")
    for mode, v in m["modes"].items():
        print(f"  {mode:45s} {v['gflop']:7.1f} GFLOP  second pass {v['second_pass_ratio']:.3f}x  "
              f"total {v['ratio']:.3f}x plain")


if __name__ == "__main__":
    main()
