"""Save → load is bit-exact; broken files and bad inputs fail with errors that name the problem."""
import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mass
from mass.nn.model import extract_embedding
from mass.storage.serialization import MODEL_NAME

from _tolerances import assert_within, gamma, logit_bound, product_bound
from conftest import build_model, make_setup


@pytest.fixture
def heads():
    gen = torch.Generator().manual_seed(5)
    return {f"task{i}": torch.randn(4 + i, 32, generator=gen) for i in range(3)}


def _model(arch="hf", heads=None, **kw):
    pretrained, finetuned, _ = make_setup(arch)
    return mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=2, mode="topk", threshold=0.1),
                      heads=heads, progress=False, **kw)


@pytest.mark.parametrize("arch", ["hf", "openclip_sf"])
def test_save_load_bit_exact(tmp_path, images, arch):
    heads = {f"task{i}": torch.randn(3, 32 if arch == "openclip_sf" else 32) for i in range(3)}
    model = _model(arch, heads=heads)
    forced = torch.tensor([[0, -1], [1, 2], [2, -1], [0, 1], [1, -1], [2, 0]])
    before = extract_embedding(model(images, task_ids=forced))
    routed, routing = model(images, return_routing=True)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [MODEL_NAME]
    loaded = mass.MASSModel.from_pretrained(tmp_path / "saved", base_model=build_model(arch, seed=123))
    assert loaded.tasks == model.tasks and loaded.router_config == model.router_config
    a, b = model.decomposition(), loaded.decomposition()
    for key in a.base:
        assert torch.equal(a.base[key], b.base[key]), key
    for key in a.lowrank:
        for part in ("U", "S", "V"):
            assert torch.equal(getattr(a.lowrank[key], part), getattr(b.lowrank[key], part)), key
    for key in a.dense:
        assert torch.equal(a.dense[key], b.dense[key]), key
    for t in model.tasks:
        assert torch.equal(model.head(t), loaded.head(t))
    assert torch.equal(extract_embedding(loaded(images, task_ids=forced)), before)
    routed2, routing2 = loaded(images, return_routing=True)
    assert torch.equal(routing2.task_ids, routing.task_ids)
    assert torch.equal(extract_embedding(routed2), extract_embedding(routed))


