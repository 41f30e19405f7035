"""Error bounds that test tolerances come from (issue 15: no tolerance tuned to one machine's rounding).

Two kinds of bound, both standard forward-error analysis (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §3.1 and §3.5), with u the unit roundoff of the precision that accumulates:

* One dot product / matrix product / sum of n terms evaluated in any order: ``|fl(Σ a_i b_i) − Σ a_i b_i| ≤
  γ_n Σ |a_i b_i|`` with ``γ_n = n·u / (1 − n·u)`` (:func:`gamma`, :func:`product_bound`). Elementwise ops (add,
  multiply, LayerNorm's divide, exp) round once each: a relative u per op, counted as terms of the path below.

* A whole network (an encoder forward): every stage (a linear layer, a LayerNorm, an attention) computes its
  output with an absolute error of at most γ_{n_i}·M_i, n_i its longest accumulation and M_i the magnitude of
  the values it sums. To first order these errors add up along the path from input to output, each carried by
  the rest of the network, so with P = Σ_i n_i (the *path length*, :func:`path_length`; every stage of a
  ViT lies on the one path through the residual stream) and Λ a bound on how much the rest of the network
  amplifies a perturbation relative to the output's magnitude, ``|ŷ − y| ≤ Λ·γ_P·M_out`` (:func:`forward_bound`;
  γ_{n_1} + γ_{n_2} ≤ γ_{n_1+n_2}). We state Λ = :data:`GROWTH` = 1: the residual stream is re-normalised by
  a LayerNorm in every half block, and the test models' weights have spectral norms of order one, so a
  perturbation does not grow relative to the values it rides on. The bound is pessimistic by construction
  (it adds worst cases of every rounding; measured errors are ~10³ times smaller), and
  ``tests/test_tolerances.py`` checks it against float64 on every test architecture.

The reference side of a comparison is computed in float64 wherever it can be (``.double()`` on the module and
the inputs), so that only the side under test rounds in fp32 and the bound is one-sided; where both sides are
fp32 computations of the same exact value, the tolerance is twice the bound (triangle inequality).
"""
from __future__ import annotations

import torch
from torch import nn

U32 = 2.0 ** -24  # fp32 unit roundoff (round to nearest)
U64 = 2.0 ** -53  # fp64 unit roundoff
GROWTH = 1.0  # Λ above: a stated assumption, checked in tests/test_tolerances.py


