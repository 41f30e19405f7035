"""Model-level features against direct computations (fine-tuned models, forced tasks, TSV-M over a set)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mass
from mass.method.merging import tsv_merge_from_decomposition
from mass.nn.model import extract_embedding
from mass_kernels.reference import group_rows, routing_error_bound

from _tolerances import (U32, assert_within, encoder_bound, float64_model_bound, gamma, layernorm_bound,
                         probabilistic_relative_error)
from conftest import build_model, make_setup


def emb(out):
    return extract_embedding(out)


def _rank(model, n_tasks=1):
    """The largest low-rank block a forward of ``model`` applies with sets of ``n_tasks`` tasks (for the bound)."""
    return n_tasks * max(m.rank for m in model.modules() if isinstance(m, mass.MASSLinear))


def test_full_rank_forced_task_reproduces_finetuned(arch, images):
    pretrained, finetuned, reference = make_setup(arch)
    model = mass.merge(pretrained, finetuned, rank=1.0, router=mass.RouterConfig(layer=2), progress=False)
    dec, k = model.decomposition(), _rank(model)
    # 1. The stored factors reproduce every fine-tuned weight: an fp32 SVD's backward error is a modest multiple
    # of u·‖Δ‖ (LAPACK; taken as γ_{m+n}, as in test_support_router.py), on top of the fp32 Δ = θt − θ0 (u·|Δ|).
    for t, name in enumerate(dec.tasks):
        for key, f in dec.lowrank.items():
            delta = finetuned[name][key].double() - dec.base[key].double()
            recon = (f.U[t].double() * f.S[t].double()) @ f.V[t].double()
            assert float((recon - delta).norm()) <= (gamma(sum(delta.shape)) + U32) * float(delta.norm()), key
        assert all(torch.equal(v[t], finetuned[name][key]) for key, v in dec.dense.items())  # kept whole
    # 2. Forcing task t runs the model with those weights: the model and the reference in float64 (the claim is
    # about the algorithm), the reference loading the weights the library reconstructs in fp32.
    model.to(torch.float64)
    reference.double()
    x = images.double()
    for t, name in enumerate(model.tasks):
        reference.load_state_dict(dec.task_state_dict(t))
        want = emb(reference(x))
        got = emb(model(x, task_ids=torch.full((x.shape[0],), t)))
        bound = float64_model_bound(reference, want, k, stored_terms=k + 3, fp32_lowrank=arch == "openclip_sf")
        assert_within(got, want, bound, f"{arch} task {t}")
        by_name = emb(model(x, task_ids=[name] * x.shape[0]))
        assert torch.equal(by_name, got)  # names resolve to the same ids: the same ops in the same order


def test_zero_deltas_reproduce_pretrained(arch, images):
    pretrained = build_model(arch)
    reference = copy.deepcopy(pretrained)
    # One task: the same checkpoint under two task names is refused (tests/test_fuzz_io.py).
    same = {"t0": copy.deepcopy(pretrained.state_dict())}
    model = mass.merge(pretrained, same, router=mass.RouterConfig(layer=1), progress=False).to(torch.float64)
    want = emb(reference.double()(images.double()))  # both in float64: the claim is about the algorithm
    bound = float64_model_bound(reference, want, _rank(model), stored_terms=1, fp32_lowrank=arch == "openclip_sf")
    assert_within(emb(model(images.double())), want, bound, arch)


def test_merge_refuses_one_checkpoint_under_two_task_names(arch):
    pretrained, finetuned, _ = make_setup(arch, n_tasks=2, scale=0.2)
    sd = dict(finetuned)[next(iter(finetuned))]
    sd = sd if isinstance(sd, dict) else sd.state_dict()
    before = copy.deepcopy(pretrained.state_dict())
    with pytest.raises(mass.CheckpointError, match="same weights"):
        mass.merge(pretrained, {"a": sd, "b": {k: v.clone() for k, v in sd.items()}}, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in pretrained.state_dict().items())  # left as it was


@pytest.mark.parametrize("mode", ["top1", "topk", "weighted"])
def test_mixed_batch_equals_per_sample_forced(arch, images, mode):
    """A row of a batch and the same sample alone are two computations of one value (GEMMs of other shapes may
    sum in another order). The model runs in float64 (the claim is about the algorithm): they agree within
    twice the float64 model bound."""
    pretrained, finetuned, plain = make_setup(arch, n_tasks=4, scale=0.2)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=2, mode=mode, threshold=0.1),
                       progress=False).to(torch.float64)
    images = images.double()
    # Force a mix: routed rows plus explicit sets, including a two-task set and a no-task row.
    out, routing = model(images, return_routing=True)
    assert routing.task_ids.shape == (images.shape[0], model.router_config.slots)
    rank = _rank(model, 2)

    def same(a, b):
        bound = float64_model_bound(plain, b, rank, fp32_lowrank=arch == "openclip_sf", sides=2)
        assert_within(a, b, bound, f"{arch} {mode} row {i}")

    for i in range(images.shape[0]):
        ids = routing.task_ids[i : i + 1]
        if mode == "weighted":
            continue  # weighted rows are not a set; checked below against a direct computation
        single = model(images[i : i + 1], task_ids=ids)
        same(emb(out)[i : i + 1], emb(single))
    forced = torch.tensor([[0, -1], [1, 3], [-1, -1], [2, -1], [3, 0], [1, -1]])
    batch = emb(model(images, task_ids=forced))
    for i in range(images.shape[0]):
        single = emb(model(images[i : i + 1], task_ids=forced[i : i + 1]))
        same(batch[i : i + 1], single)
    if mode == "top1":  # samples already in task order: the CPU fast path runs without reordering them
        in_order = torch.tensor([0, 0, 1, 2, 2, 3])
        assert group_rows(in_order[:, None])[0] is None
        batch = emb(model(images, task_ids=in_order))
        for i in range(images.shape[0]):
            single = emb(model(images[i : i + 1], task_ids=in_order[i : i + 1]))
            same(batch[i : i + 1], single)


def test_task_set_applies_tsv_merge_over_the_set(arch, images):
    pretrained, finetuned, reference = make_setup(arch, n_tasks=4)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=2))
    reference.double()  # the direct computation in fp64 from the fp32 weights the library builds
    reference.load_state_dict(tsv_merge_from_decomposition(dec, tasks=[1, 3]))
    got = emb(model(images, task_ids=torch.tensor([[3, 1]] * images.shape[0])))
    want = emb(reference(images.double()))
    assert_within(got, want, encoder_bound(reference, want, rank=_rank(model, 2)), f"{arch} set [3, 1]")
    reference.load_state_dict(dec.task_state_dict(2))
    got = emb(model(images, task_ids=torch.tensor([2] * images.shape[0])))
    want = emb(reference(images.double()))
    assert_within(got, want, encoder_bound(reference, want, rank=_rank(model)), f"{arch} task 2")


def test_weighted_mode_sums_blocks_with_routing_weights(images):
    pretrained, finetuned, reference = make_setup("hf", n_tasks=3)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=2, mode="weighted", max_tasks=2))
    model.to(torch.float64)  # the claim is about the algorithm: both sides in float64 (the router stays fp32)
    out, routing = model(images[:1].double(), return_routing=True)
    (t0, t1), (w0, w1) = routing.task_ids[0].tolist(), routing.weights[0].tolist()
    # w_i = fl(p_i / fl(p_0 + p_1)), summed exactly in Python floats: (p_0(1+δ_0) + p_1(1+δ_1)) / ((p_0+p_1)(1+δ)),
    # |δ| ≤ u, is within [(1−u)/(1+u), (1+u)/(1−u)], i.e. off 1 by at most γ_2.
    assert abs(w0 + w1 - 1) <= gamma(2) and w0 >= w1
    sd0, sd1 = dec.task_state_dict(t0), dec.task_state_dict(t1)
    reference.double().load_state_dict(
        {k: w0 * sd0[k].double() + w1 * sd1[k].double() if sd0[k].is_floating_point() else sd0[k] for k in sd0})
    want = emb(reference(images[:1].double()))
    # two fp32 reconstructions θ0 + U S V (k + 3 roundings each), weighted and summed: 2k + 8 terms per stage
    k = _rank(model)
    assert_within(emb(out), want, float64_model_bound(reference, want, 2 * k, stored_terms=2 * k + 8), "weighted")


def test_first_pass_stops_after_routing_block(arch, images):
    pretrained, finetuned, _ = make_setup(arch)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1), progress=False)
    calls = []
    for i, block in enumerate(model.arch.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    routing = model.route(images)
    assert routing.task_ids.shape[0] == images.shape[0]
    assert calls == [0]  # block 1 started (its MLP input is the feature) but never finished; 2, 3 never ran
    calls.clear()
    model(images)
    assert calls == [0, 0, 1, 2, 3]


def _prefix_hybrid(model, merged, task, L):
    """θ with TSV-M for the embeddings and blocks ≤ L, task weights for blocks > L and the head layers."""
    before = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")
    hybrid = {}
    for key in merged:
        block = next((i for i, n in enumerate(model.arch.block_names) if key.startswith(n + ".")), None)
        if block is not None:
            use_merged = block <= L
        else:
            use_merged = key.startswith(before) or "embeddings." in key or "pre_layrnorm." in key
        hybrid[key] = merged[key] if use_merged else task[key]
    return hybrid


def test_reuse_prefix_matches_hybrid_model(arch, images):
    pretrained, finetuned, reference = make_setup(arch)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    L = 1
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=L, mode="top1"), reuse_prefix=True)
    model.to(torch.float64)  # the claim is about the algorithm: both sides in float64
    out, routing = model(images.double(), return_routing=True)
    out = emb(out)
    merged = tsv_merge_from_decomposition(dec)
    reference.double()
    k = _rank(model)
    for i in range(images.shape[0]):
        task = dec.task_state_dict(int(routing.task_ids[i, 0]))
        reference.load_state_dict(_prefix_hybrid(model, merged, task, L))
        want = emb(reference(images[i : i + 1].double()))
        bound = float64_model_bound(reference, want, k, stored_terms=k + 3, fp32_lowrank=arch == "openclip_sf")
        assert_within(out[i : i + 1], want, bound, f"{arch} row {i}")


def test_router_picks_task_whose_subspace_holds_the_feature():
    gen = torch.Generator().manual_seed(0)
    T, k, D = 5, 4, 40
    q, _ = torch.linalg.qr(torch.randn(D, T * k, generator=gen))
    basis = q.T.reshape(T, k, D)  # mutually orthogonal task subspaces
    coeffs = torch.randn(T, 3, k, generator=gen)
    feats = torch.einsum("tnk,tkd->tnd", coeffs, basis).reshape(T * 3, D)
    feats = feats + 0.01 * torch.randn(feats.shape, generator=gen)
    import mass_kernels

    routing = mass.select_tasks(mass_kernels.routing_residuals(feats, basis), mass.RouterConfig(mode="top1"))
    assert routing.task_ids[:, 0].tolist() == [t for t in range(T) for _ in range(3)]


def test_topk_selection_rules():
    cfg = mass.RouterConfig(mode="topk", threshold=0.2, max_tasks=2)
    # one clear winner -> one task; two close winners -> both (weights 1/2 each);
    # six equal scores -> every softmax weight is 1/6 < 0.2 -> argmax fallback keeps one task
    residuals = torch.tensor([[0.1, 5.0, 5.0, 5.0, 5.0, 5.0], [0.1, 0.1, 5.0, 5.0, 5.0, 5.0], [1.0] * 6])
    r = mass.select_tasks(residuals, cfg)
    assert r.task_ids[0].tolist() == [0, -1] and r.weights[0].tolist() == [1.0, 0.0]
    assert sorted(r.task_ids[1].tolist()) == [0, 1] and r.weights[1].tolist() == [0.5, 0.5]
    assert r.task_ids[2, 1].item() == -1 and r.task_ids[2, 0].item() >= 0
    # four equal scores -> weights 1/4 > 0.2 -> two tasks, capped by max_tasks
    r4 = mass.select_tasks(torch.ones(1, 4), cfg)
    assert (r4.task_ids >= 0).sum().item() == 2


def test_weighted_and_batch_level_modes():
    residuals = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    r = mass.select_tasks(residuals, mass.RouterConfig(mode="weighted", max_tasks=2, temperature=0.5))
    p = torch.softmax(-residuals / 0.5, 1)
    assert r.task_ids.tolist() == [[0, 1], [2, 1]]
    # the router runs these very fp32 ops (negate, scale, softmax, keep the 2 largest, renormalise): bit-equal
    assert torch.equal(r.weights[0], p[0, :2] / p[0, :2].sum())
    per_sample = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 10.0]])  # alone: tasks 0 and 1
    b = mass.select_tasks(per_sample, mass.RouterConfig(mode="top1", batch_level=True))
    assert b.task_ids[:, 0].tolist() == [1, 1]  # mean residuals [2, 1.5, 6.5]: one decision, task 1


def test_wrapped_model_keeps_module_names_and_state_dict_keys(arch):
    pretrained, finetuned, _ = make_setup(arch)
    keys_before = list(pretrained.state_dict().keys())
    shapes_before = {k: v.shape for k, v in pretrained.state_dict().items()}
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1), progress=False)
    model.route(torch.randn(2, 3, 32, 32))  # an early-stopped first pass must leave the structure intact
    assert list(model.model.state_dict().keys()) == keys_before
    assert {k: v.shape for k, v in model.model.state_dict().items()} == shapes_before
    linears = [m for m in model.model.modules() if isinstance(m, mass.MASSLinear)]
    assert linears and all(hasattr(m, "in_features") and hasattr(m, "out_features") for m in linears)
    assert not any(type(m) is torch.nn.Linear for m in model.model.modules())


@pytest.mark.parametrize("arch_name", ["hf", "openclip_sf"])
def test_model_through_triton_kernels_matches_torch_path(arch_name, monkeypatch):
    """The MASSModel calls the dispatching ops, so the Triton kernels serve it with no code change."""
    pretrained = build_model(arch_name, layers=2)
    plain = copy.deepcopy(pretrained)
    from mass.method.synthetic import finetuned_like

    finetuned = finetuned_like(pretrained, 3, scale=0.2, seed=3)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1, threshold=0.1), progress=False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    forced = torch.tensor([[0, -1], [2, 1], [-1, -1]])
    monkeypatch.setenv("MASS_KERNEL_IMPL", "torch")
    want_out, want_routing = model(x, return_routing=True)
    want_forced = emb(model(x, task_ids=forced))
    monkeypatch.setenv("MASS_KERNEL_IMPL", "triton")
    got_out, got_routing = model(x, return_routing=True)
    # The first pass runs no kernel: both residuals come from one feature, each op within its own bound of
    # the fp64 oracle there (mass_kernels.reference.routing_error_bound).
    feature, basis = model.first_pass(x)[0][0], model.routing_basis[0]
    bound = routing_error_bound(feature, basis, "fused") + routing_error_bound(feature, basis, "direct")
    assert_within(got_routing.residuals, want_routing.residuals, bound, "residuals, triton vs torch")
    assert torch.equal(got_routing.task_ids, want_routing.task_ids)
    rank = _rank(model, 2)
    want = emb(want_out)
    assert_within(emb(got_out), want, encoder_bound(plain, want, rank=rank, sides=2), "routed, triton vs torch")
    assert_within(emb(model(x, task_ids=forced)), want_forced, encoder_bound(plain, want_forced, rank=rank, sides=2),
                  "forced, triton vs torch")


def _conv_exact(conv, x, entries, weights):
    """Per sample i: conv(x_i, W0 + Σ_j w_ij Δ_{e_ij}) + b + Σ_j w_ij b_{e_ij} in fp64, and the bound on an fp32
    evaluation in any order (weights combined first or one conv per term): γ_n times the same expression on
    absolute values, n = the patch size + K·(patch size + 2) + 2 for K slots (Higham §3.5)."""
    W0, b = conv.weight.double(), conv.bias.double()
    dW, db = conv.task_weight.double(), conv.task_bias.double()
    want, mag = [], []
    for i in range(x.shape[0]):
        w, ww, bb, bm = W0, W0.abs(), b, b.abs()
        for e, a in zip(entries[i].tolist(), weights[i].double().tolist()):
            if e >= 0:
                w, ww, bb, bm = w + a * dW[e], ww + abs(a) * dW[e].abs(), bb + a * db[e], bm + abs(a) * db[e].abs()
        xi = x[i : i + 1].double()
        want.append(F.conv2d(xi, w, bb, stride=conv.stride))
        mag.append(F.conv2d(xi.abs(), ww, bm, stride=conv.stride))
    patch, K = W0[0].numel(), entries.shape[1]
    return torch.cat(want), gamma(patch + K * (patch + 2) + 2) * torch.cat(mag)


def test_conv_grouped_delta_matches_per_entry_loop():
    """The sync-free grouped conv (CUDA path) equals the per-entry loop (CPU path)."""
    from mass.nn.layers import MASSConv2d, PassState

    state = PassState()
    conv = MASSConv2d(torch.nn.Conv2d(3, 8, 4, stride=4, bias=True), state)
    gen = torch.Generator().manual_seed(0)
    conv.task_weight = torch.randn(5, 8, 3, 4, 4, generator=gen)
    conv.task_bias = torch.randn(5, 8, generator=gen)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    entries = torch.tensor([[0, -1], [3, 1], [-1, -1], [4, 4]])
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.3, 0.7]])
    with state.use("tasks", entries, weights):
        loop = conv(x)
        grouped = conv._conv(x, conv.weight, conv.bias) + conv._grouped_delta(x)
    want, bound = _conv_exact(conv, x, entries, weights)
    assert_within(loop, want, bound, "per-entry loop")
    assert_within(grouped, want, bound, "grouped conv")


@pytest.mark.parametrize("grouping", ["top1", "weighted pairs"])
def test_conv_patch_gemm_matches_per_entry_loop(grouping):
    """The CPU fast path of the patch embedding (one GEMM over patches, per-entry deltas on grouped samples,
    the image cropped to whole patches as the conv does) equals one conv per entry."""
    from mass.nn.layers import MASSConv2d, PassState

    state = PassState()
    conv = MASSConv2d(torch.nn.Conv2d(3, 8, 4, stride=4, bias=True), state)
    gen = torch.Generator().manual_seed(0)
    conv.set_weight_deltas(torch.randn(5, 8, 3, 4, 4, generator=gen))
    conv.task_bias = torch.randn(5, 8, generator=gen)
    assert conv.task_weight.reshape(5, 8, -1).transpose(1, 2).is_contiguous()  # the GEMM's operand layout
    x = torch.randn(6, 3, 18, 17, generator=gen)  # 4 x 4 patches, ragged border
    if grouping == "top1":
        entries, weights = torch.tensor([[0], [0], [3], [3], [4], [1]]), torch.ones(6, 1)
        segments = [(0, 0, 0, 2), (0, 3, 2, 4), (0, 4, 4, 5), (0, 1, 5, 6)]
    else:
        entries = torch.tensor([[0, 2], [0, 2], [1, -1], [4, 3], [4, 3], [-1, -1]])
        weights = torch.tensor([[0.6, 0.4], [0.6, 0.4], [1.0, 0.0], [0.3, 0.7], [0.3, 0.7], [0.0, 0.0]])
        segments = [(0, 0, 0, 2), (0, 1, 2, 3), (0, 4, 3, 5), (1, 2, 0, 2), (1, 3, 3, 5)]
    with state.use("tasks", entries, weights):
        loop = conv(x)
    with state.use("tasks", entries, weights, segments):
        fast = conv(x)
    want, bound = _conv_exact(conv, x, entries, weights)
    assert_within(loop, want, bound, "per-entry loop")
    assert_within(fast, want, bound, "patch GEMM")


@pytest.mark.parametrize("mode", ["base", "merged"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_shared_passes_patch_gemm_matches_conv(mode, bias):
    """On the CPU the first pass (merged weights) and the pretrained forward embed patches with one GEMM over
    the patches: the same values as the convolution, the image cropped to whole patches as the conv does."""
    from mass.nn.layers import MASSConv2d, PassState

    state = PassState()
    conv = MASSConv2d(torch.nn.Conv2d(3, 8, 4, stride=4, bias=bias), state)
    gen = torch.Generator().manual_seed(2)
    conv.merged_weight = torch.randn(8, 3, 4, 4, generator=gen)
    conv.merged_bias = torch.randn(8, generator=gen) if bias else None
    w, b = (conv.weight, conv.bias) if mode == "base" else (conv.merged_weight, conv.merged_bias)
    x = torch.randn(2, 3, 18, 17, generator=gen)  # 4 x 4 patches, ragged border
    with torch.no_grad(), state.use(mode):
        got = conv(x)
    # one dot of the patch size (48) plus the bias per output, in any order: γ_49·(|x| * |w| + |b|)
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride=4)
    mag = F.conv2d(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(), stride=4)
    assert_within(got, want, gamma(49) * mag, f"{mode} patch GEMM")


def test_conv_patch_whole_weights_follow_weight_changes():
    """The top-1 patch path multiplies by cached ``W0 + Δ_e``: an in-place write to the base weight or to the
    deltas (as ``load_state_dict`` does), or a new delta bank, must be seen by the next forward."""
    from mass.nn.layers import MASSConv2d, PassState

    state = PassState()
    conv = MASSConv2d(torch.nn.Conv2d(3, 8, 4, stride=4, bias=True), state)
    gen = torch.Generator().manual_seed(1)
    conv.set_weight_deltas(torch.randn(3, 8, 3, 4, 4, generator=gen))
    conv.task_bias = torch.randn(3, 8, generator=gen)
    x, weights = torch.randn(3, 3, 8, 8, generator=gen), torch.ones(3, 1)

    def check():
        with state.use("tasks", entries, weights):
            loop = conv(x)
        with state.use("tasks", entries, weights, segments):
            fast = conv(x)
        want, bound = _conv_exact(conv, x, entries, weights)
        assert_within(loop, want, bound, "per-entry loop")
        assert_within(fast, want, bound, "cached W0 + Δ")

    entries, segments = torch.tensor([[0], [1], [1]]), [(0, 0, 0, 1), (0, 1, 1, 3)]
    check()
    assert conv.fine_tuned_weight.shape[0] == 2  # only the entries used so far
    entries, segments = torch.tensor([[2], [0], [1]]), [(0, 2, 0, 1), (0, 0, 1, 2), (0, 1, 2, 3)]
    check()
    assert conv.fine_tuned_weight.shape[0] == 3
    with torch.no_grad():
        conv.weight.mul_(2.0)
    check()
    with torch.no_grad():
        conv.task_weight.add_(1.0)
    check()
    conv.task_weight = torch.randn(3, 8, 3, 4, 4, generator=gen)
    check()


@pytest.mark.parametrize("entries, segments", [
    ([0, 0, 2, 1, 1], [(0, 0, 0, 2), (0, 2, 2, 3), (0, 1, 3, 5)]),  # unequal groups: one affine call each
    ([0, 0, 2, 2, 1, 1], [(0, 0, 0, 2), (0, 2, 2, 4), (0, 1, 4, 6)]),  # equal groups: one call, entries 0, 2, 1
])
def test_layernorm_grouped_path_matches_per_sample_affine(entries, segments):
    from mass.nn.layers import MASSLayerNorm, PassState

    state = PassState()
    ln = MASSLayerNorm(torch.nn.LayerNorm(10), state)
    gen = torch.Generator().manual_seed(0)
    ln.task_weight, ln.task_bias = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    x = torch.randn(len(entries), 4, 10, generator=gen)
    entries, weights = torch.tensor(entries).view(-1, 1), torch.ones(len(entries), 1)
    with state.use("tasks", entries, weights):
        generic = ln(x.clone())
    with state.use("tasks", entries, weights, segments):
        grouped = ln(x.clone())
        with torch.no_grad():  # the affine is then applied with an out= op
            grouped_no_grad = ln(x.clone())
    w, b = ln.weight[None] + ln.task_weight[entries[:, 0]], ln.bias[None] + ln.task_bias[entries[:, 0]]
    w64, b64 = ln.weight.double()[None] + ln.task_weight.double()[entries[:, 0]], \
        ln.bias.double()[None] + ln.task_bias.double()[entries[:, 0]]
    want = torch.stack([F.layer_norm(x[i].double(), (10,), w64[i], b64[i]) for i in range(x.shape[0])])
    bound = layernorm_bound(x, w[:, None], b[:, None], ln.eps)
    assert_within(generic, want, bound, "generic affine")
    assert_within(grouped, want, bound, "grouped affine")
    assert_within(grouped_no_grad, want, bound, "grouped affine, out= form")


@pytest.mark.parametrize("token", ["cls", "mean"])
def test_trimmed_routing_block_reads_the_same_feature(arch, images, token):
    """With the CLS token the routing block computes only the CLS row after its keys and values (its MLP
    never runs); the feature equals the one read at fc1's input in a whole block."""
    pretrained, finetuned, plain = make_setup(arch)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=2, token=token), progress=False)
    fc1_calls = []
    model.arch.fc1[2].register_forward_pre_hook(lambda m, a: fc1_calls.append(1))
    trimmed, _ = model.first_pass(images)
    assert fc1_calls == ([] if token == "cls" else [1])
    model.trim_routing_block = False
    whole, _ = model.first_pass(images)
    assert len(fc1_calls) == (1 if token == "cls" else 2)
    # two fp32 computations of one feature (the trimmed attention runs for the CLS row only)
    assert_within(trimmed[0], whole[0], encoder_bound(plain, whole[0], sides=2), f"{arch} {token}")


