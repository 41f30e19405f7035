"""Per-task labelled images for evaluation: image folders, ``datasets`` directories, hub datasets.

Every source is a map-style ``torch`` dataset of ``(pixel_values, label)`` with its class names; images are
decoded and preprocessed one at a time as batches are drawn, so a task's images never sit in memory together.
Preprocessing follows a CLIP image processor configuration (resize the shortest edge, centre crop, rescale,
normalise) with PIL only: no torchvision.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from mass.nn.encoders import CLIP_MEAN, CLIP_STD  # OpenAI CLIP's normalisation, when a configuration gives none

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """Labelled data that cannot be read or does not fit the task."""


# ---------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class ClipPreprocess:
    """PIL image → (3, crop_h, crop_w) float tensor, as a CLIP image processor does."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = 3  # PIL bicubic
    rescale: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True

    @classmethod
    def from_spec(cls, spec: Mapping) -> "ClipPreprocess":
        """From the plain dict a saved MASS model keeps (``MASSModel.preprocessing``: this class's fields, lists
        for tuples)."""
        spec = dict(spec)
        for name in ("crop", "mean", "std"):
            spec[name] = tuple(spec[name])
        return cls(**spec)

    @classmethod
    def from_config(cls, config: Mapping) -> "ClipPreprocess":
        """From a ``preprocessor_config.json`` dictionary."""
        size = config.get("size", 224)
        if isinstance(size, Mapping):
            size = size.get("shortest_edge", size.get("height"))
        crop = config.get("crop_size", size)
        if isinstance(crop, Mapping):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        if not isinstance(size, int) or size < 1:
            raise DataError(f"image processor config: cannot read a resize size from {config.get('size')!r}")
        return cls(
            shortest_edge=size, crop=tuple(int(c) for c in crop),
            mean=tuple(config.get("image_mean", CLIP_MEAN)), std=tuple(config.get("image_std", CLIP_STD)),
            resample=int(config.get("resample", 3)), rescale=float(config.get("rescale_factor", 1 / 255)),
            do_resize=bool(config.get("do_resize", True)), do_center_crop=bool(config.get("do_center_crop", True)),
            do_normalize=bool(config.get("do_normalize", True)),
        )

    @classmethod
    def from_pretrained(cls, source: str, image_size: Optional[int] = None) -> "ClipPreprocess":
        """From ``preprocessor_config.json`` in a directory or hub repository; without one, CLIP's defaults at
        ``image_size`` (which is then required)."""
        path = Path(source) / "preprocessor_config.json"
        if path.exists():
            return cls.from_config(json.loads(path.read_text()))
        from mass.files.hub import from_hub, is_hub_id

        if is_hub_id(str(source)):
            from huggingface_hub import hf_hub_download

            fetched = from_hub("image processor of", str(source),
                               lambda: hf_hub_download(str(source), "preprocessor_config.json"))
            return cls.from_config(json.loads(Path(fetched).read_text()))
        if image_size is None:
            raise DataError(f"{source!r} holds no preprocessor_config.json: give the image size")
        return cls(shortest_edge=image_size, crop=(image_size, image_size))

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        if self.do_resize:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
            if size != image.size:
                image = image.resize(size, resample=Image.Resampling(self.resample))
        if self.do_center_crop:
            w, h = image.size
            ch, cw = self.crop
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))  # pads with black when the crop is larger
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) * self.rescale
        if self.do_normalize:
            x = (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
        return x


# ---------------------------------------------------------------------------------------------- sources
class TaskData(torch.utils.data.Dataset):
    """One task's labelled images: ``(pixel_values, label)`` items and ``classes`` (label order)."""

    def __init__(self, name: str, classes: Sequence[str], preprocess, indices: Optional[Sequence[int]] = None):
        self.name = name
        self.classes = list(classes)
        self.preprocess = preprocess
        self._indices = None if indices is None else list(indices)

    def _size(self) -> int:
        raise NotImplementedError

    def _item(self, index: int):
        """(PIL image, label) of the underlying source."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._indices) if self._indices is not None else self._size()

    def __getitem__(self, i: int):
        image, label = self._item(self._indices[i] if self._indices is not None else i)
        if not 0 <= label < len(self.classes):
            raise DataError(f"task {self.name!r}: label {label} outside its {len(self.classes)} classes")
        return self.preprocess(image), label

    def subset(self, limit: Optional[int], seed: int = 0) -> "TaskData":
        """At most ``limit`` samples, drawn without replacement with a fixed seed (kept in source order)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        base = self._indices if self._indices is not None else range(self._size())
        pick = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._indices = [base[i] for i in pick.tolist()]
        return clone

    def batches(self, batch_size: int = 64, num_workers: int = 0):
        """A DataLoader over the task in order: (B, 3, H, W) images and (B,) labels per batch."""
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _visible(path: Path) -> bool:
    """Not hidden (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``): hidden entries are skipped."""
    return not path.name.startswith(".")


class ImageFolderData(TaskData):
    """``root/<class>/*.png|jpg...``; classes are the sorted folder names. Hidden folders and files (names
    starting with ".") are skipped; a class folder without images is refused (it would become a class of the
    head that no image can have)."""

    def __init__(self, root, preprocess, name: Optional[str] = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
        files = [(f, c) for c, cls in enumerate(classes) for f in sorted((root / cls).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES and _visible(f)]
        if not files:
            raise DataError(f"image folder {root} holds no images in class folders root/<class>/*"
                            f" (suffixes {sorted(IMAGE_SUFFIXES)})")
        used = {c for _, c in files}
        empty = [cls for c, cls in enumerate(classes) if c not in used]
        if empty:
            raise DataError(f"image folder {root}: class folder(s) {empty} hold no images (suffixes "
                            f"{sorted(IMAGE_SUFFIXES)}); remove them or add their images")
        super().__init__(name or root.name, classes, preprocess)
        self._files = files

    def _size(self):
        return len(self._files)

    def _item(self, index):
        from PIL import Image

        path, label = self._files[index]
        with Image.open(path) as image:
            image.load()
            return image, label


class HFDatasetData(TaskData):
    """A ``datasets.Dataset`` (memory-mapped Arrow) with an image column and a ``ClassLabel`` column."""

    def __init__(self, dataset, preprocess, name: str, image_column: Optional[str] = None,
                 label_column: Optional[str] = None, classes: Optional[Sequence[str]] = None):
        from datasets import ClassLabel, Image as ImageFeature

        features = dataset.features
        image_column = image_column or next((k for k, f in features.items() if isinstance(f, ImageFeature)), None)
        label_column = label_column or next((k for k, f in features.items() if isinstance(f, ClassLabel)), None)
        if label_column is None and classes is not None:  # integer labels named the usual ways
            label_column = next((k for k in ("label", "labels", "cls", "target") if k in features), None)
        if image_column not in features or label_column not in features:
            raise DataError(f"dataset for task {name!r}: need an Image column and a ClassLabel column (or integer "
                            f"labels and the class names), found { {k: type(f).__name__ for k, f in features.items()} }")
        feature = features[label_column]
        if classes is None:
            if not isinstance(feature, ClassLabel):
                raise DataError(f"dataset for task {name!r}: column {label_column!r} is not a ClassLabel; pass the "
                                f"class names in label order")
            classes = feature.names
        elif isinstance(feature, ClassLabel) and len(feature.names) != len(classes):
            raise DataError(f"dataset for task {name!r} has {len(feature.names)} classes, {len(classes)} names given")
        super().__init__(name, classes, preprocess)
        self._dataset, self._image, self._label = dataset, image_column, label_column

    def _size(self):
        return len(self._dataset)

    def _item(self, index):
        row = self._dataset[int(index)]
        return row[self._image], int(row[self._label])


def _pick_split(data, split: str, where: str):
    from datasets import DatasetDict

    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"{where} has no split {split!r} (splits: {sorted(data)})")
        return data[split]
    return data


def is_saved_dataset(path) -> bool:
    path = Path(path)
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
        path / "state.json").exists()


def load_task_data(source, preprocess, task: str, split: str = "test", config: Optional[str] = None,
                   classes: Optional[Sequence[str]] = None) -> TaskData:
    """One task's data from a ``save_to_disk`` directory, an image folder ``root/<class>/*``, or a hub
    dataset id (``ID`` or ``ID:CONFIG``; downloaded by ``datasets.load_dataset``, online only). ``classes``
    names the labels (in label order) where the source's own names are missing or unwanted."""
    if isinstance(source, TaskData):
        return source
    path = Path(source)
    if path.is_dir():
        if is_saved_dataset(path):
            from datasets import load_from_disk

            data = _pick_split(load_from_disk(str(path)), split, str(path))
            return HFDatasetData(data, preprocess, task, classes=classes)
        folder = ImageFolderData(path, preprocess, task)
        if classes is not None:
            if len(classes) != len(folder.classes):
                raise DataError(f"image folder {path} has {len(folder.classes)} classes, {len(classes)} names given")
            folder.classes = list(classes)
        return folder
    from mass.files.hub import HubUnavailableError, from_hub, is_hub_id

    repo, _, cfg = str(source).partition(":")
    if not is_hub_id(repo):
        if not path.exists():
            raise DataError(f"data for task {task!r}: the local path {source} does not exist "
                            f"(resolved to {path.absolute()}), and it is not a hub dataset id")
        raise DataError(f"data for task {task!r}: {source!r} is neither a directory nor a hub dataset id")
    if not path.exists() and _looks_local(path):
        raise DataError(f"data for task {task!r}: the local path {source} does not exist (resolved to "
                        f"{path.absolute()}; {path.parent} does exist)")
    from datasets import load_dataset

    try:
        data = from_hub(f"dataset for task {task!r}:", repo, lambda: load_dataset(repo, cfg or config, split=split))
    except HubUnavailableError as exc:  # say first that no local directory goes by that name
        raise HubUnavailableError(f"data for task {task!r}: no local directory {source} (resolved to "
                                  f"{path.absolute()}); as a hub dataset id: {exc}") from exc
    return HFDatasetData(data, preprocess, task, classes=classes)


def _looks_local(path: Path) -> bool:
    """A missing path meant as a local one, not a hub id: its parent folder exists (``data/dtd`` with a
    ``data`` folder here), or it is absolute or starts with ``.`` or ``~``."""
    text = str(path)
    return path.is_absolute() or text.startswith((".", "~")) or (path.parent != Path(".") and path.parent.is_dir())


def discover_image_folders(root, preprocess) -> dict[str, TaskData]:
    """``root/<task>/<class>/*`` → ``{task: ImageFolderData}`` (tasks in sorted order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist")
    return {p.name: ImageFolderData(p, preprocess, p.name) for p in sorted(root.iterdir())
            if p.is_dir() and _visible(p)}

