"""The randomised solver's accuracy study (``python -m mass.tools.bench.svd_merge --accuracy``): its measures are right.

Rounding bounds (u = 2^-24, √ accumulation model as in test_decompose_solver): fp32 factors are orthonormal
within δ = 10 √n u, so the sine between two fp32 bases of one subspace is at most √(2δ) (from cos ≥ 1 − δ).
"""
import math

import torch

from mass.tools.bench.svd_merge import accuracy_markdown, power_law_deltas, solver_effect

U32 = 2.0 ** -24


def test_power_law_deltas_have_the_asked_spectrum():
    """Built as Q₁ diag(σ) Q₂ᵀ in fp32: singular values within 10 √(mn) u σ_1 (products and QR) of i^-a."""
    d = power_law_deltas((48, 32), 3, 1.0, seed=1)
    assert d.shape == (3, 48, 32)
    want = torch.arange(1, 33, dtype=torch.float64) ** -1.0
    got = torch.linalg.svdvals(d.double())
    assert float((got - want).abs().max()) <= 10 * math.sqrt(48 * 32) * U32


def test_solver_effect_of_the_full_solver_on_itself_is_nil():
    """The full solver against itself: the same SVD call on the same matrix, so identical factors: the TSV-M and
    output changes are exactly 0, the reconstruction is the optimum (ratio 1 within the fp32 rounding of the
    product, 10 √(mn) u ‖A‖₂ over an optimal error ‖σ_{k+1:}‖), and the sine between the bases is the rounding
    bound √(2δ) of the module docstring."""
    deltas = power_law_deltas((64, 48), 2, 1.0, seed=2)
    row = solver_effect(deltas, 12, "full")
    assert row["tsv_delta_change"] == 0.0 and row["tsv_output_change"] == 0.0
    assert row["block_output_change_max"] == 0.0
    optimal = float((torch.arange(13, 49, dtype=torch.float64) ** -1.0).norm())
    assert abs(row["recon_ratio_max"] - 1) <= 10 * math.sqrt(64 * 48) * U32 / optimal
    assert row["subspace_max"] <= math.sqrt(2 * 10 * math.sqrt(64) * U32)
    assert row["k"] == 12 and row["shape"] == [64, 48] and row["n_tasks"] == 2


def test_solver_effect_sees_the_randomised_solver_rotate_a_gapless_block():
    """σ_i = i^-1/2 (no gap at k): the randomised factors are near-optimal (ratio within the bound that
    test_decompose_solver derives, here loosely 1.05) while the kept subspaces differ well beyond rounding."""
    deltas = power_law_deltas((128, 128), 4, 0.5, seed=3)
    row = solver_effect(deltas, 16, "randomized")
    assert 1 - 1e-4 <= row["recon_ratio_median"] <= row["recon_ratio_max"] <= 1.05
    assert row["subspace_max"] > 10 * math.sqrt(2 * 10 * math.sqrt(128) * U32)
    assert row["tsv_delta_change"] > 0 and row["block_output_change_max"] > 0
    lines = accuracy_markdown({"synthetic": [dict(row, exponent=0.5)], "demo": None})
    assert any(line.startswith("| σ_i = i^-0.5 (randomized) | 128×128 | 16 |") for line in lines)
