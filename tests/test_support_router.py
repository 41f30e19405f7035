"""The few-example (support-set) router and the unknown-task detector (issue 14) against direct computations."""
import copy
import dataclasses

import pytest
import torch

import mass
from mass.method.support import SupportFit, UnknownTaskError
from mass_kernels.reference import routing_error_bound, routing_residuals_exact

from _tolerances import U32, assert_within, encoder_bound, gamma, residual_bound
from conftest import make_setup
from test_router_options import fc1_input

LAYER = 2


def _support(tasks, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(n, 3, 32, 32, generator=g) * 0.5 + 0.8 * i for i, t in enumerate(tasks)}


def _router(**kw):
    return mass.RouterConfig(**{"layer": LAYER, "basis": "support", "features": "pretrained", "mode": "top1", **kw})


def _merged(router, support=None, keep_merged="prefix"):
    pretrained, finetuned, reference = make_setup("hf")
    support = _support(list(finetuned)) if support is None else support
    model = mass.merge(pretrained, finetuned, router=router, support=support, keep_merged=keep_merged,
                       progress=False)
    return model, reference, support


def _projector(v):
    return v.double().T @ v.double()


def _exact_features(model, reference, images):
    """The routing feature x in fp64 (a hook on the plain model, θ0 in fp64) and each row's error ‖x̂ − x‖₂ of
    the fp32 feature x̂ the model computes (its first pass on the same batch: the computation its routing and
    its calibration run, so the same values). x̂ is first checked against x within the a-priori forward bound;
    the measured error then serves the a-posteriori bounds below (tighter than the a-priori one by ~10³)."""
    with torch.no_grad():
        x = fc1_input(copy.deepcopy(reference).double(), "hf", LAYER, images.double())
        got = model.first_pass(images)[0][0]
    assert_within(got, x, encoder_bound(reference, x), "routing feature")
    return x, (got.double() - x).norm(dim=1)


def _subspace_error(x, errors, rank):
    """Bound on ‖P̂ − P‖₂ (elementwise too) between the top-``rank`` right singular subspaces of x (fp64, exact)
    and of the fp32 x̂ the model fits, by Wedin's sin θ theorem: ‖sin Θ‖₂ ≤ √2·‖E‖₂ / (s_k − s_{k+1} − ‖E‖₂).
    ‖E‖₂ ≤ ‖E‖_F: the rows' errors (``errors``, twice: a centre is a mean of them) plus the fp32 SVD's backward
    error, taken as γ_{N+D}·‖x‖_F (LAPACK: a modest multiple of u·‖x‖). Asserted to be well below the O(1)
    distance of a wrong subspace (another task's, a centring skipped), or the test would mean nothing."""
    s = torch.linalg.svdvals(x)
    e = 2 * float(errors.norm()) + gamma(x.shape[0] + x.shape[1]) * float(x.norm())
    gap = float(s[rank - 1] - s[rank]) - e
    assert gap > 0 and 2 ** 0.5 * e / gap < 1e-2
    return 2 ** 0.5 * e / gap


@pytest.mark.parametrize("centre", [False, True])
def test_support_basis_is_the_svd_of_the_support_features(centre):
    model, reference, support = _merged(_router(support_rank=3, centre=centre))
    assert model.routing_basis.shape == (1, 3, 3, model.routing_basis.shape[-1])
    for t, task in enumerate(model.tasks):
        x, errors = _exact_features(model, reference, support[task])  # reference holds θ0
        mu = x.mean(0)
        y = x - mu if centre else x
        vh = torch.linalg.svd(y, full_matrices=False)[2]
        tol = _subspace_error(y, errors, 3)
        assert_within(_projector(model.routing_basis[0, t]), _projector(vh[:3]), tol, f"{task} subspace")
        if centre:  # the mean of the rows' errors, plus the fp32 sum's γ_N·mean|x|
            tol = float(errors.max()) + gamma(x.shape[0]) * x.abs().mean(0)
            assert_within(model.routing_centre[0, t], mu, tol, f"{task} centre")
    assert (model.routing_centre is not None) == centre


