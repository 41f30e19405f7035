"""Offline image-classification tasks: a small stand-in for the paper's 8-task CLIP benchmark.

No dataset can be downloaded here, so every task is built from data shipped inside installed packages
(scikit-learn's 8x8 ``load_digits``) or drawn procedurally (Pillow drawing, Pillow's built-in FreeType font
and, when matplotlib is installed, its bundled DejaVu fonts; numpy for textures). Each task imitates the
*look* of one of the paper's datasets, has its own label set, and carries nuisance variation (position,
scale, rotation, colour, background clutter, pixel noise) so that it is not trivial:

=================  =========================  ============================================================
task               stands in for              what an image looks like
=================  =========================  ============================================================
digits             MNIST                      sklearn 8x8 handwritten digit, upscaled, grey on black
house_numbers      SVHN                       font digit on a colourful blurry background, clipped
                                              neighbouring digits at the sides
signs              GTSRB                      traffic-sign-like badge (shape x colours x symbol) on clutter,
                                              dim or bright
textures           DTD                        banded / checkered / dotted / grid / zigzag / blotchy /
                                              marbled / fibrous texture, random colours, scale, angle
aerial             EuroSAT / RESISC45         top-down land use: forest, pasture, crops, river, highway,
                                              residential, industrial, sea
scenes             SUN397                     side-view scene: beach, mountains, city, forest, desert,
                                              night, snow field, sunset
shapes             Cars (object category)     one filled geometric shape on a flat noisy background
flags              (colour patterns)          waving flag; layout and colours both matter
letters            EMNIST (extra)             dark letter A-J on paper
gratings           (extra, orientation)       Gabor patch, class = orientation (8 bins)
counting           CLEVR-count (extra)        1..8 coloured dots
clocks             (extra, fine-grained)      analog clock, class = direction of the hour hand (8)
=================  =========================  ============================================================

The first 8 are the default benchmark (``make_tasks(n_tasks=8)``); up to 12 are available.

Splits are fixed: train, test and the pretraining pool (see :func:`make_pretrain_pool`) are drawn from
independent seed streams (``SeedSequence([seed, crc32(name), split])``), and for ``digits`` from disjoint
subsets of the 1,797 source digits (test digits are never used for training or pretraining). Everything
is deterministic for a given seed and environment (font files are part of the environment: when
matplotlib is not installed, only Pillow's default font is used for glyph tasks).

Images are 32x32 RGB, returned as float32 tensors (N, 3, 32, 32) normalised with CLIP's mean/std.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGE_SIZE = 32
_CANVAS = 64  # draw at 2x and downsample (anti-aliasing)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPLIT_TRAIN, SPLIT_TEST, SPLIT_PRETRAIN = 1, 2, 3


@dataclass
class Task:
    """One classification task: fixed train/test splits as CLIP-normalised float tensors."""

    name: str
    class_names: List[str]
    train_images: torch.Tensor  # (N_train, 3, 32, 32) float32, CLIP-normalised
    train_labels: torch.Tensor  # (N_train,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:  # keep tensors out of the repr
        return (f"Task({self.name!r}, classes={self.num_classes}, train={len(self.train_labels)}, "
                f"test={len(self.test_labels)})")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def _rng(seed: int, name: str, split: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), int(split)]))


def _balanced_labels(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    return labels


def normalize_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> CLIP-normalised float32 (N, 3, H, W)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised float (N, 3, H, W) -> float in [0, 1] (for plotting)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


@lru_cache(maxsize=64)
def _cubic_upsample_matrix(grid: int, size: int) -> np.ndarray:
    """(size x grid) Catmull-Rom interpolation matrix (edge-clamped), so that up = A @ g @ A.T."""
    A = np.zeros((size, grid), np.float32)
    for i in range(size):
        x = (i + 0.5) * grid / size - 0.5
        x0 = math.floor(x)
        t = x - x0
        w = [(-0.5 * t ** 3 + t ** 2 - 0.5 * t), (1.5 * t ** 3 - 2.5 * t ** 2 + 1),
             (-1.5 * t ** 3 + 2 * t ** 2 + 0.5 * t), (0.5 * t ** 3 - 0.5 * t ** 2)]
        for k, wk in zip(range(x0 - 1, x0 + 3), w):
            A[i, min(max(k, 0), grid - 1)] += wk
    return A


def _smooth_noise(rng: np.random.Generator, n: int, grid: int, size: int = IMAGE_SIZE, channels: int = 1) -> np.ndarray:
    """Low-frequency noise (unit-variance-ish): a (grid x grid) Gaussian field upsampled bicubically.

    Returns (n, size, size, channels) float32. Pure numpy (generators must not use torch: they may run in
    forked worker processes)."""
    g = rng.standard_normal((n, channels, grid, grid)).astype(np.float32)
    A = _cubic_upsample_matrix(grid, size)
    up = np.matmul(np.matmul(A, g), A.T)  # (n, c, size, size)
    return np.ascontiguousarray(up.transpose(0, 2, 3, 1))


def _finish(canvas: Image.Image, rng: np.random.Generator, noise: float, blur: float = 0.0) -> np.ndarray:
    """Downsample a 2x canvas to 32x32, optional blur, add Gaussian pixel noise; -> uint8 (32, 32, 3)."""
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    img = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    a = np.asarray(img, dtype=np.float32)
    if noise > 0:
        a = a + rng.normal(0.0, noise, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def _arr_to_canvas(a: np.ndarray) -> Image.Image:
    """float array (H, W, 3) in [0, 255] at any size -> RGB canvas of size _CANVAS."""
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if img.size != (_CANVAS, _CANVAS):
        img = img.resize((_CANVAS, _CANVAS), Image.BILINEAR)
    return img


def _rand_color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> Tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _jitter(rng: np.random.Generator, color: Sequence[int], amount: float) -> Tuple[int, int, int]:
    c = np.asarray(color, dtype=np.float32) + rng.normal(0, amount, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _scale_color(color: Sequence[int], s: float) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c * s, 0, 255)) for c in color)


@lru_cache(maxsize=1)
def _font_files() -> Tuple[str, ...]:
    """Font files available offline: matplotlib's bundled DejaVu fonts (if matplotlib is installed)."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return ()
    d = os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "fonts", "ttf")
    names = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
             "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf"]
    return tuple(os.path.join(d, n) for n in names if os.path.exists(os.path.join(d, n)))


