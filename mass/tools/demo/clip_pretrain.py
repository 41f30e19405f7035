"""The demo's pretrained model: a tiny two-tower CLIP trained contrastively, offline, on captioned images.

Real MASS users start from a CLIP model trained on web images with their captions, whose zero-shot heads
(text embeddings of "a photo of a {class}") are far below fine-tuned accuracy on specialised tasks (CLIP
ViT-B/32 on the paper's 8 tasks: about 48% against 93%). This module builds the offline stand-in:

* **Images**: the pretraining pool of :func:`mass.tools.demo.tasks.make_pretrain_pool` (fresh samples of all 12
  generator families plus crops of two photos, from a seed stream disjoint from every task's train and test
  split).
* **Captions**: web-like and imperfect. Each caption names the *kind* of image (``"a satellite photo"``,
  ``"a road sign"``); it names the image's class only with a per-family probability (:data:`CLASS_RATE`: often
  for scenes and flags, rarely for digits, house numbers or gratings, as the web describes photos more than
  MNIST digits), and when it does, it names a random class of the family instead with probability
  :data:`WRONG_CLASS_RATE` (caption noise). Captions are drawn afresh at every step.
* **Tokenizer**: word level, built from the caption and prompt vocabulary (a ``transformers``
  ``PreTrainedTokenizerFast``, saved with the model like any CLIP tokenizer).
* **Objective**: CLIP's symmetric contrastive loss over a batch, images against the batch's distinct captions;
  images with the same caption are all positives of it (captions repeat, unlike on the web).

The result is committed (``mass/tools/demo/assets/pretrained_clip``, with the command, seed and SHA-256 in
``PROVENANCE.json``) so that ``mass demo`` only fine-tunes. Reproduce it with
``python -m mass.tools.demo.clip_pretrain --out DIR`` (bit-exactness across machines is not promised: float
reductions differ between CPUs).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mass.files.atomic import file_sha256 as sha256_of

from .schedule import warmup_cosine
from .tasks import TASK_SPECS, make_pretrain_pool, normalize_uint8

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "pretrained_clip"

#: What captions call each family (one phrase is drawn per caption).
FAMILY_PHRASES: Dict[str, tuple] = {
    "digits": ("handwritten digit", "digit"),
    "house_numbers": ("house number", "street number"),
    "signs": ("traffic sign", "road sign"),
    "textures": ("texture", "surface pattern"),
    "aerial": ("satellite photo", "aerial view"),
    "scenes": ("scene", "landscape photo"),
    "shapes": ("shape", "geometric shape"),
    "flags": ("flag", "national flag"),
    "letters": ("letter", "printed letter"),
    "gratings": ("grating", "striped patch"),
    "counting": ("group of dots", "set of dots"),
    "clocks": ("clock", "clock face"),
    "photos": ("photo", "snapshot"),
}

#: How often a caption names the image's class, per family (the rest name only the kind of image).
CLASS_RATE: Dict[str, float] = {
    "digits": 0.3, "house_numbers": 0.25, "signs": 0.4, "textures": 0.35, "aerial": 0.35, "scenes": 0.6,
    "shapes": 0.45, "flags": 0.5, "letters": 0.4, "gratings": 0.2, "counting": 0.25, "clocks": 0.25,
}
#: Probability that a caption naming a class names a wrong one (drawn uniformly from the family's classes).
WRONG_CLASS_RATE = 0.3

_CAPTION_FAMILY_ONLY = ("a photo of a {f}.", "a {f}.", "an image of a {f}.", "a picture showing a {f}.")
_CAPTION_WITH_CLASS = ("a photo of a {f}: {c}.", "a {f}, {c}.", "{c}, a {f}.", "an image of a {f} showing {c}.")

#: Zero-shot prompt templates of the benchmark tasks (``{}`` is the class name), in CLIP's style.
TASK_TEMPLATES: Dict[str, tuple] = {
    "digits": ("a photo of the handwritten digit {}.", "a digit: {}."),
    "house_numbers": ("a photo of the house number {}.", "a street number: {}."),
    "signs": ("a photo of a {} traffic sign.", "a road sign: {}."),
    "textures": ("a photo of a {} texture.", "a {} surface pattern."),
    "aerial": ("a satellite photo of {}.", "an aerial view of {}."),
    "scenes": ("a photo of a {}.", "a landscape photo of a {}."),
    "shapes": ("a photo of a {} shape.", "a geometric shape: {}."),
    "flags": ("a photo of a flag: {}.", "a national flag, {}."),
    "letters": ("a photo of the letter {}.", "a printed letter: {}."),
    "gratings": ("a photo of a grating at {}.", "a striped patch, {}."),
    "counting": ("a photo of {} dots.", "a group of dots: {}."),
    "clocks": ("a photo of a clock showing {}.", "a clock face: {}."),
}

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_WORD = re.compile(r"\w+|[^\w\s]+")


def class_names() -> Dict[str, tuple]:
    return {s.name: tuple(s.class_names) for s in TASK_SPECS}


def caption(rng: np.random.Generator, family: str, cls: int) -> str:
    """One web-like caption for an image of ``family`` whose class index is ``cls`` (-1: no classes)."""
    phrase = FAMILY_PHRASES[family][int(rng.integers(len(FAMILY_PHRASES[family])))]
    names = class_names().get(family)
    if cls < 0 or names is None or rng.random() >= CLASS_RATE[family]:
        return _CAPTION_FAMILY_ONLY[int(rng.integers(len(_CAPTION_FAMILY_ONLY)))].format(f=phrase)
    if rng.random() < WRONG_CLASS_RATE:
        cls = int(rng.integers(len(names)))
    template = _CAPTION_WITH_CLASS[int(rng.integers(len(_CAPTION_WITH_CLASS)))]
    return template.format(f=phrase, c=names[cls])


def vocabulary() -> List[str]:
    """Every word of every caption and prompt the demo can produce, lower-cased, sorted."""
    texts = [t.format(f=p, c="") for p_list in FAMILY_PHRASES.values() for p in p_list
             for t in _CAPTION_FAMILY_ONLY + _CAPTION_WITH_CLASS]
    texts += [t.format("") for ts in TASK_TEMPLATES.values() for t in ts]
    texts += [c for names in class_names().values() for c in names]
    return sorted({w for text in texts for w in _WORD.findall(text.lower())})


def build_tokenizer(words: Sequence[str], max_length: int = 32):
    """A word-level tokenizer (``transformers.PreTrainedTokenizerFast``): lower-cases, splits words and
    punctuation, wraps every text in ``<bos> ... <eos>``; unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIALS) + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    # vision tower (the demo's CLIPVisionModel) and text tower
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 128
    vision_intermediate: int = 512
    vision_layers: int = 6
    vision_heads: int = 4
    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 64
    # data and optimisation
    per_family: int = 2000
    steps: int = 2000
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05


