"""bench/flop_model.py: the FLOP model's parts against closed forms, and the report annotation."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import flop_model  # noqa: E402


def test_b32_parts_match_closed_forms():
    s = flop_model.Shape.of("B32")
    D, F, N = 768, 3072, 50
    assert flop_model.patch_flops(s) == 2 * 49 * 3 * 32 * 32 * D
    assert flop_model.block_flops(s) == 2 * N * (4 * D * D + 2 * D * F) + 4 * N * N * D
    k = D // 8  # rank-k blocks on q, k, v, out (D -> D), fc1, fc2: 2·N·k·(8D + 2(D + F)) = 2·N·18·k·D
    assert flop_model.block_flops(s, k) - flop_model.block_flops(s) == 2 * N * 18 * k * D


def test_ratios_order_and_batch_independence():
    r = flop_model.model_ratios("B32", 8, 16)["modes"]
    top1, delta, whole = (r[m]["ratio"] for m in ("top1", "topk (two-slot, delta patch GEMMs)",
                                                  "topk (two-slot, whole patch weight per set)"))
    assert 1.9 < top1 < whole < delta < 2.25
    assert flop_model.model_ratios("B32", 8, 1)["modes"]["top1"]["ratio"] == pytest.approx(top1, rel=1e-12)
    assert top1 == pytest.approx(1.951, abs=5e-4) and delta == pytest.approx(2.184, abs=5e-4)


def test_annotate_adds_model_and_measured_over_model():
    report = {"results": [
        {"provider": "ours", "model": "B32", "n_tasks": 8, "router_mode": "topk", "routing_layer": 9,
         "ratio_to_plain": 2.3},
        {"provider": "plain", "model": "B32", "n_tasks": 8, "ratio_to_plain": 1.0},
        {"provider": "ours", "model": "B32", "n_tasks": 8, "router_mode": "top1", "status": "failed"},
    ]}
    rows = flop_model.annotate(report)
    assert len(rows) == 1 and rows[0]["flop_model_ratio"] == pytest.approx(2.132, abs=5e-4)
    assert rows[0]["measured_over_model"] == pytest.approx(2.3 / rows[0]["flop_model_ratio"])
