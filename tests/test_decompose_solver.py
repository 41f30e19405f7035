"""Truncated SVD solvers of the offline decomposition, and the TSV-M orthogonalisation.

Bounds used below (A is m × n, σ_1 ≥ σ_2 ≥ … its singular values, u = 2^-24 the fp32 unit roundoff):
* Randomised range finder with l = k + p columns, p ≥ 2 (Halko, Martinsson & Tropp 2011, eq. 1.9): with
  probability at least 1 − 6 p^-p, ‖(I − QQᵀ)A‖₂ ≤ C σ_{k+1}, C = 1 + 11 √(k+p) √min(m, n). With q power
  iterations the same bound holds for (AAᵀ)^q A, whose singular values are σ^(2q+1), and
  ‖(I − QQᵀ)A‖₂ ≤ ‖(I − QQᵀ)(AAᵀ)^q A‖₂^(1/(2q+1)) (their Prop. 8.6): ε ≤ C^(1/(2q+1)) σ_{k+1}.
* fp32 arithmetic adds a normwise error of at most FP32_SLACK = 10 √(mn) u ‖A‖₂ to that (products, QR and
  the small SVD are backward stable; √ accumulation model of the rounding errors of inner products).
* With ε' = ε + FP32_SLACK: Weyl gives |Ŝ_i − σ_i| ≤ ε'; ‖A − Â_k‖₂ ≤ σ_{k+1} + ε' (HMT Thm 9.3); Wedin gives
  ‖UUᵀ − ÛÛᵀ‖₂ ≤ ε' / (σ_k − σ_{k+1} − ε') when the denominator is positive; and since
  ‖A − Â_k‖_F² = ‖A‖_F² − Σ_{i≤k} Ŝ_i², the Frobenius excess over the optimum is at most 2 ε' Σ_{i≤k} σ_i.
"""
import math

import pytest
import torch

import mass
from mass.method.decompose import LowRankFactors
from mass.method.merging import polar_factor, tsv_delta, tsv_factors
import mass.method.svd_solvers as svd_solvers
from mass.method.svd_solvers import (
    LU_MAX_COND,
    _lu_basis,
    _power_basis,
    accuracy_vs_full,
    choose_solver,
    default_oversample,
    full_topk,
    randomized_topk,
    subspace_distance,
    topk_svd,
)

from _tolerances import U32, U64, gamma


def _with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A = U diag(σ) Vᵀ with random orthonormal U, V (built in fp64, returned in fp32)."""
    g = torch.Generator().manual_seed(seed)
    r = sigma.numel()
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return ((U * sigma.double()) @ V.T).float()


def _range_finder_bound(m, n, k, p, q, sigma_k1, sigma_1):
    C = 1 + 11 * math.sqrt(k + p) * math.sqrt(min(m, n))
    return C ** (1 / (2 * q + 1)) * sigma_k1 + 10 * math.sqrt(m * n) * U32 * sigma_1


def _count_qr(monkeypatch) -> list:
    """Spy on the solver's Householder QR: the list grows by one per call."""
    calls = []
    qr = svd_solvers._orthonormal_basis
    monkeypatch.setattr(svd_solvers, "_orthonormal_basis", lambda block: calls.append(1) or qr(block))
    return calls


