"""The evaluation engine (mass.evaluation), its data sources (mass.data) and ``mass eval``: every number of the
table is checked against a direct computation on offline stand-ins."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import mass
import mass.clip
from _clip_fixtures import (fine_tune, hf_to_openclip, save_clip, task_images, tiny_clip, without_projection,
                            write_image_folders, write_saved_dataset, write_tokenizer)
from mass.data import ClipPreprocess, DataError, HFDatasetData, ImageFolderData, discover_image_folders, load_task_data
from mass.evaluation import EvalResult, evaluate, routed_correct
from mass.heads import zero_shot_heads

CLASSES = {"task0": ["cat", "dog"], "task1": ["red", "green", "blue"], "task2": ["one", "two"]}
BATCH = 5  # does not divide the task sizes: partial batches are exercised
SCALE = 100.0
# Two evaluations of the same fp32 function on the same inputs may round differently (batched GEMM blocking,
# memory alignment): relative embedding error <= ~ depth * width * eps = 2 * 64 * 1.2e-7 ~ 1.5e-5, i.e. at most
# 100 * 2 * 1.5e-5 = 3e-3 in logits. Decisions whose margin exceeds twice that cannot differ.
ROUNDING = 3e-3


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = write_tokenizer(root / "tok")
    clip = tiny_clip(tok, layers=2)
    clip_dir = save_clip(root / "clip", clip, tok)
    vision = mass.clip.vision_encoder(clip)
    images = task_images(CLASSES, per_class=4, seed=1)
    folders = write_image_folders(root / "data", images)
    pre = ClipPreprocess(shortest_edge=32, crop=(32, 32))
    data = discover_image_folders(folders, pre)
    heads = zero_shot_heads(clip, tok, CLASSES)
    ft = {}
    for i, task in enumerate(CLASSES):  # a few steps on the task's images: fine-tuned >> zero-shot
        x, y = (torch.stack(v) if j == 0 else torch.tensor(v) for j, v in enumerate(zip(*data[task])))
        ft[task] = fine_tune(vision, x, y, heads[task].weight, seed=i)
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
def _logits(model, dataset, head):
    out = [SCALE * F.normalize(model(pixel_values=x).image_embeds, dim=-1) @ F.normalize(head, dim=-1).T
           for x, _ in _batches(dataset)]
    return torch.cat(out), torch.cat([y for _, y in _batches(dataset)])


def _margin(scores):
    top2 = scores.topk(2, dim=1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def _direct_accuracy(model, bench, task):
    logits, y = _logits(model, bench["data"][task], bench["heads"][task].weight)
    assert _margin(logits) > 2 * ROUNDING  # premise: no decision lies within rounding of a tie
    return int((logits.argmax(1) == y).sum()) / len(y)


def _tower(bench, state):
    model = copy.deepcopy(mass.clip.vision_encoder(bench["clip"]))
    model.load_state_dict(state)
    return model.eval()


def test_individual_and_zero_shot_rows_equal_direct_accuracy(bench):
    result = bench["result"]
    for task in CLASSES:
        assert result.accuracy["individual"][task] == _direct_accuracy(_tower(bench, bench["ft"][task]), bench, task)
        plain = mass.clip.vision_encoder(bench["clip"])
        assert result.accuracy["zero_shot"][task] == _direct_accuracy(plain, bench, task)
    assert result.samples == {"task0": 8, "task1": 12, "task2": 8}


def test_static_merge_rows_equal_direct_accuracy(bench):
    pretrained = mass.clip.vision_encoder(bench["clip"])
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
        model = mass.clip.merge(copy.deepcopy(bench["clip"]), bench["ft"], router=config,
                                heads=bench["heads"].as_tensors(), progress=False)
        confusion = torch.zeros(3, 3, dtype=torch.long)
        for ti, task in enumerate(tasks):
            correct = 0
            for x, y in _batches(bench["data"][task]):
                out = model.classify(pixel_values=x)
                scores = -out.routing.residuals
                # premise: the best task and the selection weights are clear of rounding (residuals are O(1))
                assert _margin(scores) > 1e-3
                if config.mode == "topk":
                    z = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True)
                    assert float((torch.softmax(z, 1) - config.threshold).abs().min()) > 1e-4
                correct += int(((out.task_ids == ti) & (out.predictions == y)).sum())
                for b in out.routing.task_ids[:, 0].tolist():
                    confusion[ti, b] += 1
            n = result.samples[task]
            assert result.accuracy[f"mass[{name}]"][task] == correct / n
            assert result.routing_accuracy[name][task] == int(confusion[ti, ti]) / n
        assert result.confusion[name] == confusion.tolist()
        assert sum(map(sum, result.confusion[name])) == sum(result.samples.values())


@torch.no_grad()
def test_mass_with_forced_tasks_reproduces_the_individual_row(bench):
    """Full rank (rank = min(out, in)): each task's block is its whole delta, so forcing the right task gives
    the fine-tuned model back up to the SVD's rounding."""
    result = bench["full"]
    model = mass.clip.merge(copy.deepcopy(bench["clip"]), bench["ft"], rank=1.0,
                            heads=bench["heads"].as_tensors(), progress=False)
    for task in CLASSES:
        ind, y = _logits(_tower(bench, bench["ft"][task]), bench["data"][task], bench["heads"][task].weight)
        forced = torch.cat([model.classify(pixel_values=x, task_ids=[task] * len(x)).logits
                            for x, _ in _batches(bench["data"][task])])[:, : ind.shape[1]]
        # θ0 + U S V reconstructs θt to ~ n eps ‖Δ‖ per matrix (n <= 64); through 2 blocks the embedding moves
        # by < 1e-4 relative, so logits (scale 100, unit vectors) move by < 100 * 2 * 1e-4 = 0.02.
        assert float((forced - ind).abs().max()) < 0.02
        assert _margin(ind) > 0.04  # premise: then argmaxes agree
        assert torch.equal(forced.argmax(1), ind.argmax(1))
        assert result.accuracy["mass_oracle"][task] == result.accuracy["individual"][task]


