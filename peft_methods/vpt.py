"""Visual Prompt Tuning (Jia et al. 2022) for timm ViTs.

Layout of the token sequence inside the blocks: ``[prefix tokens | prompts | patch tokens]``.
Prompts are inserted after the position embedding (they get none), carried through every block,
and removed again after the final norm, so pooling (``token`` reads the class token, ``avg``
averages the patch tokens) and everything downstream see the stock token layout.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from peft_methods._vit import embed_dim, is_vit, num_prefix_tokens, patch_size, reference_param, set_module
from peft_methods.base import PeftMethod, freeze, unfreeze_head


def _new_prompt(num_tokens: int, dim: int, bound: float, like: torch.Tensor) -> nn.Parameter:
    prompt = torch.empty(1, num_tokens, dim, device=like.device, dtype=like.dtype)
    return nn.Parameter(prompt.uniform_(-bound, bound))


class PromptInsert(nn.Module):
    """Runs ``base_layer`` (the ViT's ``norm_pre``) and inserts the prompts after the prefix tokens."""

    def __init__(self, base_layer: nn.Module, vpt_prompt: nn.Parameter, prefix: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.vpt_prompt = vpt_prompt
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.base_layer(x)
        prompts = self.vpt_prompt.expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : self.prefix], prompts, x[:, self.prefix :]], dim=1)


class PromptReplace(nn.Module):
    """Replaces the prompt slots with this block's own prompts, then runs the block (deep VPT)."""

    def __init__(self, base_layer: nn.Module, vpt_prompt: nn.Parameter, prefix: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.vpt_prompt = vpt_prompt
        self.prefix = prefix

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        p, n = self.prefix, self.vpt_prompt.shape[1]
        prompts = self.vpt_prompt.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :p], prompts, x[:, p + n :]], dim=1)
        return self.base_layer(x, *args, **kwargs)


class PromptRemove(nn.Module):
    """Runs ``base_layer`` (the ViT's final ``norm``) and drops the prompt tokens."""

    def __init__(self, base_layer: nn.Module, num_tokens: int, prefix: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_tokens = num_tokens
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.base_layer(x)
        return torch.cat([x[:, : self.prefix], x[:, self.prefix + self.num_tokens :]], dim=1)


class VPT(PeftMethod):
    """Learnable prompt tokens prepended to the patch tokens of a frozen ViT.

    Args:
        num_tokens: Prompts per set (the paper sweeps 1-200).
        deep: False (VPT-shallow): one set inserted before the first block and carried through all
            blocks. True (VPT-deep): before every block i >= 1 the prompt slots are overwritten by
            that block's own prompts (one set per block).

    Prompts start uniform(-v, v) with v = sqrt(6 / (3 p^2 + d)) (Xavier over a patch's pixels and
    the token width), so the model is not the pretrained function at init. Not mergeable.
    """

    param_prefix: ClassVar[str] = "vpt_"
    identity_at_init: ClassVar[bool] = False

    def __init__(self, num_tokens: int = 10, deep: bool = False) -> None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"VPT num_tokens must be a positive integer, got {num_tokens!r}.")
        self.num_tokens = num_tokens
        self.deep = bool(deep)

    def unsupported_reason(self, model: nn.Module) -> str | None:
        needed = ("patch_embed", "blocks", "norm_pre", "norm", "num_prefix_tokens", "embed_dim")
        if not is_vit(model) or not all(hasattr(model, a) for a in needed):
            return (
                "it supports timm Vision Transformers (patch_embed, blocks, norm_pre, norm, "
                "num_prefix_tokens); CNNs have no token sequence to prompt."
            )
        return None

    def init_bound(self, model: nn.Module) -> float:
        """v = sqrt(6 / (3 * p_h * p_w + d)) for the model's patch size and width."""
        ph, pw = patch_size(model)
        return math.sqrt(6.0 / (3 * ph * pw + embed_dim(model)))

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        d, n, prefix = embed_dim(model), self.num_tokens, num_prefix_tokens(model)
        bound = self.init_bound(model)
        like = reference_param(model.patch_embed)

        def prompt() -> nn.Parameter:
            return _new_prompt(n, d, bound, like)

        model.norm_pre = PromptInsert(model.norm_pre, prompt(), prefix)
        if self.deep:
            for i in range(1, len(model.blocks)):
                set_module(model, f"blocks.{i}", PromptReplace(model.blocks[i], prompt(), prefix))
        model.norm = PromptRemove(model.norm, n, prefix)
        unfreeze_head(model)
        return model
