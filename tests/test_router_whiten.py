"""The whitened few-example router and its calibrated unknown-task detector (``RouterConfig(whiten=...)``,
issue 14) against direct fp64 computations."""
import json
import math

import pytest
import torch

import mass
from mass.method import support as sup
from mass_kernels.reference import routing_residuals_exact

from _tolerances import U32, gamma, residual_bound
from conftest import make_setup

LAYER = 2
TASKS = ["a", "b", "c"]


def _features(G=2, N=7, D=10, seed=0):
    """Per-task (G, N, D) fp32 features, the tasks apart and each stretched along its own axes."""
    g = torch.Generator().manual_seed(seed)
    return {t: (torch.randn(G, N, D, generator=g) * torch.linspace(0.3, 2.0, D) + 2.0 * i).float()
            for i, t in enumerate(TASKS)}


def _whitener_direct(xs, w):
    """C^(-1/2) from its definition, fp64: the pooled within-task covariance (recomputed from scratch, no
    downdate), shrunk towards (tr C / D)·I with weight 1 − w."""
    C = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in xs) / (sum(x.shape[0] for x in xs) - len(xs))
    D = C.shape[0]
    S = w * C + (1 - w) * C.trace() / D * torch.eye(D, dtype=C.dtype)
    e, U = torch.linalg.eigh(S)
    return U @ torch.diag(e.rsqrt()) @ U.T, S


def _residual2(z, rest, rank, centre):
    mu = rest.mean(0) if centre else torch.zeros_like(rest[0])
    v = torch.linalg.svd(rest - mu, full_matrices=False)[2][:rank]
    zc = z - mu
    return zc @ zc - (v @ zc).square().sum(), v, mu


def _projector(v):
    return v.double().T @ v.double()


@pytest.mark.parametrize("centre", [True, False])
def test_whitened_fit_equals_a_direct_fp64_computation(centre):
    feats, w, rank = _features(), 0.3, 2
    router = mass.RouterConfig(basis="support", layers=[1, 2], support_rank=rank, centre=centre, whiten=w)
    fit = sup.fit(feats, TASKS, router, [1, 2], None)
    assert fit.whiten == w and fit.whitener.dtype == torch.float32 and fit.basis.shape == (2, 3, rank, 10)
    # The fit computes in fp64 (its error ~1e-13 relative here: the shrunk covariance's condition number is
    # < 1e3, asserted) and rounds each stored value once to fp32: elementwise within u·|value| of the fp64 one.
    # A projector built from rows each within u of unit rows is within 2·k·u·(1 + u) elementwise; 4·k·u covers
    # that plus the fp64 part. Both are far below the O(1) gaps a wrong whitening or subspace would leave.
    G = 2
    d2 = torch.zeros(sum(f.shape[1] for f in feats.values()), G, dtype=torch.float64)
    for g in range(G):
        xs = [feats[t][g].double() for t in TASKS]
        W, S = _whitener_direct(xs, w)
        assert torch.linalg.cond(S) < 1e3
        assert torch.allclose(fit.whitener[g].double(), W, rtol=2 * U32, atol=1e-12 * float(W.abs().max()))
        for t, x in enumerate(xs):
            z = x @ W
            mu = z.mean(0) if centre else torch.zeros_like(z[0])
            v = torch.linalg.svd(z - mu, full_matrices=False)[2][:rank]
            assert (_projector(fit.basis[g, t]) - _projector(v)).abs().max() <= 4 * rank * U32
            if centre:
                assert torch.allclose(fit.centre[g, t].double(), mu, rtol=2 * U32, atol=1e-12 * float(mu.abs().max()))
        # Held out: image i leaves its task's rows, the pooled covariance (recomputed here, downdated there)
        # and the subspace; its squared residual in its own whitened coordinates.
        row = 0
        for t, x in enumerate(xs):
            for i in range(x.shape[0]):
                keep = torch.arange(x.shape[0]) != i
                W_i, _ = _whitener_direct([x[keep] if s == t else y for s, y in enumerate(xs)], w)
                d2[row, g] = _residual2(x[i] @ W_i, x[keep] @ W_i, rank, centre)[0]
                row += 1
    unit = d2.mean(0)
    u = (d2 / unit).mean(1)
    n = u.numel()
    q = u.sort().values[min(math.ceil((n + 1) * (1 - sup.UNKNOWN_RATE)), n) - 1]
    # the stored unit of the squared residual, rounded once to fp32 (the fp64 path's own error is ~1e-12)
    assert torch.allclose(fit.scale.double(), (unit * q).unsqueeze(1).expand(G, 3), rtol=2 * U32, atol=0)
    # by construction at most rate·(n + 1) of the support's own held-out scores lie above the unit (here
    # n = 21 < 1/rate − 1: the largest is the unit, none above)
    assert int((u > q * (1 + 1e-9)).sum()) <= max(0, n - math.ceil((n + 1) * (1 - sup.UNKNOWN_RATE)))