@lru_cache(maxsize=256)
def _font(idx: int, size: int) -> ImageFont.FreeTypeFont:
    files = _font_files()
    n = len(files) + 1
    idx = idx % n
    if idx == 0:
        return ImageFont.load_default(size=size)  # Pillow's built-in FreeType font
    return ImageFont.truetype(files[idx - 1], size=size)


def _n_fonts() -> int:
    return len(_font_files()) + 1


def _draw_glyph(char: str, rng: np.random.Generator, size: int, color, stroke: int = 0,
                angle: float = 0.0, font_idx: Optional[int] = None) -> Image.Image:
    """A single glyph as an RGBA image (tight-ish crop), rotated by ``angle`` degrees."""
    fi = int(rng.integers(0, _n_fonts())) if font_idx is None else font_idx
    font = _font(fi, size)
    tile = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
    d = ImageDraw.Draw(tile)
    d.text((size, size), char, font=font, fill=tuple(color) + (255,), anchor="mm", stroke_width=stroke,
           stroke_fill=tuple(color) + (255,))
    bbox = tile.getbbox()
    if bbox:
        tile = tile.crop(bbox)
    if angle:
        tile = tile.rotate(angle, resample=Image.BILINEAR, expand=True)
    return tile


def _paste_center(canvas: Image.Image, tile: Image.Image, cx: float, cy: float) -> None:
    canvas.paste(tile, (int(round(cx - tile.width / 2)), int(round(cy - tile.height / 2))), tile)


def _regular_polygon(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# generators: (rng, labels, pool) -> uint8 (N, 32, 32, 3)
# ----------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _digits_source() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # shipped with scikit-learn (no download)

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def digits_pool(split: int) -> np.ndarray:
    """Indices of the source digits a split may use: test gets a fixed 40%, train and pretraining the rest."""
    _, y = _digits_source()
    perm = np.random.default_rng(12345).permutation(len(y))  # fixed, independent of the task seed
    n_test = int(0.4 * len(y))
    return np.sort(perm[:n_test]) if split == SPLIT_TEST else np.sort(perm[n_test:])


def _curated(split: int) -> bool:
    """Task splits (train/test) of the glyph tasks are *curated*: milder nuisances than the web-like
    pretraining pool, as MNIST or SVHN crops are centred and scaled while web images of digits are not. The
    pretraining split keeps the original, messier draw (same random calls, so the pool is unchanged)."""
    return split != SPLIT_PRETRAIN


def gen_digits(rng, labels, split):
    X, y = _digits_source()
    pool = digits_pool(split)
    by_class = {c: pool[y[pool] == c] for c in range(10)}
    curated = _curated(split)
    size, angle, shift, noise = ((44, 54), 8, 3, (2, 8)) if curated else ((30, 52), 20, 10, (4, 18))
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, c in enumerate(labels):
        src = X[rng.choice(by_class[int(c)])]
        s = int(rng.integers(*size))
        tile = Image.fromarray((src * 255).astype(np.uint8), "L").resize((s, s), Image.BICUBIC)
        tile = tile.rotate(float(rng.uniform(-angle, angle)), resample=Image.BILINEAR, expand=True)
        bg = float(rng.uniform(0, 40))
        canvas = Image.new("L", (_CANVAS, _CANVAS), int(bg))
        ink = float(rng.uniform(0.6, 1.0))
        tile = tile.point(lambda v, ink=ink: v * ink)
        cx, cy = rng.uniform(_CANVAS / 2 - shift, _CANVAS / 2 + shift, 2)
        canvas.paste(tile, (int(cx - tile.width / 2), int(cy - tile.height / 2)), tile)
        out[i] = _finish(canvas.convert("RGB"), rng, noise=float(rng.uniform(*noise)))
    return out


def gen_house_numbers(rng, labels, split):
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    bgs = _smooth_noise(rng, len(labels), 3, _CANVAS, 3)
    curated = _curated(split)
    size_range, shift, angle, blur = ((46, 56), 2, 4, 0.6) if curated else ((34, 50), 5, 10, 1.5)
    for i, c in enumerate(labels):
        base = np.asarray(_rand_color(rng, 30, 230), np.float32)
        canvas = _arr_to_canvas(base + 45 * bgs[i])
        mean_bg = base.mean()
        fg = _rand_color(rng, 0, 110) if mean_bg > 128 else _rand_color(rng, 150, 256)
        size = int(rng.integers(*size_range))
        fi = int(rng.integers(0, _n_fonts()))
        cx = _CANVAS / 2 + rng.uniform(-shift, shift)
        cy = _CANVAS / 2 + rng.uniform(-shift, shift)
        gap = size * rng.uniform(0.55, 0.75)
        for dx in (-1, 1):  # clipped neighbouring digits (distractors), as in SVHN crops
            if rng.random() < 0.7:
                t = _draw_glyph(str(int(rng.integers(0, 10))), rng, size, fg, angle=0, font_idx=fi)
                _paste_center(canvas, t, cx + dx * gap * 1.6, cy)
        tile = _draw_glyph(str(int(c)), rng, size, fg, stroke=int(rng.integers(0, 2)),
                           angle=float(rng.uniform(-angle, angle)), font_idx=fi)
        _paste_center(canvas, tile, cx, cy)
        out[i] = _finish(canvas, rng, noise=float(rng.uniform(3, 12)), blur=float(rng.uniform(0, blur)))
    return out


_SIGNS = [
    # (shape, rim, fill, symbol, symbol colour)
    ("circle", (200, 20, 20), (245, 245, 245), None, None),
    ("circle", (200, 20, 20), (200, 20, 20), "hbar", (250, 250, 250)),
    ("circle", (20, 60, 180), (20, 60, 180), "arrow_up", (250, 250, 250)),
    ("circle", (20, 60, 180), (20, 60, 180), "arrow_right", (250, 250, 250)),
    ("triangle", (200, 20, 20), (245, 245, 245), "excl", (20, 20, 20)),
    ("triangle_down", (200, 20, 20), (245, 245, 245), None, None),
    ("octagon", (245, 245, 245), (200, 20, 20), "hbar", (250, 250, 250)),
    ("diamond", (245, 245, 245), (240, 200, 20), None, None),
    ("square", (245, 245, 245), (20, 60, 180), "vbar", (250, 250, 250)),
    ("circle", (40, 40, 40), (245, 245, 245), "diag", (30, 30, 30)),
]
_SIGN_NAMES = ["no vehicles", "no entry", "ahead only", "turn right", "caution", "yield", "stop",
               "priority road", "parking", "end of restriction"]


def _sign_outline(shape, cx, cy, r):
    if shape == "circle":
        return None
    if shape == "triangle":
        return _regular_polygon(cx, cy + 0.15 * r, r * 1.1, 3, -math.pi / 2)
    if shape == "triangle_down":
        return _regular_polygon(cx, cy - 0.15 * r, r * 1.1, 3, math.pi / 2)
    if shape == "octagon":
        return _regular_polygon(cx, cy, r, 8, math.pi / 8)
    if shape == "diamond":
        return _regular_polygon(cx, cy, r, 4, 0)
    if shape == "square":
        return _regular_polygon(cx, cy, r * 1.05, 4, math.pi / 4)
    raise ValueError(shape)


def _draw_sign(d: ImageDraw.ImageDraw, cls: int, cx, cy, r, bright):
    shape, rim, fill, sym, symc = _SIGNS[cls]
    rim, fill = _scale_color(rim, bright), _scale_color(fill, bright)
    rim_w = 0.2 * r
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rim)
        ri = r - rim_w
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=fill)
    else:
        d.polygon(_sign_outline(shape, cx, cy, r), fill=rim)
        d.polygon(_sign_outline(shape, cx, cy, r * 0.72), fill=fill)
    if sym is None:
        return
    symc = _scale_color(symc, bright)
    w = 0.16 * r
    if sym == "hbar":
        d.rectangle([cx - 0.55 * r, cy - w, cx + 0.55 * r, cy + w], fill=symc)
    elif sym == "vbar":
        d.rectangle([cx - w * 1.2, cy - 0.5 * r, cx + w * 1.2, cy + 0.5 * r], fill=symc)
    elif sym == "excl":
        d.rectangle([cx - w * 0.7, cy - 0.25 * r, cx + w * 0.7, cy + 0.25 * r], fill=symc)
        d.ellipse([cx - w, cy + 0.35 * r, cx + w, cy + 0.35 * r + 2 * w], fill=symc)
    elif sym == "diag":
        d.line([cx - 0.6 * r, cy + 0.6 * r, cx + 0.6 * r, cy - 0.6 * r], fill=symc, width=max(2, int(w * 1.5)))
    elif sym in ("arrow_up", "arrow_right"):
        pts = [(0, -0.6), (0.4, -0.1), (0.15, -0.1), (0.15, 0.6), (-0.15, 0.6), (-0.15, -0.1), (-0.4, -0.1)]
        if sym == "arrow_right":
            pts = [(-y, x) for x, y in pts]
        d.polygon([(cx + x * r, cy + y * r) for x, y in pts], fill=symc)


