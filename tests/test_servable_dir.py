"""A saved directory is self-contained (issue 22): the encoder's config, the image preprocessing and the heads'
class names travel with it, so ``MASSModel.from_pretrained(dir)`` needs no base model and equals the model that
saved it; older directories still load with ``base_model=`` and say what they lack; the new fields are checked
as strictly as the rest of the config."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mass
from mass.evaluation.data import ClipPreprocess
from mass.evaluation.heads import Head, Heads
from mass.nn.model import extract_embedding
from mass.storage.saved_format import SERVING_FIELDS
from mass.storage.serialization import MODEL_NAME, content_sha256

from conftest import build_model, make_setup


def _heads(width: int) -> Heads:
    gen = torch.Generator().manual_seed(5)
    return Heads({f"task{i}": Head(tuple(f"class {i}.{j}" for j in range(3 + i)), torch.randn(3 + i, width,
                                                                                                generator=gen))
                  for i in range(3)})


def _model(arch: str, router=None):
    pretrained, finetuned, _ = make_setup(arch)
    return mass.merge(pretrained, finetuned, router=router or mass.RouterConfig(layer=2, threshold=0.1),
                      heads=_heads(16 if arch == "hf_proj" else 32), progress=False)


def _call(model, arch, images, **kw):
    return model(pixel_values=images, **kw) if arch.startswith("hf") else model(images, **kw)


def _rewrite(directory, edit):
    """Rewrite the saved file's config with ``edit(config)`` (a valid checksum, as a writer would)."""
    path = directory / MODEL_NAME
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(config)
    text = json.dumps(config)
    save_file(tensors, str(path), metadata={"format": "mass", "format_version": "2", "config": text,
                                            "sha256": content_sha256(text, tensors)})


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory):
    """A saved HF model's directory (copy it before changing it)."""
    directory = tmp_path_factory.mktemp("servable") / "m"
    _model("hf").save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch", ["hf", "hf_proj", "openclip_bf", "openclip_sf"])
def test_self_contained_directory_loads_without_a_base_model(tmp_path, images, arch):
    model = _model(arch)
    model.save_pretrained(tmp_path / "m")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m")
    assert type(loaded.model).__name__ == model.encoder_spec["class"]
    assert loaded.tasks == model.tasks and loaded.router_config == model.router_config
    assert loaded.class_names == {t: list(h.classes) for t, h in _heads(1).items()}
    assert loaded.preprocessing == model.preprocessing and loaded.encoder_spec == model.encoder_spec
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a, ra = _call(model, arch, images, return_routing=True)
    b, rb = _call(loaded, arch, images, return_routing=True)
    assert torch.equal(extract_embedding(a), extract_embedding(b)) and torch.equal(ra.task_ids, rb.task_ids)
    ca = model.classify(images) if not arch.startswith("hf") else model.classify(pixel_values=images)
    cb = loaded.classify(images) if not arch.startswith("hf") else loaded.classify(pixel_values=images)
    assert torch.equal(ca.logits, cb.logits) and torch.equal(ca.task_ids, cb.task_ids)