def test_conformal_quantile_is_the_documented_order_statistic():
    scores = torch.arange(200, 0, -1).double()  # 1..200, unsorted
    assert sup.conformal_quantile(scores, 0.02) == 197  # ⌈201 · 0.98⌉ = ⌈196.98⌉: the 197th smallest
    assert sup.conformal_quantile(scores[101:], 0.1) == 90  # 1..99: ⌈100 · 0.9⌉ = 90
    assert sup.conformal_quantile(scores[:10], 0.02) == 200  # too few to certify 2%: the largest (200..191)


def _merged(router, keep_merged="prefix", n=6):
    pretrained, finetuned, reference = make_setup("hf")
    g = torch.Generator().manual_seed(0)
    support = {t: torch.randn(n, 3, 32, 32, generator=g) * 0.5 + 0.8 * i for i, t in enumerate(finetuned)}
    model = mass.merge(pretrained, finetuned, router=router, support=support, keep_merged=keep_merged,
                       progress=False)
    return model, support


def _router(**kw):
    return mass.RouterConfig.few_example(**{"layers": [1, LAYER], "whiten": 0.5, "centre": True, "unknown": "pretrained",
                                            **kw})


@pytest.mark.parametrize("centre", [True, False])
def test_calibrate_fits_the_models_own_features(centre):
    model, support = _merged(_router(centre=centre))
    probe = model.with_router(mass.RouterConfig(layers=[1, LAYER], features="pretrained", mode="top1"))
    feats = {t: probe.first_pass(support[t])[0] for t in model.tasks}
    direct = sup.fit(feats, model.tasks, model.router_config, [1, LAYER], None)
    for name in ("basis", "centre", "scale", "whitener"):  # same features, same deterministic fit
        a, b = getattr(model.support, name), getattr(direct, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert torch.equal(model.routing_whitener, direct.whitener)


def test_whitened_scores_and_detector_follow_the_formula(images):
    model, support = _merged(_router(unknown_threshold=0.7))
    x = torch.cat([images, support[model.tasks[0]][:3]])
    feats = model.first_pass(x)[0]  # (G, B, D) fp32: the features the router scores
    routing = model.route_features(feats)
    fit = model.support
    want, bound = [], []
    for g in range(feats.shape[0]):
        W = fit.whitener[g].double()
        z = feats[g].double() @ W
        # the fp32 product x @ W errs by ≤ γ_D·(|x| @ |W|) per element; subtracting the centre adds u·|z − c|
        ez = (gamma(W.shape[0]) * (feats[g].double().abs() @ W.abs())).norm(dim=1)
        cols, bcols = [], []
        for t in range(len(model.tasks)):
            zc = z - fit.centre[g, t].double()
            cols.append(routing_residuals_exact(zc, fit.basis[g, t:t + 1])[:, 0])
            bcols.append(residual_bound(zc, fit.basis[g, t:t + 1], ez + U32 * (zc.norm(dim=1) + ez))[:, 0])
        want.append(torch.stack(cols, 1))
        bound.append(torch.stack(bcols, 1))
    want, bound = torch.stack(want), torch.stack(bound)
    assert bool(((routing.residuals.double() - want).abs() <= bound).all())
    # the detector: mean over blocks of the chosen task's squared residual over the unit (r² errs by ≤ (2r + b)·b)
    chosen = mass.method.router.combine_scores(routing.residuals).argmax(1)  # the task chosen before flagging
    idx = chosen.view(1, -1, 1).expand(want.shape[0], -1, 1)
    r, b = want.gather(2, idx)[..., 0], bound.gather(2, idx)[..., 0]
    unit = fit.scale.double().gather(1, chosen.view(1, -1).expand(want.shape[0], -1))
    score = (r.square() / unit).mean(0)
    score_bound = (((2 * r + b) * b) / unit).mean(0) + 4 * U32 * score
    assert bool(((routing.unknown_scores.double() - score).abs() <= score_bound).all())
    assert torch.equal(routing.unknown, routing.unknown_scores > 0.7)
    assert torch.equal(routing.task_ids[routing.unknown], torch.full_like(routing.task_ids[routing.unknown], -1))
    assert bool(routing.unknown[:len(images)].any()) and not bool(routing.unknown[len(images):].all())


def test_flagged_samples_get_the_pretrained_output(images):
    model, support = _merged(_router(unknown_threshold=0.7))
    pretrained, _, _ = make_setup("hf")
    x = torch.cat([images, support[model.tasks[1]][:2]])
    with torch.no_grad():
        out, routing = model(x, return_routing=True)
        plain = pretrained(pixel_values=x)
    flagged = routing.unknown
    assert bool(flagged.any()) and not bool(flagged.all())
    assert torch.equal(routing.task_ids[flagged], torch.full_like(routing.task_ids[flagged], -1))
    # the fallback runs θ0 (the same weights in the same order of operations), so the same values
    got, ref = mass.extract_embedding(out)[flagged], mass.extract_embedding(plain)[flagged]
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    errors = model.with_router(_router(unknown="error", unknown_threshold=0.7))
    with pytest.raises(sup.UnknownTaskError):
        errors(x)


def test_save_load_keeps_the_whitened_router_bit_exactly(tmp_path, images):
    model, support = _merged(_router(unknown_threshold=0.8))
    model.save_pretrained(tmp_path / "m")
    pretrained, _, _ = make_setup("hf")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", pretrained)
    assert loaded.router_config == model.router_config and loaded.support.whiten == 0.5
    for name in ("routing_basis", "routing_centre", "routing_scale", "routing_whitener"):
        assert torch.equal(getattr(model, name), getattr(loaded, name)), name
    x = torch.cat([images, support[model.tasks[2]][:2]])
    out, routing = model(x, return_routing=True)
    out2, routing2 = loaded(x, return_routing=True)
    assert torch.equal(routing.task_ids, routing2.task_ids) and torch.equal(routing.unknown_scores,
                                                                            routing2.unknown_scores)
    assert torch.equal(mass.extract_embedding(out), mass.extract_embedding(out2))


def _rewrite(directory, edit, drop=()):
    """Rewrite a saved model's config (``edit(config)``) and drop tensors, with a matching checksum: what
    another version of mass would have written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mass.storage.serialization import MODEL_NAME, content_sha256

    path = directory / MODEL_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    config = json.loads(metadata["config"])
    edit(config)
    text = json.dumps(config)
    save_file(tensors, str(path), metadata={**metadata, "config": text, "sha256": content_sha256(text, tensors)})


def test_files_saved_before_the_option_load_unwhitened(tmp_path, images):
    model, _ = _merged(_router(whiten=0.0))
    model.save_pretrained(tmp_path / "m")

    def older(config):  # what a mass without the option wrote
        del config["router"]["whiten"], config["support"]["whiten"]

    _rewrite(tmp_path / "m", older)
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", make_setup("hf")[0])
    assert loaded.router_config.whiten == 0.0 and loaded.routing_whitener is None
    assert torch.equal(model.route(images).unknown_scores, loaded.route(images).unknown_scores)


def test_a_whitened_file_without_its_whitener_is_refused(tmp_path):
    model, _ = _merged(_router())
    model.save_pretrained(tmp_path / "m")
    _rewrite(tmp_path / "m", lambda config: None, drop=("support/whitener",))
    with pytest.raises(mass.storage.saved_format.SavedModelError, match="whitener"):
        mass.MASSModel.from_pretrained(tmp_path / "m", make_setup("hf")[0])


@pytest.mark.parametrize("kw,match", [
    (dict(basis="support", whiten=1.0), "whiten"), (dict(basis="support", whiten=-0.1), "whiten"),
    (dict(whiten=0.5), "basis='support'"), (dict(basis="support", whiten="0.5"), "whiten"),
])
def test_router_config_checks_whiten(kw, match):
    with pytest.raises(ValueError, match=match):
        mass.RouterConfig(**kw)


def test_a_fit_serves_only_its_own_whitening():
    model, _ = _merged(_router())
    with pytest.raises(ValueError, match="calibrate again"):
        model.with_router(_router(whiten=0.2))
    assert model.with_router(_router(unknown="off")).routing_whitener is not None
