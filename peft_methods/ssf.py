"""SSF (Lian et al. 2022): learnable per-channel scale and shift after frozen layers.

ViT: after ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1`` (before the activation) and
``mlp.fc2`` of every block, plus after ``patch_embed.proj`` and the final norm (``fc_norm`` when the
model pools before normalising). CNN: after every convolution and every normalisation layer
(channel dim 1); norm layers with a fused activation (timm ``*NormAct*``) output post-activation
values that no weight could absorb, so they only get the SSF of the convolution before them.

Merging folds y = gamma * f(x) + beta into the layer f: a Linear / Conv gets W <- gamma W and
b <- gamma b + beta; a norm gets its affine weight and bias scaled the same way. A convolution
without a bias (ResNet style) passes its shift to the BatchNorm that reads its output, as
running_mean <- running_mean - beta (exact for the frozen BatchNorm, which runs on running stats).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerNorm2d, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from peft_methods._vit import VIT_BLOCKS, is_vit, reference_param, set_module, vit_blocks, vit_blocks_reason
from peft_methods.base import NORM_TYPES, PeftMethod, backbone_modules, freeze, unfreeze_head

# Convolutions that standardise their weight in forward: a folded scale would be normalised away.
_STANDARDISED_CONVS = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
_BLOCK_TARGETS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


#: Layers whose forward is exactly F.linear / F.layer_norm of their own weight and bias.
_FOLDABLE = (nn.Linear, nn.LayerNorm, TimmLayerNorm)
#: Below this |gamma| the folded Linear path would divide by a near-zero scale in its backward.
_MIN_FOLDED_SCALE = 1e-2


class _FoldedScaleShiftLinear(torch.autograd.Function):
    """y = gamma * (x W^T + b) + beta computed as x (gamma W)^T + (gamma b + beta).

    The per-channel scale and shift ride on the (small) weight instead of the (large) activation:
    no extra pass over the output in the forward, none over its gradient in the backward. The
    scale's gradient needs the pre-scale output z = (y - beta) / gamma; y is saved instead of z,
    and y is what the next layer saves anyway (GELU after fc1, attention after qkv), so the wrapper
    keeps no activation of its own there.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta):  # noqa: ANN001, ANN205 - autograd.Function protocol
        shift = beta if bias is None else torch.addcmul(beta, bias, gamma)
        y = F.linear(x, weight * gamma[:, None], shift)
        ctx.save_for_backward(y, weight, gamma, beta)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        y, weight, gamma, beta = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ (weight * gamma[:, None]).to(grad_y.dtype)).to(ctx.x_dtype)
        grad_gamma, grad_beta = _scale_shift_grads(grad_y, y, gamma, beta)
        return grad_x, None, None, grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype)


