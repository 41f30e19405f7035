"""The evaluation engine (mass.evaluation), its data sources (mass.evaluation.data) and ``mass eval``: every number of the
table is checked against a direct computation on offline stand-ins."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import mass
import mass.nn.clip
from _clip_fixtures import (fine_tune_tasks, hf_to_openclip, save_clip, task_images, tiny_clip, without_projection,
                            write_image_folders, write_saved_dataset, write_tokenizer)
from mass.evaluation.data import ClipPreprocess, DataError, HFDatasetData, ImageFolderData, discover_image_folders, load_task_data
from mass.evaluation.protocol import EvalResult, evaluate, routed_correct
from mass.evaluation.heads import zero_shot_heads

from _tolerances import U32, U64, assert_within, feature_error, gamma, logit_bound, residual_bound

CLASSES = {"task0": ["cat", "dog"], "task1": ["red", "green", "blue"], "task2": ["one", "two"]}
BATCH = 5  # does not divide the task sizes: partial batches are exercised
SCALE = 100.0
# Decisions are compared against direct computations in fp64: the library's fp32 logits lie within
# logit_bound of them (tests/_tolerances.py), so wherever the exact top logit leads by more than twice that
# bound, the two argmaxes agree. That premise is asserted, never assumed.


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = write_tokenizer(root / "tok")
    clip = tiny_clip(tok, layers=2)
    clip_dir = save_clip(root / "clip", clip, tok)
    vision = mass.nn.clip.vision_encoder(clip)
    images = task_images(CLASSES, per_class=4, seed=1)
    folders = write_image_folders(root / "data", images)
    pre = ClipPreprocess(shortest_edge=32, crop=(32, 32))
    data = discover_image_folders(folders, pre)
    heads = zero_shot_heads(clip, tok, CLASSES)
    # a few steps on each task's images: fine-tuned >> zero-shot
    ft = fine_tune_tasks(vision, {t: data[t] for t in CLASSES}, heads)
    # Fine-tuned checkpoints in three user forms (all hold the same weights as ``ft``).
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(copy.deepcopy(clip.config.vision_config))
    sd = without_projection(ft["task2"])
    tower.load_state_dict({k[len("vision_model."):]: v for k, v in sd.items()} if not hasattr(tower, "vision_model")
                          else sd)
    tower.save_pretrained(str(root / "task2_tower"))
    given = {"task0": without_projection(ft["task0"]), "task1": hf_to_openclip(ft["task1"]),
             "task2": str(root / "task2_tower")}
    # Default rank k = floor(min(out, in) / T): at full rank every task's basis spans the whole feature space
    # and routing is void.
    result = evaluate(clip, given, data, heads, routers=["paper", "top1"], batch_size=BATCH, progress=False,
                      latency_repeats=1)
    full = evaluate(clip, given, data, heads, methods=["individual", "mass_oracle"], rank=1.0, batch_size=BATCH,
                    progress=False, latency=False)
    return dict(root=root, clip=clip, clip_dir=clip_dir, tok=tok, ft=ft, data=data, heads=heads, result=result,
                full=full, images=images)


def _batches(dataset):
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)


@torch.no_grad()
def _logits(model, dataset, head, rank=0):
    """Exact logits (the tower and the head in fp64), the labels, and per row the bound on the error of an
    fp32 evaluation (of ``model``, or of a MASS model over it with blocks of ``rank``)."""
    tower = copy.deepcopy(model).double()
    emb = torch.cat([tower(pixel_values=x.double()).image_embeds for x, _ in _batches(dataset)])
    logits = SCALE * F.normalize(emb, dim=-1) @ F.normalize(head.double(), dim=-1).T
    return logits, torch.cat([y for _, y in _batches(dataset)]), logit_bound(model, emb, SCALE, rank)


def _margins(scores):
    top2 = scores.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def _direct_accuracy(model, bench, task):
    logits, y, bound = _logits(model, bench["data"][task], bench["heads"][task].weight)
    assert bool((_margins(logits) > 2 * bound).all())  # premise: no decision lies within rounding of a tie
    return int((logits.argmax(1) == y).sum()) / len(y)


def _tower(bench, state):
    model = copy.deepcopy(mass.nn.clip.vision_encoder(bench["clip"]))
    model.load_state_dict(state)
    return model.eval()


def test_individual_and_zero_shot_rows_equal_direct_accuracy(bench):
    result = bench["result"]
    for task in CLASSES:
        assert result.accuracy["individual"][task] == _direct_accuracy(_tower(bench, bench["ft"][task]), bench, task)
        plain = mass.nn.clip.vision_encoder(bench["clip"])
        assert result.accuracy["zero_shot"][task] == _direct_accuracy(plain, bench, task)
    assert result.samples == {"task0": 8, "task1": 12, "task2": 8}


def test_static_merge_rows_equal_direct_accuracy(bench):
    pretrained = mass.nn.clip.vision_encoder(bench["clip"])
    merges = {"task_arithmetic": mass.task_arithmetic(pretrained, bench["ft"], scaling=0.3),
              "ties": mass.ties_merging(pretrained, bench["ft"]),
              "tsv": mass.tsv_merge(pretrained, bench["ft"])}
    for row, state in merges.items():
        model = _tower(bench, state)
        for task in CLASSES:
            assert bench["result"].accuracy[row][task] == _direct_accuracy(model, bench, task), (row, task)


@torch.no_grad()
def test_mass_rows_routing_and_confusion_equal_direct_counts(bench):
    result = bench["result"]
    tasks = list(CLASSES)
    for name, config in {"paper": mass.RouterConfig(), "top1": mass.RouterConfig(mode="top1")}.items():
        model = mass.merge(copy.deepcopy(bench["clip"]), bench["ft"], router=config,
                                heads=bench["heads"].as_tensors(), progress=False)
        plain = mass.nn.clip.vision_encoder(bench["clip"])
        confusion = torch.zeros(3, 3, dtype=torch.long)
        unclear_route = [0] * len(tasks)
        for ti, task in enumerate(tasks):
            correct = unclear = 0
            for x, y in _batches(bench["data"][task]):
                out = model.classify(pixel_values=x)
                scores = -out.routing.residuals
                # This run and the evaluation's each lie within b (residual_bound) of the exact residuals, so a
                # best task ahead by more than 4b is both runs'; a sample closer to a tie may be routed otherwise
                # in the evaluation (the worst-case bound is pessimistic; it flags a few samples here).
                feature = model.first_pass(pixel_values=x)[0][0]
                b = residual_bound(feature, model.routing_basis[0], feature_error(plain, feature)).amax(1)
                close = _margins(scores) <= 4 * b
                if config.mode == "topk":
                    # z = (ℓ − mean)/std moves by ≤ (2b + |z|·2b·√(T/(T−1)))/std for residuals off by ≤ b; a
                    # softmax weight by ≤ 2·max|Δz|/temperature. Each run lies within that of the exact weights,
                    # so a weight further than twice that from the threshold selects alike in both runs; a sample
                    # with a weight closer may take another set in the evaluation: it may count otherwise there.
                    # (The worst-case bound is pessimistic: about half the paper-router samples of these tiny
                    # models are "unclear" by it, so this row's accuracy is checked loosely.)
                    std = scores.std(1, keepdim=True)
                    z = (scores - scores.mean(1, keepdim=True)) / std
                    T = scores.shape[1]
                    dz = ((2 * b[:, None] + z.abs() * 2 * b[:, None] * (T / (T - 1)) ** 0.5) / std).amax(1)
                    dw = 2 * dz / config.temperature
                    close |= (torch.softmax(z, 1) - config.threshold).abs().amin(1) <= 2 * dw
                unclear += int(close.sum())
                unclear_route[ti] += int((_margins(scores) <= 4 * b).sum())  # the best task alone
                correct += int(((out.task_ids == ti) & (out.predictions == y)).sum())
                for best in out.routing.task_ids[:, 0].tolist():
                    confusion[ti, best] += 1
            n = result.samples[task]
            assert abs(result.accuracy[f"mass[{name}]"][task] * n - correct) <= unclear  # equal when all are clear
            assert abs(result.routing_accuracy[name][task] * n - int(confusion[ti, ti])) <= unclear_route[ti]
        # each sample routed otherwise moves one count between two cells of its row: equal when all are clear
        got = torch.tensor(result.confusion[name])
        assert all(int((got[t] - confusion[t]).abs().sum()) <= 2 * unclear_route[t] for t in range(len(tasks)))
        assert sum(map(sum, result.confusion[name])) == sum(result.samples.values())


@torch.no_grad()
def test_mass_with_forced_tasks_reproduces_the_individual_row(bench):
    """Full rank (rank = min(out, in)): each task's block is its whole delta, so forcing the right task gives
    the fine-tuned model back up to the SVD's rounding."""
    result = bench["full"]
    model = mass.merge(copy.deepcopy(bench["clip"]), bench["ft"], rank=1.0,
                            heads=bench["heads"].as_tensors(), progress=False)
    rank = max(m.rank for m in model.modules() if isinstance(m, mass.MASSLinear))
    for task in CLASSES:
        # θ0 + U S V reconstructs θt up to the fp32 SVD's backward error, within the forward bound's 2k + 4
        # terms per linear layer at k = min(out, in) (tests/_tolerances.py)
        ind, y, bound = _logits(_tower(bench, bench["ft"][task]), bench["data"][task], bench["heads"][task].weight,
                                rank)
        forced = torch.cat([model.classify(pixel_values=x, task_ids=[task] * len(x)).logits
                            for x, _ in _batches(bench["data"][task])])[:, : ind.shape[1]]
        assert_within(forced, ind, bound[:, None], task)
        assert bool((_margins(ind) > 2 * bound).all())  # premise: then argmaxes agree
        assert torch.equal(forced.argmax(1), ind.argmax(1))
        assert result.accuracy["mass_oracle"][task] == result.accuracy["individual"][task]