def gamma(n: int, u: float = U32) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative error bound of an n-term sum or dot product."""
    if n * u >= 1:
        raise ValueError(f"n·u = {n * u} >= 1: no bound")
    return n * u / (1.0 - n * u)


def product_bound(a: torch.Tensor, b: torch.Tensor, u: float = U32, extra_terms: int = 0) -> torch.Tensor:
    """Componentwise bound on ``|fl(a @ b) − a @ b|`` for any summation order: ``γ_n·(|a| @ |b|)`` with
    n = the inner dimension + ``extra_terms`` (further additions into the same accumulator, e.g. a bias)."""
    n = a.shape[-1] + extra_terms
    return gamma(n, u) * (a.double().abs() @ b.double().abs())


def path_length(model: nn.Module, tokens: int, rank: int = 0) -> int:
    """P of the module docstring for an encoder: the sum over its stages of their accumulation lengths.

    Linear: in_features (+ 2·rank + 4 when it carries a low-rank task block: the down- and up-projections,
    the weights θ0 + UΣV rounded once to fp32, the block's bias and the add); Conv2d: in_ch·kh·kw;
    LayerNorm: 3 sums of the normalised width (mean, variance, the affine) + 2 rounding ops;
    attention (nn.MultiheadAttention or an HF attention module): its fused in-projection when it has one, then
    the head width for the scores and 2·tokens for the softmax sum and the weighted sum of values.
    ``tokens``: the sequence length the encoder sees. Every stage is counted, so P bounds the longest path.
    """
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features + (2 * rank + 4 if rank else 1)
        elif isinstance(m, nn.Conv2d):
            total += m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups + 1
        elif isinstance(m, nn.LayerNorm):
            total += 3 * m.normalized_shape[-1] + 2
        elif isinstance(m, nn.MultiheadAttention):
            total += m.embed_dim + (2 * rank + 4 if rank else 1)  # in_proj_weight (out_proj is an nn.Linear)
            total += m.head_dim + 2 * tokens + 4
        elif hasattr(m, "head_dim") and hasattr(m, "q_proj"):  # HF CLIPAttention: q/k/v/out are nn.Linear
            total += m.head_dim + 2 * tokens + 4
    # the rest: positional/class embeddings, GELU, residual adds, a final projection (≤ width): a few u each
    return total + 8 * sum(1 for _ in model.modules()) + _projection_width(model)


def _projection_width(model: nn.Module) -> int:
    proj = getattr(model, "proj", None)
    return proj.shape[0] + 1 if isinstance(proj, torch.Tensor) else 0


def forward_bound(scale: torch.Tensor, path: int, u: float = U32, growth: float = GROWTH) -> torch.Tensor:
    """Λ·γ_P·M of the module docstring: the worst-case error of a network output whose magnitude is ``scale``
    (e.g. each row's max |y|, broadcast over the row) after a path of length ``path`` in precision u."""
    return growth * gamma(path, u) * scale


def row_scale(y: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, broadcastable against ``y`` (the M of :func:`forward_bound`)."""
    return y.detach().double().abs().flatten(1).amax(1).view(-1, *([1] * (y.dim() - 1)))


def assert_within(got: torch.Tensor, want: torch.Tensor, bound, what: str = "") -> None:
    """``|got − want| ≤ bound`` elementwise (compared in float64), with a message naming the worst excess."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shapes differ, {tuple(got.shape)} vs {tuple(want.shape)}")
    err = (got.detach().double() - want.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    if not bool(torch.isfinite(err).all()) or not bool((err <= bound).all()):
        i = int((err - bound).flatten().argmax())
        raise AssertionError(f"{what}: |got − want| = {float(err.flatten()[i]):.3g} exceeds its bound "
                             f"{float(bound.flatten()[i]):.3g} at flat index {i} (max error {float(err.max()):.3g})")


TOKENS = 17  # the test encoders see 32×32 images in 8×8 patches: 16 patches + the class token


def encoder_bound(encoder: nn.Module, want: torch.Tensor, rank: int = 0, sides: int = 1,
                  tokens: int = TOKENS, u: float = U32) -> torch.Tensor:
    """:func:`forward_bound` for outputs ``want`` (rows = samples) of ``encoder`` (the plain module the
    model wraps; ``rank``: the largest rank of a low-rank block it carries, for a set Ω the sum of its
    members' ranks), once per side that rounds in precision u: 1 against a float64 reference, 2 when both
    sides are fp32 computations of the same value."""
    return sides * forward_bound(row_scale(want), path_length(encoder, tokens, rank), u)


def residual_bound(x: torch.Tensor, basis: torch.Tensor, feature_error: torch.Tensor,
                   method: str = "direct") -> torch.Tensor:
    """Bound on a routing residual computed by ``method`` from a feature x̂ with ‖x̂ − x‖₂ ≤ ``feature_error``
    (per row, broadcast over tasks), against the fp64 oracle at the exact feature x. The residual
    r(x) = ‖(I − VᵀV)x‖ is Lipschitz in x with constant ‖I − VᵀV‖₂ ≤ 1 + ω ≤ 2 (ω ≪ 1 for an fp32 basis, see
    :func:`mass_kernels.reference.routing_error_bound`), plus that function's bound on the op itself."""
    from mass_kernels.reference import routing_error_bound

    return routing_error_bound(x, basis, method) + 2.0 * feature_error.reshape(-1, 1)


def feature_error(encoder: nn.Module, feature: torch.Tensor, sides: int = 1, rank: int = 0) -> torch.Tensor:
    """‖x̂ − x‖₂ per row for a feature read inside ``encoder`` (e.g. a block's MLP input): √D times the
    elementwise :func:`encoder_bound` (the whole encoder's path bounds the prefix's)."""
    return encoder_bound(encoder, feature, rank, sides).amax(1) * feature.shape[-1] ** 0.5


def layernorm_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    u: float = U32) -> torch.Tensor:
    """Bound on an fp32 LayerNorm over the last axis (any stable mean/variance algorithm: two-pass, Welford,
    cascaded) against its exact value, the affine weight and bias rounded once to fp32 beforehand.

    With n the width, μ the mean, σ = √(var + eps): μ̂ errs by ≤ e_μ = γ_n·mean|x|; each x_i − μ̂ by
    ≤ e_d = e_μ + u(|x − μ| + e_μ); the variance, a sum of n squares, relatively by ≤ γ_{2n}, plus
    2·e_d·max|x − μ| + e_d² absolutely; σ̂ (sqrt, then divide or rsqrt) relatively by ≤ ½·rel(var) + 2u.
    So |x̂_comp − x̂| ≤ e_d/σ + |x̂|·(½·rel(var) + 3u), and the affine adds |w|·that + u·|w x̂| (product)
    + u·(|w x̂| + |b|) (sum) + u·(|w| |x̂| + |b|) (w, b rounded to fp32)."""
    x, w, b = x.double(), weight.double(), bias.double()
    n = x.shape[-1]
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    var = d.square().mean(-1, keepdim=True)
    sigma = (var + eps).sqrt()
    e_mu = gamma(n, u) * x.abs().mean(-1, keepdim=True)
    dmax = d.abs().amax(-1, keepdim=True)
    e_d = e_mu + u * (dmax + e_mu)
    rel_var = (gamma(2 * n, u) * var + 2 * e_d * dmax + e_d ** 2) / (var + eps)
    xhat = d / sigma
    e_xhat = e_d / sigma + xhat.abs() * (0.5 * rel_var + 3 * u)
    return w.abs() * e_xhat + 3 * u * (w.abs() * xhat.abs() + b.abs())


def stage_count(encoder: nn.Module) -> int:
    """S: the stages of an encoder that each round their output once (linear layers, LayerNorms, the patch
    convolution, and one attention per block: HF attention modules or nn.MultiheadAttention)."""
    return sum(isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.MultiheadAttention))
               or (hasattr(m, "head_dim") and hasattr(m, "q_proj")) for m in encoder.modules())


