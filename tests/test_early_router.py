"""Early routers (issue 25): the patch-token mean, the routing block placed by depth, several early blocks in
one first pass, and prefix reuse at an early block, against direct computations on a plain model."""
import copy

import pytest
import torch

import mass
from mass.method.merging import tsv_merge_from_decomposition
from mass.method.router import depth_layer
from mass_kernels.reference import routing_residuals_exact

from _tolerances import assert_within, encoder_bound, feature_error, gamma, residual_bound
from conftest import make_setup
from test_model import _prefix_hybrid as prefix_hybrid
from test_model import _rank as lowrank_width
from test_router_whiten import _rewrite as rewrite_saved


def mlp_inputs(plain, arch, layers, images):
    """Blocks ``layers``' MLP inputs (B, S, D), batch first, of a plain (unwrapped) model, read with hooks."""
    if arch.startswith("hf"):
        blocks = (plain.vision_model if hasattr(plain, "vision_model") else plain).encoder.layers
        fc1s, batch_axes = [blocks[l].mlp.fc1 for l in layers], [0] * len(layers)
    else:
        blocks = plain.transformer.resblocks
        fc1s = [blocks[l].mlp.c_fc for l in layers]
        batch_axes = [0 if blocks[l].attn.batch_first else 1 for l in layers]
    seen = {}
    hooks = [fc1.register_forward_pre_hook(lambda m, a, l=l: seen.setdefault(l, a[0]))
             for l, fc1 in zip(layers, fc1s)]
    with torch.no_grad():
        plain(images)
    for h in hooks:
        h.remove()
    return [seen[l] if b == 0 else seen[l].transpose(0, 1) for l, b in zip(layers, batch_axes)]


def token_feature(x, token):
    """The routing feature of a (B, S, D) MLP input, from its definition."""
    return {"cls": x[:, 0], "mean": x.mean(1), "patch_mean": x[:, 1:].mean(1)}[token]


def feature_bound(plain, x, token):
    """‖x̂ − x‖ per sample of a feature the model reads in fp32: the encoder's bound at the largest entry of
    any token of the sample (the mean of S rows errs by no more than its worst row), plus the S-term sum of
    the mean itself (γ_S of the largest entry, √D over the row)."""
    err = feature_error(plain, x)
    if token == "cls":
        return err
    return err + gamma(x.shape[1]) * x.abs().flatten(1).amax(1).view(-1, 1) * x.shape[-1] ** 0.5


def test_depth_places_the_routing_block_by_the_share_of_the_encoder():
    assert [depth_layer(0.5, n) for n in (4, 6, 12, 24)] == [1, 2, 5, 11]
    assert [depth_layer(d, 6) for d in (1 / 6, 2 / 6, 0.5, 4 / 6, 5 / 6, 1.0)] == [0, 1, 2, 3, 4, 5]
    assert depth_layer(0.01, 12) == 0
    assert mass.RouterConfig(depth=0.5).resolved_layers(12) == [5]
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError):
            mass.RouterConfig(depth=bad)
    with pytest.raises(ValueError, match="not several"):
        mass.RouterConfig(depth=0.5, layer=2)
    with pytest.raises(ValueError, match="not several"):
        mass.RouterConfig(depth=0.5, layers=[1, 2])