def test_randomized_keeps_the_subspace_when_the_spectrum_has_a_gap(monkeypatch):
    m, n, k, q = 384, 320, 24, 2
    p = default_oversample(k)
    head = torch.linspace(2.0, 1.0, k)
    tail = torch.logspace(-2, -3, min(m, n) - k)  # σ_{k+1} = 0.01 σ_k
    sigma = torch.cat([head, tail])
    A = _with_spectrum(m, n, sigma)
    qr_calls = _count_qr(monkeypatch)
    U, S, Vh = randomized_topk(A, k, p, q)
    assert len(qr_calls) == 1  # the 2q intermediate bases came from LU (certified), only the last from QR
    acc = accuracy_vs_full(A, (U, S, Vh))
    eps = _range_finder_bound(m, n, k, p, q, float(tail[0]), float(head[0]))
    wedin = eps / (float(head[-1]) - float(tail[0]) - eps)
    assert 0 < wedin < 0.05  # the bound says something here
    assert acc["subspace_U"] <= wedin and acc["subspace_V"] <= wedin
    assert acc["sv_rel_err"] * float(head[0]) <= eps
    spectral_err = float(torch.linalg.matrix_norm(A.double() - (U.double() * S.double()) @ Vh.double(), ord=2))
    assert spectral_err <= float(tail[0]) + eps
    # the factors have the full SVD's form: orthonormal columns of U and rows of Vh. Householder QR gives a Q
    # with |QᵀQ − I| ≤ γ_{m·l} entrywise (Higham, Thm 19.4, l = k + p columns), and each factor is such a Q times
    # an orthogonal l×l factor of a small SVD (another γ_l): |UᵀU − I| ≤ γ_{m·l + l}.
    eye = torch.eye(k, dtype=torch.float64)
    assert float((U.double().T @ U.double() - eye).abs().max()) <= gamma(m * (k + p) + k + p)
    assert float((Vh.double() @ Vh.double().T - eye).abs().max()) <= gamma(n * (k + p) + k + p)


def test_randomized_on_a_slowly_decaying_spectrum_reconstructs_near_the_optimum():
    """σ_i = i^-1/2, no gap at k: single directions may rotate inside the block (no subspace bound holds), but
    the rank-k reconstruction error stays within the derived bound of the optimum. Measured ratios are in
    bench/README.md (about 1.004 at 768², k = 96)."""
    m = n = 384
    k, q = 48, 2  # T = 8
    p = default_oversample(k)
    sigma = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5
    A = _with_spectrum(m, n, sigma, seed=1)
    acc = accuracy_vs_full(A, randomized_topk(A, k, p, q))
    eps = _range_finder_bound(m, n, k, p, q, float(sigma[k]), float(sigma[0]))
    optimal_sq = float((sigma[k:] ** 2).sum())
    bound = math.sqrt(1 + 2 * eps * float(sigma[:k].sum()) / optimal_sq)
    # ≥ 1 (Eckart–Young) up to the fp32 storage of A and of the factors: 10 √(mn) u ‖A‖₂ on an error of
    # √optimal_sq, the same rounding allowance as the exact solver's line below
    rounding = 10 * math.sqrt(m * n) * U32 * float(sigma[0]) / math.sqrt(optimal_sq)
    assert 1.0 - rounding <= acc["recon_ratio"] <= bound
    # the exact solver is optimal up to fp32 rounding
    exact = accuracy_vs_full(A, full_topk(A, k))
    assert exact["recon_ratio"] <= 1 + rounding


def test_auto_rule():
    assert choose_solver("auto", (768, 768), 96) == "randomized"  # ViT-B, T = 8: sketch 144 ≤ 768 / 4
    assert choose_solver("auto", (3072, 768), 38) == "randomized"  # T = 20
    assert choose_solver("auto", (768, 768), 384) == "full"  # T = 2: the sketch is as wide as the matrix
    assert choose_solver("auto", (768, 768), 192) == "full"  # T = 4: 4 · (192 + 96) > 768
    assert choose_solver("auto", (50, 768), 6) == "full"  # small (positional embedding)
    assert choose_solver("auto", (200, 200), 5) == "full"  # below AUTO_MIN_DIM
    assert choose_solver("full", (768, 768), 96) == "full"
    assert choose_solver("randomized", (50, 768), 6) == "randomized"


def _toy_checkpoints(dim: int, n_tasks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(dim, dim, generator=g), "b": torch.randn(dim, generator=g)}
    sigma = torch.arange(1, dim + 1, dtype=torch.float64) ** -0.5
    tuned = {f"t{t}": {"w": base["w"] + _with_spectrum(dim, dim, sigma, seed=seed + 1 + t),
                       "b": base["b"] + 0.1 * t} for t in range(n_tasks)}
    return base, tuned