def probabilistic_relative_error(encoder: nn.Module, u: float, lam: float = 2.0) -> float:
    """λ·√S·u: the typical relative output error of a low-precision forward (bf16: u = 2⁻⁸), where no
    worst-case bound exists (P·u > 1). Probabilistic rounding-error analysis (Higham & Mary, SIAM J. Sci.
    Comput. 41(5), 2019): errors of relative size ≤ u, independent and of mean zero, at each of the S stages
    add like a random walk; λ = 2 is two standard deviations. A statistical threshold, not a bound."""
    return lam * stage_count(encoder) ** 0.5 * u


def logit_bound(encoder: nn.Module, embedding: torch.Tensor, logit_scale: float, rank: int = 0,
                tokens: int = TOKENS) -> torch.Tensor:
    """Bound (per row) on the error of fp32 logits ``s·⟨e/‖e‖, h/‖h‖⟩`` of a zero-shot head, from an fp32
    embedding of ``encoder`` (``embedding``: the exact one, fp64). With ‖ê − e‖₂ ≤ E (√D times
    :func:`encoder_bound`), the unit vector moves by ≤ 2E/‖e‖; normalising it and the head in fp32 (a sum of
    D squares, a sqrt, a divide) adds γ_{D+2} each, the dot with the unit head γ_D: in all
    s·(2E/‖e‖ + γ_{3D+4})."""
    e = embedding.double()
    D = e.shape[-1]
    E = encoder_bound(encoder, e, rank, tokens=tokens).amax(1) * D ** 0.5
    return logit_scale * (2 * E / e.norm(dim=1) + gamma(3 * D + 4))


def linear_path_length(model: nn.Module, rank: int = 0) -> int:
    """The part of :func:`path_length` spent in linear layers (nn.Linear, the fused in-projection of
    nn.MultiheadAttention), each with its low-rank block of ``rank``."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features + 2 * rank + 4
        elif isinstance(m, nn.MultiheadAttention):
            total += m.embed_dim + 2 * rank + 4
    return total


def float64_model_bound(encoder: nn.Module, want: torch.Tensor, rank: int = 0, stored_terms: int = 0,
                        fp32_lowrank: bool = False, sides: int = 1, tokens: int = TOKENS) -> torch.Tensor:
    """Bound for a MASS model cast to float64 against a float64 reference (or, ``sides=2``, against itself on
    another batch), where the claim is about the algorithm, not fp32 rounding. Three parts, each a
    :func:`forward_bound`:

    * the float64 arithmetic: the whole path at u = 2⁻⁵³;
    * the weights' fp32 representations: the reference loads weights the library reconstructs in fp32 (θ0 +
      U S V: k + 3 roundings of a weight's magnitude) and the model keeps its task deltas in fp32 (one
      rounding): ``stored_terms`` per weight-carrying stage (:func:`stage_count`) at u₃₂;
    * ``fp32_lowrank``: the row-wise low-rank op, which sequence-first layouts use, accumulates in fp32
      (mass_kernels' contract): the linear layers' path (:func:`linear_path_length`) at u₃₂.
    """
    M = row_scale(want)
    bound = forward_bound(M, path_length(encoder, tokens, rank), U64)
    if stored_terms:
        bound = bound + forward_bound(M, stored_terms * stage_count(encoder), U32)
    if fp32_lowrank:
        bound = bound + forward_bound(M, linear_path_length(encoder, rank), U32)
    return sides * bound