@pytest.mark.parametrize("centre", [False, True])
def test_scores_and_scale_follow_the_formula(centre, images):
    model, reference, support = _merged(_router(support_rank=2, centre=centre, unknown="pretrained"))
    basis = model.routing_basis[0]
    centres = model.routing_centre[0] if centre else torch.zeros(basis.shape[0], basis.shape[-1])
    routing = model.route(images)
    x, errors = _exact_features(model, reference, images)
    want, bound = [], []
    for t in range(basis.shape[0]):  # the fp64 oracle at the exact centred feature; the model's error on top:
        xc = x - centres[t].double()  # its feature's, the fp32 subtraction's (u·‖x − c‖), the op's own
        want.append(routing_residuals_exact(xc, basis[t : t + 1])[:, 0])
        bound.append(residual_bound(xc, basis[t : t + 1], errors + U32 * xc.norm(dim=1))[:, 0])
    want, bound = torch.stack(want, 1), torch.stack(bound, 1)
    assert_within(routing.residuals, want, bound, "residuals")
    # the decision follows the residuals wherever the two smallest are further apart than their bounds
    two = want.topk(2, dim=1, largest=False).values
    clear = ~routing.unknown & (two[:, 1] - two[:, 0] > 2 * bound.amax(1))
    assert routing.task_ids[clear, 0].tolist() == want.argmin(1)[clear].tolist()
    # the unknown score: the chosen task's residual over its scale, the largest leave-one-out residual
    # Each held-out residual r_i = ‖(I − P)(f_i − μ)‖ in fp64; the model's errs by its vector's error (f_i's,
    # the centre's, the subtraction's), ‖P̂ − P‖₂·‖f_i − μ‖ (the subspace fitted on fp32 rows) and the op's.
    scales, scale_bound = [], []
    for t, task in enumerate(model.tasks):
        f, errors = _exact_features(model, reference, support[task])
        held_out, held_bound = [], []
        for i in range(f.shape[0]):
            keep = torch.arange(f.shape[0]) != i
            rest = f[keep]
            mu = rest.mean(0) if centre else torch.zeros_like(rest[0])
            v = torch.linalg.svd(rest - mu, full_matrices=False)[2][:2]
            y = (f[i] - mu)[None]
            e_y = errors[i] + (float(errors[keep].max()) + gamma(rest.shape[0]) * float(rest.abs().mean(0).norm())
                               if centre else 0.0) + U32 * y.norm()
            held_out.append(routing_residuals_exact(y, v[None])[0, 0])
            held_bound.append(residual_bound(y, v[None].float(), e_y.reshape(1))[0, 0]
                              + _subspace_error(rest - mu, errors[keep], 2) * y.norm())
        # |max_i r̂_i − max_i r_i| ≤ max_i |r̂_i − r_i|
        scales.append(torch.stack(held_out).max())
        scale_bound.append(torch.stack(held_bound).max())
        assert_within(model.routing_scale[0, t], scales[-1], scale_bound[-1], f"{task} scale")
    # score = r̂/ŝ rounded once: |r̂/ŝ − r/s| ≤ (e_r + (r/s)·e_s) / (s − e_s) + u·r̂/ŝ
    chosen = want.argmin(1)
    best, e_r = want.gather(1, chosen[:, None])[:, 0], bound.gather(1, chosen[:, None])[:, 0]
    s, e_s = torch.stack(scales)[chosen], torch.stack(scale_bound)[chosen]
    expected = best / s
    assert_within(routing.unknown_scores, expected, (e_r + expected * e_s) / (s - e_s) + 2 * U32 * expected,
                  "unknown scores")


def test_routed_equals_forced_on_the_routed_tasks():
    model, _, support = _merged(_router())
    images = torch.cat([v[:2] for v in support.values()])
    out, routing = model(images, return_routing=True)
    assert routing.task_ids[:, 0].tolist() == [0, 0, 1, 1, 2, 2]  # separated support sets route home
    forced = model(images, task_ids=routing.task_ids)
    assert torch.equal(mass.extract_embedding(out), mass.extract_embedding(forced))


def _mixed(model, support):
    """A batch with in-task images (support ones) and far-away images, and the threshold that splits them."""
    images = torch.cat([support[model.tasks[0]][:3], torch.randn(3, 3, 32, 32) * 4 + 3])[[3, 0, 4, 1, 5, 2]]
    scores = model.with_router(dataclasses.replace(model.router_config, unknown="pretrained")).route(images)
    return images, scores.unknown_scores