def test_decompose_uses_the_solver_the_auto_rule_names():
    base, tuned = _toy_checkpoints(256, 8)  # k = 32, sketch 48: 4 · 48 ≤ 256 → randomised
    auto = mass.decompose(base, tuned, progress=False)
    rand = mass.decompose(base, tuned, progress=False, solver="randomized")
    full = mass.decompose(base, tuned, progress=False, solver="full")
    for name in ("U", "S", "V"):
        assert torch.equal(getattr(auto.lowrank["w"], name), getattr(rand.lowrank["w"], name))
    assert not torch.equal(auto.lowrank["w"].U, full.lowrank["w"].U)
    assert torch.equal(auto.dense["b"], full.dense["b"])
    small_base, small_tuned = _toy_checkpoints(64, 2)  # below AUTO_MIN_DIM → full SVD
    small_auto = mass.decompose(small_base, small_tuned, progress=False)
    small_full = mass.decompose(small_base, small_tuned, progress=False, solver="full")
    assert torch.equal(small_auto.lowrank["w"].U, small_full.lowrank["w"].U)


def test_decompose_randomized_matches_full_on_a_slow_spectrum():
    """Per task: reconstruction within the derived bound of the optimum, and singular values within ε'."""
    dim, T = 256, 8
    base, tuned = _toy_checkpoints(dim, T)
    dec = mass.decompose(base, tuned, progress=False, solver="randomized")
    f = dec.lowrank["w"]
    k = f.rank
    sigma = torch.arange(1, dim + 1, dtype=torch.float64) ** -0.5
    eps = _range_finder_bound(dim, dim, k, default_oversample(k), 2, float(sigma[k]), float(sigma[0]))
    bound = math.sqrt(1 + 2 * eps * float(sigma[:k].sum()) / float((sigma[k:] ** 2).sum()))
    for t, name in enumerate(dec.tasks):
        delta = tuned[name]["w"] - base["w"]
        acc = accuracy_vs_full(delta, (f.U[t], f.S[t], f.V[t]))
        assert acc["recon_ratio"] <= bound
        assert acc["sv_rel_err"] * float(sigma[0]) <= eps