def gen_signs(rng, labels, split):
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    bgs = _smooth_noise(rng, len(labels), 4, _CANVAS, 3)
    for i, c in enumerate(labels):
        base = np.asarray(_rand_color(rng, 40, 200), np.float32) * 0.6 + 50
        canvas = _arr_to_canvas(base + 50 * bgs[i])
        d = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(0, 4))):  # clutter
            x0, y0 = rng.uniform(0, _CANVAS, 2)
            d.rectangle([x0, y0, x0 + rng.uniform(5, 25), y0 + rng.uniform(5, 25)], fill=_rand_color(rng, 30, 200))
        bright = float(rng.uniform(0.35, 1.1))
        r = float(rng.uniform(15, 26))
        cx, cy = rng.uniform(_CANVAS / 2 - 6, _CANVAS / 2 + 6, 2)
        _draw_sign(d, int(c), cx, cy, r, bright)
        out[i] = _finish(canvas, rng, noise=float(rng.uniform(3, 12)), blur=float(rng.uniform(0, 1.2)))
    return out


_TEXTURES = ["banded", "checkered", "dotted", "grid", "zigzagged", "blotchy", "marbled", "fibrous"]


def gen_textures(rng, labels, split):
    curated = _curated(split)
    n = len(labels)
    s = IMAGE_SIZE
    yy, xx = np.meshgrid(np.arange(s) / s, np.arange(s) / s, indexing="ij")
    noise_lo = _smooth_noise(rng, n, 4)[..., 0]
    noise_hi = _smooth_noise(rng, n, 12)[..., 0]
    out = np.empty((n, s, s, 3), np.uint8)
    for i, c in enumerate(labels):
        th = rng.uniform(0, math.pi)
        u = xx * math.cos(th) + yy * math.sin(th)
        v = -xx * math.sin(th) + yy * math.cos(th)
        f = rng.uniform(3.0, 4.0) if curated else rng.uniform(2.5, 5.0)
        ph = rng.uniform(0, 1)
        name = _TEXTURES[int(c)]
        if name == "banded":
            p = (np.sin(2 * math.pi * (f * u + ph)) > rng.uniform(-0.3, 0.3)).astype(np.float32)
        elif name == "checkered":
            p = (np.sin(2 * math.pi * (f * u + ph)) * np.sin(2 * math.pi * (f * v + ph)) > 0).astype(np.float32)
        elif name == "dotted":
            du = (f * u + ph) % 1 - 0.5
            dv = (f * v + ph) % 1 - 0.5
            p = (du ** 2 + dv ** 2 < rng.uniform(0.04, 0.08)).astype(np.float32)
        elif name == "grid":
            du = np.abs((f * u + ph) % 1 - 0.5)
            dv = np.abs((f * v + ph) % 1 - 0.5)
            w = rng.uniform(0.08, 0.15)
            p = ((du > 0.5 - w) | (dv > 0.5 - w)).astype(np.float32)
        elif name == "zigzagged":
            g = rng.uniform(2.0, 4.0)
            tri = np.abs((g * v + ph) % 1 - 0.5) * 2
            p = (np.sin(2 * math.pi * (f * u + 0.6 * tri)) > 0).astype(np.float32)
        elif name == "blotchy":
            p = (noise_lo[i] + 0.8 * noise_hi[i] * 0.3 > rng.uniform(-0.3, 0.3)).astype(np.float32)
        elif name == "marbled":
            p = 0.5 + 0.5 * np.sin(2 * math.pi * (f * 0.6 * u + ph) + 3.0 * noise_lo[i])
        else:  # fibrous: many thin sines with nearly the same orientation
            p = np.zeros_like(u)
            for _ in range(6):
                t2 = th + rng.normal(0, 0.12)
                uu = xx * math.cos(t2) + yy * math.sin(t2)
                p += np.sin(2 * math.pi * (rng.uniform(5, 10) * uu + rng.uniform(0, 1)))
            p = 0.5 + p / 6
        c1 = np.asarray(_rand_color(rng), np.float32)
        c2 = np.asarray(_rand_color(rng), np.float32)
        if np.abs(c1 - c2).sum() < 150:
            c2 = 255 - c1
        img = c1 * (1 - p[..., None]) + c2 * p[..., None]
        img = img * (1 + 0.15 * noise_hi[i][..., None]) + rng.normal(0, rng.uniform(*((2, 6) if curated else (3, 15))), img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


_AERIAL = ["forest", "pasture", "annual crop", "river", "highway", "residential", "industrial", "sea or lake"]


def gen_aerial(rng, labels, split):
    n = len(labels)
    lo = _smooth_noise(rng, n, 4, _CANVAS)[..., 0]
    hi = _smooth_noise(rng, n, 24, _CANVAS)[..., 0]
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    land_colors = [(95, 120, 60), (120, 140, 70), (140, 125, 85), (110, 110, 70)]
    for i, c in enumerate(labels):
        name = _AERIAL[int(c)]
        land = np.asarray(_jitter(rng, land_colors[int(rng.integers(0, 4))], 12), np.float32)
        field = land + 18 * lo[i][..., None] + 8 * hi[i][..., None]
        if name == "forest":
            dark = np.asarray(_jitter(rng, (35, 70, 35), 10), np.float32)
            field = dark + 30 * hi[i][..., None] * np.array([0.6, 1.0, 0.6]) + 10 * lo[i][..., None]
        elif name == "pasture":
            field = np.asarray(_jitter(rng, (125, 165, 80), 12), np.float32) + 10 * lo[i][..., None]
        elif name == "sea or lake":
            water = np.asarray(_jitter(rng, (30, 70, 120), 15), np.float32)
            field = water + 10 * lo[i][..., None] + 4 * hi[i][..., None]
        canvas = _arr_to_canvas(field)
        d = ImageDraw.Draw(canvas)
        th = rng.uniform(0, math.pi)
        ct, st = math.cos(th), math.sin(th)
        cx, cy = rng.uniform(20, 44, 2)

        def line_through(off, width, color):
            px, py = cx - st * off, cy + ct * off
            d.line([px - 60 * ct, py - 60 * st, px + 60 * ct, py + 60 * st], fill=color, width=int(width))

        if name == "annual crop":
            w = rng.uniform(4, 9)
            cols = [_jitter(rng, (150, 140, 80), 15), _jitter(rng, (90, 130, 50), 15), _jitter(rng, (120, 95, 60), 15)]
            for k in range(-12, 13):
                line_through(k * w, w + 1, cols[k % 3])
        elif name == "river":
            water = _jitter(rng, (40, 80, 130), 15)
            amp, fr, ph = rng.uniform(3, 10), rng.uniform(0.05, 0.12), rng.uniform(0, 6.3)
            pts = []
            for t in np.linspace(-50, 50, 40):
                off = amp * math.sin(fr * t + ph)
                pts.append((cx + t * ct - off * st, cy + t * st + off * ct))
            d.line(pts, fill=water, width=int(rng.integers(5, 10)), joint="curve")
        elif name == "highway":
            line_through(0, rng.uniform(6, 10), _jitter(rng, (120, 120, 120), 12))
            line_through(0, 1, _jitter(rng, (210, 210, 200), 10))
            if rng.random() < 0.5:
                th2 = th + math.pi / 2 + rng.normal(0, 0.2)
                d.line([cx - 60 * math.cos(th2), cy - 60 * math.sin(th2), cx + 60 * math.cos(th2),
                        cy + 60 * math.sin(th2)], fill=_jitter(rng, (130, 125, 115), 10), width=3)
        elif name == "residential":
            step = rng.uniform(9, 13)
            roof = [(170, 80, 60), (150, 150, 150), (190, 120, 90), (110, 90, 80)]
            for gx in np.arange(-step, _CANVAS + step, step):
                for gy in np.arange(-step, _CANVAS + step, step):
                    if rng.random() < 0.85:
                        x0 = gx + rng.uniform(0, 2)
                        y0 = gy + rng.uniform(0, 2)
                        sz = step * rng.uniform(0.45, 0.65)
                        d.rectangle([x0, y0, x0 + sz, y0 + sz], fill=_jitter(rng, roof[int(rng.integers(0, 4))], 15))
        elif name == "industrial":
            d.rectangle([0, 0, _CANVAS, _CANVAS], fill=_jitter(rng, (120, 115, 105), 10))
            for _ in range(int(rng.integers(3, 7))):
                x0, y0 = rng.uniform(-10, 55, 2)
                d.rectangle([x0, y0, x0 + rng.uniform(15, 35), y0 + rng.uniform(12, 30)],
                            fill=_jitter(rng, (200, 200, 195), 25))
        elif name == "sea or lake" and rng.random() < 0.5:
            shore = _jitter(rng, (160, 150, 110), 15)
            line_through(-40 - rng.uniform(0, 15), 40, shore)
        out[i] = _finish(canvas, rng, noise=float(rng.uniform(2, 8)), blur=float(rng.uniform(0, 1.0)))
    return out


_SCENES = ["beach", "mountains", "city", "forest", "desert", "night", "snow field", "sunset"]


def _sky(top, bottom, h):
    t = np.linspace(0, 1, h)[:, None, None]
    return np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t


def gen_scenes(rng, labels, split):
    n = len(labels)
    hi = _smooth_noise(rng, n, 16, _CANVAS)[..., 0]
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    S = _CANVAS
    for i, c in enumerate(labels):
        name = _SCENES[int(c)]
        hz = int(rng.uniform(0.35, 0.65) * S)
        j = lambda col, a=15: _jitter(rng, col, a)  # noqa: E731
        if name == "night":
            sky = _sky(j((5, 5, 25), 5), j((20, 25, 60), 8), S)
        elif name == "sunset":
            sky = _sky(j((80, 60, 140)), j((250, 140, 60)), S)
        elif name == "snow field":
            sky = _sky(j((170, 175, 185)), j((215, 215, 220)), S)
        elif name == "desert":
            sky = _sky(j((120, 170, 230)), j((230, 225, 200)), S)
        else:
            sky = _sky(j((60, 120, 210)), j((170, 200, 235)), S)
        img = np.broadcast_to(sky, (S, S, 3)).copy()
        img = img + 4 * hi[i][..., None]
        canvas = _arr_to_canvas(img)
        d = ImageDraw.Draw(canvas)
        if name == "beach":
            d.rectangle([0, hz, S, S], fill=j((30, 90, 150)))
            sand_y = hz + rng.uniform(8, 20)
            d.polygon([(0, sand_y + rng.uniform(-4, 4)), (S, sand_y + rng.uniform(-4, 4)), (S, S), (0, S)],
                      fill=j((225, 205, 150)))
        elif name == "mountains":
            d.rectangle([0, hz, S, S], fill=j((70, 110, 60)))
            for _ in range(int(rng.integers(2, 5))):
                px, ph = rng.uniform(-5, S + 5), rng.uniform(15, hz + 5)
                w = rng.uniform(15, 30)
                col = j((110, 105, 115), 20)
                d.polygon([(px - w, hz + 2), (px, hz - ph), (px + w, hz + 2)], fill=col)
                d.polygon([(px - w * 0.25, hz - ph * 0.75), (px, hz - ph), (px + w * 0.25, hz - ph * 0.75)],
                          fill=j((240, 240, 245), 8))
        elif name == "city":
            d.rectangle([0, hz, S, S], fill=j((70, 70, 75)))
            x = rng.uniform(-5, 0)
            while x < S:
                w = rng.uniform(6, 14)
                h = rng.uniform(10, hz)
                col = j((80, 85, 100), 25)
                d.rectangle([x, hz - h, x + w, hz], fill=col)
                for wy in np.arange(hz - h + 3, hz - 2, 5):
                    if rng.random() < 0.5:
                        d.rectangle([x + 2, wy, x + 4, wy + 1], fill=j((230, 220, 150)))
                x += w + rng.uniform(0, 3)
        elif name == "forest":
            d.rectangle([0, hz, S, S], fill=j((50, 90, 40)))
            for _ in range(int(rng.integers(6, 14))):
                tx, ty = rng.uniform(0, S), hz + rng.uniform(-2, 10)
                h, w = rng.uniform(12, 26), rng.uniform(5, 10)
                d.rectangle([tx - 1, ty - 3, tx + 1, ty + 2], fill=j((80, 55, 30)))
                d.polygon([(tx - w, ty - 2), (tx, ty - h), (tx + w, ty - 2)], fill=j((25, 80, 35), 15))
        elif name == "desert":
            base = j((215, 175, 110))
            amp, fr, ph = rng.uniform(2, 6), rng.uniform(0.08, 0.2), rng.uniform(0, 6.3)
            d.polygon([(x, hz + amp * math.sin(fr * x + ph)) for x in range(0, S + 1, 4)] + [(S, S), (0, S)], fill=base)
            y2 = hz + rng.uniform(8, 18)
            d.polygon([(x, y2 + amp * math.sin(fr * 1.3 * x)) for x in range(0, S + 1, 4)] + [(S, S), (0, S)],
                      fill=_scale_color(base, 0.85))
        elif name == "night":
            for _ in range(int(rng.integers(8, 25))):
                sx, sy = rng.uniform(0, S), rng.uniform(0, hz)
                d.point([(sx, sy), (sx + 1, sy)], fill=j((240, 240, 220), 10))
            if rng.random() < 0.7:
                mx, my, mr = rng.uniform(8, S - 8), rng.uniform(5, hz * 0.6), rng.uniform(3, 6)
                d.ellipse([mx - mr, my - mr, mx + mr, my + mr], fill=j((230, 230, 200), 10))
            d.rectangle([0, hz, S, S], fill=j((15, 20, 20), 6))
        elif name == "snow field":
            d.rectangle([0, hz, S, S], fill=j((235, 238, 245), 8))
            for _ in range(int(rng.integers(0, 6))):
                sx = rng.uniform(0, S)
                sy = hz + rng.uniform(0, S - hz)
                d.line([sx, sy, sx, sy - rng.uniform(3, 10)], fill=j((50, 45, 40)), width=1)
        elif name == "sunset":
            sr = rng.uniform(4, 9)
            sx, sy = rng.uniform(10, S - 10), hz - rng.uniform(0, 10)
            d.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=j((255, 220, 120), 10))
            d.rectangle([0, hz, S, S], fill=j((40, 30, 30), 10))
        out[i] = _finish(canvas, rng, noise=float(rng.uniform(2, 10)), blur=float(rng.uniform(0, 1.0)))
    return out


