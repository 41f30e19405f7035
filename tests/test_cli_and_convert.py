"""The command line and the open_clip → HF checkpoint conversion."""
import pytest
import torch
from safetensors.torch import save_file

import mass
from mass.tools.cli.main import main
from mass.files.openclip import openclip_to_hf
from mass.method.synthetic import OpenCLIPStyleViT, finetuned_like

from _tolerances import assert_within, encoder_bound


def _hf_twin(oc: OpenCLIPStyleViT):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    width = oc.conv1.out_channels
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=len(oc.transformer.resblocks),
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=oc.proj.shape[1],
                           hidden_act="gelu", architectures=["CLIPVisionModelWithProjection"])
    return CLIPVisionModelWithProjection(cfg).eval()


def test_openclip_weights_converted_to_hf_give_the_same_embeddings():
    torch.manual_seed(0)
    oc = OpenCLIPStyleViT(width=32, layers=2, batch_first=False).eval()
    hf = _hf_twin(oc)
    hf.load_state_dict(openclip_to_hf({"visual." + k: v for k, v in oc.state_dict().items()}, hf.state_dict().keys()))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = oc.double()(x.double())  # the open_clip model in fp64; the HF twin in fp32 within the forward bound
        assert_within(hf(pixel_values=x).image_embeds, want, encoder_bound(hf, want), "HF twin")


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(0)
    oc = OpenCLIPStyleViT(width=32, layers=2).eval()
    hf = _hf_twin(oc)
    hf.load_state_dict(openclip_to_hf(oc.state_dict(), hf.state_dict().keys()))
    hf.save_pretrained(tmp_path / "pretrained")
    ft = finetuned_like(oc, 3, scale=0.1, seed=1)
    save_file(openclip_to_hf(ft["task0"], hf.state_dict().keys()), str(tmp_path / "a.safetensors"))
    torch.save({"visual." + k: v for k, v in ft["task1"].items()}, tmp_path / "b.pt")  # open_clip names
    hf_b = _hf_twin(oc)
    hf_b.load_state_dict(openclip_to_hf(ft["task2"], hf.state_dict().keys()))
    hf_b.save_pretrained(tmp_path / "c_dir")
    return tmp_path, hf, ft


def test_cli_merge_and_inspect(checkpoints, capsys):
    tmp, hf, ft = checkpoints
    rc = main(["merge", "--pretrained", str(tmp / "pretrained"), "--finetuned", f"a={tmp / 'a.safetensors'}",
               f"b={tmp / 'b.pt'}", f"c={tmp / 'c_dir'}", "--layer", "1", "--out", str(tmp / "out"), "--quiet"])
    assert rc == 0
    assert "storage" in capsys.readouterr().out
    model = mass.MASSModel.from_pretrained(tmp / "out", base_model=_hf_twin(OpenCLIPStyleViT(width=32, layers=2)))
    assert model.tasks == ["a", "b", "c"]
    direct = mass.decompose(hf, {n: openclip_to_hf(ft[f"task{i}"], hf.state_dict().keys())
                                 for i, n in enumerate("abc")}, progress=False)
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    # the files hold the same deltas bit for bit (the conversion only renames and splits), and the same SVD
    # runs on them; the saved factors load back bit-exactly
    assert torch.equal(model.decomposition().lowrank[key].S, direct.lowrank[key].S)
    assert main(["inspect", str(tmp / "out")]) == 0
    out = capsys.readouterr().out
    assert "storage factor" in out and "tasks (3)" in out and key in out


@pytest.mark.parametrize("argv_tail,message", [
    (["--finetuned", "a=/nonexistent.safetensors"], "no such file"),
    (["--finetuned", "a"], "NAME=PATH"),
    (["--finetuned", "a=PATH_A", "--rank", "lots"], "--rank must be"),
    (["--finetuned", "m=MODULE"], "Pickled modules are refused"),
])
def test_cli_user_errors_are_one_line(checkpoints, capsys, argv_tail, message):
    tmp, _, _ = checkpoints
    torch.save(torch.nn.Linear(2, 2), tmp / "module.pt")
    tail = [a.replace("PATH_A", str(tmp / "a.safetensors")).replace("MODULE", str(tmp / "module.pt")) for a in argv_tail]
    rc = main(["merge", "--pretrained", str(tmp / "pretrained"), "--out", str(tmp / "o"), "--quiet"] + tail)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mass: error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_inspect_reports_a_broken_directory(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a saved MASS model" in capsys.readouterr().err


def test_cli_bench_exits_zero_on_a_tiny_model(capsys):
    rc = main(["bench", "--models", "tiny", "--tasks", "2", "--batches", "1", "--providers", "plain", "ours",
               "--repeats", "1", "--out", ""])
    assert rc == 0
    assert "ours" in capsys.readouterr().out


def test_cli_merge_with_support(checkpoints, capsys):
    from PIL import Image

    tmp, hf, ft = checkpoints
    for t in "abc":
        (tmp / "sup" / t).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40, 40), (40 * i, 80 * "abc".index(t), 30)).save(tmp / "sup" / t / f"{i}.png")
    argv = ["merge", "--pretrained", str(tmp / "pretrained"), "--finetuned", f"a={tmp / 'a.safetensors'}",
            f"b={tmp / 'b.pt'}", f"c={tmp / 'c_dir'}", "--layer", "1", "--out", str(tmp / "out"), "--quiet",
            "--basis", "support", "--unknown", "pretrained", "--support"] + [f"{t}={tmp / 'sup' / t}" for t in "abc"]
    assert main(argv) == 0
    model = mass.MASSModel.from_pretrained(tmp / "out", base_model=_hf_twin(OpenCLIPStyleViT(width=32, layers=2)))
    assert model.router_config.basis == "support" and model.support.n_images == 5
    assert main(argv[:-4] + ["--out", str(tmp / "out2")]) == 2
    assert "--support" in capsys.readouterr().err


def test_cli_router_presets_and_overrides():
    """``mass merge --router`` gives the named RouterConfig preset; an explicit routing flag overrides only its
    own field."""
    from mass.tools.cli.main import build_parser
    from mass.tools.cli.merge import router_from_args

    def router(*flags):
        return router_from_args(build_parser().parse_args(["merge", "--pretrained", "p", "--finetuned", "a=x",
                                                             "--out", "o", *flags]))

    assert router() == mass.RouterConfig()
    assert router("--router", "recommended") == mass.RouterConfig.recommended()
    assert router("--router", "few-example") == mass.RouterConfig.few_example()
    assert router("--router", "few-example", "--layer", "5", "--centre", "--whiten", "0.5") == \
        mass.RouterConfig.few_example(layer=5, centre=True, whiten=0.5)
    assert router("--router", "few-example", "--no-centre", "--unknown", "error") == \
        mass.RouterConfig.few_example(centre=False, unknown="error")
    assert router("--mode", "top1", "--features", "pretrained") == mass.RouterConfig.recommended()
