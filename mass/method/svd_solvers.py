"""Top-k SVD solvers for the offline decomposition: the full thin SVD, and a randomised range finder.

MASS keeps only k = min(out, in) / T components of each task delta, yet a full SVD computes all of them. The
randomised solver (Halko, Martinsson & Tropp 2011, Alg. 4.4: Gaussian sketch with l = k + p columns, q power
iterations, then an exact SVD of the small l × n matrix QᵀA from a QR of its transpose,
:func:`topk_svd_of_transpose`; p = max(10, k/2) and q = 2 by default) costs about (2q + 2) products of the
matrix with an l-column block instead of a full SVD. All arithmetic is fp32. Inside the power iterations only
the span of each block matters, so it is re-normalised by the cheaper LU factorisation (:func:`_lu_basis`, as
in Rokhlin, Szlam & Tygert 2009); the last block is orthonormalised by a Householder QR.

Accuracy (checked by :func:`accuracy_vs_full`): the error of the kept subspace depends on the spectrum. With a
gap σ_k ≫ σ_{k+1} the subspace is found almost exactly; with a slowly decaying spectrum (real task vectors) the
rank-k reconstruction is close to optimal although single directions inside the top-k block may rotate.

``solver="auto"`` (:func:`choose_solver`) uses the randomised solver only where it does much less work than
the full SVD: min(out, in) ≥ ``AUTO_MIN_DIM`` and k + p ≤ min(out, in) / ``AUTO_RATIO``; elsewhere the full SVD
(small matrices are cheap anyway, and for small T the sketch is as wide as the matrix).
"""
from __future__ import annotations

from typing import Optional

import torch