_SHAPES = ["circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "semicircle"]


def _draw_shape(d, name, cx, cy, r, rot, color, bg):
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif name in ("square", "triangle", "pentagon", "hexagon"):
        k = {"square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6}[name]
        d.polygon(_regular_polygon(cx, cy, r, k, rot), fill=color)
    elif name == "star":
        pts = []
        for q in range(10):
            rr = r if q % 2 == 0 else r * 0.42
            a = rot + math.pi * q / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=color)
    elif name == "cross":
        w = 0.32 * r
        for a in (rot, rot + math.pi / 2):
            ca, sa = math.cos(a), math.sin(a)
            corners = [(-r, -w), (r, -w), (r, w), (-r, w)]
            d.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners], fill=color)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    elif name == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        ox, oy = 0.45 * r * math.cos(rot), 0.45 * r * math.sin(rot)
        d.ellipse([cx + ox - r * 0.85, cy + oy - r * 0.85, cx + ox + r * 0.85, cy + oy + r * 0.85], fill=bg)
    elif name == "semicircle":
        start = math.degrees(rot)
        d.pieslice([cx - r, cy - r, cx + r, cy + r], start, start + 180, fill=color)


def gen_shapes(rng, labels, split):
    curated = _curated(split)
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, c in enumerate(labels):
        bg = _rand_color(rng)
        col = _rand_color(rng)
        while sum(abs(a - b) for a, b in zip(bg, col)) < 180:
            col = _rand_color(rng)
        canvas = Image.new("RGB", (_CANVAS, _CANVAS), bg)
        d = ImageDraw.Draw(canvas)
        r = rng.uniform(22, 28) if curated else rng.uniform(12, 24)
        lo, hi = (_CANVAS / 2 - 3, _CANVAS / 2 + 3) if curated else (r + 2, _CANVAS - r - 2)
        cx, cy = rng.uniform(lo, hi, 2)
        rot = rng.uniform(0, 2 * math.pi)
        if curated:  # upright, within +-15 degrees
            rot = -math.pi / 2 + (rot / math.pi - 1) * math.radians(15)
        _draw_shape(d, _SHAPES[int(c)], cx, cy, r, rot, col, bg)
        out[i] = _finish(canvas, rng, noise=float(rng.uniform(*((2, 8) if curated else (4, 20)))))
    return out