def test_normalised_accuracy_storage_and_outputs(bench, tmp_path):
    result = bench["result"]
    norm = result.normalized()
    # Python floats: a quotient rounds once (u = 2⁻⁵³), a mean of 3 non-negative terms 3 times more: either
    # side within γ_4(u) of the exact value, so within 2γ_4 ≤ γ_8 of each other (the storage factor: a quotient
    # of integer counts, one rounding each side).
    rel = gamma(8, U64)
    for row in result.rows:
        for task in CLASSES:
            ind = result.accuracy["individual"][task]
            assert norm[row][task] == pytest.approx(result.accuracy[row][task] / ind, rel=rel)
        assert result.average(row, normalized=True) == pytest.approx(sum(norm[row].values()) / 3, rel=rel)
    dec = mass.decompose(mass.nn.clip.vision_encoder(bench["clip"]), bench["ft"], progress=False)
    assert result.storage_factor == pytest.approx(dec.storage_factor(), rel=rel)
    assert set(result.latency) == {"paper", "top1"}
    assert all(lat["ratio"] > 0 and lat["plain_ms"] > 0 for lat in result.latency.values())
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"results.json", "results.md", "accuracy.png", "routing_confusion_paper.png",
                                       "routing_confusion_top1.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    back = EvalResult.from_json((tmp_path / "results.json").read_text())
    assert back.accuracy == result.accuracy and back.confusion == result.confusion
    assert json.loads((tmp_path / "results.json").read_text())["normalized_average"]["individual"] == 1.0
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {row} |" in md for row in result.rows) and "Routing accuracy" in md