@pytest.mark.parametrize("arch_name", ["hf", "openclip_sf"])
@pytest.mark.parametrize("token", ["cls", "mean", "patch_mean"])
def test_early_router_scores_equal_the_formula(arch_name, token, images):
    """Data-free router at block 1 of 4 (``depth=0.5``), pretrained features: the residuals of the feature
    computed here from the plain model's MLP input (fp64), within the bound of the fp32 feature and the op."""
    pretrained, finetuned, plain = make_setup(arch_name)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(depth=0.5, token=token, features="pretrained",
                                                                          mode="top1"), progress=False)
    assert model.routing_layers == [1]
    calls = []
    for i, block in enumerate(model.arch.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    routing = model.route(images)
    assert calls == [0]  # the first pass ends inside block 1
    [x] = mlp_inputs(copy.deepcopy(plain).double(), arch_name, [1], images.double())
    feature = token_feature(x, token)
    basis = model.routing_basis[0]
    want = routing_residuals_exact(feature, basis)
    assert_within(routing.residuals, want, residual_bound(feature, basis, feature_bound(plain, x, token)),
                  f"{arch_name} {token}")


def test_several_early_blocks_with_the_patch_mean_in_one_pass(images):
    pretrained, finetuned, plain = make_setup("hf")
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layers=[0, 1], token="patch_mean",
                                                                          features="pretrained", mode="top1"),
                       progress=False)
    calls = []
    for i, block in enumerate(model.arch.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    routing = model.route(images)
    assert calls == [0] and routing.residuals.shape == (2, images.shape[0], 3)
    xs = mlp_inputs(copy.deepcopy(plain).double(), "hf", [0, 1], images.double())
    for g, x in enumerate(xs):
        feature, basis = token_feature(x, "patch_mean"), model.routing_basis[g]
        bound = residual_bound(feature, basis, feature_bound(plain, x, "patch_mean"))
        assert_within(routing.residuals[g], routing_residuals_exact(feature, basis), bound, f"block {g}")
    scores = -routing.residuals
    z = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-6)
    assert routing.task_ids[:, 0].tolist() == z.sum(0).argmax(1).tolist()


def _support(model, n=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(n, 3, 32, 32, generator=g) + 0.5 * i for i, t in enumerate(model.tasks)}


def test_early_few_example_router_scores_equal_the_formula(images):
    """A support basis fitted at blocks 0 and 1 on the patch mean (uncentred, unwhitened, so the score is the
    plain residual against the fitted rows): the residuals of features computed here, within the bound."""
    pretrained, finetuned, plain = make_setup("hf")
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=3), progress=False)
    router = mass.RouterConfig.few_example(layers=[0, 1], token="patch_mean", centre=False, whiten=0.0)
    early = model.calibrate(_support(model), router)
    assert early.routing_layers == [0, 1] and early.support.token == "patch_mean"
    routing = early.route(images)
    xs = mlp_inputs(copy.deepcopy(plain).double(), "hf", [0, 1], images.double())
    for g, x in enumerate(xs):
        feature, basis = token_feature(x, "patch_mean"), early.routing_basis[g]
        bound = residual_bound(feature, basis, feature_bound(plain, x, "patch_mean"))
        assert_within(routing.residuals[g], routing_residuals_exact(feature, basis), bound, f"block {g}")


def test_save_load_keeps_the_early_router_fields_bit_exactly(tmp_path, images):
    pretrained, finetuned, _ = make_setup("hf")
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=3), progress=False)
    router = mass.RouterConfig.few_example(depth=0.5, token="patch_mean", unknown="pretrained")
    early = model.calibrate(_support(model), router)
    early.save_pretrained(tmp_path / "m")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", make_setup("hf")[0])
    assert loaded.router_config == router and loaded.router_config.depth == 0.5
    assert loaded.routing_layers == [1] and loaded.support.token == "patch_mean"
    for name in ("routing_basis", "routing_centre", "routing_scale", "routing_whitener"):
        a, b = getattr(early, name), getattr(loaded, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    out, routing = early(images, return_routing=True)
    out2, routing2 = loaded(images, return_routing=True)
    assert torch.equal(routing.residuals, routing2.residuals) and torch.equal(routing.task_ids, routing2.task_ids)
    assert torch.equal(mass.extract_embedding(out), mass.extract_embedding(out2))


def test_a_file_without_depth_loads_unchanged(tmp_path, images):
    """A format-2 config written before ``router.depth`` existed loads with depth None (its block by layer)."""
    pretrained, finetuned, _ = make_setup("hf")
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=2, token="patch_mean"), progress=False)
    model.save_pretrained(tmp_path / "m")

    def older(config):  # what a mass without the field wrote
        del config["router"]["depth"]

    rewrite_saved(tmp_path / "m", older)
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", make_setup("hf")[0])
    assert loaded.router_config == model.router_config and loaded.router_config.depth is None
    assert loaded.routing_layers == [2]
    assert torch.equal(model.route(images).residuals, loaded.route(images).residuals)


