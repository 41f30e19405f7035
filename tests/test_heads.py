"""Zero-shot heads from the CLIP text tower (mass.evaluation.heads), checked against a direct computation."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mass.nn.clip
from _clip_fixtures import PROJECTION, finetuned_towers, tiny_clip, write_tokenizer
from mass.evaluation.heads import DEFAULT_TEMPLATES, Head, Heads, head_tensors, zero_shot_heads
from mass.evaluation.presets import task_templates

from _tolerances import assert_within, encoder_bound, gamma


@pytest.fixture(scope="module")
def clip_and_tokenizer(tmp_path_factory):
    tok = write_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_clip(tok, layers=2), tok


@torch.no_grad()
def _direct_text_embedding(clip, tok, prompt):
    """One prompt, no padding: the text tower's pooled (end-of-text) output times the text projection (in the
    dtype of ``clip``), not normalised."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    return clip.text_projection(clip.text_model(input_ids=ids).pooler_output)[0]


def _head_bound(clip, embeddings):
    """Bound on an fp32 head row (normalised mean of the templates' normalised embeddings) against the exact one
    from the exact (fp64) embeddings (m, D). Each embedding errs by E ≤ √D·encoder_bound (the text tower, with
    its projection, over at most max_position_embeddings tokens); its unit vector by 2E/‖e‖ + γ_{D+2}; their
    mean by the largest of those + γ_m; the final normalisation doubles that over ‖mean‖ and adds γ_{D+2}."""
    m, D = embeddings.shape
    tokens = clip.config.text_config.max_position_embeddings
    E = encoder_bound(clip.text_model, embeddings, tokens=tokens).amax(1) * D ** 0.5
    E = E + gamma(clip.text_projection.in_features) * embeddings.abs().amax(1) * D ** 0.5  # the projection
    unit = 2 * E / embeddings.norm(dim=1) + gamma(D + 2)
    mean = F.normalize(embeddings, dim=-1).mean(0)
    return 2 * (unit.max() + gamma(m)) / mean.norm() + gamma(D + 2)


def test_heads_equal_direct_computation(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    classes = {"pets": ["cat", "golden retriever", "hamster"], "digits": ["0", "1"]}
    templates = {"pets": ["a photo of a {}.", "a {} at home."], "digits": ["the number {}."]}
    heads = zero_shot_heads(clip, tok, classes, templates=templates, batch_size=3)  # batches split classes
    clip64 = copy.deepcopy(clip).double()  # the direct computation in fp64, one prompt at a time, no padding
    for task, names in classes.items():
        direct, bounds = [], []
        for c in names:
            e = torch.stack([_direct_text_embedding(clip64, tok, t.format(c)) for t in templates[task]])
            direct.append(F.normalize(F.normalize(e, dim=-1).mean(0), dim=-1))
            bounds.append(_head_bound(clip, e))
        assert heads[task].classes == tuple(names)
        assert heads[task].weight.shape == (len(names), PROJECTION)
        # Same tokens and weights; batching with padding changes only fp32 summation orders (causal attention
        # hides the padding): each fp32 row within its bound of the exact one
        assert_within(heads[task].weight, torch.stack(direct), torch.stack(bounds)[:, None], task)
        # a unit vector in fp32: ‖fl(v/‖v‖)‖ is 1 up to the norm's γ_{D+1} and the divisions' u
        assert_within(heads[task].weight.double().norm(dim=1), torch.ones(len(names)), gamma(PROJECTION + 2), task)


def test_template_choice_and_validation(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    generic = zero_shot_heads(clip, tok, {"mytask": ["a", "b"]})
    explicit = zero_shot_heads(clip, tok, {"mytask": ["a", "b"]}, templates=DEFAULT_TEMPLATES)
    assert torch.equal(generic["mytask"].weight, explicit["mytask"].weight)  # the same prompts: the same ops
    assert task_templates("eurosat") and task_templates("mytask") == ()
    known = zero_shot_heads(clip, tok, {"eurosat": ["forest", "river"]})
    own = zero_shot_heads(clip, tok, {"eurosat": ["forest", "river"]}, templates=list(task_templates("eurosat")))
    assert torch.equal(known["eurosat"].weight, own["eurosat"].weight)  # the same prompts: the same ops
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
    ft = finetuned_towers(mass.nn.clip.vision_encoder(clip), 2)
    model = mass.merge(clip, ft, heads=tensors, progress=False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model.classify(pixel_values=x, task_ids=["task1"] * 3)
    assert out.logits.shape == (3, 3)
    labels = heads.labels(out.task_ids, out.predictions, model.tasks)
    assert labels == [heads["task1"].classes[p] for p in out.predictions.tolist()]
    assert isinstance(heads, Heads) and heads.classes("task0") == ["cat", "dog"]
