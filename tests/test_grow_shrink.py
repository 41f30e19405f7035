"""Issue 23: adding and removing tasks without merging again equals merging the resulting task set.

The SVDs run with ``solver="full"`` (LAPACK's SVD of one matrix does not depend on the other tasks in the batch),
so "equal" is bit-equal: a model grown task by task holds the very factors, TSV-M weights and banks of a model
merged at once, and computes the same outputs and routings with the same operations.
"""
import copy
import json

import pytest
import torch

import mass
from mass.method.decompose import decompose
from mass.nn.model import extract_embedding

from conftest import build_model, make_setup


def _same_decomposition(a, b, what=""):
    assert a.tasks == b.tasks, what
    assert a.rank_rule == b.rank_rule and a.bank_dtype == b.bank_dtype, what
    assert set(a.lowrank) == set(b.lowrank) and set(a.dense) == set(b.dense), what
    for key, f in a.lowrank.items():
        g = b.lowrank[key]
        assert torch.equal(f.U, g.U) and torch.equal(f.S, g.S) and torch.equal(f.V, g.V), f"{what} {key}"
    for key, v in a.dense.items():
        assert torch.equal(v, b.dense[key]), f"{what} {key}"
    for key, v in a.base.items():
        assert torch.equal(v, b.base[key]), f"{what} {key}"


def _same_outputs(a, b, images, what=""):
    out_a, routing_a = a(images, return_routing=True)
    out_b, routing_b = b(images, return_routing=True)
    assert torch.equal(routing_a.task_ids, routing_b.task_ids), what
    assert torch.equal(routing_a.residuals, routing_b.residuals), what
    assert torch.equal(extract_embedding(out_a), extract_embedding(out_b)), what
    forced = torch.arange(images.shape[0]) % len(a.tasks)
    assert torch.equal(extract_embedding(a(images, task_ids=forced)), extract_embedding(b(images, task_ids=forced)))


def _heads(tasks, width, classes=3):
    gen = torch.Generator().manual_seed(7)
    return {t: torch.randn(classes, width, generator=gen) for t in tasks}


@pytest.mark.parametrize("mode", ["top1", "topk"])
def test_adding_tasks_one_by_one_equals_merging_them_at_once(images, mode):
    pretrained, finetuned, _ = make_setup("hf_proj", n_tasks=3)
    names = list(finetuned)
    heads = _heads(names, 16)
    router = mass.RouterConfig(mode=mode, layer=2)
    at_once = mass.merge(copy.deepcopy(pretrained), finetuned, router=router, heads=heads, solver="full",
                         progress=False)
    grown = mass.merge(copy.deepcopy(pretrained), {names[0]: finetuned[names[0]]}, router=router,
                       heads={names[0]: heads[names[0]]}, solver="full", progress=False)
    assert all(k == min(pretrained.state_dict()[key].shape) for key, k in grown.ranks.items())  # T = 1: full rank
    for name in names[1:]:
        grown = grown.add_tasks({name: finetuned[name]}, heads={name: heads[name]}, solver="full")
    assert grown.ranks == at_once.ranks  # the rule's k = ⌊min / 3⌋: sliced from the stored factors
    _same_decomposition(grown.decomposition(), at_once.decomposition(), "grown vs merged")
    _same_outputs(grown, at_once, images, "grown vs merged")
    assert torch.equal(grown.classify(images).logits, at_once.classify(images).logits)


def test_removing_a_task_equals_merging_without_it(images):
    pretrained, finetuned, _ = make_setup("hf_proj", n_tasks=3)
    router = mass.RouterConfig(layer=2)
    # A fixed rank: the merge without the task has the same ranks, so it is the same model.
    full = mass.merge(copy.deepcopy(pretrained), finetuned, rank=4, router=router, solver="full", progress=False)
    shrunk = full.remove_tasks(["task1"])
    rest = {k: v for k, v in finetuned.items() if k != "task1"}
    merged = mass.merge(copy.deepcopy(pretrained), rest, rank=4, router=router, solver="full", progress=False)
    _same_decomposition(shrunk.decomposition(), merged.decomposition(), "fixed rank")
    _same_outputs(shrunk, merged, images, "fixed rank")
    # The default rule: the stored ranks are kept (they cannot grow); the model equals a merge at those ranks.
    full = mass.merge(copy.deepcopy(pretrained), finetuned, router=router, solver="full", progress=False)
    shrunk = full.remove_tasks(["task1"])
    assert shrunk.ranks == full.ranks and shrunk.rank_rule == "default"
    dec = decompose(copy.deepcopy(pretrained), rest, ranks=full.ranks, solver="full", progress=False)
    dec.rank_rule = "default"
    merged = mass.MASSModel(copy.deepcopy(pretrained), dec, router=router)
    _same_decomposition(shrunk.decomposition(), merged.decomposition(), "default rule")
    _same_outputs(shrunk, merged, images, "default rule")
    # The model it came from is untouched and still serves its three tasks.
    assert full.tasks == ["task0", "task1", "task2"]
    full(images, task_ids=["task1"] * images.shape[0])


