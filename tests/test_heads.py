"""Zero-shot heads from the CLIP text tower (mass.heads), checked against a direct computation."""
import pytest
import torch
import torch.nn.functional as F

import mass.clip
from _clip_fixtures import PROJECTION, finetuned_towers, tiny_clip, write_tokenizer
from mass.heads import DEFAULT_TEMPLATES, Head, Heads, head_tensors, zero_shot_heads
from mass.presets import task_templates


@pytest.fixture(scope="module")
def clip_and_tokenizer(tmp_path_factory):
    tok = write_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_clip(tok, layers=2), tok


@torch.no_grad()
def _direct_text_embedding(clip, tok, prompt):
    """One prompt, no padding: the text tower's pooled (end-of-text) output times the text projection."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    return F.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output)[0], dim=-1)


def test_heads_equal_direct_computation(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    classes = {"pets": ["cat", "golden retriever", "hamster"], "digits": ["0", "1"]}
    templates = {"pets": ["a photo of a {}.", "a {} at home."], "digits": ["the number {}."]}
    heads = zero_shot_heads(clip, tok, classes, templates=templates, batch_size=3)  # batches split classes
    for task, names in classes.items():
        direct = torch.stack([
            F.normalize(torch.stack([_direct_text_embedding(clip, tok, t.format(c)) for t in templates[task]]).mean(0),
                        dim=-1)
            for c in names])
        assert heads[task].classes == tuple(names)
        assert heads[task].weight.shape == (len(names), PROJECTION)
        # Same tokens and weights; batching with padding only changes fp32 summation order inside the
        # GEMMs (causal attention hides the padding): |error| <= ~ depth * width * eps = 4 * 64 * 1.2e-7
        # on unit vectors, so 1e-5 bounds it with margin.
        torch.testing.assert_close(heads[task].weight, direct, rtol=0, atol=1e-5)
        torch.testing.assert_close(heads[task].weight.norm(dim=1), torch.ones(len(names)), rtol=0, atol=1e-6)


def test_template_choice_and_validation(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    generic = zero_shot_heads(clip, tok, {"mytask": ["a", "b"]})
    explicit = zero_shot_heads(clip, tok, {"mytask": ["a", "b"]}, templates=DEFAULT_TEMPLATES)
    torch.testing.assert_close(generic["mytask"].weight, explicit["mytask"].weight, rtol=0, atol=1e-6)
    assert task_templates("eurosat") and task_templates("mytask") == ()
    known = zero_shot_heads(clip, tok, {"eurosat": ["forest", "river"]})
    own = zero_shot_heads(clip, tok, {"eurosat": ["forest", "river"]}, templates=list(task_templates("eurosat")))
    torch.testing.assert_close(known["eurosat"].weight, own["eurosat"].weight, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_heads(clip, tok, {"t": ["a"]}, templates=["no placeholder"])
    with pytest.raises(TypeError, match="list of strings"):
        zero_shot_heads(clip, tok, {"t": ["a"]}, templates="a photo of a {}.")
    with pytest.raises(ValueError, match="no entry for task"):
        zero_shot_heads(clip, tok, {"t": ["a"]}, templates={"other": ["{}"]})
    with pytest.raises(ValueError, match="class-name"):
        zero_shot_heads(clip, tok, {"t": ["a", ""]})
    with pytest.raises(TypeError, match="list of strings"):
        zero_shot_heads(clip, tok, {"t": "cat"})
    with pytest.raises(ValueError, match="one \\(D,\\) row per class"):
        Head(("a", "b"), torch.zeros(3, 4))


def test_heads_drive_a_clip_merge_and_name_labels(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    import copy

    clip = copy.deepcopy(clip)
    heads = zero_shot_heads(clip, tok, {"task0": ["cat", "dog"], "task1": ["red", "green", "blue"]})
    tensors = heads.as_tensors()
    assert head_tensors(heads).keys() == tensors.keys() and all(torch.equal(tensors[t], heads[t].weight) for t in heads)
    ft = finetuned_towers(mass.clip.vision_encoder(clip), 2)
    model = mass.clip.merge(clip, ft, heads=tensors, progress=False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model.classify(pixel_values=x, task_ids=["task1"] * 3)
    assert out.logits.shape == (3, 3)
    labels = heads.labels(out.task_ids, out.predictions, model.tasks)
    assert labels == [heads["task1"].classes[p] for p in out.predictions.tolist()]
    assert isinstance(heads, Heads) and heads.classes("task0") == ["cat", "dog"]