@pytest.mark.parametrize("fallback", ["pretrained", "merged"])
def test_unknown_samples_get_the_documented_fallback(fallback):
    model, _, support = _merged(_router(unknown=fallback), keep_merged="all")
    images, scores = _mixed(model, support)
    threshold = float(scores.sort().values[2:4].mean())  # three flagged, three kept
    model = model.with_router(dataclasses.replace(model.router_config, unknown_threshold=threshold))
    out, routing = model(images, return_routing=True)
    flagged = routing.unknown
    assert flagged.sum() == 3 and (routing.task_ids[flagged] == -1).all() and (routing.task_ids[~flagged] >= 0).all()
    single = model.forward_pretrained if fallback == "pretrained" else model.forward_merged
    emb = mass.extract_embedding(out)
    assert torch.equal(emb[flagged], mass.extract_embedding(single(images[flagged])))
    forced = model(images[~flagged], task_ids=routing.task_ids[~flagged])
    assert torch.equal(emb[~flagged], mass.extract_embedding(forced))


def test_unknown_error_and_classification():
    model, _, support = _merged(_router(unknown="error"))
    images, scores = _mixed(model, support)
    model = model.with_router(dataclasses.replace(model.router_config, unknown_threshold=float(scores.median())))
    with pytest.raises(UnknownTaskError) as err:
        model(images)
    assert err.value.indices == (scores > scores.median()).nonzero().squeeze(1).tolist()
    heads = {t: torch.nn.functional.normalize(torch.randn(4, 32), dim=-1) for t in model.tasks}
    pretrained, finetuned, _ = make_setup("hf")
    classifier = mass.merge(pretrained, finetuned, router=_router(unknown="pretrained", unknown_threshold=1e-6), heads=heads,
                            support=support, progress=False)
    res = classifier.classify(images[:2])  # every sample flagged at this threshold
    assert res.routing.unknown.all() and (res.task_ids == -1).all() and (res.predictions == -1).all()


def test_calibrate_derives_models_and_keeps_the_original():
    pretrained, finetuned, _ = make_setup("hf")
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=LAYER), progress=False)
    support = _support(model.tasks)
    calibrated = model.calibrate(support, _router())
    assert model.support is None and model.router_config.basis == "fc1"
    assert isinstance(calibrated.support, SupportFit) and calibrated.support.n_images == 6
    # same features: the calibration is kept; other features: refused
    topk = calibrated.with_router(dataclasses.replace(calibrated.router_config, mode="topk"))
    assert torch.equal(topk.routing_basis, calibrated.routing_basis)
    with pytest.raises(ValueError, match="calibrate again"):
        calibrated.with_router(_router(features="merged"))
    # the fc1 basis with a calibrated detector: scales are plain residuals of the support images
    fc1 = model.calibrate(support, mass.RouterConfig(layer=LAYER, unknown="pretrained"))
    assert fc1.support.basis is None and torch.equal(fc1.routing_basis, model.routing_basis)
    view = fc1.with_router(mass.RouterConfig(layer=LAYER))
    x = view.route(support[model.tasks[1]]).residuals
    # one feature (the same first pass on the same batch), scored by the op against all tasks' bases here and
    # against task 1's alone in the calibration: two evaluations, each within the op's bound of the oracle
    feature, basis = view.first_pass(support[model.tasks[1]])[0][0], view.routing_basis[0, 1:2]
    bound = 2 * routing_error_bound(feature, basis, "direct").max()
    assert_within(fc1.routing_scale[0, 1], x[:, 1].max(), bound, "fc1 scale")