def _scale_shift_grads(
    grad_y: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 gradients of gamma and beta in y = gamma * z + beta (channels last), from the output y.

    d beta = sum(dy) and d gamma = sum(dy * (y - beta)) / gamma over every dim but the last. On the
    CPU both come from BatchNorm's backward reduction (batch mean = beta, inverse std = 1 / gamma),
    which reads dy and y once for both sums: half the time of two separate reductions (measured on
    ViT-S's activations in fp32). Elsewhere, two reductions.
    """
    c = y.shape[-1]
    grad_2d, y_2d = grad_y.reshape(-1, c), y.reshape(-1, c)
    if y.device.type == "cpu" and grad_2d.dtype == y_2d.dtype and y.dtype in (torch.float32, torch.bfloat16):
        # Contiguous: the kernel's strided fallback is serial and sums a bf16 d beta in bf16.
        _, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_2d.contiguous(), y_2d.contiguous(), None, None, None, beta.float(), gamma.float().reciprocal(),
            True, 0.0, [False, True, True],
        )
        return grad_gamma, grad_beta
    grad_beta = grad_2d.sum(0, dtype=torch.float32)
    grad_gamma = (grad_2d * y_2d).sum(0, dtype=torch.float32) - beta.float() * grad_beta
    return grad_gamma / gamma.float(), grad_beta


class ScaleShift(nn.Module):
    """y = ssf_scale * base_layer(x) + ssf_shift along ``channel_dim`` of the output.

    After a frozen ``nn.Linear`` or ``nn.LayerNorm`` (every ViT target but the patch embedding) the
    scale and shift are folded into the layer's weight and bias on the fly, which computes the same
    function with fewer passes over the activations (``_FoldedScaleShiftLinear``; a LayerNorm's
    affine gradient comes from its own fused backward kernel). Other layers, a trainable base layer
    and a near-zero scale take the direct path.
    """

    def __init__(self, base_layer: nn.Module, channels: int, channel_dim: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.channel_dim = channel_dim
        like = reference_param(base_layer)
        self.ssf_scale = nn.Parameter(torch.empty(channels, device=like.device, dtype=like.dtype))
        self.ssf_shift = nn.Parameter(torch.empty(channels, device=like.device, dtype=like.dtype))
        nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
        nn.init.normal_(self.ssf_shift, mean=0.0, std=0.02)
        self.fold = type(base_layer) in _FOLDABLE and not getattr(base_layer, "_fast_norm", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        if self.fold and not any(p.requires_grad for p in layer.parameters()):
            if isinstance(layer, nn.LayerNorm):
                gamma, beta = self.ssf_scale, self.ssf_shift
                weight = gamma if layer.weight is None else layer.weight * gamma
                bias = beta if layer.bias is None else torch.addcmul(beta, layer.bias, gamma)
                return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
            if not torch.is_grad_enabled() or bool(self.ssf_scale.detach().abs().min() >= _MIN_FOLDED_SCALE):
                return _FoldedScaleShiftLinear.apply(x, layer.weight, layer.bias, self.ssf_scale, self.ssf_shift)
        return self.direct(x)

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        """The unfolded computation: the base layer's output, scaled and shifted."""
        y = self.base_layer(x)
        shape = [1] * y.ndim
        shape[self.channel_dim] = -1
        # In the layer's output dtype: under bf16 autocast an fp32 result would push every later op
        # and its saved activations to fp32 (measured on ViT-S: 25% slower steps, 2x the memory).
        scale, shift = self.ssf_scale.view(shape).to(y.dtype), self.ssf_shift.view(shape).to(y.dtype)
        return torch.addcmul(shift, y, scale)


def _out_channels(layer: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "num_features", "num_channels"):
        if hasattr(layer, attr):
            return int(getattr(layer, attr))
    return int(layer.normalized_shape[0])  # LayerNorm


def _has_fused_act(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "act", None), nn.Module)


def _is_cnn_target(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return True
    return (
        isinstance(layer, NORM_TYPES) and not _has_fused_act(layer) and any(True for _ in layer.parameters())
    )


def _cnn_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in backbone_modules(model) if name and _is_cnn_target(m)]


def _vit_targets(model: nn.Module) -> list[tuple[str, int]]:
    """(name, channel dim) of every ViT layer that gets an SSF."""
    targets = [("patch_embed.proj", 1)]
    for block, _ in vit_blocks(model):
        targets += [(f"{block}.{t}", -1) for t in _BLOCK_TARGETS]
    final = "norm" if isinstance(model.norm, nn.LayerNorm) else "fc_norm"
    if isinstance(getattr(model, final, None), nn.LayerNorm):
        targets.append((final, -1))
    return targets


class SSF(PeftMethod):
    """Scale-and-shift features: per-channel gamma, beta after frozen layers (mergeable)."""

    mergeable: ClassVar[bool] = True
    param_prefix: ClassVar[str] = "ssf_"
    identity_at_init: ClassVar[bool] = False  # gamma ~ N(1, 0.02), beta ~ N(0, 0.02) as in the paper

    def __init__(self) -> None:
        pass

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if is_vit(model):
            return vit_blocks_reason(model)
        linear = next((n for n, m in backbone_modules(model) if isinstance(m, nn.Linear)), None)
        if linear is not None:  # a transformer that is not a supported ViT: its Linear layers would stay bare
            return (f"its Linear layer '{linear}' would get no scale and shift; SSF supports {VIT_BLOCKS} "
                    "and CNNs made of convolution and normalisation layers.")
        if not _cnn_targets(model):
            return "it needs ViT blocks or CNN convolution / normalisation layers; this backbone has neither."
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        if is_vit(model):
            targets = [(n, model.get_submodule(n), dim) for n, dim in _vit_targets(model)]
        else:
            targets = [(n, m, -1 if _is_channels_last_norm(m) else 1) for n, m in _cnn_targets(model)]
        for name, layer, dim in targets:
            set_module(model, name, ScaleShift(layer, _out_channels(layer), dim))
        unfreeze_head(model)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ScaleShift)]
        if not wrappers:
            raise ValueError("SSF.merge found no SSF layers in the model; call SSF().apply(model) first.")
        consumers = _bias_free_consumers(model, wrappers)
        with torch.no_grad():
            for name, wrapper in wrappers:
                _fold(name, wrapper, consumers.get(name))
        for name, wrapper in wrappers:
            set_module(model, name, wrapper.base_layer)
        return model