def test_decompose_device_and_option_errors():
    base, tuned = _toy_checkpoints(64, 2)
    on_cpu = mass.decompose(base, tuned, progress=False, device="cpu")
    default = mass.decompose(base, tuned, progress=False)
    assert torch.equal(on_cpu.lowrank["w"].V, default.lowrank["w"].V)
    assert on_cpu.lowrank["w"].V.device.type == "cpu"
    with pytest.raises(ValueError, match="solver"):
        mass.decompose(base, tuned, progress=False, solver="lanczos")
    with pytest.raises(ValueError, match="oversample"):
        mass.decompose(base, tuned, progress=False, oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        mass.decompose(base, tuned, progress=False, power_iters=1.5)
    with pytest.raises(ValueError, match="device"):
        mass.decompose(base, tuned, progress=False, device="no-such-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            mass.decompose(base, tuned, progress=False, device="cuda")
    with pytest.raises(ValueError, match="k must"):
        topk_svd(torch.ones(8, 4), 5)


def test_randomized_on_an_unchanged_matrix_keeps_orthonormal_rows():
    """A task that left a matrix untouched (zero delta): S = 0, and Vh still has orthonormal rows (the router's
    residual formula needs them)."""
    U, S, Vh = randomized_topk(torch.zeros(300, 280), 20)
    assert float(S.abs().max()) == 0.0
    # orthonormal up to Householder QR's γ_{m·l} (Higham, Thm 19.4) plus the fp32 product's γ_m
    l = 20 + default_oversample(20)
    assert float((Vh.double() @ Vh.double().T - torch.eye(20, dtype=torch.float64)).abs().max()) <= gamma(280 * l + 280)
    assert float((U.double().T @ U.double() - torch.eye(20, dtype=torch.float64)).abs().max()) <= gamma(300 * l + 300)


def test_randomized_is_reproducible():
    A = torch.randn(300, 280)
    assert all(torch.equal(a, b) for a, b in zip(randomized_topk(A, 20), randomized_topk(A, 20)))


def _old_tsv_factors(U, S, V):
    """TSV-M as it was computed before (two separate polar factors, Vcat wide)."""
    m, d_out, k = U.shape
    Ucat = U.permute(1, 0, 2).reshape(d_out, m * k)
    Vcat = V.reshape(m * k, V.shape[-1])
    return polar_factor(Ucat), S.reshape(m * k), polar_factor(Vcat)


@pytest.mark.parametrize("d_out,d_in,T", [(96, 96, 4), (256, 96, 4), (96, 256, 4)])
def test_tsv_factors_equal_the_previous_computation(d_out, d_in, T):
    """Both computations are backward-stable SVDs of the same matrix. Perturbation bound of the polar factor of
    a full-rank A (Li 1995; rectangular case with an extra 1/σ_n term): ‖ΔP‖_F ≤ 3 ‖ΔA‖_F / σ_n, with
    ‖ΔA‖_F ≤ 10 √(mn) u ‖A‖_F from the SVD and the product P·Qᵀ; so each result lies within that of the fp64
    polar factor, and the two within twice that of each other."""
    k = min(d_out, d_in) // T
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(T, d_out, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(T, d_in, k, generator=g)).Q.mT
    S = torch.rand(T, k, generator=g) + 0.5
    new, old = tsv_factors(U, S, V), _old_tsv_factors(U, S, V)
    for cat, a, b in ((U.permute(1, 0, 2).reshape(d_out, -1), new[0], old[0]),
                      (V.reshape(-1, d_in), new[2], old[2])):
        A = cat.double()
        sv = torch.linalg.svdvals(A)
        tol = 3 * 10 * math.sqrt(A.numel()) * U32 * float(A.norm()) / float(sv[-1])
        P, _, Qh = torch.linalg.svd(A, full_matrices=False)
        exact = P @ Qh
        assert float((a.double() - exact).norm()) <= tol
        assert float((b.double() - exact).norm()) <= tol
        assert float((a.double() - b.double()).norm()) <= 2 * tol
    assert torch.equal(new[1], old[1])


def test_tsv_delta_on_a_device_equals_the_default():
    g = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(3, 48, 16, generator=g)).Q
    V = torch.linalg.qr(torch.randn(3, 40, 13, generator=g)).Q.mT
    f = LowRankFactors(U[..., :13], torch.rand(3, 13, generator=g), V)
    assert torch.equal(tsv_delta(f, device="cpu"), tsv_delta(f))
    assert torch.equal(tsv_delta(f, tasks=[0, 2], device="cpu"), tsv_delta(f, tasks=[0, 2]))


def test_subspace_distance_is_the_sine_of_the_largest_angle():
    e = torch.eye(4)
    # exact 0/1 inputs: the fp64 singular values are 1 or 0 within γ_4(u64), so the sine is within
    # sqrt(2·γ_4) of 0 (near a cosine of 1, sqrt(1 − c²) amplifies an error δ in c to sqrt(2δ)) and γ_4 of 1
    g4 = gamma(4, U64)
    assert subspace_distance(e[:, :2], e[:, :2]) <= math.sqrt(2 * g4)
    assert abs(subspace_distance(e[:, :2], e[:, 2:]) - 1.0) <= g4
    c, s = math.cos(0.3), math.sin(0.3)
    rotated = torch.stack([e[:, 0], c * e[:, 1] + s * e[:, 2]], 1)
    # c and s are rounded to fp32 (relative u32 each, so the rotated column's norm is 1 within 2·u32): the
    # computed cosine is c within 3·u32·c, and d sqrt(1 − c²)/dc = −c/s; fp64 arithmetic adds far less
    assert abs(subspace_distance(e[:, :2], rotated) - s) <= 4 * U32 * c * c / s


def _block_columns(d: int, T: int, k: int, seed: int) -> torch.Tensor:
    """[U1 … UT]: T random k-dim orthonormal blocks of R^d side by side (TSV-M's Ucat), d × Tk."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(T, d, k, generator=g, dtype=torch.float64)).Q.permute(1, 0, 2).reshape(d, -1)


@pytest.mark.parametrize("wide", [False, True])
def test_polar_factor_gram_route_is_within_its_bound(wide):
    """A clearly tall (or wide) well-conditioned matrix takes the Gram route. First-order bound (M = P H,
    G = MᵀM = H², Ĝ = G + E): ‖X − P‖_F ≤ ‖E‖_F / (2σ_n²), and the final product M·Ĝ^-1/2 adds at most
    10 √n u ‖M‖_F ‖Ĝ^-1/2‖_F ≤ 10 √n u ‖M‖_F √n / σ_n. E gathers the Gram product's rounding (inner products of
    length m: 10 √m u ‖M‖_F² in the √ accumulation model of the module docstring) and eigh's backward error
    (10 n u ‖G‖_F); a factor 2 covers the second-order terms. The same matrix through the SVD route must obey
    the SVD's own bound (3 · 10 √(mn) u ‖M‖_F / σ_n, as above): both are compared with the fp64 polar factor."""
    M = _block_columns(384, 4, 24, seed=5)  # 384 × 96, κ ≈ 2
    m, n = M.shape
    sv = torch.linalg.svdvals(M)
    assert float(sv[0] / sv[-1]) < 8  # the Gram route's condition
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    exact = P @ Qh
    fro = float(M.norm())
    smin = float(sv[-1])
    gram_err = (10 * math.sqrt(m) * fro ** 2 + 10 * n * fro ** 2) * U32 / (2 * smin ** 2)
    tol = 2 * (gram_err + 10 * n * U32 * fro / smin)
    X = polar_factor(M.float().mT if wide else M.float()).double()
    err = float(((X.mT if wide else X) - exact).norm())
    assert err <= tol
    svd_tol = 3 * 10 * math.sqrt(m * n) * U32 * fro / smin
    P32, _, Qh32 = torch.linalg.svd(M.float(), full_matrices=False)
    assert float(((P32 @ Qh32).double() - exact).norm()) <= svd_tol
    assert tol <= 4 * svd_tol  # the Gram route is held to about the SVD's accuracy


