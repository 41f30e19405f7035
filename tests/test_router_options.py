"""Router options beyond the paper (issue 6) against direct computations."""
import copy

import pytest
import torch

import mass
from mass.method.router import combine_scores

from mass_kernels.reference import routing_error_bound, routing_residuals_exact

from _tolerances import U32, U64, assert_within, feature_error, gamma, residual_bound
from conftest import make_setup


def _exact_residuals(reference, arch, layer, images, basis):
    """The fp64 oracle of the residuals at the exact feature (the plain model in fp64), and the bound on the
    model's: its fp32 feature errs by ≤ feature_error, then the CPU op by routing_error_bound."""
    with torch.no_grad():
        x = fc1_input(copy.deepcopy(reference).double(), arch, layer, images.double())
    return routing_residuals_exact(x, basis), residual_bound(x, basis, feature_error(reference, x))


def fc1_input(model_copy, arch, layer, images):
    """CLS token of block ``layer``'s MLP input, read with a hook on a plain (unwrapped) model."""
    if arch.startswith("hf"):
        blocks = (model_copy.vision_model if hasattr(model_copy, "vision_model") else model_copy).encoder.layers
        fc1, batch_axis = blocks[layer].mlp.fc1, 0
    else:
        blocks = model_copy.transformer.resblocks
        fc1, batch_axis = blocks[layer].mlp.c_fc, 0 if blocks[layer].attn.batch_first else 1
    seen = {}
    h = fc1.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model_copy(images)
    h.remove()
    return seen["x"].select(1 - batch_axis, 0)


@pytest.mark.parametrize("arch_name", ["hf", "openclip_sf"])
def test_pretrained_features_route_on_theta0(arch_name, images):
    pretrained, finetuned, reference = make_setup(arch_name)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=2, features="pretrained"), progress=False)
    routing = model.route(images)
    want, bound = _exact_residuals(reference, arch_name, 2, images, model.routing_basis[0])  # reference holds θ0
    assert_within(routing.residuals, want, bound, arch_name)


def test_merged_features_route_on_tsv_merge(images):
    pretrained, finetuned, reference = make_setup("hf")
    dec = mass.decompose(pretrained, finetuned, progress=False)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=2))
    from mass.method.merging import tsv_merge_from_decomposition

    reference.load_state_dict(tsv_merge_from_decomposition(dec))
    want, bound = _exact_residuals(reference, "hf", 2, images, model.routing_basis[0])
    assert_within(model.route(images).residuals, want, bound, "merged features")


def test_several_layers_are_scored_in_one_pass_and_combined(images):
    pretrained, finetuned, plain = make_setup("hf")
    dec = mass.decompose(pretrained, finetuned, progress=False)
    multi = mass.MASSModel(copy.deepcopy(pretrained), dec, router=mass.RouterConfig(layers=[2, 0], mode="top1"))
    assert multi.routing_layers == [0, 2] and multi.routing_basis.shape[0] == 2
    calls = []
    for i, block in enumerate(multi.arch.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    routing = multi.route(images)
    assert calls == [0, 1]  # stops inside block 2, the last scored block
    features = multi.first_pass(images)[0]
    for g, layer in enumerate([0, 2]):
        single = mass.MASSModel(copy.deepcopy(pretrained), dec, router=mass.RouterConfig(layer=layer))
        # one feature computed twice in fp32 (block 0 is trimmed to the CLS row when it is the last block), each
        # copy's residuals within residual_bound of the oracle at the exact feature: twice that apart
        x, basis = features[g], multi.routing_basis[g]
        bound = 2 * residual_bound(x, basis, feature_error(plain, x, rank=0))
        assert_within(routing.residuals[g], single.route(images).residuals, bound, f"layer {layer}")
    scores = -routing.residuals
    z = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-6)
    assert routing.task_ids[:, 0].tolist() == z.sum(0).argmax(1).tolist()
    # the second pass still runs on the routed tasks
    out = multi(images, task_ids=routing.task_ids)
    # the routed forward runs the forced one's second pass on the same ids: the same ops, bit-equal
    assert torch.equal(mass.extract_embedding(multi(images)), mass.extract_embedding(out))


def test_singular_value_norm_weights_directions():
    pretrained, finetuned, _ = make_setup("hf")
    dec = mass.decompose(pretrained, finetuned, progress=False)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=1, norm="sv"))
    f = dec.lowrank["encoder.layers.1.mlp.fc1.weight"]
    x = torch.randn(4, f.V.shape[-1])
    got = mass.select_tasks(
        __import__("mass_kernels").routing_residuals(x, model.routing_basis[0]), model.router_config
    ).residuals
    # The formula sqrt(‖x‖² − Σ w_i (v_i·x)²), w = S/S₁, in fp64 (its cancellation costs ~√u₆₄·‖x‖ there).
    # It is the op's definition (routing_residuals_exact) when the rows of V are orthonormal; for an fp32
    # SVD's rows the two r² differ by ≤ ω(1+ω)·‖x‖², ω = ‖V Vᵀ − I‖₂; the model's rows v·sqrt(fl(S/S₁)), each
    # entry rounded 3 times, carry weights off by ≤ 6u relative and directions off by ≤ u: ≤ 12u·‖x‖² more
    # (generously). Hence r differs by ≤ min(√δ, δ/r) with δ the sum of those terms.
    xd, V, w = x.double(), f.V.double(), f.S.double() / f.S.double()[:, :1]
    want = torch.stack([(xd.square().sum(1) - ((xd @ V[t].T).square() * w[t]).sum(1)).clamp_min(0).sqrt()
                        for t in range(3)], 1)
    basis = model.routing_basis[0]
    omega = torch.linalg.matrix_norm(V @ V.transpose(1, 2) - torch.eye(V.shape[1], dtype=V.dtype), ord=2)
    delta = (omega * (1 + omega) + 12 * U32 + gamma(2 * x.shape[1], U64)) * xd.square().sum(1, keepdim=True)
    bound = routing_error_bound(x, basis, "direct") + torch.minimum(delta.sqrt(), delta / want.clamp_min(1e-300))
    assert_within(got, want, bound, "sv-weighted residuals")


def test_combine_scores_single_block_is_plain_negative_residual():
    r = torch.rand(5, 4)
    assert torch.equal(combine_scores(r), -r)


@pytest.mark.parametrize("bad", [dict(layers=[]), dict(layers=[1, 1]), dict(features="tsv"), dict(norm="maha")])
def test_router_option_validation(bad):
    with pytest.raises(ValueError):
        mass.RouterConfig(**bad)


def test_pretrained_features_hold_no_merged_weights(images):
    pretrained, finetuned, _ = make_setup("hf")
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig.recommended(layer=2), progress=False)
    assert model.router_config.features == "pretrained" and model.router_config.mode == "top1"
    layers = [m for m in model.model.modules() if hasattr(m, "merged_weight")]
    assert layers and all(m.merged_weight is None for m in layers)
    routing = model.route(images)  # the first pass runs θ0 and never touches merged weights
    assert routing.task_ids.shape == (images.shape[0], 1)
    assert mass.RouterConfig() == mass.RouterConfig(features="merged", mode="topk")  # defaults stay the paper's
