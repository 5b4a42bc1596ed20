"""Bottleneck adapters for timm ViTs: serial Adapters (Houlsby / Pfeiffer) and AdaptFormer.

Each block of the ViT is replaced by a block that reuses the stock sub-layers (same state-dict keys
for the frozen weights) and adds a bottleneck MLP Down(d->r) -> act -> Up(r->d). Up is zero-
initialised and Down is not, so each adapted model starts exactly at the pretrained function while
Down still receives a gradient from the first step (zero-initialising both would leave only the
up-projection bias learning).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, get_args

import torch
from timm.models.vision_transformer import Block
from torch import nn

from peft_methods._vit import AdoptedBlock, embed_dim, place_like, set_module, vit_blocks, vit_blocks_reason
from peft_methods.base import PeftMethod, freeze, unfreeze_head

AdapterStyle = Literal["houlsby", "pfeiffer"]
Activation = Literal["gelu", "relu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class Bottleneck(nn.Module):
    """Down(d->r) -> activation -> dropout -> Up(r->d), Up zero-initialised (the branch starts at 0)."""

    def __init__(self, dim: int, rank: int, activation: type[nn.Module], dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = activation()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(rank, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class SerialAdapterBlock(AdoptedBlock):
    """Block with a residual adapter h + Up(act(Down(h))) on the output h of its sub-layers."""

    def __init__(self, block: Block, adapter_attn: Bottleneck | None, adapter_mlp: Bottleneck) -> None:
        super().__init__(block)
        self.adapter_attn = adapter_attn
        self.adapter_mlp = adapter_mlp

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        h = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        if self.adapter_attn is not None:
            h = h + self.adapter_attn(h)
        x = x + self.drop_path1(self.ls1(h))
        h = self.mlp(self.norm2(x))
        h = h + self.adapter_mlp(h)
        return x + self.drop_path2(self.ls2(h))


class AdaptFormerBlock(AdoptedBlock):
    """Block whose MLP sub-layer gets a parallel AdaptMLP fed the un-normalised residual stream."""

    def __init__(self, block: Block, adaptformer_mlp: Bottleneck, scale: float) -> None:
        super().__init__(block)
        self.adaptformer_mlp = adaptformer_mlp
        self.scale = scale

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        # out = h + MLP(norm2(h)) + s * Up(ReLU(Down(h))), with h the post-attention stream.
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.scale * self.adaptformer_mlp(x)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}.")


class Adapter(PeftMethod):
    """Serial bottleneck adapters in every ViT block (Houlsby et al. 2019; Pfeiffer et al. 2021).

    Args:
        style: ``"houlsby"`` puts an adapter after both the attention and the MLP sub-layer;
            ``"pfeiffer"`` puts one after the MLP sub-layer only.
        bottleneck: Hidden width r; None means 64 (houlsby) or d/8 (pfeiffer, d = ViT width).
        activation: Non-linearity between Down and Up.
    """

    param_prefix: ClassVar[str] = "adapter_"

    def __init__(
        self, style: AdapterStyle = "houlsby", bottleneck: int | None = None, activation: Activation = "gelu"
    ) -> None:
        _check_choice("Adapter style", style, get_args(AdapterStyle))
        _check_choice("Adapter activation", activation, get_args(Activation))
        if bottleneck is not None and bottleneck <= 0:
            raise ValueError(f"Adapter bottleneck must be a positive integer, got {bottleneck}.")
        self.style = style
        self.bottleneck = bottleneck
        self.activation = activation

    def rank(self, dim: int) -> int:
        """The bottleneck width used for a ViT of width ``dim``."""
        if self.bottleneck is not None:
            return self.bottleneck
        return 64 if self.style == "houlsby" else max(1, dim // 8)

    def unsupported_reason(self, model: nn.Module) -> str | None:
        return vit_blocks_reason(model)

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        d = embed_dim(model)
        r, act = self.rank(d), _ACTIVATIONS[self.activation]
        for name, block in vit_blocks(model):
            attn = place_like(Bottleneck(d, r, act), block) if self.style == "houlsby" else None
            mlp = place_like(Bottleneck(d, r, act), block)
            set_module(model, name, SerialAdapterBlock(block, attn, mlp))
        unfreeze_head(model)
        return model


class AdaptFormer(PeftMethod):
    """AdaptFormer (Chen et al. 2022): a scaled AdaptMLP parallel to each block's MLP.

    Args:
        bottleneck: Hidden width of the AdaptMLP.
        scale: Fixed factor s on the AdaptMLP output.
        dropout: Dropout on the bottleneck activations.
    """

    param_prefix: ClassVar[str] = "adaptformer_"

    def __init__(self, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        if bottleneck <= 0:
            raise ValueError(f"AdaptFormer bottleneck must be a positive integer, got {bottleneck}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AdaptFormer dropout must be in [0, 1), got {dropout}.")
        self.bottleneck = bottleneck
        self.scale = scale
        self.dropout = dropout

    def unsupported_reason(self, model: nn.Module) -> str | None:
        return vit_blocks_reason(model)

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        d = embed_dim(model)
        for name, block in vit_blocks(model):
            branch = place_like(Bottleneck(d, self.bottleneck, nn.ReLU, self.dropout), block)
            set_module(model, name, AdaptFormerBlock(block, branch, self.scale))
        unfreeze_head(model)
        return model