SOLVERS = ("auto", "full", "randomized")
MIN_OVERSAMPLE = 10
DEFAULT_POWER_ITERS = 2
AUTO_MIN_DIM = 256
AUTO_RATIO = 4

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def default_oversample(k: int) -> int:
    """p = max(10, k/2). On slowly decaying spectra (σ_i ∝ i^-0.5 and i^-1, 768², k = 96, q = 2) this kept the
    rank-k reconstruction error within 0.4% and 0.1% of the optimum, against 1.1% and 0.9% with p = 10."""
    return max(MIN_OVERSAMPLE, k // 2)


def check_solver_options(solver: str, oversample: Optional[int], power_iters: int) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    for name, value in (("oversample", oversample), ("power_iters", power_iters)):
        if value is None and name == "oversample":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def choose_solver(solver: str, shape: tuple, k: int, oversample: Optional[int] = None) -> str:
    """Resolve ``"auto"`` for one matrix of ``shape`` (…, out, in) truncated to rank k: ``"randomized"`` when
    the matrix is large and the sketch narrow (see the module docstring), else ``"full"``."""
    if solver != "auto":
        return solver
    if oversample is None:
        oversample = default_oversample(k)
    small = min(shape[-2:])
    if small >= AUTO_MIN_DIM and AUTO_RATIO * (k + oversample) <= small:
        return "randomized"
    return "full"


def full_topk(matrix: torch.Tensor, k: int) -> Factors:
    """Top-k of the thin SVD (batched over leading dims): U (…, out, k), S (…, k), Vh (…, k, in)."""
    U, S, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return U[..., :k].contiguous(), S[..., :k].contiguous(), Vh[..., :k, :].contiguous()


def _orthonormal_basis(block: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(block).Q


LU_MAX_COND = 1e5  # the LU basis is used only when its certified condition bound is at most this (_lu_basis)


def _undo_row_swaps_(rows: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """``rows`` (…, m, l) put back, in place, in the order before LAPACK's row interchanges (row i swapped with
    row pivots[i] − 1, for i = 0, 1, …): afterwards X[perm[i]] = rows[i]. Only the ≤ 2l rows the swaps touch
    move, so the permutation is composed on the host from the l pivots (a dict) and only those rows are copied."""
    m, l = rows.shape[-2:]
    flat = rows.view(-1, m, l)  # a view (LAPACK's batched factors): the moves below land in ``rows``
    batch, dest, source = [], [], []
    for b, piv in enumerate(pivots.reshape(-1, pivots.shape[-1]).tolist()):
        perm: dict = {}  # i -> the original row of the factors' row i (absent: i itself)
        for i, p in enumerate(piv):
            p -= 1
            if p != i:
                perm[i], perm[p] = perm.get(p, p), perm.get(i, i)
        batch += [b] * len(perm)
        source += list(perm)
        dest += list(perm.values())
    if batch:
        b, d, s = (torch.tensor(v, device=rows.device) for v in (batch, dest, source))
        flat[b, d] = flat[b, s]  # the right side is gathered first: no row is overwritten before it is read
    return rows


def _lu_basis(block: torch.Tensor) -> Optional[torch.Tensor]:
    """A (not orthonormal) basis of span(Y) for a tall Y = ``block`` (…, m, l), l ≤ m, from its LU
    factorisation with partial pivoting Y = P L U: the basis is P L (= Y U⁻¹, without the solve), or None when
    its conditioning is not certified (the caller then uses the Householder QR).

    Why the span is kept: LU with partial pivoting is backward stable, P L Û = Y + E with |E| ≤ γ_l |P L| |Û|
    (Higham, Thm 9.3), and |L| ≤ 1 entrywise. When Y has full column rank (Û nonsingular) span(P L) =
    span(Y + E), a perturbation of the same kind as the Householder QR's; when Y is rank deficient (Û singular:
    zero or rounding-level pivots) span(P L) still contains span(Y + E), and the extra columns of L (bounded by
    1, never divided by a tiny pivot) act like fresh random start vectors. (Forming Y U⁻¹ by a triangular solve
    instead would divide by those pivots.)
    What is not free: P L is not orthonormal, so the next product A·(P L), computed in fp32, is the exact product
    of a perturbed A + ΔA with ‖ΔA‖₂ ≲ √n u ‖A‖_F κ_F(L), κ_F(L) = ‖L‖_F / σ_min(L), where an orthonormal basis
    has κ_F = √l; rounding then blurs directions below about u κ_F(L) of the largest at each step. κ_F(L) is
    bounded without an SVD: σ_min(L) ≥ σ_min(L₁) for the unit lower-triangular top l × l block L₁ (adding rows
    cannot lower it), so κ_F(L) ≤ ‖L‖_F ‖L₁⁻¹‖_F. The bound measured 2·10³–1.2·10⁴ on Gaussian sketches of
    ViT-B/L-sized deltas (l = 76–192; the true κ₂(L) 30–170: GEPP's L is well conditioned in practice), far
    from the exponential κ of GEPP's pathological cases (Wilkinson's matrix: κ(L) ≈ 2^l). The LU basis is used
    only when the bound is ≤ ``LU_MAX_COND`` = 10⁵ for every batch entry (u κ_F ≤ 6·10⁻³ even then; a
    non-finite Y fails the check too).
    """
    m, l = block.shape[-2:]
    L, pivots, _ = torch.linalg.lu_factor_ex(block)  # no error on a singular Û: LAPACK leaves L bounded
    eye = torch.eye(l, dtype=L.dtype, device=L.device)
    L[..., :l, :] = L[..., :l, :].tril(-1) + eye  # rows ≥ l of the packed factors hold L alone: kept in place
    top_inverse = torch.linalg.solve_triangular(L[..., :l, :], eye, upper=False, unitriangular=True)
    cond_bound = torch.linalg.matrix_norm(L) * torch.linalg.matrix_norm(top_inverse)
    if not bool((cond_bound <= LU_MAX_COND).all()):
        return None
    return _undo_row_swaps_(L, pivots)


def _power_basis(block: torch.Tensor) -> torch.Tensor:
    """A basis of span(``block``) between two products of a power iteration: LU when certified, else QR."""
    basis = _lu_basis(block)
    return _orthonormal_basis(block) if basis is None else basis


def randomized_topk(
    matrix: torch.Tensor,
    k: int,
    oversample: Optional[int] = None,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
) -> Factors:
    """Top-k SVD from a randomised range finder (batched over leading dims); same outputs as :func:`full_topk`.

    The Gaussian sketch comes from a generator seeded with ``seed`` on the matrix's device, so the result is
    reproducible. U = Q·Ub has orthonormal columns and Vh orthonormal rows up to fp32 rounding, like the full SVD.
    """
    A = matrix.float()
    m, n = A.shape[-2:]
    width = min(k + (default_oversample(k) if oversample is None else oversample), m, n)
    gen = torch.Generator(device=A.device).manual_seed(seed)
    sketch = torch.randn(*A.shape[:-2], n, width, generator=gen, device=A.device, dtype=A.dtype)
    # Q ← basis(A basis(Aᵀ Q)) q times: singular values raised to the power 2q + 1. Only the spans matter until
    # the last block, which must be orthonormal (Q projects A): LU bases in between, a Householder QR at the end.
    Q = A @ sketch
    for _ in range(power_iters):
        Q = A @ _power_basis(A.mT @ _power_basis(Q))
    Q = _orthonormal_basis(Q)
    Ub, S, Vh = topk_svd_of_transpose(A.mT @ Q, k)  # the SVD of QᵀA, from its transpose
    return (Q @ Ub).contiguous(), S.contiguous(), Vh.contiguous()


def topk_svd_of_transpose(Bt: torch.Tensor, k: int) -> Factors:
    """Top-k thin SVD factors of B = Btᵀ for a tall Bt (…, n, l), l ≤ n: a Householder QR Bt = Qb R, then the
    SVD of the small l × l Rᵀ = Ur diag(S) Vrh, so that B = Ur diag(S) (Qb Vrhᵀ)ᵀ. Both steps are backward
    stable (an SVD of B as accurate as LAPACK's own); on this CPU (MKL) it took about half the time of
    ``torch.linalg.svd`` of the wide B for l = 144, n = 768 and 3072."""
    Qb, R = torch.linalg.qr(Bt)
    Ur, S, Vrh = torch.linalg.svd(R.mT)
    return Ur[..., :k], S[..., :k], (Qb @ Vrh[..., :k, :].mT).mT


def topk_svd(
    matrix: torch.Tensor,
    k: int,
    solver: str = "auto",
    oversample: Optional[int] = None,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
) -> Factors:
    """Top-k SVD factors of ``matrix`` (…, out, in) with the solver ``choose_solver`` picks."""
    check_solver_options(solver, oversample, power_iters)
    if not 1 <= k <= min(matrix.shape[-2:]):
        raise ValueError(f"k must lie in [1, {min(matrix.shape[-2:])}] for shape {tuple(matrix.shape)}, got {k}")
    if choose_solver(solver, tuple(matrix.shape), k, oversample) == "randomized":
        return randomized_topk(matrix, k, oversample, power_iters, seed)
    return full_topk(matrix, k)


def subspace_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖AAᵀ − BBᵀ‖₂ for two bases with orthonormal columns of equal width: the sine of the largest principal
    angle between the spans, from the smallest singular value of AᵀB (computed in fp64)."""
    cosines = torch.linalg.svdvals(a.double().mT @ b.double()).clamp(max=1.0)
    return float(torch.sqrt(1.0 - cosines.min() ** 2))


@torch.no_grad()
def accuracy_vs_full(matrix: torch.Tensor, factors: Factors) -> dict:
    """How close truncated factors (U, S, Vh) of one 2-D ``matrix`` are to the exact rank-k truncation.

    ``recon_ratio``: ‖A − U diag(S) Vh‖_F / ‖A − A_k‖_F (1 = optimal; the quantity that matters for the merged
    weights); ``subspace_U`` / ``subspace_V``: ‖UUᵀ − U_kU_kᵀ‖₂ and the same for the rows of Vh (meaningful when
    the spectrum has a gap at k); ``sv_rel_err``: max_i |S_i − σ_i| / σ_1. The reference is an fp64 SVD.
    """
    A = matrix.double()
    U, S, Vh = (t.double() for t in factors)
    k = S.shape[-1]
    Ur, Sr, Vhr = torch.linalg.svd(A, full_matrices=False)
    optimal = float(Sr[k:].norm())
    error = float((A - (U * S) @ Vh).norm())
    return {
        "k": k,
        "recon_ratio": error / optimal if optimal > 0 else (1.0 if error == 0 else float("inf")),
        "recon_error_rel": error / max(float(Sr.norm()), 1e-300),
        "optimal_error_rel": optimal / max(float(Sr.norm()), 1e-300),
        "subspace_U": subspace_distance(U, Ur[:, :k]),
        "subspace_V": subspace_distance(Vh.mT, Vhr[:k].mT),
        "sv_rel_err": float((S - Sr[:k]).abs().max() / Sr[0].clamp_min(1e-300)),
        "gap": float(Sr[k] / Sr[k - 1]) if k < Sr.shape[0] and Sr[k - 1] > 0 else 0.0,
    }
