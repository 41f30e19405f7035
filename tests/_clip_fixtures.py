"""Offline stand-ins with the structure CLIP users have: a tiny two-tower ``CLIPModel`` and a ``CLIPTokenizer``
built from a vocabulary written here, fine-tuned vision towers in every saved form, image folders and a
``datasets`` directory."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 32
PROJECTION = 16
_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,-'\" ")


def write_tokenizer(directory):
    """A character-level CLIPTokenizer (no merges) saved in ``directory``."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = [c for c in _CHARS if c != " "]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tok.save_pretrained(str(directory))
    return tok


def tiny_clip(tokenizer, seed: int = 0, layers: int = 4):
    """A randomly initialised CLIPModel (vision 32-d × ``layers`` blocks on 32×32 images, text 32-d × 2)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=48, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=PROJECTION)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8, projection_dim=PROJECTION)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION)).eval()


def save_clip(directory, clip, tokenizer):
    """A full CLIP model directory: weights, config, tokenizer, image processor config."""
    directory = Path(directory)
    clip.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))
    return directory


@torch.no_grad()
def finetuned_towers(vision, n_tasks: int, scale: float = 0.05, seed: int = 3) -> dict[str, dict]:
    """Fine-tuned state dicts of a vision encoder with a projection: every parameter of the tower moved by
    noise of relative size ``scale``; ``visual_projection`` left unchanged, as public fine-tuned towers do."""
    from mass.method.synthetic import finetuned_like

    out = {}
    for name, sd in finetuned_like(vision, n_tasks, scale=scale, seed=seed).items():
        sd["visual_projection.weight"] = vision.visual_projection.weight.detach().clone()
        out[name] = sd
    return out


def without_projection(sd: dict) -> dict:
    """What a ``CLIPVisionModel`` checkpoint holds: the tower's keys only."""
    return {k: v for k, v in sd.items() if not k.startswith("visual_projection")}


_BLOCK = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_TOP = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
        "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
        "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
        "post_layernorm.bias": "ln_post.bias"}
_INNER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
          "self_attn.out_proj": "attn.out_proj"}


def hf_to_openclip(sd: dict, prefix: str = "visual.") -> dict:
    """The inverse of mass.files.openclip (test-only): HF CLIP vision names → open_clip names under ``prefix``,
    q/k/v fused into ``in_proj``, ``visual_projection`` transposed into ``proj``."""
    out, fused = {}, {}
    for key, value in sd.items():
        if key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()
            continue
        if key.endswith("position_ids"):
            continue
        m = _BLOCK.match(key)
        if m is None:
            out[_TOP[key[len("vision_model."):]]] = value
            continue
        i, rest = m.groups()
        module, _, param = rest.rpartition(".")
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault((i, param), {})[module[-6]] = value
            continue
        out[f"transformer.resblocks.{i}.{_INNER[module]}.{param}"] = value
    for (i, param), parts in fused.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {prefix + k: v for k, v in out.items()}


def _image(rng: np.random.Generator, tint):
    from PIL import Image

    pixels = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    pixels = np.clip(0.5 * pixels + 0.5 * np.asarray(tint, dtype=np.float32), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def task_images(tasks: dict[str, list[str]], per_class: int, seed: int = 0):
    """{task: [(PIL image, label)]}: noise images tinted per task and class (deterministic)."""
    rng = np.random.default_rng(seed)
    out = {}
    for ti, (task, classes) in enumerate(tasks.items()):
        items = []
        for c in range(len(classes)):
            tint = [(97 * ti + 31 * c) % 256, (57 * ti + 89 * c) % 256, (13 * ti + 151 * c) % 256]
            items += [(_image(rng, tint), c) for _ in range(per_class)]
        out[task] = items
    return out


def write_image_folders(root, images: dict) -> Path:
    """root/<task>/<class>/<i>.png"""
    root = Path(root)
    for task, items in images.items():
        classes = sorted({c for _, c in items})
        for i, (image, label) in enumerate(items):
            folder = root / task / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:03d}.png")
        assert classes == list(range(len(classes)))
    return root


def write_saved_dataset(path, items, class_names, split: str = "test") -> Path:
    """A ``datasets`` DatasetDict with one split, written with ``save_to_disk``."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names))})
    ds = Dataset.from_dict({"image": [im for im, _ in items], "label": [c for _, c in items]}, features=features)
    DatasetDict({split: ds}).save_to_disk(str(path))
    return Path(path)


def fine_tune(vision, x: torch.Tensor, y: torch.Tensor, head: torch.Tensor, steps: int = 25, lr: float = 3e-3,
              seed: int = 0) -> dict:
    """A copy of ``vision`` trained on (x, y) against a fixed zero-shot head (projection frozen, as the public
    fine-tuned towers are); returns its state dict. Full batch, Adam, deterministic."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = copy.deepcopy(vision).train()
    model.visual_projection.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    w = F.normalize(head.float(), dim=-1)
    for _ in range(steps):
        opt.zero_grad()
        logits = 100.0 * F.normalize(model(pixel_values=x).image_embeds, dim=-1) @ w.T
        F.cross_entropy(logits, y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.eval().state_dict().items()}
def fine_tune_tasks(vision, data, heads, steps: int = 25) -> dict:
    """``{task: state dict}``: per task of ``data`` (``{task: dataset of (pixel_values, label)}``), :func:`fine_tune`
    on all its items against its zero-shot head, with the task's index as the seed."""
    out = {}
    for i, task in enumerate(data):
        images, labels = zip(*data[task])  # each item read (and preprocessed) once
        x, y = torch.stack(images), torch.tensor(labels)
        out[task] = fine_tune(vision, x, y, heads[task].weight, steps=steps, seed=i)
    return out