def test_polar_factor_ill_conditioned_tall_matrix_takes_the_svd_route():
    """κ = 10³ > GRAM_MAX_COND: the Gram route's first-order error κ² u / 2 ≈ 0.03 would be far above the SVD
    route's (about κ u), so the result must be exactly the SVD route's."""
    m, n = 300, 60
    M = _with_spectrum(m, n, torch.logspace(0, -3, n, dtype=torch.float64), seed=7)
    for A in (M, M.mT):
        P, _, Qh = torch.linalg.svd(A, full_matrices=False)
        assert torch.equal(polar_factor(A), P @ Qh)
    assert bool(torch.isfinite(polar_factor(torch.zeros(300, 60))).all())  # singular: the SVD route too


def test_topk_svd_of_transpose_is_an_svd_of_the_wide_matrix():
    """The randomised solver's last step (SVD of the l × n matrix QᵀA from a QR of its transpose): singular
    values within Weyl's bound of the fp64 ones (backward error 10 √(ln) u ‖B‖₂ for the QR and the small SVD,
    doubled), orthonormal factors, and B's rank-k truncation reproduced within the same slack."""
    from mass.method.svd_solvers import topk_svd_of_transpose

    l, n, k = 40, 300, 25
    sigma = torch.linspace(3.0, 0.1, l, dtype=torch.float64)
    B = _with_spectrum(l, n, sigma, seed=8)
    U, S, Vh = topk_svd_of_transpose(B.mT.contiguous(), k)
    eps = 2 * 10 * math.sqrt(l * n) * U32 * float(sigma[0])
    assert float((S.double() - sigma[:k]).abs().max()) <= eps
    eye = torch.eye(k, dtype=torch.float64)
    assert float((U.double().mT @ U.double() - eye).abs().max()) <= 10 * math.sqrt(l) * U32 * 10
    assert float((Vh.double() @ Vh.double().mT - eye).abs().max()) <= 10 * math.sqrt(n) * U32 * 10
    Ur, Sr, Vhr = torch.linalg.svd(B.double(), full_matrices=False)
    best = (Ur[:, :k] * Sr[:k]) @ Vhr[:k]
    approx = (U.double() * S.double()) @ Vh.double()
    # ‖B − approx‖₂ ≤ σ_{k+1} + ε (backward stability) and ‖B − best‖₂ = σ_{k+1}
    assert float(torch.linalg.matrix_norm(B.double() - approx, ord=2)) <= float(sigma[k]) + eps
    assert float((approx - best).norm()) <= 2 * math.sqrt(2 * k) * eps / float(sigma[k - 1] - sigma[k]) * float(sigma[0])


