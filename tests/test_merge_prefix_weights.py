"""Which TSV-M weights the first pass reads (mass.nn.banks.merged_needed): without prefix reuse it ends at the last
routing block's MLP input, so that MLP's merged weights (fc1, fc2) are never read and need not be built.

The claims are checked on the model itself: dropping those weights leaves routing and outputs bit-identical
(same code path, same inputs, deterministic CPU kernels: nothing that is computed may differ), and asking for
prefix reuse afterwards (``with_router(reuse_prefix=True)``) rebuilds them."""
import copy

import pytest
import torch

import mass
from mass.nn.banks import add_merged_weights, merged_needed, routing_mlp_layers, targets
from mass.nn.model import extract_embedding

from conftest import make_setup

MLP_NAMES = {"hf": ("mlp.fc1", "mlp.fc2"), "hf_proj": ("mlp.fc1", "mlp.fc2"),
             "openclip_bf": ("mlp.c_fc", "mlp.c_proj"), "openclip_sf": ("mlp.c_fc", "mlp.c_proj")}


def _needs(model, routing_layer, keep_merged="prefix", first_pass_merged=True, reuse_prefix=True):
    order = {name: i for i, (name, _) in enumerate(model.model.named_modules())}
    return merged_needed(model.arch, order, list(model._layers), routing_layer, keep_merged, first_pass_merged,
                         reuse_prefix=reuse_prefix)


def _merged(model) -> dict:
    return {name: layer.merged_weight for name, layer, _, _ in targets(model._layers)}


def _drop_merged(model, names) -> None:
    for name, layer, _, _ in targets(model._layers):
        if name in names:
            layer.merged_weight = None
            layer.merged_bias = None


def _run(model, images):
    out, routing = model(images, return_routing=True)
    return extract_embedding(out), routing


def _assert_same(a, b):
    (emb_a, ra), (emb_b, rb) = a, b
    assert torch.equal(emb_a, emb_b)
    assert torch.equal(ra.task_ids, rb.task_ids) and torch.equal(ra.weights, rb.weights)
    assert torch.equal(ra.residuals, rb.residuals)


@pytest.fixture(scope="module")
def decomposed():
    """Per architecture: a pretrained model (kept unwrapped) and its decomposition over 3 tasks."""
    out = {}
    for arch in MLP_NAMES:
        pretrained, finetuned, _ = make_setup(arch)
        out[arch] = (pretrained, mass.decompose(pretrained, finetuned, progress=False))
    return out


def test_merged_needed_drops_exactly_the_routing_blocks_mlp(decomposed):
    for arch, (pretrained, dec) in decomposed.items():
        model = mass.MASSModel(copy.deepcopy(pretrained), dec, keep_merged="all")
        L = 2
        with_mlp = _needs(model, L)
        lean = _needs(model, L, reuse_prefix=False)
        block = model.arch.block_names[L]
        assert with_mlp - lean == {f"{block}.{n}" for n in MLP_NAMES[arch]} == set(
            routing_mlp_layers(model.arch, list(model._layers), L))
        assert lean < with_mlp
        assert f"{block}.{MLP_NAMES[arch][0]}" in with_mlp  # the prefix default keeps them
        everything = set(model._layers)
        assert _needs(model, L, keep_merged="all", reuse_prefix=False) == everything  # 'all' keeps all
        assert _needs(model, L, first_pass_merged=False, reuse_prefix=False) == set()


ROUTERS = {
    "cls-trimmed": (mass.RouterConfig(layer=2), True),
    "cls-whole-block": (mass.RouterConfig(layer=2), False),  # the routing block runs whole, fc1 stops it
    "mean-token": (mass.RouterConfig(layer=2, token="mean"), True),
    "two-blocks": (mass.RouterConfig(layers=[1, 2], mode="top1"), True),  # block 1's MLP runs: kept
}


@pytest.mark.parametrize("router_name", list(ROUTERS))
@pytest.mark.parametrize("arch", list(MLP_NAMES))
def test_routing_block_mlp_weights_are_never_read_without_prefix_reuse(decomposed, arch, router_name, images):
    pretrained, dec = decomposed[arch]
    router, trim = ROUTERS[router_name]
    model = mass.MASSModel(copy.deepcopy(pretrained), dec, router=router)
    model.trim_routing_block = trim
    x = images
    unused = _needs(model, model.routing_layer) - _needs(model, model.routing_layer, reuse_prefix=False)
    assert len(unused) == 2
    add_merged_weights(model._layers, unused, len(dec.tasks))  # held whether or not the model built them
    before = _run(model, x)
    merged = _merged(model)
    assert all(merged[name] is not None for name in unused)
    _drop_merged(model, unused)
    assert all(_merged(model)[name] is None for name in unused)
    _assert_same(_run(model, x), before)
    # Asking for prefix reuse afterwards rebuilds them from the banks: the same merged weights as before (the same
    # fp32 factors, the same tsv_delta call), hence the same outputs as a model built with prefix reuse.
    reused_before = _run(mass.MASSModel(copy.deepcopy(pretrained), dec, router=router, reuse_prefix=True), x)
    view = model.with_router(router, reuse_prefix=True)
    rebuilt = _merged(model)
    assert all(torch.equal(rebuilt[name], merged[name]) for name in unused)
    _assert_same(_run(view, x), reused_before)


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_pretrained_features_read_no_merged_weights(decomposed, images, reuse_prefix):
    """features='pretrained': the first pass runs θ0 (with prefix reuse too: the second pass replays θ0's block
    output), so no layer's merged weights are read. Without prefix reuse none are built; with it, dropping all
    of them changes nothing."""
    pretrained, dec = decomposed["hf"]
    router = mass.RouterConfig(layer=2, features="pretrained")
    model = mass.MASSModel(copy.deepcopy(pretrained), dec, router=router, reuse_prefix=reuse_prefix)
    before = _run(model, images)
    if not reuse_prefix:
        assert all(w is None for w in _merged(model).values())
    _drop_merged(model, set(model._layers))
    _assert_same(_run(model, images), before)



def test_merge_builds_no_routing_mlp_weights_without_prefix_reuse(decomposed):
    """What MASSModel builds: without prefix reuse the routing block's MLP gets no merged weights; with it, it
    does; with pretrained routing features no layer gets any (no pass reads them)."""
    pretrained, dec = decomposed["hf"]
    lean = mass.MASSModel(copy.deepcopy(pretrained), dec, router=mass.RouterConfig(layer=2))
    mlp = routing_mlp_layers(lean.arch, list(lean._layers), 2)
    assert len(mlp) == 2 and all(_merged(lean)[n] is None for n in mlp)
    full = mass.MASSModel(copy.deepcopy(pretrained), dec, router=mass.RouterConfig(layer=2), reuse_prefix=True)
    assert all(_merged(full)[n] is not None for n in mlp)
    pre = mass.MASSModel(copy.deepcopy(pretrained), dec, router=mass.RouterConfig(layer=2, features="pretrained"),
                         reuse_prefix=True)
    assert all(w is None for w in _merged(pre).values())