def test_a_sample_routed_away_is_wrong():
    chosen = torch.tensor([0, 1, 1, 0, -1])
    predictions = torch.tensor([2, 2, 0, 1, 2])
    labels = torch.tensor([2, 2, 0, 0, 2])
    # rows 1 and 2: the label index is predicted, but by task 1's head while the sample belongs to task 0
    assert routed_correct(chosen, predictions, 0, labels).tolist() == [True, False, False, False, False]


def test_evaluate_refuses_bad_input(bench):
    clip, data, heads = bench["clip"], bench["data"], bench["heads"]
    ft = {"task0": bench["ft"]["task0"]}
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(clip, ft, data, heads, methods=["magic"])
    with pytest.raises(ValueError, match="data has no entry"):
        evaluate(clip, {"nope": bench["ft"]["task0"]}, data, heads)
    with pytest.raises(ValueError, match="classes"):
        evaluate(clip, {"task0": bench["ft"]["task0"]}, {"task0": data["task1"]}, heads)
    with pytest.raises(ValueError, match="unknown router"):
        evaluate(clip, ft, data, heads, routers=["clever"])


def test_data_sources_agree(bench, tmp_path):
    pre = ClipPreprocess(shortest_edge=32, crop=(32, 32))
    items = bench["images"]["task1"]
    saved = write_saved_dataset(tmp_path / "ds", items, CLASSES["task1"])
    from_disk = load_task_data(str(saved), pre, "task1")
    folder = bench["data"]["task1"]
    assert isinstance(from_disk, HFDatasetData) and isinstance(folder, ImageFolderData)
    assert from_disk.classes == CLASSES["task1"] and folder.classes == ["class_0", "class_1", "class_2"]
    assert len(from_disk) == len(folder) == 12
    for i in range(len(folder)):  # PNG is lossless: the same pixels and labels
        (a, la), (b, lb) = from_disk[i], folder[i]
        assert la == lb and torch.equal(a, b)
    sub = from_disk.subset(5)
    assert len(sub) == 5 and len(from_disk) == 12
    from datasets import Dataset, Features, Image, Value

    plain = Dataset.from_dict({"img": [im for im, _ in items], "cls": [c for _, c in items]},
                              features=Features({"img": Image(), "cls": Value("int64")}))
    plain.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="class names"):  # integer labels: names are needed
        load_task_data(str(tmp_path / "plain"), pre, "task1")
    named = load_task_data(str(tmp_path / "plain"), pre, "task1", classes=["r", "g", "b"])
    assert named.classes == ["r", "g", "b"] and named[3][1] == items[3][1] and torch.equal(named[3][0], folder[3][0])
    with pytest.raises(DataError, match="2 names given"):
        load_task_data(str(root_of(folder)), pre, "task1", classes=["a", "b"])
    with pytest.raises(DataError, match="no split 'validation'"):
        load_task_data(str(saved), pre, "task1", split="validation")
    with pytest.raises(DataError, match="no images"):
        ImageFolderData(tmp_path, pre)
    with pytest.raises(DataError, match="the local path /no/such/dir does not exist"):
        load_task_data("/no/such/dir", pre, "x")


