"""``mass eval`` / ``mass.evaluation`` with routers calibrated on unlabelled support images (issue 14): the few-example
router and the unknown-task detector, each number against a direct computation on offline stand-ins."""
import copy
import json

import pytest
import torch

import mass
import mass.nn.clip
from _clip_fixtures import fine_tune_tasks, save_clip, task_images, tiny_clip, write_image_folders, write_tokenizer
from mass.evaluation.data import ClipPreprocess, discover_image_folders
from mass.evaluation.protocol import evaluate, support_indices, take_support
from mass.evaluation.heads import zero_shot_heads

CLASSES = {"task0": ["cat", "dog"], "task1": ["red", "green", "blue"], "task2": ["one", "two"]}
BATCH = 4
N_SUPPORT = 3


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_support")
    tok = write_tokenizer(root / "tok")
    clip = tiny_clip(tok, layers=2)
    pre = ClipPreprocess(shortest_edge=32, crop=(32, 32))
    data = discover_image_folders(write_image_folders(root / "data", task_images(CLASSES, per_class=4, seed=1)), pre)
    heads = zero_shot_heads(clip, tok, CLASSES)
    vision = mass.nn.clip.vision_encoder(clip)
    ft = fine_tune_tasks(vision, {t: data[t] for t in CLASSES}, heads, steps=10)
    # another draw of images of the same tasks, standing in for a training split
    other = {t: [(pre(im), c) for im, c in items] for t, items in task_images(CLASSES, per_class=3, seed=7).items()}
    return dict(root=root, clip=clip, tok=tok, data=data, heads=heads, ft=ft, other=other,
                clip_dir=save_clip(root / "clip", clip, tok))


def _stack(dataset, indices):
    return torch.stack([dataset[i][0] for i in indices])


def _model(bench, router, support):
    return mass.merge(copy.deepcopy(bench["clip"]), bench["ft"], router=router, support=support,
                           heads=bench["heads"].as_tensors(), progress=False,
                           keep_merged="all" if router.unknown == "merged" else "prefix")


@torch.no_grad()
def _direct(model, bench, evaluated):
    """Per task: correct count (own head, right label), top-1 confusion row, flagged count, samples."""
    tasks = list(CLASSES)
    out = {}
    for ti, task in enumerate(tasks):
        correct, row, flagged, n = 0, [0] * len(tasks), 0, 0
        for x, y in torch.utils.data.DataLoader(evaluated[task], batch_size=BATCH, shuffle=False):
            res = model.classify(pixel_values=x)
            scores = -res.routing.residuals
            top2 = scores.topk(2, dim=1).values
            assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4  # premise: no routing decision near a tie
            correct += int(((res.task_ids == ti) & (res.predictions == y)).sum())
            for b in res.routing.task_ids[:, 0].tolist():
                if b < 0:
                    flagged += 1
                else:
                    row[b] += 1
            n += len(y)
        out[task] = dict(correct=correct, row=row, flagged=flagged, n=n)
    return out


def _check(result, name, direct):
    for ti, task in enumerate(CLASSES):
        d = direct[task]
        assert result.samples[task] == d["n"]
        assert result.accuracy[f"mass[{name}]"][task] == d["correct"] / d["n"]
        assert result.routing_accuracy[name][task] == d["row"][ti] / d["n"]
        assert result.confusion[name][ti] == d["row"]
        if name in result.unknown_rate:
            assert result.unknown_rate[name][task] == d["flagged"] / d["n"]
            assert sum(d["row"]) + d["flagged"] == d["n"]


def test_support_images_are_drawn_and_left_out_of_every_row(bench):
    data = bench["data"]
    picked = support_indices(12, N_SUPPORT)
    assert picked == sorted(picked) and len(set(picked)) == N_SUPPORT and all(0 <= i < 12 for i in picked)
    assert picked == support_indices(12, N_SUPPORT)  # seeded
    support, evaluated, where = take_support(data, None, list(CLASSES), N_SUPPORT)
    for task in CLASSES:
        idx = support_indices(len(data[task]), N_SUPPORT)
        assert torch.equal(support[task], _stack(data[task], idx))
        assert evaluated[task].indices == [i for i in range(len(data[task])) if i not in idx]
    assert "left out" in where
    support, evaluated, where = take_support(data, bench["other"], list(CLASSES), N_SUPPORT)
    assert evaluated["task1"] is data["task1"] and "support data" in where
    assert torch.equal(support["task1"], _stack(bench["other"]["task1"], support_indices(9, N_SUPPORT)))
    with pytest.raises(ValueError, match="leave nothing to evaluate"):
        take_support({"t": [(torch.zeros(3, 32, 32), 0)] * 2}, None, ["t"], 2)
    with pytest.raises(ValueError, match="at least 2"):
        support_indices(8, 1)


def test_few_example_rows_equal_direct_computation(bench):
    result = evaluate(bench["clip"], bench["ft"], bench["data"], bench["heads"], methods=["individual", "mass"],
                      routers=["few-example", "energy"], support_per_task=N_SUPPORT, batch_size=BATCH,
                      progress=False, latency=False)
    support, evaluated, _ = take_support(bench["data"], None, list(CLASSES), N_SUPPORT)
    few = _model(bench, mass.RouterConfig.few_example(), support)
    assert few.router_config.basis == "support" and few.support.n_images == N_SUPPORT
    _check(result, "few-example", _direct(few, bench, evaluated))
    # a router that needs no support images is evaluated on the same (reduced) samples
    energy = _model(bench, mass.RouterConfig.recommended(norm="energy"), None)
    _check(result, "energy", _direct(energy, bench, evaluated))
    assert result.samples == {"task0": 8 - N_SUPPORT, "task1": 12 - N_SUPPORT, "task2": 8 - N_SUPPORT}
    assert "left out of every row" in result.config["support"] and not result.unknown_rate