def test_preprocessing_defaults_to_clip_and_can_be_set(tmp_path):
    model = _model("hf")
    assert ClipPreprocess(**{**model.preprocessing, "crop": tuple(model.preprocessing["crop"]),
                             "mean": tuple(model.preprocessing["mean"]),
                             "std": tuple(model.preprocessing["std"])}) == ClipPreprocess(32, (32, 32))
    model.preprocessing = ClipPreprocess(shortest_edge=36, crop=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    model.save_pretrained(tmp_path / "m")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m")
    assert loaded.preprocessing["shortest_edge"] == 36 and loaded.preprocessing["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="preprocess.std"):
        model.preprocessing = {**model.preprocessing, "std": [0.2, 0.0, 0.2]}
    with pytest.raises(ValueError, match="3 head rows but 2 class names"):
        model.class_names = {"task0": ["a", "b"], "task1": list("abcd"), "task2": list("abcde")}
    model.class_names = {"task0": list("abc"), "task1": list("abcd"), "task2": list("abcde")}
    assert model.class_names["task2"] == list("abcde")


def test_older_directory_needs_base_model_and_says_so(tmp_path, images):
    model = _model("hf")
    model.save_pretrained(tmp_path / "m")
    _rewrite(tmp_path / "m", lambda c: [c.pop(k) for k in SERVING_FIELDS])  # as written before issue 22
    with pytest.raises(mass.SavedModelError, match="no encoder config.*base_model="):
        mass.MASSModel.from_pretrained(tmp_path / "m")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", base_model=build_model("hf", seed=9))
    assert loaded.class_names is None  # the old file had none; the encoder is described again from base_model
    assert torch.equal(extract_embedding(loaded(pixel_values=images)), extract_embedding(model(pixel_values=images)))
    loaded.class_names = model.class_names
    loaded.save_pretrained(tmp_path / "m")  # saving again makes it self-contained
    again = mass.MASSModel.from_pretrained(tmp_path / "m")
    assert again.class_names == model.class_names


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["encoder"].update(kind="open_clip"), "encoder.kind"),
    (lambda c: c["encoder"].pop("config"), "missing field.*encoder.config"),
    (lambda c: c["encoder"].update({"class": "ResNet"}), "unsupported saved encoder"),
    (lambda c: c["encoder"]["config"].update(hidden_size=48), "does not match the saved weights"),
    (lambda c: c["preprocess"].update(mean=[0.5, 0.5]), "preprocess.mean"),
    (lambda c: c["preprocess"].update(crop=[32, "32"]), "preprocess"),
    (lambda c: c["preprocess"].update(do_resize="yes"), "preprocess.do_resize"),
    (lambda c: c["classes"].update(task1=["a", "b"]), "classes.task1.*2 classes.*4 rows"),
    (lambda c: c["classes"].pop("task2"), "one entry per task"),
    (lambda c: c["classes"].update(task0=["a", "", "c"]), "classes.task0"),
    (lambda c: c.update(encoder=[]), "field 'encoder' must be an object or null"),
])
def test_serving_fields_are_checked(tmp_path, saved_hf, edit, message):
    shutil.copytree(saved_hf, tmp_path / "m")
    _rewrite(tmp_path / "m", edit)
    with pytest.raises(mass.SavedModelError, match=message):
        mass.MASSModel.from_pretrained(tmp_path / "m")


def test_classes_without_heads_are_refused(tmp_path):
    pretrained, finetuned, _ = make_setup("hf")
    model = mass.merge(pretrained, finetuned, progress=False)
    with pytest.raises(ValueError, match="class names need heads"):
        model.class_names = {"task0": ["a"], "task1": ["b"], "task2": ["c"]}
    model.save_pretrained(tmp_path / "m")
    _rewrite(tmp_path / "m", lambda c: c.update(classes={"task0": ["a"], "task1": ["b"], "task2": ["c"]}))
    with pytest.raises(mass.SavedModelError, match="no heads"):
        mass.MASSModel.from_pretrained(tmp_path / "m")


def test_open_clip_tower_the_replica_cannot_rebuild_is_not_described():
    """A tower with QuickGELU (OpenAI's open_clip models) has the same keys and shapes as the replica but
    another forward: it gets no encoder config (serving it then needs base_model), never a wrong one."""
    from mass.nn.encoders import encoder_spec

    class QuickGELU(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    tower = build_model("openclip_bf")
    assert encoder_spec(tower, "open_clip") is not None
    for block in tower.transformer.resblocks:
        block.mlp.gelu = QuickGELU()
    assert encoder_spec(tower, "open_clip") is None


def test_serving_an_older_directory_names_everything_it_lacks(tmp_path, saved_hf):
    from mass.serve.engine import check_servable  # no Ray needed: the check reads the saved config

    check_servable(saved_hf)
    shutil.copytree(saved_hf, tmp_path / "m")
    _rewrite(tmp_path / "m", lambda c: [c.pop(k) for k in SERVING_FIELDS])
    with pytest.raises(mass.SavedModelError, match="lacks the encoder's config, the class names of its heads, the "
                                                   "image preprocessing.*base_model="):
        check_servable(tmp_path / "m")


def test_mass_serve_without_ray_says_how_to_install_it(saved_hf, monkeypatch, capsys):
    import importlib.util

    from mass.tools.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(["serve", str(saved_hf)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mass: error: mass serve needs Ray Serve") and "pip install" in err