def test_rank_policy_after_shrinking_and_with_a_fixed_rank():
    pretrained, finetuned, _ = make_setup("hf", n_tasks=4)
    first3 = {k: finetuned[k] for k in ["task0", "task1", "task2"]}
    base = pretrained.state_dict()
    model = mass.merge(copy.deepcopy(pretrained), first3, solver="full", progress=False)
    shrunk = model.remove_tasks(["task0", "task1"])  # T = 1: the rule would give full rank; stored k stays
    assert shrunk.ranks == model.ranks
    regrown = shrunk.add_tasks({"task3": finetuned["task3"]}, solver="full")  # T = 2: min(stored, ⌊min / 2⌋)
    assert regrown.ranks == {k: min(model.ranks[k], min(base[k].shape) // 2) for k in model.ranks}
    fixed = mass.merge(copy.deepcopy(pretrained), first3, rank=2, solver="full", progress=False)
    assert fixed.rank_rule == "fixed"
    assert fixed.add_tasks({"task3": finetuned["task3"]}, solver="full").ranks == fixed.ranks


def test_heads_calibration_and_errors(images):
    pretrained, finetuned, _ = make_setup("hf_proj", n_tasks=3)
    heads = _heads(list(finetuned), 16)
    model = mass.merge(copy.deepcopy(pretrained), {"task0": finetuned["task0"], "task1": finetuned["task1"]},
                       router=mass.RouterConfig(layer=2), heads={t: heads[t] for t in ["task0", "task1"]},
                       solver="full", progress=False)
    with pytest.raises(ValueError, match="already in the model"):
        model.add_tasks({"task1": finetuned["task2"]}, heads={"task1": heads["task2"]})
    with pytest.raises(ValueError, match="has heads"):
        model.add_tasks({"task2": finetuned["task2"]})
    with pytest.raises(ValueError, match="unknown task"):
        model.remove_tasks(["nope"])
    with pytest.raises(ValueError, match="every task"):
        model.remove_tasks(["task0", "task1"])
    with pytest.raises(mass.CheckpointError):
        model.add_tasks({"task2": {"bogus": torch.zeros(1)}}, heads={"task2": heads["task2"]})
    assert model.tasks == ["task0", "task1"]  # failed calls left it as it was
    shrunk = model.remove_tasks(["task0"])
    assert shrunk.heads is not None and list(shrunk.heads) == ["task1"]
    assert torch.equal(shrunk.head("task1"), heads["task1"])
    # A support router: a task added without images is refused; with images of every task it is calibrated,
    # exactly as a merge of all the tasks with the same images.
    support = {t: torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i, t in
               enumerate(finetuned)}
    router = mass.RouterConfig(layer=2, basis="support", features="pretrained", mode="top1")
    two = {t: finetuned[t] for t in ["task0", "task1"]}
    calibrated = mass.merge(copy.deepcopy(pretrained), two, router=router, solver="full", progress=False,
                            support={t: support[t] for t in two})
    with pytest.raises(ValueError, match="support images"):
        calibrated.add_tasks({"task2": finetuned["task2"]})
    grown = calibrated.add_tasks({"task2": finetuned["task2"]}, support=support, solver="full")
    at_once = mass.merge(copy.deepcopy(pretrained), finetuned, router=router, solver="full", progress=False,
                         support=support)
    for name in ("basis", "centre", "scale"):
        a, b = getattr(grown.support, name), getattr(at_once.support, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    _same_outputs(grown, at_once, images, "calibrated")
    # Removing a task from a fit of θ0's features without whitening slices it: no trace of the task is left,
    # the fit is the one the remaining tasks' images give.
    shrunk = at_once.remove_tasks(["task1"])
    rest = {t: finetuned[t] for t in ["task0", "task2"]}
    merged = mass.merge(copy.deepcopy(pretrained), rest, router=router, solver="full", progress=False,
                        support={t: support[t] for t in rest})
    assert torch.equal(shrunk.support.basis, merged.support.basis)
    assert torch.equal(shrunk.support.scale, merged.support.scale)
    whitened = mass.RouterConfig(layer=2, basis="support", features="pretrained", whiten=0.5)
    model_w = at_once.calibrate(support, whitened)
    with pytest.raises(ValueError, match="support images"):
        model_w.remove_tasks(["task1"])  # the whitener pools every task's images: a new fit is needed
    assert model_w.remove_tasks(["task1"], support={t: support[t] for t in rest}).tasks == ["task0", "task2"]


def test_open_clip_structure_takes_a_fresh_base_model(images):
    pretrained, finetuned, _ = make_setup("openclip_bf", n_tasks=2)
    model = mass.merge(copy.deepcopy(pretrained), {"task0": finetuned["task0"]}, router=mass.RouterConfig(layer=2),
                       solver="full", progress=False)
    with pytest.raises(ValueError, match="base_model"):
        model.add_tasks({"task1": finetuned["task1"]})
    grown = model.add_tasks({"task1": finetuned["task1"]}, solver="full", base_model=build_model("openclip_bf"))
    at_once = mass.merge(copy.deepcopy(pretrained), finetuned, router=mass.RouterConfig(layer=2), solver="full",
                         progress=False)
    _same_decomposition(grown.decomposition(), at_once.decomposition(), "open_clip")
    _same_outputs(grown, at_once, images, "open_clip")


def test_save_and_load_a_grown_and_shrunk_model(tmp_path, images):
    pretrained, finetuned, _ = make_setup("hf_proj", n_tasks=4)
    heads = _heads(list(finetuned), 16)
    model = mass.merge(copy.deepcopy(pretrained), {t: finetuned[t] for t in ["task0", "task1"]},
                       router=mass.RouterConfig(layer=2), heads={t: heads[t] for t in ["task0", "task1"]},
                       solver="full", progress=False)
    model = model.add_tasks({t: finetuned[t] for t in ["task2", "task3"]},
                            heads={t: heads[t] for t in ["task2", "task3"]}, solver="full")
    model = model.remove_tasks(["task1"])
    model.save_pretrained(tmp_path / "m")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", build_model("hf_proj"))
    assert loaded.tasks == ["task0", "task2", "task3"] and loaded.rank_rule == "default"
    _same_decomposition(loaded.decomposition(), model.decomposition(), "loaded")
    _same_outputs(loaded, model, images, "loaded")
    assert torch.equal(loaded.classify(images).logits, model.classify(images).logits)


def test_old_files_without_the_new_fields_infer_the_rank_rule(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mass.storage.serialization import MODEL_NAME, content_sha256

    pretrained, finetuned, _ = make_setup("hf", n_tasks=2)
    for rank, rule in ((None, "default"), (2, "fixed")):
        model = mass.merge(copy.deepcopy(pretrained), finetuned, rank=rank, solver="full", progress=False)
        path = tmp_path / f"r{rank}"
        model.save_pretrained(path)
        with safe_open(str(path / MODEL_NAME), framework="pt") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        config = json.loads(meta["config"])
        assert config["rank_rule"] == rule and config["bank_dtype"] is None
        del config["rank_rule"], config["bank_dtype"]  # as written before issue 23
        text = json.dumps(config)
        save_file(tensors, str(path / MODEL_NAME), metadata={**meta, "config": text,
                                                             "sha256": content_sha256(text, tensors)})
        loaded = mass.MASSModel.from_pretrained(path, build_model("hf"))
        assert loaded.rank_rule == rule and loaded.bank_dtype is None


def test_grown_and_shrunk_models_stay_servable(tmp_path, images):
    """Class names and the image preprocessing follow add/remove (a self-contained directory stays one); a model
    with class names refuses a new task without them instead of dropping every task's names."""
    pretrained, finetuned, _ = make_setup("hf_proj", n_tasks=3)
    names = list(finetuned)
    heads = _heads(names, 16)
    classes = {t: [f"{t}-c{i}" for i in range(3)] for t in names}
    first = {t: finetuned[t] for t in names[:2]}
    model = mass.merge(copy.deepcopy(pretrained), first, router=mass.RouterConfig(layer=2),
                       heads={t: heads[t] for t in names[:2]}, solver="full", progress=False)
    model.class_names = {t: classes[t] for t in names[:2]}
    model.preprocessing = {**model.preprocessing, "mean": [0.5, 0.5, 0.5]}
    with pytest.raises(ValueError, match=r"class_names=.*'task2'"):
        model.add_tasks({names[2]: finetuned[names[2]]}, heads={names[2]: heads[names[2]]}, solver="full")
    grown = model.add_tasks({names[2]: finetuned[names[2]]}, heads={names[2]: heads[names[2]]}, solver="full",
                            class_names={names[2]: classes[names[2]]})
    assert grown.class_names == classes and grown.preprocessing == model.preprocessing
    shrunk = grown.remove_tasks([names[0]])
    assert shrunk.class_names == {t: classes[t] for t in names[1:]}
    shrunk.save_pretrained(tmp_path / "m")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m")  # no base model: the directory is self-contained
    assert loaded.class_names == shrunk.class_names and loaded.preprocessing == shrunk.preprocessing
    assert torch.equal(loaded.classify(images).logits, shrunk.classify(images).logits)
