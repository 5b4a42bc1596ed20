"""TSA residual adapters (Li, Liu & Bilen 2022) for CNNs.

Beside every 3x3 convolution runs a parallel 1x1 convolution alpha with the same stride and groups:
y = conv(x) + alpha(x). alpha starts at zero, so the adapted CNN starts exactly at the pretrained
function (the paper's alternative, an identity-like alpha, would change the features at step 0).

Layers adapted: 3x3 ``nn.Conv2d`` whose 1x1 branch yields the same output grid, i.e. padding equal
to dilation (the usual "same"-style 3x3) or timm's dynamically padded ``Conv2dSame``; a 3x3 conv
with other padding (e.g. 0) is left alone. Merging adds alpha to the centre tap of the 3x3 kernel,
which is exact when the centre tap reads pixel s*i, i.e. padding == dilation. ``Conv2dSame`` pads
asymmetrically at stride 2, so its adapters cannot be merged; ``merge`` then refuses, naming them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from peft_methods._vit import set_module
from peft_methods.base import PeftMethod, backbone_modules, freeze, unfreeze_head


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "same":  # PyTorch pads (k - 1) * d / 2 = d on each side for a 3x3 kernel
        return (int(conv.dilation[0]), int(conv.dilation[1]))
    if conv.padding == "valid":
        return (0, 0)
    return (int(conv.padding[0]), int(conv.padding[1]))


def is_centre_aligned(conv: nn.Conv2d) -> bool:
    """True when the 3x3 kernel's centre tap reads the pixel a stride-s 1x1 conv reads."""
    return not isinstance(conv, Conv2dSame) and _padding(conv) == tuple(conv.dilation)


def _adaptable(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == (3, 3)
        and (isinstance(conv, Conv2dSame) or is_centre_aligned(conv))
    )


class TSAConv(nn.Module):
    """A frozen 3x3 convolution plus a parallel zero-initialised 1x1 convolution ``tsa_alpha``."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        shape = (base_layer.out_channels, base_layer.in_channels // base_layer.groups, 1, 1)
        self.tsa_alpha = nn.Parameter(torch.zeros(shape, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.base_layer
        return conv(x) + F.conv2d(x, self.tsa_alpha, stride=conv.stride, groups=conv.groups)


class TSA(PeftMethod):
    """Task-specific residual adapters: a 1x1 convolution beside every 3x3 convolution of a CNN."""

    mergeable: ClassVar[bool] = True
    param_prefix: ClassVar[str] = "tsa_"

    def __init__(self) -> None:
        pass

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if not any(_adaptable(m) for _, m in backbone_modules(model)):
            return (
                "it adds 1x1 adapters beside the 3x3 convolutions of CNNs (e.g. ResNets), and this "
                "backbone has no 3x3 Conv2d with padding equal to dilation."
            )
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        for name, conv in [(n, m) for n, m in backbone_modules(model) if n and _adaptable(m)]:
            set_module(model, name, TSAConv(conv))
        unfreeze_head(model)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, TSAConv)]
        if not layers:
            raise ValueError("TSA.merge found no TSA adapters in the model; call TSA().apply(model) first.")
        blocked = [n for n, m in layers if not is_centre_aligned(m.base_layer)]
        if blocked:
            raise ValueError(
                f"TSA.merge cannot fold the adapters of {', '.join(blocked)} into their 3x3 kernels: "
                "these convolutions pad asymmetrically (Conv2dSame), so the centre tap is offset from "
                "the 1x1 branch; keep the unmerged model for inference."
            )
        with torch.no_grad():
            for name, layer in layers:
                layer.base_layer.weight[:, :, 1, 1] += layer.tsa_alpha[:, :, 0, 0]
                set_module(model, name, layer.base_layer)
        return model
