"""Where things live in the supported CLIP vision encoders, and swapping their layers for MASS layers.

Supported: HF transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel.vision_model``
and the open_clip ``VisionTransformer`` structure (``conv1``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, ``transformer.resblocks[i]`` with ``attn`` an ``nn.MultiheadAttention`` batch-first or
sequence-first and ``mlp.c_fc``/``mlp.c_proj``, ``ln_post``, ``proj``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mass.nn.layers import MASSConv2d, MASSLayerNorm, MASSLinear, MASSMultiheadAttention, PassState


@dataclass
class Architecture:
    kind: str  # "hf" or "open_clip"
    root_name: str  # module path of the vision transformer inside the wrapped model ("" = the model)
    root: nn.Module
    blocks: list  # the transformer blocks, in order
    block_names: list  # their module paths inside the wrapped model
    batch_axes: list  # per block: batch axis of activations inside it
    fc1: list  # per block: the MLP's first linear (its input is the routing feature)
    token_keys: dict = field(default_factory=dict)  # "cls"/"pos" -> state-dict key of those raw params
    pre_norm: Optional[nn.Module] = None  # token deltas are added to its input
    proj_key: Optional[str] = None  # open_clip's raw ``proj`` parameter, if any
    in_channels: int = 3  # image channels the patch embedding takes
    output_dim: int = 0  # width of the image embedding the model returns (what heads multiply)
    image_size: Optional[tuple] = None  # (height, width) the model takes, where it does not check it itself

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class AlreadyWrappedError(ValueError):
    """The module already holds MASS layers: it was wrapped by a MASSModel before."""


def _mass_layer_types() -> tuple:
    return (MASSConv2d, MASSLayerNorm, MASSLinear, MASSMultiheadAttention)


def detect(model: nn.Module) -> Architecture:
    """Recognise the encoder structure; a clear error otherwise (also for a module that is already wrapped)."""
    wrapped = next((name for name, m in model.named_modules() if isinstance(m, _mass_layer_types())), None)
    if wrapped is not None:
        raise AlreadyWrappedError(
            f"this {type(model).__name__} is already wrapped by a MASSModel (it holds MASS layers, e.g. "
            f"{wrapped or 'the model itself'!r}); wrap a fresh copy of the pretrained model, or change the router "
            f"of the existing MASSModel with model.with_router(RouterConfig(...))"
        )
    if hasattr(model, "text_model") or (hasattr(model, "visual") and hasattr(model, "token_embedding")):
        raise TypeError(
            "pass the vision tower only: CLIPModel.vision_model (or CLIPVisionModelWithProjection), "
            "or open_clip's model.visual"
        )
    root_name, root = "", model
    if hasattr(model, "vision_model") and hasattr(model.vision_model, "encoder"):
        root_name, root = "vision_model", model.vision_model
    if hasattr(root, "encoder") and hasattr(root, "embeddings") and hasattr(root, "pre_layrnorm"):
        layers = list(root.encoder.layers)
        emb = _join(root_name, "embeddings")
        return Architecture(
            kind="hf", root_name=root_name, root=root, blocks=layers,
            block_names=[_join(root_name, "encoder.layers", str(i)) for i in range(len(layers))],
            batch_axes=[0] * len(layers), fc1=[blk.mlp.fc1 for blk in layers],
            token_keys={"cls": _join(emb, "class_embedding"), "pos": _join(emb, "position_embedding.weight")},
            pre_norm=root.pre_layrnorm, in_channels=root.embeddings.patch_embedding.in_channels,
            output_dim=(model.visual_projection.out_features if hasattr(model, "visual_projection")
                        else root.post_layernorm.normalized_shape[-1]),
        )
    if hasattr(model, "transformer") and hasattr(model.transformer, "resblocks") and hasattr(model, "conv1"):
        if getattr(model, "attn_pool", None) is not None:
            raise NotImplementedError("open_clip attentional pooling (attn_pool) is not supported")
        blocks = list(model.transformer.resblocks)
        return Architecture(
            kind="open_clip", root_name="", root=model, blocks=blocks,
            block_names=[f"transformer.resblocks.{i}" for i in range(len(blocks))],
            batch_axes=[0 if blk.attn.batch_first else 1 for blk in blocks], fc1=[blk.mlp.c_fc for blk in blocks],
            token_keys={"cls": "class_embedding", "pos": "positional_embedding"},
            pre_norm=model.ln_pre, proj_key="proj" if getattr(model, "proj", None) is not None else None,
            in_channels=model.conv1.in_channels,
            output_dim=model.proj.shape[1] if getattr(model, "proj", None) is not None
            else model.ln_post.normalized_shape[-1],
            image_size=_openclip_image_size(model),
        )
    raise TypeError(
        f"unsupported model {type(model).__name__}: expected a HF CLIP vision model or an open_clip-style "
        f"VisionTransformer (conv1, transformer.resblocks, ln_pre)"
    )


def _openclip_image_size(model: nn.Module) -> Optional[tuple]:
    """(height, width) an open_clip tower takes: its ``image_size``, else a square grid of patches that fills
    its positional embedding (one row per patch plus the class token). open_clip does not check the size
    itself (a wrong one fails inside attention), so the MASS model does, as HF's CLIP does."""
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return tuple(int(s) for s in size)
    n_patches = model.positional_embedding.shape[0] - 1
    grid = round(n_patches ** 0.5)
    stride = model.conv1.stride
    if grid * grid != n_patches or model.conv1.kernel_size != stride:
        return None  # not a square grid of non-overlapping patches: leave the check to the model
    return (grid * stride[0], grid * stride[1])


