"""The error bounds of tests/_tolerances.py: they hold where they are used, and they stay tight enough for the
tests that use them to catch a wrong computation."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mass.nn.model import extract_embedding

from _tolerances import U32, assert_within, encoder_bound, gamma, layernorm_bound, path_length
from conftest import build_model


def test_forward_bound_holds_for_every_test_encoder(arch, images):
    """The growth assumption Λ = 1 of the forward bound, on the encoders the tests use (fp32 against fp64)."""
    encoder = build_model(arch)
    with torch.no_grad():
        got = extract_embedding(encoder(images))
        want = extract_embedding(copy.deepcopy(encoder).double()(images.double()))
    bound = encoder_bound(encoder, want)
    assert_within(got, want, bound, arch)
    # meaningful: a wrong weight, bias or task block moves outputs by 1e-2 relative or more
    assert float((bound / want.abs().amax(1, keepdim=True)).max()) < 1e-3


def test_path_length_counts_the_low_rank_blocks():
    encoder = build_model("hf")
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in encoder.modules())
    assert path_length(encoder, 17, rank=4) - path_length(encoder, 17) == n_linear * (2 * 4 + 3)


def test_gamma_and_assert_within_refuse_what_they_must():
    assert gamma(3) == pytest.approx(3 * U32, rel=1e-6)
    with pytest.raises(ValueError, match="no bound"):
        gamma(2 ** 24)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_within(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.1]), 0.05)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_within(torch.tensor([float("nan")]), torch.tensor([0.0]), 1.0)
    assert_within(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.04]), 0.05)


def test_layernorm_bound_holds_on_badly_centred_rows():
    """Rows with a large mean (cancellation in x − μ) and a tiny eps: the bound's e_μ/σ term carries it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g) * torch.logspace(-3, 0, 64)[:, None] + 10.0
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    got = F.layer_norm(x, (48,), w, b, 1e-12)
    want = F.layer_norm(x.double(), (48,), w.double(), b.double(), 1e-12)
    assert_within(got, want, layernorm_bound(x, w, b, 1e-12), "layer_norm")
