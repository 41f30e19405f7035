"""Small encoders for tests, benchmarks and examples.

``OpenCLIPStyleViT`` reproduces open_clip's ``VisionTransformer`` module structure and forward (conv1,
class_embedding, positional_embedding, ln_pre, transformer.resblocks with nn.MultiheadAttention and
mlp.c_fc/c_proj, ln_post, proj), batch-first or sequence-first, because open_clip itself cannot be imported
beside the CPU torch build here.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, batch_first: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.resblocks = nn.ModuleList(
            [_ResidualAttentionBlock(width, heads, mlp_ratio, batch_first) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class OpenCLIPStyleViT(nn.Module):
    """open_clip's VisionTransformer structure with the standard CLS-token pooling."""

    def __init__(self, image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32,
                 batch_first=True):
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads, mlp_ratio, batch_first)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        if not self.transformer.batch_first:
            x = x.permute(1, 0, 2)
        x = self.transformer(x)
        if not self.transformer.batch_first:
            x = x.permute(1, 0, 2)
        pooled = self.ln_post(x[:, 0])
        if self.proj is not None:
            pooled = pooled @ self.proj
        return pooled


def tiny_hf_clip(hidden=32, layers=4, heads=4, intermediate=64, image_size=32, patch_size=8, projection_dim=None,
                 seed=0):
    """A randomly initialised HF ``CLIPVisionModel`` (or ``...WithProjection``) built from a config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    if projection_dim is None:
        return CLIPVisionModel(CLIPVisionConfig(**kwargs)).eval()
    return CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=projection_dim, **kwargs)).eval()


@torch.no_grad()
def finetuned_like(model: nn.Module, n_tasks: int, scale: float = 0.05, seed: int = 0) -> dict[str, dict]:
    """Synthetic 'fine-tuned' state dicts: every float tensor moved by a random delta of relative size ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    base = model.state_dict()
    out = {}
    for t in range(n_tasks):
        sd = {}
        for key, value in base.items():
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=gen, dtype=torch.float32)
                sd[key] = value + scale * (value.float().std() + 1e-3) * noise.to(value.dtype)
            else:
                sd[key] = value.clone()
        out[f"task{t}"] = sd
    return out


@torch.no_grad()
def random_decomposition(model: nn.Module, n_tasks: int, rank=None, seed: int = 0, scale: float = 0.02):
    """A :class:`~mass.method.decompose.TaskDecomposition` of ``model`` with random factors of the right shapes.

    FOR LATENCY / MEMORY BENCHMARKS ONLY: no fine-tuned checkpoints and no SVDs. Every 2-D weight gets T
    factor triples with k = ``resolve_rank(rank, shape, T)`` (floor(min(out, in) / T) by default): V with
    orthonormal rows (QR of a Gaussian matrix), U Gaussian with unit-norm columns, S positive, sized so the
    delta is about ``scale`` of the weight's spread. Non-2-D float params get T whole values (θ0 + noise).
    Routing decisions on such a model are meaningless; shapes, storage and FLOPs are exact.
    """
    from mass.method.decompose import LowRankFactors, TaskDecomposition, resolve_rank

    gen = torch.Generator().manual_seed(seed)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dec = TaskDecomposition(tasks=[f"task{t}" for t in range(n_tasks)], base=base)
    for key, value in base.items():
        if not value.is_floating_point():
            continue
        v32 = value.float()
        spread = float(v32.std()) + 1e-3 if v32.numel() > 1 else 1e-2
        if value.dim() == 2:
            out_f, in_f = value.shape
            k = resolve_rank(rank, tuple(value.shape), n_tasks, key)
            q, _ = torch.linalg.qr(torch.randn(n_tasks, in_f, k, generator=gen))  # (T, in, k), orthonormal cols
            V = q.transpose(1, 2).contiguous()
            U = torch.randn(n_tasks, out_f, k, generator=gen)
            U = U / U.norm(dim=1, keepdim=True)
            S = (0.5 + torch.rand(n_tasks, k, generator=gen)) * scale * spread * math.sqrt(out_f * in_f / k)
            dec.lowrank[key] = LowRankFactors(U, S, V)
        else:
            noise = torch.randn((n_tasks, *value.shape), generator=gen)
            dec.dense[key] = v32.unsqueeze(0) + scale * spread * noise
    return dec