def block_of(arch: Architecture, module_name: str) -> Optional[int]:
    """Index of the block containing ``module_name``, or None if outside the blocks."""
    for i, name in enumerate(arch.block_names):
        if module_name == name or module_name.startswith(name + "."):
            return i
    return None


def plan_layers(model: nn.Module, arch: Architecture, state: PassState) -> dict[str, nn.Module]:
    """MASS layers for every Linear / LayerNorm / Conv2d / MultiheadAttention of ``model``, sharing its
    parameters, WITHOUT installing them (``model`` is not touched); ``arch.fc1`` and ``arch.pre_norm`` are
    pointed at the new layers. Returns module path -> MASS layer (an attention's ``out_proj`` included)."""
    replaced: dict[str, nn.Module] = {}
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.MultiheadAttention, nn.Linear, nn.LayerNorm, nn.Conv2d)):
            targets.append((name, module))
    for name, module in targets:
        if name in replaced:
            continue  # out_proj of a replaced attention module: already wrapped by it
        parent_name, _, child = name.rpartition(".")
        blk = block_of(arch, name)
        axis = 0 if blk is None else arch.batch_axes[blk]
        if isinstance(module, nn.MultiheadAttention):
            new = MASSMultiheadAttention(module, state, axis)
            replaced[_join(name, "out_proj")] = new.out_proj
        elif isinstance(module, nn.Linear):
            new = MASSLinear.from_linear(module, state, axis)
        elif isinstance(module, nn.LayerNorm):
            new = MASSLayerNorm(module, state, axis)
        else:
            new = MASSConv2d(module, state)
        replaced[name] = new
    # fc1 handles must point at the new modules
    for i, blk_name in enumerate(arch.block_names):
        fc1_name = _join(blk_name, "mlp.fc1" if arch.kind == "hf" else "mlp.c_fc")
        arch.fc1[i] = replaced[fc1_name]
        arch.fc1[i].feature_index = i
    if arch.pre_norm is not None:
        arch.pre_norm = replaced[_join(arch.root_name, "pre_layrnorm" if arch.kind == "hf" else "ln_pre")]
    return replaced


def install_layers(model: nn.Module, replaced: dict[str, nn.Module], undo: list) -> None:
    """Put the planned layers in place. ``undo`` receives, step by step, what puts each original back (an
    attention's ``out_proj`` is installed with its attention layer)."""
    inside = {name for name, layer in replaced.items() if isinstance(layer, MASSMultiheadAttention)}
    for name, new in replaced.items():
        parent_name, _, child = name.rpartition(".")
        if parent_name in inside:
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        setattr(parent, child, new)
        undo.append(lambda parent=parent, child=child, original=original: setattr(parent, child, original))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, D) -> (B, heads, S, D / heads)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def cls_mlp_input(arch: Architecture, index: int, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """The CLS token's MLP input (second LayerNorm output) of block ``index``, computing only what it needs:
    keys and values for every token, but the query, attention, output projection and LayerNorm for the CLS
    token alone. Returns (B, D), or None when the block is not one of the known structures (the caller then
    runs the whole block). ``hidden`` is the block's input in its own layout; the block takes no mask."""
    blk = arch.blocks[index]
    x = hidden if arch.batch_axes[index] == 0 else hidden.transpose(0, 1)  # (B, S, D)
    if arch.kind == "hf" and type(blk).__name__ == "CLIPEncoderLayer":
        attn = blk.self_attn
        a = blk.layer_norm1(x)
        # The CLS rows as a 2-D (B, D) input: a 3-D strided one would go through a batched matmul.
        q = _heads(attn.q_proj(a[:, 0]).unsqueeze(1), attn.num_heads)
        k, v = _heads(attn.k_proj(a), attn.num_heads), _heads(attn.v_proj(a), attn.num_heads)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, heads, 1, D / heads)
        out = attn.out_proj(o.reshape(o.shape[0], -1))
        return blk.layer_norm2(x[:, 0] + out)
    if arch.kind == "open_clip" and type(blk).__name__ in ("ResidualAttentionBlock", "_ResidualAttentionBlock"):
        from mass.nn.layers import MASSMultiheadAttention

        mha = blk.attn
        if not isinstance(mha, MASSMultiheadAttention) or not isinstance(getattr(blk, "ln_attn", nn.Identity()),
                                                                        nn.Identity):
            return None
        a = blk.ln_1(x)
        qkv = mha.in_proj(a)  # fused projection: the CLS-only query would need a weight slice
        D = x.shape[-1]
        q = _heads(qkv[:, :1, :D], mha.num_heads)
        k, v = _heads(qkv[..., D: 2 * D], mha.num_heads), _heads(qkv[..., 2 * D:], mha.num_heads)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, D / heads)
        out = getattr(blk, "ls_1", nn.Identity())(mha.out_proj(o.reshape(o.shape[0], -1)))
        return blk.ln_2(x[:, 0] + out)
    return None
