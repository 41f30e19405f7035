"""The public CLIP merging benchmarks (8 / 14 / 20 tasks; ViT-B/32, B/16, L/14) as presets for ``mass eval``.

Checkpoints are the fine-tuned vision towers published for FusionBench (``tanganke/clip-vit-<arch>_<task>``,
HF ``CLIPVisionModel`` directories without ``visual_projection``); the pretrained model is OpenAI's CLIP.
Class names come from each dataset's ``ClassLabel`` feature. Dataset ids follow FusionBench's test-set
configurations where we could check them; the others (``verified=False``: fer2013, rendered-sst2) are our best
guess. None was loaded from here (no network): override an id with ``--data TASK=ID_OR_DIR``, and give
``--classes`` where a dataset's labels carry no names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the suffix of the fine-tuned checkpoint ids
    dataset: str  # hub dataset id
    config: Optional[str] = None  # hub dataset configuration
    split: str = "test"
    verified: bool = True  # dataset id checked against FusionBench's configuration
    templates: tuple[str, ...] = field(default_factory=tuple)


def _t(*templates: str) -> tuple[str, ...]:
    return tuple(templates)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("sun397", "tanganke/sun397", templates=_t("a photo of a {}.", "a picture of the {}, a kind of place.",
                                                        "a scene showing a {}.")),
    TaskSpec("stanford-cars", "tanganke/stanford_cars", templates=_t("a photo of a {}.", "a photo of the {}, a car.",
                                                                     "a picture of my {}.", "a {} parked outside.")),
    TaskSpec("resisc45", "tanganke/resisc45", templates=_t("satellite imagery of {}.", "an aerial view of {}.",
                                                           "a remote sensing image of {}.")),
    TaskSpec("eurosat", "tanganke/eurosat", templates=_t("a satellite photo of {}.", "an overhead image of {}.",
                                                         "a centered satellite view of {}.")),
    TaskSpec("svhn", "svhn", config="cropped_digits",
             templates=_t('a photo of the number "{}".', 'a street sign showing the digit "{}".')),
    TaskSpec("gtsrb", "tanganke/gtsrb", templates=_t('a photo of the traffic sign "{}".',
                                                     'a road sign meaning "{}".', 'a blurry photo of a "{}" sign.')),
    TaskSpec("mnist", "mnist", templates=_t('a photo of the number "{}".', 'a handwritten digit "{}".')),
    TaskSpec("dtd", "tanganke/dtd", templates=_t("a photo of a {} texture.", "a {} pattern.",
                                                 "a close-up of a {} surface.")),
    TaskSpec("oxford_flowers102", "dpdl-benchmark/oxford_flowers102",
             templates=_t("a photo of a {}, a type of flower.", "a close-up of a {} flower.")),
    TaskSpec("pcam", "1aurent/PatchCamelyon",
             templates=_t("a histopathology image of {}.", "a microscope slide of lymph node tissue showing {}.")),
    TaskSpec("fer2013", "tanganke/fer2013", verified=False,
             templates=_t("a photo of a {} looking face.", "a face showing the emotion: {}.")),
    TaskSpec("oxford-iiit-pet", "timm/oxford-iiit-pet",
             templates=_t("a photo of a {}, a type of pet.", "a picture of my {}, a pet.")),
    TaskSpec("stl10", "tanganke/stl10", templates=_t("a photo of a {}.", "a picture of the {}.")),
    TaskSpec("cifar100", "tanganke/cifar100", templates=_t("a photo of a {}.", "a blurry photo of the {}.",
                                                           "a low resolution photo of a {}.")),
    TaskSpec("cifar10", "tanganke/cifar10", templates=_t("a photo of a {}.", "a blurry photo of the {}.",
                                                         "a low resolution photo of a {}.")),
    TaskSpec("food101", "ethz/food101", split="validation",
             templates=_t("a photo of {}, a type of food.", "a plate of {}.")),
    TaskSpec("fashion_mnist", "zalando-datasets/fashion_mnist",
             templates=_t("a photo of a {}.", "a grayscale image of a {}, a piece of clothing.")),
    TaskSpec("emnist_letters", "tanganke/emnist_letters",
             templates=_t('a photo of the letter "{}".', 'a handwritten letter "{}".')),
    TaskSpec("kmnist", "tanganke/kmnist", templates=_t('a photo of the character "{}".',
                                                       'a handwritten Japanese character "{}".')),
    TaskSpec("rendered-sst2", "tanganke/rendered-sst2", verified=False,
             templates=_t("a {} review of a movie.", "text expressing a {} opinion.")),
]}

TASK_SETS = {
    8: ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"],
}
TASK_SETS[14] = TASK_SETS[8] + ["oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100"]
TASK_SETS[20] = TASK_SETS[14] + ["cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2"]

ARCHS = {"vit-b-32": "clip-vit-base-patch32", "vit-b-16": "clip-vit-base-patch16", "vit-l-14": "clip-vit-large-patch14"}


@dataclass(frozen=True)
class Preset:
    name: str
    pretrained: str  # hub id of the full CLIP model (vision + text towers, tokenizer, image processor)
    finetuned: dict  # task -> hub id of the fine-tuned vision tower
    tasks: tuple[TaskSpec, ...]


def preset(name: str) -> Preset:
    """``vit-b-32-8``, ``vit-l-14-20``, ...: architecture and task count."""
    arch, _, count = name.rpartition("-")
    if arch not in ARCHS or not count.isdigit() or int(count) not in TASK_SETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    model = ARCHS[arch]
    tasks = tuple(TASKS[t] for t in TASK_SETS[int(count)])
    return Preset(name, f"openai/{model}", {t.name: f"tanganke/{model}_{t.name}" for t in tasks}, tasks)


def preset_names() -> list[str]:
    return [f"{a}-{n}" for a in ARCHS for n in sorted(TASK_SETS)]


def task_templates(task: str) -> tuple[str, ...]:
    """The templates of a known public task (empty for other tasks)."""
    spec = TASKS.get(task)
    return spec.templates if spec is not None else ()