def test_routing_block_with_a_mask_runs_whole(images):
    """A block called with a mask is not trimmed (the trimmed path takes no mask): the feature comes from fc1."""
    pretrained, finetuned, plain = make_setup("openclip_bf")
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1), progress=False)
    fc1_calls = []
    model.arch.fc1[1].register_forward_pre_hook(lambda m, a: fc1_calls.append(1))
    no_mask = torch.zeros(17, 17)  # additive mask of zeros: same attention, but a mask is passed
    transformer = model.model.transformer
    original = transformer.forward
    transformer.forward = lambda x, attn_mask=None: original(x, attn_mask=no_mask)
    masked, _ = model.first_pass(images)
    assert fc1_calls == [1]
    transformer.forward = original
    plain_feature, _ = model.first_pass(images)
    assert fc1_calls == [1]
    # two fp32 computations of one feature (attention with a zero mask takes another kernel)
    assert_within(masked[0], plain_feature[0], encoder_bound(plain, plain_feature[0], sides=2), "masked")


def test_banks_use_the_cpu_layout_and_stored_factors_stay_contiguous(arch):
    from mass.nn.layers import MASSLinear

    pretrained, finetuned, _ = make_setup(arch)
    model = mass.merge(pretrained, finetuned, progress=False)
    layers = [m for m in model.modules() if isinstance(m, MASSLinear)]
    assert all(m.task_V.transpose(1, 2).is_contiguous() and m.task_U.transpose(1, 2).is_contiguous() for m in layers)
    dec = model.decomposition()
    assert all(f.U.is_contiguous() and f.V.is_contiguous() for f in dec.lowrank.values())
    model.to(torch.float64)
    assert all(m.task_V.dtype == torch.float64 and m.task_V.transpose(1, 2).is_contiguous() for m in layers)