def test_corrupted_and_truncated_files_are_reported(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / MODEL_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(mass.SavedModelError, match="truncated or corrupted"):
        mass.MASSModel.from_pretrained(tmp_path / "m", base_model=build_model("hf"))
    for offset in (-5, data.index(b"reuse_prefix")):  # a tensor byte, then a byte of the config (in the header)
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(mass.SavedModelError, match="truncated or corrupted"):
            mass.MASSModel.from_pretrained(tmp_path / "m", base_model=build_model("hf"))
    with pytest.raises(mass.SavedModelError, match="not a saved MASS model"):
        mass.MASSModel.from_pretrained(tmp_path / "empty", base_model=build_model("hf"))


def test_interrupted_save_keeps_previous_files_and_leaves_no_temp(tmp_path, monkeypatch):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def explode(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "m")
    after = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    assert after == before  # old model intact, no temporary leftovers
    monkeypatch.undo()
    mass.MASSModel.from_pretrained(tmp_path / "m", base_model=build_model("hf"))


def test_load_into_wrong_architecture_is_reported(tmp_path):
    _model().save_pretrained(tmp_path / "m")
    with pytest.raises(mass.SavedModelError, match="does not match"):
        mass.MASSModel.from_pretrained(tmp_path / "m", base_model=build_model("hf", layers=3))


def test_checkpoint_key_and_shape_mismatches_are_reported():
    pretrained, finetuned, _ = make_setup("hf")
    broken = dict(finetuned)
    sd = dict(finetuned["task1"])
    sd.pop(next(iter(sd)))
    broken["task1"] = sd
    with pytest.raises(mass.CheckpointError, match="task1.*missing keys"):
        mass.merge(copy.deepcopy(pretrained), broken, progress=False)
    sd = dict(finetuned["task2"])
    key = next(k for k, v in sd.items() if v.dim() == 2)
    sd[key] = torch.zeros(3, 3)
    with pytest.raises(mass.CheckpointError, match=f"task2.*{key}.*shape"):
        mass.merge(copy.deepcopy(pretrained), {**finetuned, "task2": sd}, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_sees_every_nan_and_inf(dtype):
    from mass.files.checkpoints import all_finite

    assert all_finite(torch.randn(7, 9).to(dtype)) and all_finite(torch.empty(0, 3, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in (0, 31, 62):  # first, middle, last element
            t = torch.randn(7, 9).to(dtype)
            t.view(-1)[pos] = bad
            assert not all_finite(t), (bad, pos)


def test_nan_and_inf_in_checkpoint_are_reported(tmp_path):
    pretrained, finetuned, _ = make_setup("hf")
    sd = {k: v.clone() for k, v in finetuned["task0"].items()}
    key = next(k for k, v in sd.items() if v.dim() == 2)
    sd[key][0, 0] = float("nan")
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(mass.CheckpointError, match=f"task0.*{key}.*NaN or Inf"):
        mass.merge(pretrained, {**finetuned, "task0": path}, progress=False)
    sd[key][0, 0] = float("inf")
    with pytest.raises(mass.CheckpointError, match="NaN or Inf"):
        mass.merge(build_model("hf"), {**finetuned, "task0": sd}, progress=False)


def test_checkpoint_paths_safetensors_pt_and_prefixed_keys(tmp_path, images):
    pretrained, finetuned, _ = make_setup("hf")
    save_file({k: v.contiguous() for k, v in finetuned["task0"].items()}, str(tmp_path / "t0.safetensors"))
    torch.save({"vision." + k: v for k, v in finetuned["task1"].items()}, tmp_path / "t1.pt")
    (tmp_path / "hfdir").mkdir()
    save_file({k: v.contiguous() for k, v in finetuned["task2"].items()}, str(tmp_path / "hfdir" / "model.safetensors"))
    from_paths = mass.decompose(pretrained, {"task0": tmp_path / "t0.safetensors", "task1": str(tmp_path / "t1.pt"),
                                             "task2": tmp_path / "hfdir"}, progress=False)
    from_dicts = mass.decompose(pretrained, finetuned, progress=False)
    for key in from_dicts.lowrank:
        assert torch.equal(from_paths.lowrank[key].S, from_dicts.lowrank[key].S)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(mass.CheckpointError, match="weights-only"):
        mass.decompose(pretrained, {"m": tmp_path / "module.pt"}, progress=False)
    with pytest.raises(mass.CheckpointError, match="no such file"):
        mass.decompose(pretrained, {"m": tmp_path / "missing.safetensors"}, progress=False)


def test_rank_validation():
    pretrained, finetuned, _ = make_setup("hf")
    with pytest.raises(ValueError, match="rank 64 is larger than matrix .* allows"):
        mass.decompose(pretrained, finetuned, rank=64, progress=False)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        mass.decompose(pretrained, finetuned, rank=1.5, progress=False)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    for key, f in dec.lowrank.items():
        shape = dec.base[key].shape
        assert f.rank == min(shape) // 3, key  # floor(min(out, in) / T) with T = 3
        assert f.U.shape == (3, shape[0], f.rank) and f.V.shape == (3, f.rank, shape[1])
        eye = torch.eye(f.rank).expand(3, -1, -1)
        # orthonormal rows: an fp32 SVD's singular vectors are orthonormal to p(m, n)·u (LAPACK; taken as
        # γ_{m+n}, as in test_support_router.py), and the fp32 product adds γ_in·|V||V|ᵀ
        V = f.V
        assert_within(V @ V.transpose(1, 2), eye, gamma(sum(shape)) + product_bound(V, V.transpose(1, 2)), key)
    assert mass.decompose(pretrained, finetuned, rank=4, progress=False).lowrank[key].rank == 4
    assert mass.decompose(pretrained, finetuned, rank=0.5, progress=False).lowrank[key].rank == min(shape) // 2


def test_unknown_task_names_and_bad_task_ids(images):
    model = _model()
    with pytest.raises(ValueError, match=r"unknown task name\(s\) \['nope'\]"):
        model(images, task_ids=["task0"] * 5 + ["nope"])
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        model(images, task_ids=torch.tensor([0, 1, 2, 3, 0, 0]))
    with pytest.raises(ValueError, match="names 2 samples but the batch has 6"):
        model(images, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="LongTensor"):
        model(images, task_ids=torch.zeros(6))


def test_unsupported_models_and_heads_are_reported():
    with pytest.raises(TypeError, match="unsupported model"):
        mass.merge(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"a": {}}, progress=False)
    with pytest.raises(ValueError, match="heads must have one entry per task"):
        _model(heads={"task0": torch.randn(3, 32)})
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        pretrained, finetuned, _ = make_setup("hf")
        mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=7), progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        mass.RouterConfig(mode="best")


def test_classify_uses_the_selected_head(images, heads):
    model = _model(heads=heads)
    plain = build_model("hf")
    result = model.classify(images, task_ids=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert result.logits.shape == (6, 6) and result.task_ids.tolist() == [0, 1, 2, 0, 1, 2]
    raw = extract_embedding(model(images, task_ids=result.task_ids))
    emb = torch.nn.functional.normalize(raw, dim=-1)
    # two fp32 computations of each logit (the embedding too, the ids given in another form): each within
    # logit_bound of the exact one
    rank = 2 * max(m.rank for m in model.modules() if isinstance(m, mass.MASSLinear))
    bound = 2 * logit_bound(plain, raw, 100.0, rank)  # (magnitudes from the fp32 embedding: first order)
    for i, t in enumerate(result.task_ids.tolist()):
        head = torch.nn.functional.normalize(heads[f"task{t}"], dim=-1)
        want = 100.0 * emb[i] @ head.T
        assert_within(result.logits[i, : head.shape[0]], want, bound[i], f"row {i}")
        assert torch.isinf(result.logits[i, head.shape[0]:]).all()
    # two tasks selected: the head with the larger max-logit wins
    pair = model.classify(images, task_ids=torch.tensor([[0, 2]] * 6))
    raw2 = extract_embedding(model(images, task_ids=torch.tensor([[0, 2]] * 6)))
    emb2, bound = torch.nn.functional.normalize(raw2, dim=-1), 2 * logit_bound(plain, raw2, 100.0, rank)
    for i in range(6):
        m0 = (100 * emb2[i] @ torch.nn.functional.normalize(heads["task0"], dim=-1).T).max()
        m2 = (100 * emb2[i] @ torch.nn.functional.normalize(heads["task2"], dim=-1).T).max()
        if abs(float(m0 - m2)) > 2 * float(bound[i]):  # else the choice lies within rounding of a tie
            assert pair.task_ids[i].item() == (0 if m0 > m2 else 2)
