"""Kernel and layout choices that make training faster without changing what is computed.

Each choice gives the same results as the default path up to float rounding (tests/test_speedups.py):

- Attention: on CPU, timm's fused attention (``scaled_dot_product_attention``, whose CPU flash kernel
  has a slow backward) trains ViT attention 1.6-2.8x slower than the explicit softmax(QK^T / sqrt(d)) V
  of the same timm module (measured at 197-577 tokens, bf16 autocast). The explicit path keeps the
  B x heads x N x N attention probabilities for the backward pass (ViT-B/16 at 224 px, batch 32:
  ~1 GB), so it is only chosen up to ``EXPLICIT_ATTENTION_MAX_TOKENS`` tokens per image.
- channels_last: oneDNN convolutions run ~25% faster on NHWC tensors (ResNet-50, bf16, CPU).
- fused AdamW: one kernel over all tensors of a parameter group instead of a Python loop over them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

#: Above this many tokens per image (224-256 px ViTs have 197-257) the quadratic memory of the
#: explicit attention outweighs its speed; timm's fused attention is kept.
EXPLICIT_ATTENTION_MAX_TOKENS = 400


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switches timm's fused attention on or off in every module that has the switch; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = enabled
            count += 1
    return count


def token_count(model: nn.Module) -> int | None:
    """Tokens per image of a timm ViT (patches + prefix tokens), None when the model has no patch grid."""
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(patches, int):
        return None
    return patches + int(getattr(model, "num_prefix_tokens", 0) or 0)


def prefers_fused_attention(model: nn.Module, device: torch.device | str) -> bool:
    """Whether timm's fused attention is the faster choice for ``model`` on ``device``.

    Fused everywhere except on CPU, where the explicit path is faster as long as the N x N scores
    stay small (``EXPLICIT_ATTENTION_MAX_TOKENS``).
    """
    if torch.device(device).type != "cpu":
        return True
    tokens = token_count(model)
    return tokens is not None and tokens > EXPLICIT_ATTENTION_MAX_TOKENS


def is_convolutional(model: nn.Module) -> bool:
    """A CNN (or hybrid): more than one Conv2d, so NHWC layouts pay off (a ViT has one, its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def to_channels_last(model: nn.Module) -> nn.Module:
    """Stores every 4-D weight of ``model`` in NHWC (channels_last) order, in place."""
    return model.to(memory_format=torch.channels_last)


def can_fuse_adamw(params: Iterable[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` supports these tensors (float, on CPU or CUDA)."""
    params = list(params)
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