def test_bad_support_input_is_refused():
    pretrained, finetuned, _ = make_setup("hf")
    tasks = list(finetuned)
    good = _support(tasks)
    cases = [
        ({t: good[t] for t in tasks[:2]}, ValueError, "missing"),
        ({**good, "other": good[tasks[0]]}, ValueError, "unknown"),
        ({**good, tasks[0]: good[tasks[0]][:1]}, ValueError, "at least 2"),
        ({**good, tasks[0]: good[tasks[0]][0]}, ValueError, "shape"),
        ({**good, tasks[0]: good[tasks[0]][:, :, :16]}, ValueError, "differ in shape"),
        ({**good, tasks[0]: good[tasks[0]].long()}, TypeError, "float image tensor"),
        ([good[t] for t in tasks], TypeError, "mapping"),
    ]
    for support, exc, match in cases:
        with pytest.raises(exc, match=match):
            mass.merge(pretrained, finetuned, router=_router(), support=support, progress=False)
    with pytest.raises(ValueError, match="support=|few images"):
        mass.merge(pretrained, finetuned, router=_router(), progress=False)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=LAYER), progress=False)
    with pytest.raises(ValueError, match="channels"):
        model.calibrate({t: torch.randn(4, 1, 32, 32) for t in tasks}, _router())
    with pytest.raises(ValueError, match="support_rank=6 exceeds"):
        model.calibrate(good, _router(support_rank=6))  # 6 images: 5 held out
    with pytest.raises(ValueError, match="calibrate"):
        model.with_router(_router())
    with pytest.raises(ValueError, match="keep_merged='all'"):
        model.calibrate(good, _router(unknown="merged"))


@pytest.mark.parametrize("field,value,exc", [
    ("basis", "pca", ValueError), ("support_rank", 0, ValueError), ("support_rank", 2.0, TypeError),
    ("centre", 1, TypeError), ("unknown", "fallback", ValueError), ("unknown_threshold", 0.0, ValueError),
    ("unknown_threshold", float("nan"), ValueError),
])
def test_router_config_checks_the_new_fields(field, value, exc):
    with pytest.raises(exc, match=field):
        mass.RouterConfig(**{field: value})
    with pytest.raises(ValueError, match="norm='sv'"):
        mass.RouterConfig(basis="support", norm="sv")


@pytest.mark.skipif(not hasattr(mass.storage.saved_format, "support_from_tensors"),
                    reason="the saved format does not hold the router calibration yet (issue 14 patch to "
                           "mass/storage/saved_format.py and mass/storage/serialization.py)")
@pytest.mark.parametrize("centre", [False, True])
def test_save_load_keeps_the_calibrated_router_bit_exactly(tmp_path, centre):
    model, _, support = _merged(_router(centre=centre, unknown="pretrained", unknown_threshold=0.5))
    images = torch.cat([v[:2] for v in support.values()] + [torch.randn(2, 3, 32, 32) * 4])
    model.save_pretrained(tmp_path / "m")
    pretrained, _, _ = make_setup("hf")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", pretrained)
    assert loaded.router_config == model.router_config
    for name in ("routing_basis", "routing_centre", "routing_scale"):
        a, b = getattr(model, name), getattr(loaded, name)
        assert (a is None and b is None) or torch.equal(a, b)
    out, routing = model(images, return_routing=True)
    out2, routing2 = loaded(images, return_routing=True)
    assert torch.equal(routing.task_ids, routing2.task_ids) and torch.equal(routing.residuals, routing2.residuals)
    assert torch.equal(mass.extract_embedding(out), mass.extract_embedding(out2))


def test_read_support_dir(tmp_path):
    from PIL import Image

    from mass.evaluation.data import ClipPreprocess
    from mass.method.support import read_support_dir

    (tmp_path / "a" / "sub").mkdir(parents=True)
    for i, name in enumerate(["x.png", "sub/y.jpg", "z.png"]):
        Image.new("RGB", (40, 36), (10 * i, 20, 30)).save(tmp_path / "a" / name)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    pre = ClipPreprocess.from_pretrained(str(tmp_path), image_size=32)
    got = read_support_dir(tmp_path / "a", pre)
    assert got.shape == (3, 3, 32, 32)
    # sorted path order: sub/y.jpg, x.png, z.png
    with Image.open(tmp_path / "a" / "x.png") as image:
        assert torch.equal(got[1], pre(image))
    assert read_support_dir(tmp_path / "a", pre, limit=2).shape[0] == 2
    with pytest.raises(ValueError, match="at least 2"):
        read_support_dir(tmp_path / "a", pre, limit=1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bad.png").write_text("broken")
    (tmp_path / "b" / "bad2.png").write_text("broken")
    with pytest.raises(ValueError, match="cannot read"):
        read_support_dir(tmp_path / "b", pre)
    with pytest.raises(ValueError, match="not a directory"):
        read_support_dir(tmp_path / "missing", pre)
