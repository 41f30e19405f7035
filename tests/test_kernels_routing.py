"""Triton routing-residual kernel vs the PyTorch oracle (interpreter on CPU, real kernel on CUDA)."""
import pytest
import torch

import mass_kernels
from mass_kernels.reference import routing_error_bound, routing_residuals_exact
from mass_kernels.routing import kernel_roundoff, routing_residuals_triton

from conftest import DEVICE  # conftest also switches on the Triton interpreter when there is no GPU

# Every tolerance here is the fused formula's worst-case bound (mass_kernels.reference.routing_error_bound),
# computed per (row, task) from the very inputs the kernel got: fp32 accumulation (2^-23, truncation-safe),
# exact 16-bit products, and the rounded basis' loss of orthonormality. The oracle is the fp64 projection.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_within_bound(got, x, basis):
    bound = routing_error_bound(x.cpu(), basis.cpu(), "fused", **kernel_roundoff(x.dtype))
    err = (got.cpu().double() - routing_residuals_exact(x.cpu(), basis.cpu())).abs()
    assert bool((err <= bound).all()), f"error {float((err / bound).max()):.3g}x the bound"
    return bound


def _bases(lead, T, k, D, gen):
    """Orthonormal task bases (…, T, k, D) from QR of Gaussian matrices."""
    q, _ = torch.linalg.qr(torch.randn(*lead, T, D, k, generator=gen))
    return q.transpose(-1, -2).contiguous()


def _inputs(lead, N, T, k, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis = _bases(lead, T, k, D, gen)
    # Mix of in-subspace and generic rows so residuals span small and large values.
    x = torch.randn(*lead, N, D, generator=gen)
    if T and k:
        owner = torch.randint(0, T, (N,), generator=gen)
        coef = torch.randn(*lead, N, k, generator=gen)
        on = torch.einsum("...nk,...nkd->...nd", coef, basis[..., owner, :, :])
        x = torch.where((torch.arange(N) % 2 == 0)[:, None], on + 0.05 * x, x)
    return x.to(DEVICE, dtype), basis.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N,T,k,D",
    [
        (1, 1, 1, 16),     # N = 1, T = 1, k = 1
        (7, 3, 51, 100),   # k and D not multiples of 16
        (40, 8, 5, 48),    # several row tiles, tiny k
        (19, 20, 3, 64),   # T = 20
        (9, 2, 96, 200),   # k = 96 (pads to 128)
        (6, 20, 38, 100),  # T = 20, k = 38 (ViT-B/16 at 20 tasks: 768 // 20), D not a multiple of 16
    ],
)
def test_routing_matches_reference(N, T, k, D, dtype):
    x, basis = _inputs((), N, T, k, D, dtype)
    got = routing_residuals_triton(x, basis)
    assert got.shape == (N, T) and got.dtype == torch.float32
    assert_within_bound(got, x, basis)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routing_stacked_blocks_one_launch(dtype):
    G, N, T, k, D = 3, 11, 4, 13, 72
    x, basis = _inputs((G,), N, T, k, D, dtype, seed=1)
    got = routing_residuals_triton(x, basis)
    assert got.shape == (G, N, T)
    assert_within_bound(got, x, basis)
    # Each stacked block runs the unstacked block's program (same tiles, same order): bit-equal.
    for g in range(G):
        assert torch.equal(got[g], routing_residuals_triton(x[g], basis[g]))


def test_routing_noncontiguous_and_mixed_dtype():
    x, basis = _inputs((), 10, 3, 17, 64, torch.float32, seed=2)
    xt = x.t().contiguous().t()  # column-major view: exercises the strides
    got = routing_residuals_triton(xt, basis.half())  # mixed dtypes: both computed in fp32
    assert_within_bound(got, xt, basis.half().float())


def test_routing_is_deterministic():
    x, basis = _inputs((), 33, 5, 21, 80, torch.float32, seed=3)
    a = routing_residuals_triton(x, basis)
    b = routing_residuals_triton(x, basis)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routing_selection_agrees_where_margin_exceeds_tolerance(dtype):
    N, T, k, D = 48, 8, 6, 64
    x, basis = _inputs((), N, T, k, D, dtype, seed=4)
    got = routing_residuals_triton(x, basis)
    want = routing_residuals_exact(x.cpu(), basis.cpu())
    bound = assert_within_bound(got, x, basis)
    top2, idx = want.topk(2, dim=-1, largest=False)
    margin = top2[:, 1] - top2[:, 0]
    decisive = margin > bound.gather(1, idx).sum(1)  # no error within the bounds can swap the two
    got, want = got.cpu(), want.float()
    assert int(decisive.sum()) >= N // 2, "test data should make most routing decisions clear"
    assert torch.equal(got.argmin(-1)[decisive], want.argmin(-1)[decisive])


def test_public_dispatch_reaches_triton(monkeypatch):
    import mass_kernels.routing as routing_mod

    calls = []
    real = routing_mod.routing_residuals_triton

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(routing_mod, "routing_residuals_triton", spy)
    monkeypatch.setenv("MASS_KERNEL_IMPL", "triton")
    x, basis = _inputs((), 5, 3, 7, 32, torch.float32, seed=5)
    got = mass_kernels.routing_residuals(x, basis)
    assert calls == [1]
    assert_within_bound(got, x, basis)
