"""Helpers shared by the methods that adapt timm models: finding ViT blocks, swapping modules.

A "supported ViT block" is timm's pre-norm ``Block`` whose attention is a ``timm.layers.Attention``
(fused ``qkv`` + ``proj``) and whose MLP is a ``timm.layers.Mlp`` (``fc1`` -> act -> ``fc2``).
"""

from __future__ import annotations

import torch
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn

#: What the block-level ViT methods support, for error messages.
VIT_BLOCKS = (
    "timm Vision Transformers whose blocks are pre-norm timm 'Block's with timm.layers.Attention "
    "and timm.layers.Mlp (e.g. vit_*, deit_*)"
)


def is_vit(model: nn.Module) -> bool:
    """True for timm ViT-style models (patch embedding + a sequence of transformer blocks)."""
    return hasattr(model, "patch_embed") and isinstance(getattr(model, "blocks", None), nn.Sequential)


def _is_supported_block(block: nn.Module) -> bool:
    return (
        isinstance(block, Block)
        and isinstance(block.attn, Attention)
        and isinstance(block.mlp, Mlp)
        and not any(True for _ in block.parameters(recurse=False))
    )


def vit_blocks(model: nn.Module) -> list[tuple[str, Block]]:
    """``(qualified name, block)`` of every transformer block of a timm ViT, in order."""
    if not is_vit(model):
        return []
    return [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]  # type: ignore[misc]


def vit_blocks_reason(model: nn.Module) -> str | None:
    """None when every block of ``model`` is a supported timm ViT block; otherwise why not."""
    blocks = vit_blocks(model)
    if not blocks:
        return f"it supports only {VIT_BLOCKS}; this backbone has no transformer blocks."
    odd = sorted({type(b).__name__ for _, b in blocks if not _is_supported_block(b)})
    if odd:
        return f"it supports only {VIT_BLOCKS}; this backbone has blocks of type {', '.join(odd)}."
    return None


def embed_dim(model: nn.Module) -> int:
    """Token width d of a timm ViT."""
    return int(model.embed_dim)  # type: ignore[arg-type]


def patch_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) of a ViT patch."""
    p = model.patch_embed.patch_size  # type: ignore[union-attr]
    return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))


def grid_size(model: nn.Module) -> tuple[int, int]:
    """Patch grid (rows, cols) of a fixed-size ViT: image size divided by patch size."""
    g = model.patch_embed.grid_size  # type: ignore[union-attr]
    return int(g[0]), int(g[1])


def num_prefix_tokens(model: nn.Module) -> int:
    """Number of class / register / distillation tokens in front of the patch tokens."""
    return int(getattr(model, "num_prefix_tokens", 0))


def reference_param(module: nn.Module) -> torch.Tensor:
    """A parameter (or buffer) of ``module`` whose device and dtype new modules should follow."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t
    return torch.empty(0)


def place_like(new: nn.Module, ref: nn.Module) -> nn.Module:
    """Moves a freshly built module to the device and dtype of the module it is injected into."""
    t = reference_param(ref)
    return new.to(device=t.device, dtype=t.dtype)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the sub-module at dotted path ``name`` (keeps its position among its siblings)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class AdoptedBlock(nn.Module):
    """A timm pre-norm ``Block`` re-wired with extra residual branches.

    The block's own sub-layers are registered under the same names (so the frozen weights keep
    their state-dict keys) and subclasses re-state the two residual lines of ``Block.forward``
    with their branch added.
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.train(block.training)
