"""The ViT configurations the benchmarks build (HF CLIP vision encoders from configs, random weights)."""
from __future__ import annotations

import torch

MODEL_CONFIGS = {
    "B32": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=224, patch_size=32),
    "B16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=224, patch_size=16),
    "L14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                image_size=224, patch_size=14),
    "tiny": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                 image_size=32, patch_size=8),  # tests
}


def build_clip(name: str, seed: int = 0, dtype=torch.float32, device="cpu"):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(**MODEL_CONFIGS[name])
    return CLIPVisionModel(cfg).eval().to(device=device, dtype=dtype), cfg
