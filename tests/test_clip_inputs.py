"""What CLIP users bring (mass.nn.clip): CLIPModel, vision models, fine-tuned towers in every saved form,
open_clip names, hub ids offline."""
import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import mass
import mass.nn.clip
from _clip_fixtures import (finetuned_towers, hf_to_openclip, save_clip, tiny_clip, without_projection,
                            write_tokenizer)
from mass.files.checkpoints import CheckpointError, open_finetuned
from mass.files.hub import HubUnavailableError
from mass.nn.clip import load_vision, mmap_safetensors, prepare, vision_encoder
from _tolerances import assert_within, encoder_bound


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tok = write_tokenizer(root / "tok")
    clip = tiny_clip(tok, layers=2)
    clip_dir = save_clip(root / "clip", clip, tok)
    ft = finetuned_towers(vision_encoder(clip), 1, scale=0.2)["task0"]
    return root, clip, clip_dir, ft


def _resolved(ckpt, reference):
    """The tensors mass.merge will read for ``ckpt``, keyed like the pretrained model."""
    (_, [(_, src, key_map)]) = open_finetuned(reference, {"t": ckpt})
    return {k: src.get(key_map[k]) for k in reference}


def test_vision_encoder_shares_modules_and_outputs_text_space(setup):
    _, clip, _, _ = setup
    tower = vision_encoder(clip)
    assert tower.vision_model is clip.vision_model and tower.visual_projection is clip.visual_projection
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
        assert torch.equal(tower(pixel_values=x).image_embeds, direct)
    assert not hasattr(clip.config.vision_config, "_mass_touched")


def _write(kind, root, clip, ft):
    """Save the fine-tuned tower ``ft`` (a CLIPVisionModelWithProjection state dict) in one format."""
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    path = root / kind
    vcfg = copy.deepcopy(clip.config.vision_config)
    if kind == "hf_vision_dir":  # FusionBench's form: no visual_projection
        model = CLIPVisionModel(vcfg)
        tower = without_projection(ft)
        if not hasattr(model, "vision_model"):  # transformers 5 flattens CLIPVisionModel: no prefix
            tower = {k[len("vision_model."):]: v for k, v in tower.items()}
        model.load_state_dict(tower)
        model.save_pretrained(str(path))
    elif kind == "hf_projection_dir":
        model = CLIPVisionModelWithProjection(vcfg)
        model.load_state_dict(ft)
        model.save_pretrained(str(path))
    elif kind == "clip_dir":  # a whole fine-tuned CLIPModel: the text tower is ignored
        model = copy.deepcopy(clip)
        vision_encoder(model).load_state_dict(ft)
        model.save_pretrained(str(path))
    elif kind == "fusionbench_dir":  # saved by transformers 4: "vision_model." keys, no visual_projection
        path.mkdir()
        save_file({k: v.contiguous() for k, v in without_projection(ft).items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(clip.config.vision_config.to_json_string())
    elif kind == "safetensors_bare":  # CLIPModel.vision_model.state_dict(): no prefix, no projection
        path = path.with_suffix(".safetensors")
        save_file({k[len("vision_model."):]: v.contiguous() for k, v in without_projection(ft).items()}, str(path))
    elif kind == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in ft.items()}, str(path))
    elif kind == "pt_parent_prefix":
        path = path.with_suffix(".pt")
        torch.save({"model." + k: v for k, v in without_projection(ft).items()}, str(path))
    elif kind == "openclip_pt":
        path = path.with_suffix(".pt")
        torch.save(hf_to_openclip(ft), str(path))
    elif kind == "openclip_no_proj":
        return {k: v for k, v in hf_to_openclip(ft).items() if not k.endswith("proj")}
    elif kind == "module":
        model = copy.deepcopy(clip)
        vision_encoder(model).load_state_dict(ft)
        return model
    elif kind == "state_dict":
        return dict(ft)
    return path


FORMATS = ["hf_vision_dir", "fusionbench_dir", "hf_projection_dir", "clip_dir", "safetensors_bare", "safetensors", "pt_parent_prefix",
           "openclip_pt", "openclip_no_proj", "module", "state_dict"]
LACKS_PROJECTION = {"hf_vision_dir", "fusionbench_dir", "safetensors_bare", "pt_parent_prefix", "openclip_no_proj"}


