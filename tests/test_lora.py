"""Issue 23: PEFT LoRA adapter directories as fine-tuned checkpoints, checked against PEFT itself."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mass
from mass.files.lora import LoraError, lora_checkpoint, read_adapter
from mass.method.factored_svd import factored_topk
from mass.nn.model import extract_embedding
from mass.tools.cli.main import main

from _tolerances import U32, U64, assert_within, encoder_bound, gamma
from conftest import build_model, make_setup

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make_adapter(path, seed=0, **options):
    """A PEFT LoRA adapter of the tiny HF tower (with projection), random A and B (a trained adapter's shape)."""
    base = build_model("hf_proj")
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    config.update(options)
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT's random init keeps B small; make the deltas of a useful size
                p.mul_(10)
    model.save_pretrained(str(path))
    return path


def peft_deltas(path, dtype=torch.float64):
    """θ − θ0 of PEFT's own merge_and_unload() of the adapter, the model and adapter in ``dtype``."""
    base = build_model("hf_proj").to(dtype)
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(base, str(path)).to(dtype).merge_and_unload()
    return {k: v - theta0[k] for k, v in merged.state_dict().items()}, theta0


@pytest.mark.parametrize("options", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"fc1": 2, "layers.1.self_attn.v_proj": 3}, "alpha_pattern": {"fc2": 5, "out_proj": 2}},
    {"modules_to_save": ["post_layernorm"], "bias": "lora_only"},
])
def test_deltas_equal_peft_merge_and_unload(tmp_path, options):
    path = make_adapter(tmp_path / "a", **options)
    want, theta0 = peft_deltas(path)
    ckpt = lora_checkpoint("a", read_adapter("a", path), build_model("hf_proj").state_dict())
    assert ckpt.lowrank, "the adapter's linear layers are read as factors"
    for key, delta in want.items():
        if key in ckpt.lowrank:
            f = ckpt.lowrank[key]
            got = f.scale * (f.B.double() @ f.A.double())
            # PEFT (fp64): (B @ A)·scale, + W, then our − W: γ_r on the product, u on the scaling, the sum and
            # the difference; ours: the same product and scaling.
            r = f.A.shape[0]
            magnitude = abs(f.scale) * (f.B.double().abs() @ f.A.double().abs())
            bound = 2 * (gamma(r, U64) + U64) * magnitude + U64 * (theta0[key].abs() + 2 * got.abs())
            assert_within(got, delta, bound, key)
        else:  # untouched (or saved whole): the dense value is exactly what PEFT's merged model holds
            assert torch.equal(ckpt.get(key).double() - theta0[key], delta), key
    if options.get("modules_to_save"):
        assert "vision_model.post_layernorm.weight" in ckpt.whole
        assert any(k.endswith("q_proj.bias") for k in ckpt.whole)


def test_factored_decomposition_without_dense_svd_inputs(tmp_path):
    path = make_adapter(tmp_path / "a", rank_pattern={"fc1": 2})
    pretrained = build_model("hf_proj")
    dense_ft = make_setup("hf_proj", n_tasks=1)[1]["task0"]
    dec = mass.decompose(pretrained, {"lora": lora_checkpoint("lora", read_adapter("lora", path),
                                                               pretrained.state_dict()),
                                      "dense": dense_ft}, solver="full", progress=False)
    ckpt = lora_checkpoint("lora", read_adapter("lora", path), pretrained.state_dict())
    for key, f in dec.lowrank.items():
        recon = (f.U[0].double() * f.S[0].double()) @ f.V[0].double()
        if key not in ckpt.lowrank:
            assert not bool(recon.any()), f"{key}: untouched by the adapter, so unchanged"
            continue
        lf = ckpt.lowrank[key]
        r, (out, inp) = lf.A.shape[0], recon.shape
        assert f.rank >= r  # k = min / 2 here: every direction of the rank-r delta is kept
        exact = lf.scale * (lf.B.double() @ lf.A.double())
        # Backward stable steps in fp32 (taken as γ_n, as tests/test_model.py does for LAPACK's SVD): the two
        # Householder QRs (γ_{out+r}, γ_{in+r} of ‖B‖, ‖A‖), the r × r product and SVD (γ_r, γ_{2r}), the two
        # products back (γ_r each), the scaling (u): on the scale |s|·‖B‖_F·‖A‖_F.
        scale = abs(lf.scale) * float(lf.B.double().norm()) * float(lf.A.double().norm())
        bound = (gamma(out + r) + gamma(inp + r) + gamma(2 * r) + 3 * gamma(r) + U32) * scale
        assert float((recon - exact).norm()) <= bound, key
        assert not bool(f.S[0, r:].any()) and not bool(f.V[0, r:].any())  # no direction beyond rank r
    # The dense task in the same merge gets the same factors as when merged alone (one batched SVD of the rest).
    alone = mass.decompose(pretrained, {"dense": dense_ft}, solver="full",
                           progress=False, ranks={k: f.rank for k, f in dec.lowrank.items()})
    for key, f in dec.lowrank.items():
        assert torch.equal(f.S[1], alone.lowrank[key].S[0]), key


