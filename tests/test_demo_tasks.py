"""Fast checks of the offline demo benchmark (mass.tools.demo): tasks and the cached training pipeline."""

import time

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from mass.tools.demo.tasks import MAX_TASKS, TASK_NAMES, make_pretrain_pool, make_tasks  # noqa: E402

N_TRAIN, N_TEST = 40, 24


@pytest.fixture(scope="module")
def tasks():
    return make_tasks(n_tasks=MAX_TASKS, n_train=N_TRAIN, n_test=N_TEST, seed=0)


def test_shapes_and_labels(tasks):
    assert [t.name for t in tasks] == list(TASK_NAMES)
    assert len(tasks) >= 8
    for t in tasks:
        assert t.train_images.shape == (N_TRAIN, 3, 32, 32) and t.train_images.dtype == torch.float32
        assert t.test_images.shape == (N_TEST, 3, 32, 32)
        assert t.train_labels.dtype == torch.int64
        for y, n in ((t.train_labels, N_TRAIN), (t.test_labels, N_TEST)):
            assert y.shape == (n,) and int(y.min()) >= 0 and int(y.max()) < t.num_classes
        assert len(set(t.class_names)) == t.num_classes >= 8
        # balanced labels: every class present in train
        assert set(t.train_labels.tolist()) == set(range(t.num_classes))
        assert torch.isfinite(t.train_images).all()
        # CLIP normalisation: values within what [0, 1] pixels can map to
        assert t.train_images.min() > -2.0 and t.train_images.max() < 2.3


def test_deterministic_and_worker_independent(tasks):
    again = make_tasks(n_tasks=3, n_train=N_TRAIN, n_test=N_TEST, seed=0, workers=1)
    for a, b in zip(tasks[:3], again):
        assert torch.equal(a.train_images, b.train_images) and torch.equal(a.train_labels, b.train_labels)
        assert torch.equal(a.test_images, b.test_images) and torch.equal(a.test_labels, b.test_labels)
    other = make_tasks(n_tasks=3, n_train=N_TRAIN, n_test=N_TEST, seed=1, workers=1)
    for a, b in zip(tasks[:3], other):
        assert not torch.equal(a.train_images, b.train_images)


def test_train_test_and_pretrain_disjoint(tasks):
    pool, fam, cls, fams = make_pretrain_pool(n_per_family=16, seed=0, workers=1)
    assert set(TASK_NAMES) <= set(fams)
    pool_set = {bytes(x.tobytes()) for x in pool}
    from mass.tools.demo.tasks import digits_pool, SPLIT_PRETRAIN, SPLIT_TEST, SPLIT_TRAIN

    assert not set(digits_pool(SPLIT_TEST)) & set(digits_pool(SPLIT_TRAIN))
    assert not set(digits_pool(SPLIT_TEST)) & set(digits_pool(SPLIT_PRETRAIN))
    for t in tasks:
        tr = {bytes(x.numpy().tobytes()) for x in t.train_images}
        te = {bytes(x.numpy().tobytes()) for x in t.test_images}
        assert len(te) == N_TEST  # no duplicate test images
        assert not tr & te
    # pretraining images (uint8) vs task test images: compare after the same normalisation
    from mass.tools.demo.tasks import normalize_uint8

    pool_norm = {bytes(x.numpy().tobytes()) for x in normalize_uint8(pool)}
    for t in tasks:
        assert not pool_norm & {bytes(x.numpy().tobytes()) for x in t.test_images}
    assert len(pool_set) == len(pool)


def test_tasks_look_distinct(tasks):
    """Mean image statistics differ between tasks, and a nearest-centroid classifier on simple colour/
    frequency statistics tells the tasks apart far above chance (they are distinct domains)."""

    def stats(x):
        m = x.mean((2, 3))
        s = x.std((2, 3))
        dx = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))[:, None]
        return torch.cat([m, s, dx], 1)

    tr = [stats(t.train_images) for t in tasks]
    te = [stats(t.test_images) for t in tasks]
    cents = torch.stack([f.mean(0) for f in tr])
    mu, sd = torch.cat(tr).mean(0), torch.cat(tr).std(0)
    correct = 0
    for i, f in enumerate(te):
        d = torch.cdist((f - mu) / sd, (cents - mu) / sd)
        correct += (d.argmin(1) == i).sum().item()
    assert correct / (len(tasks) * N_TEST) > 3.0 / len(tasks)
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            assert not torch.allclose(cents[i], cents[j], atol=1e-2)