# ------------------------------------------------------------------------- LU bases inside the power iterations
def _lu_parts(Y: torch.Tensor):
    """The packed LU factors of Y as fp64 L (unit lower trapezoidal, LAPACK's row order) and U."""
    LU, _, _ = torch.linalg.lu_factor_ex(Y)
    l = Y.shape[-1]
    L = LU.double().tril(-1) + torch.eye(Y.shape[-2], l, dtype=torch.float64)
    return L, LU.double()[..., :l, :].triu()


def _outside_span(basis: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """‖(I − Π) Y‖_F per batch entry, Π the orthogonal projector on span(basis) (fp64)."""
    Q = torch.linalg.qr(basis.double()).Q
    Y = Y.double()
    return torch.linalg.matrix_norm(Y - Q @ (Q.mT @ Y))


def _lu_span_bound(Y: torch.Tensor) -> torch.Tensor:
    """P L Û = Y + E with |E| ≤ γ_l |L| |Û| (Higham, Thm 9.3): ‖(I − Π) Y‖_F = ‖(I − Π) E‖_F ≤ ‖ |L| |Û| ‖_F γ_l
    for Π the projector on span(P L); the fp64 projection adds 10 √(ml) u64 ‖Y‖_F, doubled for safety."""
    L, U = _lu_parts(Y)
    m, l = Y.shape[-2:]
    return (gamma(l) * torch.linalg.matrix_norm(L.abs() @ U.abs())
            + 20 * math.sqrt(m * l) * U64 * torch.linalg.matrix_norm(Y.double()))


def test_lu_basis_is_p_l_and_spans_the_block():
    """Full column rank: the basis is P L exactly (torch.linalg.lu's, without the m × m P), P L Û reproduces Y
    within the backward error, and Y lies in its span within that bound."""
    Y = torch.randn(3, 500, 40, generator=torch.Generator().manual_seed(11))
    X = _lu_basis(Y)
    assert X is not None and X.shape == Y.shape
    P, L, _ = torch.linalg.lu(Y)
    assert torch.equal(X, P @ L)  # a permutation of rows: exact
    assert bool((_outside_span(X, Y) <= _lu_span_bound(Y)).all())


def test_lu_basis_of_a_rank_deficient_block_still_contains_its_span():
    """Rank 12 < 40 columns (Û singular up to rounding): no pivot is divided by, the basis keeps full column rank
    (unit diagonal, entries ≤ 1) and its span contains Y's within the LU backward error."""
    g = torch.Generator().manual_seed(12)
    Y = torch.randn(2, 300, 12, generator=g) @ torch.randn(2, 12, 40, generator=g)
    X = _lu_basis(Y)
    assert X is not None and bool(torch.isfinite(X).all())
    assert float(X.abs().max()) <= 1.0
    assert bool((_outside_span(X, Y) <= _lu_span_bound(Y)).all())
    # full column rank, as certified: σ_min(X) ≥ ‖L‖_F / LU_MAX_COND ≥ √l / LU_MAX_COND (unit diagonal). (The
    # certified bound was 470–660 over 200 seeds of such blocks, far below LU_MAX_COND: X is not None above.)
    assert float(torch.linalg.svdvals(X.double()).min()) >= math.sqrt(40) / LU_MAX_COND
    zero = _lu_basis(torch.zeros(300, 20))  # a zero delta: every pivot exactly zero
    assert zero is not None and torch.equal(zero, torch.eye(300, 20))


def test_power_basis_falls_back_to_qr_when_the_lu_factor_is_ill_conditioned():
    """Wilkinson's growth matrix (1 on the diagonal, −1 below, 1 in the last column; no row swaps): L has −1
    below its diagonal, so ‖L₁⁻¹‖_F ≥ 2^(l−2) (an entry of L₁⁻¹) and the certified bound is far above
    LU_MAX_COND: no LU basis, and the power iteration's basis is exactly the Householder QR's."""
    l = 40
    W = torch.eye(l) - torch.ones(l, l).tril(-1)
    W[:, -1] = 1.0
    Y = torch.cat([W, torch.zeros(60, l)])
    assert 2.0 ** (l - 2) > LU_MAX_COND
    assert _lu_basis(Y) is None
    assert _lu_basis(torch.full((50, 4), float("nan"))) is None  # non-finite: not certified either
    assert torch.equal(_power_basis(Y), torch.linalg.qr(Y).Q)


def test_randomized_recovers_a_matrix_of_exact_low_rank_below_the_sketch_width(monkeypatch):
    """Rank r = 30 < l = k + p = 40 (k = 20): the sketch A·Ω has rank r, so its LU factor is singular up to
    rounding (the case where forming Y U⁻¹ would divide by rounding-level pivots). The range finder still
    captures all of A's range: in the bound of the module docstring the term C σ_{r+1} vanishes (p' = l − r =
    10 ≥ 2), leaving ε' = FP32_SLACK; hence singular values within ε' (Weyl), the kept subspace within Wedin's
    ε' / (σ_k − σ_{k+1} − ε') and a spectral error within σ_{k+1} + ε'."""
    m, n, k, r = 320, 288, 20, 30
    sigma = torch.cat([torch.linspace(2.0, 1.0, k), torch.linspace(0.1, 0.05, r - k)])  # gap 10 at k
    A = _with_spectrum(m, n, sigma, seed=13)
    qr_calls = _count_qr(monkeypatch)
    U, S, Vh = randomized_topk(A, k, oversample=20)
    assert len(qr_calls) == 1  # the LU path was taken throughout (rank deficiency needs no fallback)
    eps = 10 * math.sqrt(m * n) * U32 * float(sigma[0])
    assert float((S.double() - sigma[:k].double()).abs().max()) <= eps
    acc = accuracy_vs_full(A, (U, S, Vh))
    wedin = eps / (float(sigma[k - 1] - sigma[k]) - eps)
    # the sine is measured between fp32 factors, orthonormal within δ = 10 √m u (√ model): UᵀU = I + F gives
    # sin² ≤ sin_exact² + ‖F‖₂, so the measure's floor is √(2δ) (as in test_merge_speed_accuracy)
    assert acc["subspace_U"] <= wedin + math.sqrt(2 * 10 * math.sqrt(m) * U32)
    assert acc["subspace_V"] <= wedin + math.sqrt(2 * 10 * math.sqrt(n) * U32)
    spectral_err = float(torch.linalg.matrix_norm(A.double() - (U.double() * S.double()) @ Vh.double(), ord=2))
    assert spectral_err <= float(sigma[k]) + eps