def test_normalised_accuracy_storage_and_outputs(bench, tmp_path):
    result = bench["result"]
    norm = result.normalized()
    for row in result.rows:
        for task in CLASSES:
            ind = result.accuracy["individual"][task]
            assert norm[row][task] == pytest.approx(result.accuracy[row][task] / ind, rel=1e-12)
        assert result.average(row, normalized=True) == pytest.approx(sum(norm[row].values()) / 3, rel=1e-12)
    dec = mass.decompose(mass.clip.vision_encoder(bench["clip"]), bench["ft"], progress=False)
    assert result.storage_factor == pytest.approx(dec.storage_factor(), rel=1e-12)
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
    with pytest.raises(DataError, match="neither a directory nor a hub"):
        load_task_data("/no/such/dir", pre, "x")


def root_of(folder):
    return folder._files[0][0].parent.parent


def test_preprocess_resizes_crops_and_normalises():
    import numpy as np
    from PIL import Image

    cols = np.tile(np.arange(40, dtype=np.uint8)[None, :, None], (32, 1, 3))  # pixel value = column index
    pre = ClipPreprocess(shortest_edge=32, crop=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = pre(Image.fromarray(cols))  # 32 x 40: no resize, crop columns 4..35
    expected = (torch.arange(4, 36, dtype=torch.float32) / 255 - 0.5) / 0.25
    # (v / 255 - 0.5) / 0.25 in fp32: one rounding per operation, |error| <= 4 ulp(8) ~ 4e-6
    torch.testing.assert_close(x, expected.view(1, 1, 32).expand(3, 32, 32), rtol=0, atol=4e-6)
    flat = Image.fromarray(np.full((50, 80, 3), 200, dtype=np.uint8))
    y = ClipPreprocess(shortest_edge=16, crop=(16, 16))(flat)  # 50 x 80 -> 16 x 25 -> 16 x 16
    assert y.shape == (3, 16, 16)
    # a constant image stays constant through bicubic resampling (weights sum to 1; PIL rounds to uint8)
    const = (200 / 255 - torch.tensor(ClipPreprocess().mean)) / torch.tensor(ClipPreprocess().std)
    torch.testing.assert_close(y, const.view(3, 1, 1).expand(3, 16, 16), rtol=0, atol=1e-5)
    cfg = ClipPreprocess.from_config({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                                      "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]})
    assert cfg.shortest_edge == 224 and cfg.crop == (224, 224) and cfg.mean == (0.1, 0.2, 0.3)


def test_presets():
    from mass.presets import TASKS, preset, preset_names

    p = preset("vit-b-32-8")
    assert p.pretrained == "openai/clip-vit-base-patch32" and len(p.tasks) == 8
    assert p.finetuned["stanford-cars"] == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert len(preset("vit-l-14-20").tasks) == 20 and preset("vit-b-16-14").pretrained.endswith("patch16")
    assert len(preset_names()) == 9
    assert all(t.templates and all(s.count("{}") == 1 for s in t.templates) for t in TASKS.values())
    with pytest.raises(ValueError, match="unknown preset"):
        preset("vit-b-32-9")


def test_eval_cli_explicit_form(bench, tmp_path, capsys):
    from mass.eval_cli import main

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
        logits, y = _logits(_tower(bench, bench["ft"][task]), bench["data"][task], heads[task].weight)
        assert _margin(logits) > 2 * ROUNDING
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