def test_prepare_demo_quick_and_cache(tmp_path):
    import mass
    from mass.tools.demo import clip_pretrain
    from mass.tools.demo.training import evaluate, prepare_demo

    t0 = time.perf_counter()
    art = prepare_demo(cache_dir=tmp_path, quick=True, n_tasks=8, progress=False, verbose=False)
    t1 = time.perf_counter()
    assert not art.loaded_from_cache
    assert len(art.tasks) == 8 and set(art.finetuned) == set(art.heads) == set(art.task_names)
    sd0 = art.pretrained.state_dict()
    assert not art.pretrained.training
    # the heads are the text tower's zero-shot heads, exactly as mass.zero_shot_heads builds them
    direct = mass.zero_shot_heads(art.clip, art.tokenizer, {t.name: t.class_names for t in art.tasks},
                                  templates=clip_pretrain.TASK_TEMPLATES)
    for name, sd in art.finetuned.items():
        assert set(sd) == set(sd0)
        assert any(not torch.equal(sd[k], sd0[k]) for k in sd0 if k.startswith("vision_model."))  # fine-tuned
        assert torch.equal(sd["visual_projection.weight"], sd0["visual_projection.weight"])  # projection frozen
        assert torch.equal(art.heads[name], direct[name].weight)
        assert 0.0 <= art.metrics[name]["finetuned_acc"] <= 1.0
    assert (tmp_path / "heads.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))

    # evaluate() accepts a model or a forward function (image embeddings)
    t = art.tasks[0]
    a1 = evaluate(art.pretrained, t, art.heads[t.name])
    a2 = evaluate(lambda x: art.pretrained(pixel_values=x).image_embeds, t, art.heads[t.name], batch_size=7)
    assert a1 == pytest.approx(a2)

    # second call: everything from the cache, nothing retrained, identical weights
    import mass.tools.demo.training as tr

    calls = []
    orig_ft = tr.finetune
    tr.finetune = lambda *a, **k: calls.append("ft") or orig_ft(*a, **k)
    try:
        art2 = prepare_demo(cache_dir=tmp_path, quick=True, n_tasks=8, progress=False, verbose=False)
    finally:
        tr.finetune = orig_ft
    t2 = time.perf_counter()
    assert calls == [] and art2.loaded_from_cache
    for name in art.finetuned:
        for k in sd0:
            assert torch.equal(art2.finetuned[name][k], art.finetuned[name][k])
        assert torch.equal(art2.heads[name], art.heads[name])
    assert t2 - t1 < t1 - t0


def test_committed_pretrained_clip_matches_its_provenance(tmp_path):
    """The committed weights are the ones PROVENANCE.json describes, and a changed byte is refused."""
    import json
    import shutil

    from mass.tools.demo import clip_pretrain

    prov = json.loads((clip_pretrain.ASSET_DIR / "PROVENANCE.json").read_text())
    assert clip_pretrain.weights_sha256() == prov["sha256"]["model.safetensors"]
    # The command as it was run; the module moved from mass.demo to mass.tools.demo afterwards (issue 21).
    assert prov["command"].split()[:3] in (["python", "-m", "mass.demo.clip_pretrain"],
                                           ["python", "-m", "mass.tools.demo.clip_pretrain"])
    assert (clip_pretrain.ASSET_DIR / "model.safetensors").stat().st_size <= 20 * 2 ** 20
    copy = tmp_path / "asset"
    shutil.copytree(clip_pretrain.ASSET_DIR, copy)
    blob = bytearray((copy / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(RuntimeError, match="SHA-256"):
        clip_pretrain.load_asset(copy)


def test_captions_and_tokenizer_cover_every_prompt():
    """Every caption and zero-shot prompt tokenizes without an unknown word; captions name the class at
    the documented rate (a binomial check with a 6-sigma margin)."""
    import numpy as np

    from mass.tools.demo import clip_pretrain as cp

    tok = cp.build_tokenizer(cp.vocabulary())
    unk = tok.unk_token_id
    rng = np.random.default_rng(0)
    names = cp.class_names()
    texts = [cp.caption(rng, f, int(rng.integers(len(names.get(f, ("x",)))))) if f in names else cp.caption(rng, f, -1)
             for f in cp.FAMILY_PHRASES for _ in range(50)]
    texts += [tpl.format(c) for task, tpls in cp.TASK_TEMPLATES.items() for tpl in tpls for c in names[task]]
    ids = tok(texts)["input_ids"]
    assert all(unk not in row for row in ids)
    n = 4000
    captions = [cp.caption(rng, "scenes", 0).lower() for _ in range(n)]
    named = sum(any(c in text for c in names["scenes"]) for text in captions)
    p = cp.CLASS_RATE["scenes"]
    assert abs(named / n - p) < 6 * (p * (1 - p) / n) ** 0.5
