"""Data-free calibrated router scores (issue 14): ``RouterConfig(norm="energy")`` against direct computations."""
import dataclasses

import pytest
import torch

import mass
from mass.storage import saved_format
from mass.method.router import norm_weights

from conftest import make_setup
from test_router_options import fc1_input

LAYER = 2
FC1 = f"encoder.layers.{LAYER}.mlp.fc1.weight"
# The model's residuals and the ones below see the same features up to fp32 rounding through <= 3 blocks
# (relative <= ~1e-5, the bound test_support_router uses), and fp32 factors orthonormal to ~1e-6: r² moves by
# <= ~3e-5 ‖x‖², r (≈ ‖x‖ here, the weighted projection being a small share) by <= ~2e-5 relative. 1e-4 holds it.
RTOL = 1e-4


def _energy_residuals(x: torch.Tensor, f) -> torch.Tensor:
    """(B, T) sqrt(‖x‖² − ‖Δ_t x‖² / ‖Δ_t‖_F²) with Δ_t = U_t diag(S_t) V_t built densely, in fp64."""
    x = x.double()
    out = []
    for t in range(f.S.shape[0]):
        delta = f.U[t].double() @ torch.diag(f.S[t].double()) @ f.V[t].double()
        share = (x @ delta.T).square().sum(1) / delta.square().sum()
        out.append((x.square().sum(1) - share).sqrt())
    return torch.stack(out, 1)


def _model(router, **kw):
    pretrained, finetuned, reference = make_setup("hf")
    dec = mass.decompose(pretrained, finetuned, progress=False)
    return mass.MASSModel(pretrained, dec, router=router, **kw), dec, reference


def test_norm_weights_follow_their_definitions():
    S = torch.tensor([[4.0, 2.0, 1.0], [3.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert norm_weights(S, "l2") is None
    torch.testing.assert_close(norm_weights(S, "sv"), torch.tensor([[1, 0.5, 0.25], [1, 1, 0], [0, 0, 0.]]))
    torch.testing.assert_close(norm_weights(S, "energy"), torch.tensor([[16 / 21, 4 / 21, 1 / 21], [0.5, 0.5, 0],
                                                                        [0, 0, 0.]]))  # a zero delta weighs nothing
    with pytest.raises(ValueError, match="unknown router norm"):
        norm_weights(S, "maha")
    with pytest.raises(ValueError, match="support basis has none"):
        mass.RouterConfig(basis="support", norm="energy")


@pytest.mark.parametrize("features", ["pretrained", "merged"])
def test_energy_scores_equal_the_share_of_each_delta_a_feature_excites(features, images):
    router = mass.RouterConfig(layer=LAYER, norm="energy", features=features, mode="top1")
    model, dec, reference = _model(router, keep_merged="all")
    if features == "merged":
        from mass.method.merging import tsv_merge_from_decomposition

        reference.load_state_dict(tsv_merge_from_decomposition(dec))
    with torch.no_grad():
        x = fc1_input(reference, "hf", LAYER, images)
    routing = model.route(images)
    want = _energy_residuals(x, dec.lowrank[FC1])
    torch.testing.assert_close(routing.residuals.double(), want, rtol=RTOL, atol=0)
    # top-1 = the task whose delta x excites most, relative to that delta's energy (the premise: no near-tie)
    share = x.double().square().sum(1, keepdim=True) - want.square()
    top2 = share.topk(2, dim=1).values
    assert float(((top2[:, 0] - top2[:, 1]) / share.max(1).values).min()) > 10 * RTOL
    assert routing.task_ids[:, 0].tolist() == share.argmax(1).tolist()
    # and it is not the plain or the singular-value residual
    for other in ("l2", "sv"):
        plain = model.with_router(dataclasses.replace(router, norm=other)).route(images).residuals.double()
        assert float(((plain - want) / want).abs().max()) > 100 * RTOL


def test_unknown_scale_is_measured_with_the_routers_norm(tmp_path):
    router = mass.RouterConfig(layer=LAYER, norm="energy", features="pretrained", mode="top1", unknown="pretrained")
    model, dec, reference = _model(mass.RouterConfig(layer=LAYER))
    g = torch.Generator().manual_seed(0)
    support = {t: torch.randn(5, 3, 32, 32, generator=g) + i for i, t in enumerate(model.tasks)}
    calibrated = model.calibrate(support, router)
    assert calibrated.support.norm == "energy" and calibrated.support.basis is None
    for t, task in enumerate(model.tasks):
        with torch.no_grad():
            x = fc1_input(reference, "hf", LAYER, support[task])
        want = _energy_residuals(x, dec.lowrank[FC1])[:, t].max()
        torch.testing.assert_close(calibrated.routing_scale[0, t].double(), want, rtol=RTOL, atol=0)
    # a calibration measured under one norm does not serve another
    with pytest.raises(ValueError, match="calibrate again"):
        calibrated.with_router(dataclasses.replace(router, norm="l2"))
    # save -> load keeps the router and its calibration bit-exactly
    calibrated.save_pretrained(tmp_path / "m")
    pretrained, _, _ = make_setup("hf")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", pretrained)
    assert loaded.router_config == router and loaded.support.norm == "energy"
    for name in ("routing_basis", "routing_scale"):
        assert torch.equal(getattr(loaded, name), getattr(calibrated, name))
    images = torch.cat([support[t][:2] for t in model.tasks] + [torch.randn(2, 3, 32, 32, generator=g) * 5])
    a, b = calibrated.route(images), loaded.route(images)
    assert torch.equal(a.task_ids, b.task_ids) and torch.equal(a.unknown_scores, b.unknown_scores)


def test_a_saved_calibration_without_its_norm_reads_as_the_routers():
    """Files written before ``support.norm`` existed ran their detector with the router's norm: they still do."""
    router = mass.RouterConfig(layer=LAYER, norm="sv", unknown="pretrained")
    model, dec, _ = _model(mass.RouterConfig(layer=LAYER))
    support = {t: torch.randn(3, 3, 32, 32) for t in model.tasks}
    config = saved_format.config_of(model.calibrate(support, router).saved_artifact())
    assert config["support"]["norm"] == "sv"
    del config["support"]["norm"]
    assert saved_format.check_config(config)["support"]["norm"] == "sv"
    config["support"]["norm"] = "maha"
    with pytest.raises(saved_format.SavedModelError, match="support.norm"):
        saved_format.check_config(config)
