"""Convpass (Jie & Deng 2022): convolutional bypasses beside a ViT block's attention and MLP.

Each bypass maps norm(x) through a 1x1 down-projection d->c, QuickGELU, a 3x3 convolution over the
patch grid, QuickGELU, dropout and a zero-initialised up-projection c->d, scaled by s. The patch
grid comes from the model's image and patch size; prefix tokens (class / register tokens) pass
through the same 3x3 convolution as 1x1 maps, so only its centre tap acts on them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from timm.models.vision_transformer import Block
from torch import nn

from peft_methods._vit import (
    AdoptedBlock,
    embed_dim,
    grid_size,
    num_prefix_tokens,
    place_like,
    set_module,
    vit_blocks,
    vit_blocks_reason,
)
from peft_methods.base import PeftMethod, freeze, unfreeze_head


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU used by Convpass: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class ConvBypass(nn.Module):
    """One convolutional bypass over the tokens of a fixed patch grid."""

    def __init__(self, dim: int, hidden: int, grid: tuple[int, int], prefix: int, dropout: float) -> None:
        super().__init__()
        self.grid = grid
        self.prefix = prefix
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        # Identity-like start: the 3x3 conv initially passes each channel through its centre tap.
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1, 1] = torch.eye(hidden)
            self.conv.bias.zero_()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        (gh, gw), p = self.grid, self.prefix
        if n != p + gh * gw:
            raise ValueError(
                f"Convpass was built for a {gh}x{gw} patch grid plus {p} prefix tokens ({p + gh * gw} "
                f"tokens) but received {n}; build the backbone with the img_size of the images you feed."
            )
        h = quick_gelu(self.down(x))
        c = h.shape[-1]
        patches = h[:, p:].reshape(b, gh, gw, c).permute(0, 3, 1, 2)
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(b, gh * gw, c)
        prefix = self.conv(h[:, :p].reshape(b * p, c, 1, 1)).reshape(b, p, c)
        h = quick_gelu(torch.cat([prefix, patches], dim=1))
        return self.up(self.dropout(h))


class ConvpassBlock(AdoptedBlock):
    """Block with scaled convolutional bypasses parallel to attention and MLP."""

    def __init__(
        self, block: Block, convpass_attn: ConvBypass, convpass_mlp: ConvBypass, scale: float
    ) -> None:
        super().__init__(block)
        self.convpass_attn = convpass_attn
        self.convpass_mlp = convpass_mlp
        self.scale = scale

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        y = self.norm1(x)
        attn = self.attn(y, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(attn)) + self.drop_path1(self.scale * self.convpass_attn(y))
        y = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(y))) + self.drop_path2(self.scale * self.convpass_mlp(y))


class Convpass(PeftMethod):
    """Convolutional bypasses in every ViT block.

    Args:
        dim: Hidden channels c of the bypass (8 in the paper).
        scale: Factor s on each bypass output; the reference code tunes it per dataset in
            {0.01, 0.1, 1, 10} (1 for diabetic retinopathy, 10 for PatchCamelyon).
        dropout: Dropout before the up-projection.
    """

    param_prefix: ClassVar[str] = "convpass_"

    def __init__(self, dim: int = 8, scale: float = 1.0, dropout: float = 0.1) -> None:
        if dim <= 0:
            raise ValueError(f"Convpass dim must be a positive integer, got {dim}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Convpass dropout must be in [0, 1), got {dropout}.")
        self.dim = dim
        self.scale = scale
        self.dropout = dropout

    def unsupported_reason(self, model: nn.Module) -> str | None:
        reason = vit_blocks_reason(model)
        if reason is None and getattr(model, "dynamic_img_size", False):
            reason = "it needs a fixed patch grid; build the ViT without dynamic_img_size=True."
        return reason

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        d, grid, prefix = embed_dim(model), grid_size(model), num_prefix_tokens(model)
        for name, block in vit_blocks(model):
            attn, mlp = (
                place_like(ConvBypass(d, self.dim, grid, prefix, self.dropout), block) for _ in range(2)
            )
            set_module(model, name, ConvpassBlock(block, attn, mlp, self.scale))
        unfreeze_head(model)
        return model