@pytest.mark.parametrize("pretrained_kind", ["module", "directory"])
@pytest.mark.parametrize("kind", FORMATS)
def test_every_finetuned_format_resolves_to_the_same_weights(setup, tmp_path, kind, pretrained_kind):
    root, clip, clip_dir, ft = setup
    source = _write(kind, tmp_path, clip, ft)
    pretrained = copy.deepcopy(clip) if pretrained_kind == "module" else str(clip_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, ckpts = prepare(pretrained, {"task0": source})
    lack = [w for w in caught if "count as unchanged" in str(w.message)]
    if kind in LACKS_PROJECTION:
        assert len(lack) == 1 and "visual_projection.weight" in str(lack[0].message)
    else:
        assert not lack
    reference = model.state_dict()
    assert set(reference) == set(ft)
    got = _resolved(ckpts["task0"], reference)
    for key in ft:
        # Renaming, fusing/splitting q/k/v and saving are exact: the tensors are bit-identical.
        assert torch.equal(got[key].float(), ft[key].float()), key


def test_pretrained_sources(setup, tmp_path):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    _, clip, clip_dir, _ = setup
    from_dir = load_vision(str(clip_dir))
    assert isinstance(from_dir, CLIPVisionModelWithProjection)
    expected = vision_encoder(clip).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in from_dir.state_dict().items())
    tower = CLIPVisionModel(copy.deepcopy(clip.config.vision_config))
    tower.save_pretrained(str(tmp_path / "vision"))
    assert type(load_vision(str(tmp_path / "vision"))) is CLIPVisionModel
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vision(str(tmp_path))
    with pytest.raises(TypeError, match="pretrained must be"):
        load_vision(3)


def test_merge_accepts_a_clip_model_and_reproduces_the_finetuned_tower(setup):
    _, clip, _, ft = setup
    clip = copy.deepcopy(clip)
    others = finetuned_towers(vision_encoder(clip), 2, scale=0.2, seed=7)
    finetuned = {"task0": without_projection(ft), "a": others["task0"], "b": others["task1"]}
    with pytest.warns(UserWarning, match="visual_projection.weight"):
        model = mass.merge(clip, finetuned, rank=1.0, progress=False)  # full rank: blocks are exact
    assert model.model.vision_model is clip.vision_model  # the CLIP model's own tower was wrapped
    reference = vision_encoder(copy.deepcopy(clip))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tower = copy.deepcopy(reference).double()  # the fine-tuned tower in fp64
        model.forward_pretrained(pixel_values=x)  # plain θ0 path still runs
        tower.load_state_dict(ft)
        want = tower(pixel_values=x.double()).image_embeds
        got = model(pixel_values=x, task_ids=["task0"] * 4).image_embeds
    assert got.shape == (4, clip.config.projection_dim)
    # rank = min(out, in): θ0 + U S V equals θt up to the fp32 SVD's backward error, of order max(m, n)·u·‖Δ‖,
    # within the 2k + 4 terms per linear layer of the forward bound (tests/_tolerances.py) at k = min(m, n)
    rank = max(m.rank for m in model.modules() if isinstance(m, mass.MASSLinear))
    assert_within(got, want, encoder_bound(reference, want, rank=rank), "full-rank task0")


def test_mmap_safetensors_matches_load_file(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(4).half(), "d": torch.zeros(0, 3),
               "e": torch.randn(2, 2).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    got, ref = mmap_safetensors(tmp_path / "x.safetensors"), load_file(str(tmp_path / "x.safetensors"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        mmap_safetensors(tmp_path / "bad.safetensors", "bad")


def test_checkpoints_that_do_not_fit_are_refused(setup):
    _, clip, _, ft = setup
    no_block = {k: v for k, v in ft.items() if "layers.0.mlp.fc1" not in k}
    with pytest.raises(CheckpointError, match="missing keys"):
        prepare(copy.deepcopy(clip), {"t": no_block})
    no_cls = {k: v for k, v in ft.items() if "class_embedding" not in k}  # inside the tower: not "unchanged"
    with pytest.raises(CheckpointError, match="missing keys.*class_embedding"):
        prepare(copy.deepcopy(clip), {"t": without_projection(no_cls)})
    wrong = dict(ft)
    wrong["vision_model.post_layernorm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match="shape"):  # re-keyed here
        prepare(copy.deepcopy(clip), {"t": without_projection(wrong)})
    with pytest.raises(CheckpointError, match="shape"):  # passed through, refused by the decomposition
        mass.merge(copy.deepcopy(clip), {"t": wrong}, progress=False)
    for missing in ("/nonexistent/dir/model.safetensors", "ckpts/cars.safetensors"):  # paths, not hub ids
        with pytest.raises(CheckpointError, match="no such file"):
            prepare(copy.deepcopy(clip), {"t": missing})
    with pytest.raises(CheckpointError, match="non-empty dict"):
        prepare(copy.deepcopy(clip), {})


def test_hub_ids_offline_fail_with_one_clear_error(setup, monkeypatch, tmp_path, capsys):
    _, clip, _, _ = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"openai/clip-vit-base-patch32.*HF_HUB_OFFLINE"):
        load_vision("openai/clip-vit-base-patch32")
    with pytest.raises(HubUnavailableError, match=r"tanganke/clip-vit-base-patch32_mnist.*HF_HUB_OFFLINE"):
        prepare(copy.deepcopy(clip), {"mnist": "tanganke/clip-vit-base-patch32_mnist"})
    from mass.evaluation.data import ClipPreprocess, load_task_data

    with pytest.raises(HubUnavailableError, match=r"tanganke/eurosat.*HF_HUB_OFFLINE"):
        load_task_data("tanganke/eurosat", ClipPreprocess(), "eurosat")
    from mass.tools.cli.eval import main

    assert main(["--preset", "vit-b-32-8", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mass: error:") and "openai/clip-vit-base-patch32" in err and "HF_HUB_OFFLINE" in err
