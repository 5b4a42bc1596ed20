"""Kernel and layout choices that make training faster without changing what is computed.

Each choice gives the same results as the default path up to float rounding (tests/test_speedups.py):

- Attention: on CPU under bf16 autocast, timm's fused attention (``scaled_dot_product_attention``,
  whose CPU flash kernel has a slow bf16 backward) trains ViT attention 1.6-2.8x slower than the
  explicit softmax(QK^T / sqrt(d)) V of the same timm module (measured at 197-577 tokens on a CPU
  with native bf16). The explicit path keeps the B x heads x N x N attention probabilities for the
  backward pass (ViT-B/16 at 224 px, batch 32: ~1 GB), so it is only chosen up to
  ``EXPLICIT_ATTENTION_MAX_TOKENS`` tokens per image. In fp32 the fused kernel wins on CPU too
  (ViT-S, 224 px, batch 8, one AVX2 thread: full fine-tuning step 0.93x, PEFT steps 0.95-0.97x,
  inference 0.94x; and it keeps no N x N probabilities: 17% less peak training memory for full
  fine-tuning, 26% for SSF), so it is kept there.
- channels_last: oneDNN convolutions run ~25% faster on NHWC tensors (ResNet-50, bf16, CPU).
- fused AdamW: one kernel over all tensors of a parameter group instead of a Python loop over them.
- CPU allocator: freed activations stay in the process (``lightning_modules.allocator``).
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


def uses_fused_attention(model: nn.Module) -> bool:
    """Whether ``model`` has timm attention modules and every one of them runs the fused kernel."""
    switches = [m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    return bool(switches) and all(switches)


def token_count(model: nn.Module) -> int | None:
    """Tokens per image of a timm ViT (patches + prefix tokens), None when the model has no patch grid."""
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(patches, int):
        return None
    return patches + int(getattr(model, "num_prefix_tokens", 0) or 0)


def prefers_fused_attention(model: nn.Module, device: torch.device | str, precision: str | None = "32-true") -> bool:
    """Whether timm's fused attention is the faster choice for ``model`` on ``device`` at ``precision``.

    Fused everywhere except on CPU under bf16 autocast (``bf16-mixed``, where it was measured), where
    the explicit path is faster as long as the N x N scores stay small (``EXPLICIT_ATTENTION_MAX_TOKENS``).
    """
    if torch.device(device).type != "cpu" or str(precision) != "bf16-mixed":
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