def build_clip(cfg: PretrainConfig, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, vocab_size=len(tokenizer),
                max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                projection_dim=cfg.projection_dim)
    vision = dict(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.projection_dim)
    torch.manual_seed(cfg.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def image_embeddings(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    return clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)


def text_embeddings(clip, tokens) -> torch.Tensor:
    out = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return clip.text_projection(out.pooler_output)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, caption_ids: torch.Tensor, scale: torch.Tensor):
    """CLIP's symmetric loss with repeated captions: image i's positive is its caption ``caption_ids[i]``;
    each distinct caption's positives are all the images carrying it (uniform target)."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # (B images, U captions)
    image_loss = F.cross_entropy(logits, caption_ids)
    onehot = F.one_hot(caption_ids, txt.shape[0]).float()  # (B, U)
    target = (onehot / onehot.sum(0, keepdim=True)).T  # (U, B): uniform over each caption's images
    text_loss = -(target * logits.T.log_softmax(-1)).sum(-1).mean()
    return 0.5 * (image_loss + text_loss), logits


def pretrain(cfg: PretrainConfig, progress: bool = True, log=print, checkpoint=None, checkpoint_every: int = 0):
    """Train the tiny CLIP model; returns ``(clip_model, tokenizer, stats)``. ``checkpoint(step, clip,
    tokenizer)`` is called every ``checkpoint_every`` steps (0: never)."""
    tokenizer = build_tokenizer(vocabulary())
    clip = build_clip(cfg, tokenizer)
    t0 = time.perf_counter()
    images, families, classes, family_names = make_pretrain_pool(cfg.per_family, seed=cfg.seed)
    log(f"[clip_pretrain] {len(images)} images of {len(family_names)} families in {time.perf_counter() - t0:.0f}s")
    decay = [p for p in clip.parameters() if p.ndim >= 2]
    no_decay = [p for p in clip.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, cfg.warmup_frac))
    g = torch.Generator().manual_seed(cfg.seed + 11)
    rng = np.random.default_rng(cfg.seed + 13)
    x_all = torch.from_numpy(images)
    clip.train()
    ema = None
    bar = tqdm(range(cfg.steps), desc="pretrain CLIP", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch,), generator=g)
        caps = [caption(rng, family_names[families[i]], int(classes[i])) for i in idx.tolist()]
        unique = sorted(set(caps))
        caption_ids = torch.tensor([unique.index(c) for c in caps])
        tokens = tokenizer(unique, padding=True, return_tensors="pt")
        img = image_embeddings(clip, normalize_uint8(x_all[idx]))
        txt = text_embeddings(clip, tokens)
        loss, logits = contrastive_loss(img, txt, caption_ids, clip.logit_scale.exp().clamp(max=100.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        acc = logits.argmax(1).eq(caption_ids).float().mean().item()
        ema = acc if ema is None else 0.95 * ema + 0.05 * acc
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", caption_acc=f"{ema:.2f}", scale=f"{clip.logit_scale.exp().item():.1f}")
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            checkpoint(step + 1, clip, tokenizer)
            clip.train()
    stats = {"seconds": time.perf_counter() - t0, "final_loss": float(loss.item()),
             "train_caption_acc_ema": float(ema or 0.0), "n_images": int(len(images)),
             "families": list(family_names)}
    return clip.eval(), tokenizer, stats


def save_asset(directory: Path, clip, tokenizer, cfg: PretrainConfig, stats: dict, command: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    weights = directory / "model.safetensors"
    provenance = {"command": command, "config": asdict(cfg), "stats": stats, "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "sha256": {"model.safetensors": sha256_of(weights)},
                  "class_rate": CLASS_RATE, "wrong_class_rate": WRONG_CLASS_RATE}
    (directory / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return directory


def weights_sha256(directory: Optional[Path] = None) -> str:
    """The SHA-256 of the pretrained weights, as recorded in ``PROVENANCE.json`` and checked against the file."""
    directory = Path(directory or ASSET_DIR)
    provenance = json.loads((directory / "PROVENANCE.json").read_text())
    want = provenance["sha256"]["model.safetensors"]
    got = sha256_of(directory / "model.safetensors")
    if got != want:
        raise RuntimeError(f"{directory / 'model.safetensors'}: SHA-256 {got} differs from PROVENANCE.json's {want}")
    return got


def load_asset(directory: Optional[Path] = None):
    """``(clip_model, tokenizer)`` of the committed pretrained model; the weights' SHA-256 is checked."""
    from transformers import AutoTokenizer, CLIPModel

    from transformers.utils import logging as hf_logging

    directory = Path(directory or ASSET_DIR)
    weights_sha256(directory)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a 6 MB file is noise
    try:
        clip = CLIPModel.from_pretrained(str(directory)).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return clip, tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mass.tools.demo.clip_pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ASSET_DIR), help="directory to write (default: the committed asset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(seed=args.seed, steps=args.steps)
    clip, tokenizer, stats = pretrain(cfg)
    command = f"python -m mass.tools.demo.clip_pretrain --seed {args.seed} --steps {args.steps}" + (
        f" --threads {args.threads}" if args.threads else "")
    out = save_asset(Path(args.out), clip, tokenizer, cfg, stats, command)
    print(f"written {out} ({stats['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