_FLAGS = [
    ("vertical tricolour blue-white-red", "v3", [(0, 50, 150), (245, 245, 245), (210, 30, 40)]),
    ("vertical tricolour green-white-red", "v3", [(0, 140, 70), (245, 245, 245), (210, 30, 40)]),
    ("horizontal tricolour black-red-gold", "h3", [(20, 20, 20), (210, 0, 0), (255, 200, 0)]),
    ("horizontal tricolour red-white-blue", "h3", [(200, 20, 40), (245, 245, 245), (30, 60, 160)]),
    ("nordic cross white on red", "nordic", [(200, 20, 40), (245, 245, 245)]),
    ("nordic cross yellow on blue", "nordic", [(0, 80, 160), (255, 210, 0)]),
    ("red disc on white", "disc", [(245, 245, 245), (200, 0, 40)]),
    ("diagonal bicolour", "diag", [(0, 120, 60), (250, 220, 0)]),
    ("horizontal bicolour white-red", "h2", [(245, 245, 245), (220, 20, 60)]),
    ("stripes with blue canton", "canton", [(200, 20, 40), (245, 245, 245), (40, 50, 120)]),
]


def gen_flags(rng, labels, split):
    n = len(labels)
    W = H = _CANVAS
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    yy, xx = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
    for i, c in enumerate(labels):
        _, layout, cols = _FLAGS[int(c)]
        bright = rng.uniform(0.7, 1.1)
        cols = [np.asarray(_scale_color(_jitter(rng, col, 18), bright), np.float32) for col in cols]
        fw, fh = rng.uniform(40, 60), rng.uniform(28, 40)
        x0, y0 = rng.uniform(0, W - fw), rng.uniform(0, H - fh)
        amp, fr, ph = rng.uniform(0, 3.5), rng.uniform(0.1, 0.25), rng.uniform(0, 6.3)
        u = (xx - x0) / fw
        v = (yy - y0 - amp * np.sin(fr * xx + ph)) / fh  # waving
        inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
        if layout == "v3":
            idx = np.clip((u * 3).astype(int), 0, 2)
        elif layout == "h3":
            idx = np.clip((v * 3).astype(int), 0, 2)
        elif layout == "h2":
            idx = (v >= 0.5).astype(int)
        elif layout == "nordic":
            idx = ((np.abs(u - 0.37) < 0.09) | (np.abs(v - 0.5) < 0.13)).astype(int)
        elif layout == "disc":
            idx = (((u - 0.5) * fw) ** 2 + ((v - 0.5) * fh) ** 2 < (0.3 * fh) ** 2).astype(int)
        elif layout == "diag":
            idx = (u > v).astype(int)
        else:  # canton
            idx = ((v * 7).astype(int) % 2 == 1).astype(int)
            idx = np.where((u < 0.4) & (v < 0.55), 2, idx)
        palette = np.stack(cols)
        flag = palette[np.clip(idx, 0, len(cols) - 1)]
        shade = 1 + 0.12 * np.sin(fr * xx + ph + 1.0)[..., None]
        bg = np.asarray(_rand_color(rng, 60, 220), np.float32) * (1 + 0.1 * _smooth_noise(rng, 1, 3, W)[0])
        img = np.where(inside[..., None], flag * shade, bg)
        out[i] = _finish(_arr_to_canvas(img), rng, noise=float(rng.uniform(3, 12)), blur=float(rng.uniform(0, 0.8)))
    return out


