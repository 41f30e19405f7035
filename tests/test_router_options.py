"""Router options beyond the paper (issue 6) against direct computations."""
import copy

import pytest
import torch

import mass
from mass.router import combine_scores

from conftest import make_setup


def _fc1_input(model_copy, arch, layer, images):
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
    x = _fc1_input(reference, arch_name, 2, images)  # reference still holds θ0
    basis = model.routing_basis[0]
    want = torch.stack([(x - x @ basis[t].T @ basis[t]).norm(dim=1) for t in range(3)], 1)
    torch.testing.assert_close(routing.residuals, want, atol=1e-4, rtol=1e-4)


def test_merged_features_route_on_tsv_merge(images):
    pretrained, finetuned, reference = make_setup("hf")
    dec = mass.decompose(pretrained, finetuned, progress=False)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=2))
    from mass.merging import tsv_merge_from_decomposition

    reference.load_state_dict(tsv_merge_from_decomposition(dec))
    x = _fc1_input(reference, "hf", 2, images)
    basis = model.routing_basis[0]
    want = torch.stack([(x - x @ basis[t].T @ basis[t]).norm(dim=1) for t in range(3)], 1)
    torch.testing.assert_close(model.route(images).residuals, want, atol=1e-4, rtol=1e-4)


def test_several_layers_are_scored_in_one_pass_and_combined(images):
    pretrained, finetuned, _ = make_setup("hf")
    dec = mass.decompose(pretrained, finetuned, progress=False)
    multi = mass.MASSModel(copy.deepcopy(pretrained), dec, router=mass.RouterConfig(layers=[2, 0], mode="top1"))
    assert multi.routing_layers == [0, 2] and multi.routing_basis.shape[0] == 2
    calls = []
    for i, block in enumerate(multi.arch.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    routing = multi.route(images)
    assert calls == [0, 1]  # stops inside block 2, the last scored block
    for g, layer in enumerate([0, 2]):
        single = mass.MASSModel(copy.deepcopy(pretrained), dec, router=mass.RouterConfig(layer=layer))
        torch.testing.assert_close(routing.residuals[g], single.route(images).residuals)
    scores = -routing.residuals
    z = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-6)
    assert routing.task_ids[:, 0].tolist() == z.sum(0).argmax(1).tolist()
    # the second pass still runs on the routed tasks
    out = multi(images, task_ids=routing.task_ids)
    torch.testing.assert_close(mass.extract_embedding(multi(images)), mass.extract_embedding(out))


def test_singular_value_norm_weights_directions():
    pretrained, finetuned, _ = make_setup("hf")
    dec = mass.decompose(pretrained, finetuned, progress=False)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=1, norm="sv"))
    f = dec.lowrank["encoder.layers.1.mlp.fc1.weight"]
    x = torch.randn(4, f.V.shape[-1])
    got = mass.select_tasks(
        __import__("mass_kernels").routing_residuals(x, model.routing_basis[0]), model.router_config
    ).residuals
    w = f.S / f.S[:, :1]
    want = torch.stack([(x.square().sum(1) - ((x @ f.V[t].T).square() * w[t]).sum(1)).clamp_min(0).sqrt()
                        for t in range(3)], 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


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