def root_of(folder):
    return folder._files[0][0].parent.parent


def test_preprocess_resizes_crops_and_normalises():
    import numpy as np
    from PIL import Image

    cols = np.tile(np.arange(40, dtype=np.uint8)[None, :, None], (32, 1, 3))  # pixel value = column index
    pre = ClipPreprocess(shortest_edge=32, crop=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = pre(Image.fromarray(cols))  # 32 x 40: no resize, crop columns 4..35
    a = torch.arange(4, 36, dtype=torch.float64) / 255
    expected = ((a - 0.5) / 0.25).view(1, 1, 32).expand(3, 32, 32)
    # fp32: v·fl(1/255) errs by ≤ γ₂·a (two roundings), − 0.5 adds u·|a − 0.5| more, / 0.25 is exact
    assert_within(x, expected, (4 * (gamma(2) * a + U32 * ((a - 0.5).abs() + gamma(2) * a))).view(1, 1, 32), "crop")
    flat = Image.fromarray(np.full((50, 80, 3), 200, dtype=np.uint8))
    y = ClipPreprocess(shortest_edge=16, crop=(16, 16))(flat)  # 50 x 80 -> 16 x 25 -> 16 x 16
    assert y.shape == (3, 16, 16)
    # a constant image stays constant through bicubic resampling (weights sum to 1; PIL rounds to uint8)
    a = 200 / 255
    mean, std = torch.tensor(ClipPreprocess().mean, dtype=torch.float64), torch.tensor(ClipPreprocess().std,
                                                                                         dtype=torch.float64)
    const = (a - mean) / std
    # fp32: a as above (≤ γ₂·a), the mean rounded to fp32 (u·mean), the subtraction (u·|a − mean|), then the
    # std rounded to fp32 and the division: a relative γ₂ of the quotient
    bound = (gamma(2) * a + U32 * mean + U32 * ((a - mean).abs() + gamma(2) * a + U32 * mean)) / std * (1 + gamma(2)) \
        + gamma(2) * const.abs()
    assert_within(y, const.view(3, 1, 1).expand(3, 16, 16), bound.view(3, 1, 1), "constant image")
    cfg = ClipPreprocess.from_config({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                                      "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]})
    assert cfg.shortest_edge == 224 and cfg.crop == (224, 224) and cfg.mean == (0.1, 0.2, 0.3)


def test_presets():
    from mass.evaluation.presets import TASKS, preset, preset_names

    p = preset("vit-b-32-8")
    assert p.pretrained == "openai/clip-vit-base-patch32" and len(p.tasks) == 8
    assert p.finetuned["stanford-cars"] == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert len(preset("vit-l-14-20").tasks) == 20 and preset("vit-b-16-14").pretrained.endswith("patch16")
    assert len(preset_names()) == 9
    assert all(t.templates and all(s.count("{}") == 1 for s in t.templates) for t in TASKS.values())
    with pytest.raises(ValueError, match="unknown preset"):
        preset("vit-b-32-9")


def test_eval_cli_explicit_form(bench, tmp_path, capsys):
    from mass.tools.cli.eval import main

    root = bench["root"]
    ft_paths = {}
    for task, sd in bench["ft"].items():
        path = tmp_path / f"{task}.pt"
        torch.save(hf_to_openclip(sd) if task == "task1" else sd, str(path))
        ft_paths[task] = path
    args = ["--pretrained", str(bench["clip_dir"]), "--finetuned"] + [f"{t}={p}" for t, p in ft_paths.items()]
    args += ["--data-root", str(root / "data"), "--methods", "individual,zero_shot,mass", "--routers", "top1",
             "--rank", "1.0", "--batch-size", str(BATCH), "--no-latency", "--quiet", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    assert got["rows"] == ["individual", "zero_shot", "mass[top1]"]
    # class names come from the folders ("class_0" ...) here, so the heads differ from the fixture's: the
    # individual row must still equal the direct accuracy with those heads
    heads = zero_shot_heads(bench["clip"], bench["tok"], {t: [c.replace("_", " ") for c in d.classes]
                                                          for t, d in bench["data"].items()})
    for task in CLASSES:
        logits, y, bound = _logits(_tower(bench, bench["ft"][task]), bench["data"][task], heads[task].weight)
        assert bool((_margins(logits) > 2 * bound).all())
        assert got["accuracy"]["individual"][task] == int((logits.argmax(1) == y).sum()) / len(y)
    assert (tmp_path / "out" / "routing_confusion_top1.png").exists()
    assert main(["--pretrained", str(bench["clip_dir"]), "--out", str(tmp_path / "x")]) == 2
    assert "no fine-tuned checkpoints" in capsys.readouterr().err
    from transformers import CLIPVisionModelWithProjection

    tower = CLIPVisionModelWithProjection(copy.deepcopy(bench["clip"].config.vision_config))
    tower.save_pretrained(str(tmp_path / "vision_only"))
    explicit = ["--finetuned", f"task0={ft_paths['task0']}", "--data", f"task0={root / 'data' / 'task0'}",
                "--out", str(tmp_path / "y"), "--quiet"]
    assert main(["--pretrained", str(tmp_path / "vision_only")] + explicit) == 2  # no text tower for the heads
    err = capsys.readouterr().err
    assert "not a full CLIP model" in err and "--text-model" in err