_LETTERS = list("ABCDEFGHJK")


def gen_letters(rng, labels, split):
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    bgs = _smooth_noise(rng, len(labels), 6, _CANVAS, 1)
    for i, c in enumerate(labels):
        paper = np.asarray(_jitter(rng, (235, 228, 210), 12), np.float32)
        canvas = _arr_to_canvas(paper + 10 * bgs[i])
        ink = _jitter(rng, (30, 30, 40), 20)
        tile = _draw_glyph(_LETTERS[int(c)], rng, int(rng.integers(30, 50)), ink, stroke=int(rng.integers(0, 3)),
                           angle=float(rng.uniform(-20, 20)))
        cx, cy = rng.uniform(_CANVAS / 2 - 8, _CANVAS / 2 + 8, 2)
        _paste_center(canvas, tile, cx, cy)
        out[i] = _finish(canvas, rng, noise=float(rng.uniform(3, 12)), blur=float(rng.uniform(0, 1.0)))
    return out


def gen_gratings(rng, labels, split):
    n = len(labels)
    s = IMAGE_SIZE
    yy, xx = np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32), indexing="ij")
    out = np.empty((n, s, s, 3), np.uint8)
    for i, c in enumerate(labels):
        th = math.pi * (int(c) / 8.0) + rng.normal(0, 0.05)
        f = rng.uniform(2, 6) / s
        cx, cy = rng.uniform(8, 24, 2)
        sig = rng.uniform(6, 14)
        u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
        env = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig ** 2))
        p = 0.5 + 0.5 * np.sin(2 * math.pi * f * u + rng.uniform(0, 6.3)) * env
        c1 = np.asarray(_rand_color(rng), np.float32)
        c2 = np.asarray(_rand_color(rng), np.float32)
        img = c1 * (1 - p[..., None]) + c2 * p[..., None] + rng.normal(0, rng.uniform(5, 25), (s, s, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def gen_counting(rng, labels, split):
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, c in enumerate(labels):
        k = int(c) + 1
        bg = _rand_color(rng, 20, 120)
        canvas = Image.new("RGB", (_CANVAS, _CANVAS), bg)
        d = ImageDraw.Draw(canvas)
        placed: List[Tuple[float, float, float]] = []
        tries = 0
        while len(placed) < k and tries < 500:
            tries += 1
            r = rng.uniform(3, 6.5)
            x, y = rng.uniform(r + 1, _CANVAS - r - 1, 2)
            if all((x - a) ** 2 + (y - b) ** 2 > (r + rr + 2) ** 2 for a, b, rr in placed):
                placed.append((x, y, r))
                d.ellipse([x - r, y - r, x + r, y + r], fill=_rand_color(rng, 130, 256))
        out[i] = _finish(canvas, rng, noise=float(rng.uniform(3, 12)))
    return out


_CLOCK_DIRS = ["12", "1:30", "3", "4:30", "6", "7:30", "9", "10:30"]


def gen_clocks(rng, labels, split):
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, c in enumerate(labels):
        bg = _rand_color(rng, 0, 256)
        canvas = Image.new("RGB", (_CANVAS, _CANVAS), bg)
        d = ImageDraw.Draw(canvas)
        r = rng.uniform(20, 29)
        cx, cy = rng.uniform(_CANVAS / 2 - 3, _CANVAS / 2 + 3, 2)
        face = _jitter(rng, (235, 235, 225), 20)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=face, outline=_jitter(rng, (40, 40, 40), 20), width=2)
        for q in range(12):
            a = 2 * math.pi * q / 12
            d.line([cx + 0.8 * r * math.sin(a), cy - 0.8 * r * math.cos(a), cx + 0.95 * r * math.sin(a),
                    cy - 0.95 * r * math.cos(a)], fill=(60, 60, 60), width=1)
        hand = _jitter(rng, (20, 20, 30), 15)
        a = 2 * math.pi * int(c) / 8 + rng.normal(0, 0.08)
        am = rng.uniform(0, 2 * math.pi)
        d.line([cx, cy, cx + 0.85 * r * math.sin(am), cy - 0.85 * r * math.cos(am)], fill=hand, width=2)
        d.line([cx, cy, cx + 0.5 * r * math.sin(a), cy - 0.5 * r * math.cos(a)], fill=hand, width=5)
        out[i] = _finish(canvas, rng, noise=float(rng.uniform(3, 12)))
    return out


def gen_photos(rng, labels, split):
    """Random crops of the photos shipped with scikit-learn (pretraining mixture only, never a task)."""
    photos = _photos()
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(len(labels)):
        ph = photos[int(rng.integers(0, len(photos)))]
        h, w = ph.shape[:2]
        s = int(rng.integers(48, min(h, w) // 2))
        y0, x0 = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        img = Image.fromarray(ph[y0:y0 + s, x0:x0 + s]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        out[i] = np.asarray(img)
    return out


@lru_cache(maxsize=1)
def _photos() -> Tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images  # china.jpg, flower.jpg: shipped, no download

    return tuple(load_sample_images().images)


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    name: str
    class_names: Tuple[str, ...]
    generator: Callable
    stands_for: str


TASK_SPECS: Tuple[TaskSpec, ...] = (
    TaskSpec("digits", tuple(str(d) for d in range(10)), gen_digits, "MNIST"),
    TaskSpec("house_numbers", tuple(str(d) for d in range(10)), gen_house_numbers, "SVHN"),
    TaskSpec("signs", tuple(_SIGN_NAMES), gen_signs, "GTSRB"),
    TaskSpec("textures", tuple(_TEXTURES), gen_textures, "DTD"),
    TaskSpec("aerial", tuple(_AERIAL), gen_aerial, "EuroSAT / RESISC45"),
    TaskSpec("scenes", tuple(_SCENES), gen_scenes, "SUN397"),
    TaskSpec("shapes", tuple(_SHAPES), gen_shapes, "Cars (object category)"),
    TaskSpec("flags", tuple(f[0] for f in _FLAGS), gen_flags, "colour patterns"),
    TaskSpec("letters", tuple(_LETTERS), gen_letters, "EMNIST"),
    TaskSpec("gratings", tuple(f"{22.5 * k:g} deg" for k in range(8)), gen_gratings, "orientation"),
    TaskSpec("counting", tuple(str(k) for k in range(1, 9)), gen_counting, "CLEVR-count"),
    TaskSpec("clocks", tuple(_CLOCK_DIRS), gen_clocks, "fine-grained direction"),
)
MAX_TASKS = len(TASK_SPECS)
TASK_NAMES = tuple(s.name for s in TASK_SPECS)

# Pretraining-only family (not a task): natural-photo crops.
_EXTRA_PRETRAIN = (TaskSpec("photos", ("photo",), gen_photos, "natural photos"),)


_ALL_SPECS = {s.name: s for s in TASK_SPECS + _EXTRA_PRETRAIN}


def _generate(spec: TaskSpec, n: int, seed: int, split: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed, spec.name, split)
    labels = _balanced_labels(rng, n, len(spec.class_names))
    return spec.generator(rng, labels, split), labels


def _generate_job(job: Tuple[str, int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    name, n, seed, split = job
    return _generate(_ALL_SPECS[name], n, seed, split)


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _run_jobs(jobs: List[Tuple[str, int, int, int]], workers: Optional[int]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Run generation jobs, in forked worker processes when ``workers > 1`` (results do not depend on it:
    every job has its own seed stream)."""
    workers = _default_workers() if workers is None else workers
    if workers <= 1 or len(jobs) <= 1:
        return [_generate_job(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    try:
        ctx = mp.get_context("fork")
    except ValueError:  # pragma: no cover - platforms without fork
        return [_generate_job(j) for j in jobs]
    # largest jobs first for better packing
    order = sorted(range(len(jobs)), key=lambda k: -jobs[k][1])
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        res = dict(zip(order, ex.map(_generate_job, [jobs[k] for k in order])))
    return [res[k] for k in range(len(jobs))]


def make_task(name: str, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> Task:
    return make_tasks(names=[name], n_train=n_train, n_test=n_test, seed=seed, workers=1)[0]


def make_tasks(n_tasks: int = 8, n_train: int = 2000, n_test: int = 500, seed: int = 0,
               names: Optional[Sequence[str]] = None, workers: Optional[int] = None) -> List[Task]:
    """The first ``n_tasks`` tasks of :data:`TASK_SPECS` (or the given ``names``); deterministic in ``seed``
    (and independent of ``workers``, the number of generator processes; default min(2, cpus))."""
    if names is None:
        if not 1 <= n_tasks <= MAX_TASKS:
            raise ValueError(f"n_tasks must be in [1, {MAX_TASKS}], got {n_tasks}")
        names = TASK_NAMES[:n_tasks]
    for n in names:
        if n not in TASK_NAMES:
            raise KeyError(f"unknown task {n!r}; known: {TASK_NAMES}")
    jobs = []
    for n in names:
        jobs += [(n, n_train, seed, SPLIT_TRAIN), (n, n_test, seed, SPLIT_TEST)]
    res = _run_jobs(jobs, workers)
    tasks = []
    for k, n in enumerate(names):
        spec = _ALL_SPECS[n]
        (xtr, ytr), (xte, yte) = res[2 * k], res[2 * k + 1]
        tasks.append(Task(name=n, class_names=list(spec.class_names),
                          train_images=normalize_uint8(xtr), train_labels=torch.from_numpy(ytr).long(),
                          test_images=normalize_uint8(xte), test_labels=torch.from_numpy(yte).long(),
                          description=f"stand-in for {spec.stands_for}"))
    return tasks


def pretrain_families() -> Tuple[str, ...]:
    fams = list(TASK_NAMES)
    try:
        _photos()
        fams += [s.name for s in _EXTRA_PRETRAIN]
    except Exception:  # pragma: no cover - sklearn images missing
        pass
    return tuple(fams)


def make_pretrain_pool(n_per_family: int = 2000, seed: int = 0, workers: Optional[int] = None
                       ) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    """The pretraining mixture: fresh samples of *every* generator family (all 12, whatever ``n_tasks`` is),
    plus natural-photo crops, from the pretraining seed stream (disjoint from every train/test split; for
    ``digits`` drawn only from the non-test source digits).

    Returns uint8 images (N, 32, 32, 3), family ids (N,), per-family class labels (N,; -1 for the photo
    family, which has no classes), family names.
    """
    fams = pretrain_families()
    res = _run_jobs([(name, n_per_family, seed, SPLIT_PRETRAIN) for name in fams], workers)
    xs = [x for x, _ in res]
    ys = [np.full(len(x), fid, np.int64) for fid, x in enumerate(xs)]
    cs = [(y.astype(np.int64) if name in TASK_NAMES else np.full(len(y), -1, np.int64))
          for name, (_, y) in zip(fams, res)]
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(cs), fams