def test_support_from_another_split_keeps_every_evaluated_image(bench):
    router = mass.RouterConfig.few_example()
    result = evaluate(bench["clip"], bench["ft"], bench["data"], bench["heads"], methods=["mass"],
                      routers={"few": router}, support_per_task=4, support_data=bench["other"], batch_size=BATCH,
                      progress=False, latency=False)
    support = {t: _stack(bench["other"][t], support_indices(len(bench["other"][t]), 4)) for t in CLASSES}
    _check(result, "few", _direct(_model(bench, router, support), bench, bench["data"]))
    assert result.samples == {t: len(bench["data"][t]) for t in CLASSES}


def test_unknown_task_detector_flags_count_as_wrong(bench):
    support, evaluated, _ = take_support(bench["data"], None, list(CLASSES), N_SUPPORT)
    router = mass.RouterConfig(mode="top1", features="pretrained", unknown="pretrained")
    model = _model(bench, router, support)
    with torch.no_grad():
        scores = torch.cat([model.route(pixel_values=x).unknown_scores
                            for t in CLASSES for x, _ in torch.utils.data.DataLoader(evaluated[t], batch_size=BATCH)])
    ordered = scores.sort().values
    middle = len(ordered) // 2  # a threshold between the two middle scores flags half: both counts are exercised
    threshold = float(ordered[middle - 1] + ordered[middle]) / 2
    # premise: no score within rounding of the threshold (scores are O(1) ratios of fp32 residuals, the two runs
    # compute them from the same images: they could differ by ~1e-6 at most)
    assert float((scores - threshold).abs().min()) > 1e-4
    router = mass.RouterConfig(mode="top1", features="pretrained", unknown="pretrained",
                               unknown_threshold=threshold)
    result = evaluate(bench["clip"], bench["ft"], bench["data"], bench["heads"], methods=["mass"],
                      routers={"guarded": router}, support_per_task=N_SUPPORT, batch_size=BATCH, progress=False,
                      latency=False)
    direct = _direct(model.with_router(router), bench, evaluated)
    assert 0 < sum(d["flagged"] for d in direct.values()) < sum(d["n"] for d in direct.values())
    _check(result, "guarded", direct)
    md = result.to_markdown()
    assert "Flagged as no task" in md and "| guarded |" in md
    with pytest.raises(ValueError, match="unknown='error'"):
        evaluate(bench["clip"], bench["ft"], bench["data"], bench["heads"], methods=["mass"],
                 routers={"e": mass.RouterConfig(unknown="error")})


def test_support_options_refuse_bad_input(bench):
    clip, ft, data, heads = bench["clip"], bench["ft"], bench["data"], bench["heads"]
    with pytest.raises(ValueError, match="support_per_task must be >= 2"):
        evaluate(clip, ft, data, heads, methods=["mass"], routers=["few-example"], support_per_task=1)
    with pytest.raises(ValueError, match="no router needs support images"):
        evaluate(clip, ft, data, heads, methods=["mass"], routers=["paper"], support_per_task=4)
    with pytest.raises(TypeError, match="support_per_task must be an int"):
        evaluate(clip, ft, data, heads, methods=["mass"], routers=["few-example"], support_per_task=4.0)
    with pytest.raises(ValueError, match="support_data has no entry"):
        evaluate(clip, ft, data, heads, methods=["mass"], routers=["few-example"], support_data={"task0": []})


def test_eval_cli_router_options(bench, tmp_path, capsys):
    from mass.tools.cli.eval import main

    paths = {}
    for task, sd in bench["ft"].items():
        paths[task] = tmp_path / f"{task}.pt"
        torch.save(sd, str(paths[task]))
    common = ["--pretrained", str(bench["clip_dir"]), "--finetuned"] + [f"{t}={p}" for t, p in paths.items()]
    common += ["--data-root", str(bench["root"] / "data"), "--methods", "mass", "--batch-size", str(BATCH),
               "--no-latency", "--quiet"]
    assert main(common + ["--routers", "few-example", "--support-per-task", str(N_SUPPORT), "--unknown",
                          "pretrained", "--unknown-threshold", "100", "--out", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    assert got["rows"] == ["mass[few-example]"]
    assert got["config"]["routers"]["few-example"]["basis"] == "support"
    assert got["config"]["routers"]["few-example"]["unknown"] == "pretrained"
    # routing does not depend on the heads (the CLI's come from the folder names): it equals the direct one
    support, evaluated, _ = take_support(bench["data"], None, list(CLASSES), N_SUPPORT)
    direct = _direct(_model(bench, mass.RouterConfig.few_example(unknown="pretrained", unknown_threshold=100.0),
                            support), bench, evaluated)
    for ti, task in enumerate(CLASSES):
        assert got["samples"][task] == direct[task]["n"]
        assert got["routing_accuracy"]["few-example"][task] == direct[task]["row"][ti] / direct[task]["n"]
        assert got["unknown_rate"]["few-example"][task] == direct[task]["flagged"] / direct[task]["n"]
    for bad, message in ((["--routers", "few-example", "--support-per-task", "1"], "support_per_task must be >= 2"),
                         (["--unknown-threshold", "2"], "--unknown-threshold needs --unknown"),
                         (["--routers", "few-example", "--support-split", "train"], "image folder"),
                         (["--routers", "few-example", "--support-split", "test"], "is the split evaluated"),
                         (["--routers", "oracle"], "unknown router")):
        assert main(common + bad + ["--out", str(tmp_path / "bad")]) == 2, bad
        assert message in capsys.readouterr().err
