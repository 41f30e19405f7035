import os

import torch

# No GPU here: Triton kernels run in the interpreter. Must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy

import pytest
import torch

from mass.method.synthetic import OpenCLIPStyleViT, finetuned_like, tiny_hf_clip

ARCHS = ["hf", "hf_proj", "openclip_bf", "openclip_sf"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_model(arch: str, seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    if arch == "hf":
        return tiny_hf_clip(layers=layers, seed=seed)
    if arch == "hf_proj":
        return tiny_hf_clip(layers=layers, projection_dim=16, seed=seed)
    if arch == "openclip_bf":
        return OpenCLIPStyleViT(layers=layers, width=32, batch_first=True).eval()
    if arch == "openclip_sf":
        return OpenCLIPStyleViT(layers=layers, width=32, batch_first=False).eval()
    raise ValueError(arch)


@pytest.fixture
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def make_setup(arch: str, n_tasks: int = 3, scale: float = 0.1):
    pretrained = build_model(arch)
    finetuned = finetuned_like(pretrained, n_tasks, scale=scale, seed=3)
    reference = copy.deepcopy(pretrained)
    return pretrained, finetuned, reference