def test_model_cast_to_bf16_serves_close_to_fp32(arch, images):
    """.to(bfloat16) moves every bank and merged weight (including the hidden in_proj wrapper)."""
    pretrained, finetuned, _ = make_setup(arch)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=2, threshold=0.1), progress=False)
    forced = torch.tensor([[0, -1], [1, 2], [2, -1], [0, 1], [1, -1], [2, 0]])
    want = emb(model(images, task_ids=forced)).float()
    model.to(torch.bfloat16)
    got = emb(model(images.bfloat16(), task_ids=forced))
    assert got.dtype == torch.bfloat16
    # A statistical threshold: no worst-case bound exists in bf16 over this depth (see
    # probabilistic_relative_error, 0.041-0.049 for the test encoders; measured 0.007-0.014). It catches a
    # bank or merged weight left uncast (an error) or read wrongly (relative errors of order 1).
    limit = probabilistic_relative_error(build_model(arch), 2.0 ** -8)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < limit
    out, routing = model(images.bfloat16(), return_routing=True)
    assert routing.task_ids.shape == (images.shape[0], 2) and torch.isfinite(emb(out).float()).all()


def test_zero_padded_banks_give_the_same_results(arch, images):
    """On CUDA the banks' rank is zero-padded to a multiple of 16 (MASSLinear.set_factors, for the Triton kernels).
    Simulated on the CPU: forced tasks, a cached two-task set and the saved decomposition of a padded model equal
    those of the unpadded one. The padded columns add exact zeros; only the summation order of the low-rank
    products may change (GEMMs of another shape). The model runs in float64, but the row-wise low-rank op
    (sequence-first layouts) accumulates in fp32 (mass_kernels' contract), so the two sides are bounded as two fp32
    computations of one value with the padded rank (tests/_tolerances.py), which also covers the fp64 paths.
    A wrong padding (non-zero padded S, a mis-sliced rank) shifts outputs by ~1e-1. The saved factors must be
    bit-equal."""
    import mass_kernels
    from mass.nn.layers import MASSLinear

    def build():
        pretrained, finetuned, _ = make_setup(arch, n_tasks=3, scale=0.2)
        finetuned = {n: {k: v.double() for k, v in sd.items()} for n, sd in finetuned.items()}
        return mass.merge(pretrained.double(), finetuned, router=mass.RouterConfig(layer=2), progress=False)

    plain, padded = build(), build()
    encoder = build_model(arch)  # the plain module, for the path length of the bound
    layers = [m for m in padded.modules() if isinstance(m, MASSLinear)]
    assert layers and all(m.rank % 16 for m in layers)  # the test pads something
    for m in layers:
        k = m.rank
        m.set_factors(*mass_kernels.pad_rank(*m.true_factors()), rank=k)
        assert m.task_S.shape[1] % 16 == 0 and m.rank == k
    x = images.double()
    for ids in (torch.arange(x.shape[0]) % 3, [["task0", "task1"]] * x.shape[0], [["task1", "task2"], "task0"] * (x.shape[0] // 2)):
        want = emb(plain(x, task_ids=ids))
        k_pad = 2 * max(m.task_S.shape[1] for m in layers)  # sets of two tasks
        assert_within(emb(padded(x, task_ids=ids)), want, encoder_bound(encoder, want, rank=k_pad, sides=2), str(ids))
    a, b = plain.decomposition(), padded.decomposition()
    assert a.lowrank.keys() == b.lowrank.keys()
    for key in a.lowrank:
        for fa, fb in zip((a.lowrank[key].U, a.lowrank[key].S, a.lowrank[key].V),
                          (b.lowrank[key].U, b.lowrank[key].S, b.lowrank[key].V)):
            assert torch.equal(fa, fb), key