def _is_channels_last_norm(layer: nn.Module) -> bool:
    return isinstance(layer, nn.LayerNorm) and not isinstance(layer, LayerNorm2d)


def _has_bias(layer: nn.Module) -> bool:
    return getattr(layer, "bias", None) is not None


def _bias_free_consumers(model: nn.Module, wrappers: list[tuple[str, ScaleShift]]) -> dict[str, _NormBase]:
    """For each SSF after a bias-free layer: the running-stats norm that reads its output.

    Found by one traced forward pass in eval mode on a dummy image (shapes only matter).
    """
    needy = {name: w for name, w in wrappers if not _has_bias(w.base_layer)}
    if not needy:
        return {}
    outputs: dict[int, str] = {}
    found: dict[str, _NormBase] = {}
    keep: list[torch.Tensor] = []  # keeps outputs alive so their ids stay unique during the pass

    def record_output(name: str):
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            keep.append(out)
            outputs[id(out)] = name

        return hook

    def match_input(norm: _NormBase):
        def hook(_m: nn.Module, inp: tuple) -> None:
            source = outputs.get(id(inp[0])) if inp else None
            if source is not None:
                found.setdefault(source, norm)

        return hook

    handles = [w.register_forward_hook(record_output(n)) for n, w in needy.items()]
    handles += [
        m.register_forward_pre_hook(match_input(m))
        for m in model.modules()
        if isinstance(m, _NormBase) and m.track_running_stats
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(_dummy_input(model))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return found


def _dummy_input(model: nn.Module) -> torch.Tensor:
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    if is_vit(model):
        size = tuple(model.patch_embed.img_size)
    else:
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[-2:]
    w = first_conv.weight
    return torch.zeros(1, first_conv.in_channels, *size, device=w.device, dtype=w.dtype)


def _fold(name: str, wrapper: ScaleShift, consumer: _NormBase | None) -> None:
    """Folds one SSF into its base layer (and, for a bias-free conv, into the next BatchNorm)."""
    layer, gamma, beta = wrapper.base_layer, wrapper.ssf_scale, wrapper.ssf_shift
    weight = getattr(layer, "weight", None)
    if weight is None or isinstance(layer, _STANDARDISED_CONVS):
        raise ValueError(
            f"SSF.merge cannot fold the SSF after '{name}' ({type(layer).__name__}): the layer has "
            "no affine weight (or a standardised one) to absorb it; keep the unmerged model for inference."
        )
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        weight.mul_(gamma.view(-1, *([1] * (weight.ndim - 1))))
    else:
        weight.mul_(gamma)
    if _has_bias(layer):
        layer.bias.mul_(gamma).add_(beta)
    elif consumer is not None and consumer.running_mean is not None:
        consumer.running_mean.sub_(beta)
    else:
        raise ValueError(
            f"SSF.merge cannot fold the shift after '{name}' ({type(layer).__name__}): the layer has "
            "no bias and its output does not feed a BatchNorm; keep the unmerged model for inference."
        )
