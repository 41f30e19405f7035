"""Issue 23 on the command line: ``mass merge --from DIR --add / --remove / --bank-dtype``."""
import copy

import pytest
import torch
from safetensors.torch import save_file

import mass
from mass.nn.model import extract_embedding
from mass.tools.cli.main import main

from conftest import build_model, make_setup


@pytest.fixture
def saved(tmp_path):
    pretrained, finetuned, _ = make_setup("hf_proj", n_tasks=3)
    pretrained.save_pretrained(tmp_path / "pre")
    for name, sd in finetuned.items():
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    args = ["merge", "--pretrained", str(tmp_path / "pre"), "--layer", "2", "--solver", "full", "--quiet"]
    assert main(args + ["--finetuned", f"task0={tmp_path / 'task0.safetensors'}",
                        f"task1={tmp_path / 'task1.safetensors'}", "--out", str(tmp_path / "m")]) == 0
    return tmp_path, pretrained, finetuned, args


def test_add_remove_and_bank_dtype_from_a_saved_model(saved, images):
    tmp, pretrained, finetuned, args = saved
    assert main(args + ["--from", str(tmp / "m"), "--remove", "task0", "--add",
                        f"task2={tmp / 'task2.safetensors'}", "--out", str(tmp / "m2")]) == 0
    got = mass.MASSModel.from_pretrained(tmp / "m2", build_model("hf_proj"))
    model = mass.MASSModel.from_pretrained(tmp / "m", build_model("hf_proj"))
    want = model.remove_tasks(["task0"]).add_tasks({"task2": finetuned["task2"]}, solver="full")
    assert got.tasks == want.tasks == ["task1", "task2"]
    for key, f in want.decomposition().lowrank.items():
        assert torch.equal(got.decomposition().lowrank[key].V, f.V), key
    assert torch.equal(extract_embedding(got(images)), extract_embedding(want(images)))
    assert main(args + ["--from", str(tmp / "m2"), "--bank-dtype", "bfloat16", "--out", str(tmp / "m3")]) == 0
    half = mass.MASSModel.from_pretrained(tmp / "m3", build_model("hf_proj"))
    assert half.bank_dtype == torch.bfloat16 and half.storage_factor() < got.storage_factor()


@pytest.mark.parametrize("tail,message", [
    (["--add", "x=X"], "give it with --from"),
    (["--from", "M", "--out", "O2"], "needs --add, --remove or --bank-dtype"),
    (["--from", "M", "--finetuned", "x=X", "--out", "O2"], "use --add"),
    (["--from", "M", "--remove", "nope", "--out", "O2"], "unknown task"),
    (["--from", "M", "--remove", "task0", "task1", "--out", "O2"], "every task"),
    (["--from", "M", "--add", "task1=X", "--out", "O2"], "already in the model"),
    (["--from", "OTHER", "--remove", "task0", "--out", "O2"], "not the encoder the saved model was merged from"),
])
def test_errors_are_one_line(saved, capsys, tail, message):
    tmp, pretrained, finetuned, args = saved
    other = copy.deepcopy(pretrained)
    with torch.no_grad():
        other.vision_model.post_layernorm.weight.add_(1.0)
    mass.merge(other, finetuned, progress=False, solver="full").save_pretrained(tmp / "other")
    subst = {"M": str(tmp / "m"), "O2": str(tmp / "o2"), "X": str(tmp / "task2.safetensors"),
             "OTHER": str(tmp / "other")}
    tail = [subst.get(a, a) if "=" not in a else a.split("=")[0] + "=" + subst.get(a.split("=")[1], a.split("=")[1])
            for a in tail]
    if "--out" not in tail:
        tail += ["--out", str(tmp / "o2")]
    rc = main(args + tail)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mass: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp / "o2").exists()


def test_from_a_self_contained_directory_needs_no_pretrained(saved, images, capsys):
    """A directory that carries its encoder's config (issue 22) is changed with --from alone; a plain merge
    still needs --pretrained, and says so."""
    tmp, pretrained, finetuned, args = saved
    assert main(["merge", "--from", str(tmp / "m"), "--remove", "task0", "--quiet", "--out", str(tmp / "m2")]) == 0
    got = mass.MASSModel.from_pretrained(tmp / "m2")
    want = mass.MASSModel.from_pretrained(tmp / "m", build_model("hf_proj")).remove_tasks(["task0"])
    assert got.tasks == want.tasks == ["task1"]
    assert torch.equal(extract_embedding(got(images)), extract_embedding(want(images)))
    capsys.readouterr()
    assert main(["merge", "--finetuned", f"task0={tmp / 'task0.safetensors'}", "--out", str(tmp / "m3")]) == 2
    assert "give --pretrained" in capsys.readouterr().err


def test_from_with_support_folders_reads_them_through_the_saved_preprocessing(saved):
    """--from DIR --support: a self-contained directory's own preprocessing reads the folders (no --pretrained);
    the new model is calibrated on them."""
    from PIL import Image

    tmp, pretrained, finetuned, args = saved
    (tmp / "sup" / "task1").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 40), (50 * i, 20, 90)).save(tmp / "sup" / "task1" / f"{i}.png")
    assert main(["merge", "--from", str(tmp / "m"), "--remove", "task0", "--support",
                 f"task1={tmp / 'sup' / 'task1'}", "--quiet", "--out", str(tmp / "m2")]) == 0
    model = mass.MASSModel.from_pretrained(tmp / "m2")
    assert model.tasks == ["task1"] and model.support is not None and model.support.n_images == 4