def test_factored_topk_in_fp64_matches_the_product():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(3, 24, generator=g, dtype=torch.float64)
    U, S, V = factored_topk(B, A, 0.5, 2, dtype=torch.float64)
    _, s, _ = torch.linalg.svd(0.5 * B @ A)
    assert_within(S, s[:2], gamma(40 + 24 + 6 * 3, U64) * float(s[0]), "singular values")
    U5, S5, V5 = factored_topk(B, A, 0.5, 5, dtype=torch.float64)
    assert not bool(S5[3:].any()) and torch.equal(S5[:2], S)


def test_merge_cli_eval_and_add_tasks_accept_adapter_dirs(tmp_path, images):
    path = make_adapter(tmp_path / "lora", seed=1)
    pretrained, finetuned, reference = make_setup("hf_proj", n_tasks=2)
    model = mass.merge(copy.deepcopy(pretrained), {"lora": str(path), **finetuned}, router=mass.RouterConfig(layer=2),
                       solver="full", progress=False)
    dec = model.decomposition()
    reference.double().load_state_dict(dec.task_state_dict(0))
    want = extract_embedding(reference(images.double()))
    got = extract_embedding(model(images, task_ids=["lora"] * images.shape[0]))
    k = max(m.rank for m in model.modules() if isinstance(m, mass.MASSLinear))
    assert_within(got, want, encoder_bound(reference, want, rank=k), "LoRA task forced")
    grown = mass.merge(copy.deepcopy(pretrained), finetuned, router=mass.RouterConfig(layer=2), solver="full",
                       progress=False).add_tasks({"lora": str(path)}, solver="full")
    assert grown.tasks == ["task0", "task1", "lora"]
    # static merges read the adapter densely
    ta = mass.task_arithmetic(pretrained, {"lora": lora_checkpoint("lora", read_adapter("lora", path),
                                                                   pretrained.state_dict())})
    assert set(ta) == set(pretrained.state_dict())
    # the CLI
    pretrained.save_pretrained(tmp_path / "pre")
    save_file(finetuned["task0"], str(tmp_path / "t0.safetensors"))
    assert main(["merge", "--pretrained", str(tmp_path / "pre"), "--finetuned", f"lora={path}",
                 f"t0={tmp_path / 't0.safetensors'}", "--layer", "2", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert mass.MASSModel.from_pretrained(tmp_path / "out", build_model("hf_proj")).tasks == ["lora", "t0"]


def _edit(path, config=None, drop=None, add=None, rename=None):
    if config:
        data = json.loads((path / "adapter_config.json").read_text())
        data.update(config)
        (path / "adapter_config.json").write_text(json.dumps(data))
    if drop or add or rename:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        if rename:
            tensors = {k.replace(*rename): v for k, v in tensors.items()}
        for key in drop or []:
            tensors = {k: v for k, v in tensors.items() if key not in k}
        tensors.update(add or {})
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


BAD = {
    "unknown target": (dict(rename=("vision_model.encoder", "text_model.encoder")), "not a layer of the pretrained"),
    "missing weights": (dict(drop=[""]), "no lora_A/lora_B"),
    "half a pair": (dict(drop=["layers.0.mlp.fc1.lora_B"]), "needs both lora_A and lora_B"),
    "base model mismatch": (dict(add={"base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight":
                                      torch.zeros(4, 48)}), "a different base model"),
    "modules_to_save MASS cannot route": (dict(add={"base_model.model.classifier.weight": torch.zeros(3, 32)}),
                                          "cannot route"),
    "DoRA": (dict(config={"use_dora": True}), "DoRA"),
    "rank disagrees with the config": (dict(config={"r": 8}), "rank 8"),
    "not LoRA": (dict(config={"peft_type": "IA3"}), "only LORA"),
    "LoRA on the patch convolution": (dict(add={"base_model.model.vision_model.embeddings.patch_embedding.lora_A"
                                                ".weight": torch.zeros(4, 3, 8, 8)}), "convolutions"),
    "LoRA on embeddings": (dict(add={"base_model.model.vision_model.embeddings.position_embedding"
                                     ".lora_embedding_A": torch.zeros(4, 17)}), "embeddings"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapters_get_one_clear_error(tmp_path, case, capsys):
    edits, message = BAD[case]
    path = _edit(make_adapter(tmp_path / "a"), **edits)
    pretrained = build_model("hf_proj")
    with pytest.raises(LoraError, match=message):
        mass.merge(pretrained, {"a": str(path), "b": make_setup("hf_proj", 1)[1]["task0"]}, progress=False)
    assert not any(isinstance(m, mass.MASSLinear) for m in pretrained.modules())
    pretrained.save_pretrained(tmp_path / "pre")
    rc = main(["merge", "--pretrained", str(tmp_path / "pre"), "--finetuned", f"a={path}", "--out",
               str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mass: error:") and message in err and len(err.strip().splitlines()) == 1


def test_missing_files(tmp_path):
    path = make_adapter(tmp_path / "a")
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(LoraError, match="safe_serialization"):
        read_adapter("a", path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraError, match="cannot read"):
        read_adapter("a", path)