@pytest.mark.parametrize("arch_name", ["hf", "openclip_sf"])
@pytest.mark.parametrize("mode", ["top1", "topk"])
def test_prefix_reuse_at_an_early_block_equals_the_hybrid_model(arch_name, mode, images):
    """``reuse_prefix=True`` at block 1 with the pretrained features: θ0 for the embeddings and blocks ≤ 1,
    each row's own weights after it (its task's; with ``topk`` and threshold 0 two tasks, TSV-M over the set),
    computed directly on a plain model in fp64 from the same fp32 weights."""
    pretrained, finetuned, reference = make_setup(arch_name)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    router = mass.RouterConfig(layer=1, features="pretrained", mode=mode, threshold=0.0, max_tasks=2)
    model = mass.MASSModel(pretrained, dec, router=router, reuse_prefix=True)
    embeddings = []
    hook_on = next(m for n, m in model.model.named_modules() if n.endswith(("patch_embedding", "conv1")))
    hook_on.register_forward_hook(lambda m, a, o: embeddings.append(1))
    out, routing = model(images, return_routing=True)
    out = mass.extract_embedding(out)
    reference.double()
    n_sets = 0
    for i in range(images.shape[0]):
        ids = sorted(int(t) for t in routing.task_ids[i] if t >= 0)
        n_sets += len(ids) > 1
        after = dec.task_state_dict(ids[0]) if len(ids) == 1 else tsv_merge_from_decomposition(dec, tasks=ids)
        reference.load_state_dict(prefix_hybrid(model, dec.base, after, 1))
        want = mass.extract_embedding(reference(images[i:i + 1].double()))
        bound = encoder_bound(reference, want, rank=lowrank_width(model, len(ids)))
        assert_within(out[i:i + 1], want, bound, f"{arch_name} {mode} row {i} tasks {ids}")
    assert n_sets == (images.shape[0] if mode == "topk" else 0)


@pytest.mark.parametrize("arch_name", ["hf", "openclip_bf", "openclip_sf"])
@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_no_block_and_no_patch_embedding_runs_twice_with_prefix_reuse(arch_name, reuse_prefix, images):
    """Where the forward's work goes (CPU path): without reuse the first pass runs fc1 in blocks < L only (the
    routing block is trimmed to the CLS row) and the second pass every block; with reuse the first pass runs
    blocks ≤ L whole and the second pass only the blocks after L and no patch embedding (replayed prefix)."""
    pretrained, finetuned, _ = make_setup(arch_name)
    L = 1
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=L, mode="top1", features="pretrained"),
                       reuse_prefix=reuse_prefix, progress=False)
    fc1_calls, patch_calls = [], []
    for i, fc1 in enumerate(model.arch.fc1):
        fc1.register_forward_pre_hook(lambda m, a, i=i: fc1_calls.append(i))
    conv = next(m for m in model.model.modules() if isinstance(m, mass.nn.layers.MASSConv2d))
    for method in ("_patch_gemm", "_patch_forward", "_conv"):
        original = getattr(conv, method)
        setattr(conv, method, lambda *a, original=original, method=method: patch_calls.append(method) or original(*a))
    model(images)
    n = model.arch.n_blocks
    if reuse_prefix:
        assert fc1_calls == list(range(L + 1)) + list(range(L + 1, n))
        assert len(patch_calls) == 1  # the first pass's
    else:
        assert fc1_calls == list(range(L)) + list(range(n))
        assert len(patch_calls) == 2


def test_fast_preset_routes_by_depth_and_takes_a_block_override():
    fast = mass.RouterConfig.fast()
    assert fast.basis == "support" and fast.mode == "top1" and fast.depth is not None and fast.layer is None
    assert mass.RouterConfig.fast(layer=3).depth is None and mass.RouterConfig.fast(layer=3).layer == 3
    assert mass.RouterConfig.fast(layers=[1, 2]).resolved_layers(6) == [1, 2]
    from mass.evaluation.protocol import ROUTERS
    from mass.tools.cli.main import build_parser
    from mass.tools.cli.merge import router_from_args

    def cli(*flags):
        return router_from_args(build_parser().parse_args(["merge", "--pretrained", "p", "--finetuned", "a=x",
                                                             "--out", "o", *flags]))

    assert cli("--router", "fast") == fast == ROUTERS["fast"]()
    assert cli("--router", "fast", "--layer", "4") == mass.RouterConfig.fast(layer=4)
