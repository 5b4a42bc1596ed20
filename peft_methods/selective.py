"""Selective methods: train a chosen subset of the backbone's existing weights (plus the head).

They add no modules, so merging is the identity: the trained model already is a plain backbone.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from peft_methods.base import (
    NORM_TYPES,
    PeftMethod,
    backbone_modules,
    freeze,
    head_param_names,
    unfreeze_head,
    unfreeze_named,
)


class _Selective(PeftMethod):
    """Freeze everything, then unfreeze ``select(model)`` and the head."""

    mergeable = True
    #: Human description of what is selected, used in errors.
    selects: str = ""

    def select(self, model: nn.Module) -> list[str]:
        """Qualified names of the backbone parameters to train."""
        raise NotImplementedError

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if not self.select(model):
            return f"it trains {self.selects}, and this backbone has none."
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        names = self.select(model)
        freeze(model)
        unfreeze_named(model, names)
        unfreeze_head(model)
        return model


class FullFineTuning(PeftMethod):
    """Every parameter trainable: the baseline (typically with a ~10x lower learning rate)."""

    mergeable = True

    def __init__(self) -> None:
        pass

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


class LinearProbe(PeftMethod):
    """Only the task head trains; the backbone is a frozen feature extractor."""

    mergeable = True

    def __init__(self) -> None:
        pass

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        unfreeze_head(model)
        return model


def _bias_names(model: nn.Module) -> list[str]:
    head = head_param_names(model)
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and n not in head]


def _norm_names(model: nn.Module) -> list[str]:
    names = []
    for mname, module in backbone_modules(model):
        if isinstance(module, NORM_TYPES):
            names += [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
    return names


def _is_attention(module: nn.Module) -> bool:
    """A ViT-style attention module: fused ``qkv`` and output ``proj`` linear layers."""
    return isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(
        getattr(module, "proj", None), nn.Linear
    )


def _is_diffusers_attention(module: nn.Module) -> bool:
    """A diffusers-style attention module: ``to_q``/``to_k``/``to_v`` and ``to_out[0]`` linear layers."""
    to_out = getattr(module, "to_out", None)
    return (
        all(isinstance(getattr(module, n, None), nn.Linear) for n in ("to_q", "to_k", "to_v"))
        and isinstance(to_out, nn.ModuleList)
        and len(to_out) > 0
        and isinstance(to_out[0], nn.Linear)
    )


def _attention_names(model: nn.Module, scope: str = "blocks") -> list[str]:
    """ViT: ``qkv`` + ``proj`` (either scope). diffusers UNet: every parameter under an
    ``attentions`` container (whole Transformer2D blocks) for ``blocks``, or only the
    ``to_q``/``to_k``/``to_v``/``to_out.0`` projections for ``projections``."""
    names = []
    for mname, module in backbone_modules(model):
        if _is_attention(module):
            for child in ("qkv", "proj"):
                names += [f"{mname}.{child}.{p}" for p, _ in getattr(module, child).named_parameters()]
    if names or not any(_is_diffusers_attention(m) for _, m in backbone_modules(model)):
        return names
    if scope == "blocks":
        return [n for n, _ in model.named_parameters() if "attentions" in n.split(".")]
    for mname, module in backbone_modules(model):
        if _is_diffusers_attention(module):
            for child in ("to_q", "to_k", "to_v", "to_out.0"):
                layer = module.get_submodule(child)
                names += [f"{mname}.{child}.{p}" for p, _ in layer.named_parameters()]
    return names


class BitFit(_Selective):
    """Every bias of the backbone (Ben Zaken et al. 2022): patch embed, qkv, proj, MLP, norms, convs."""

    selects = "bias terms"

    def __init__(self) -> None:
        pass

    def select(self, model: nn.Module) -> list[str]:
        return _bias_names(model)


class NormTuning(_Selective):
    """Affine weight and bias of every normalisation layer (LayerNorm, BatchNorm, GroupNorm).

    Running statistics of a BatchNorm whose affine parameters train keep updating (train mode);
    see ``peft_methods.base.keep_frozen_in_eval``.
    """

    selects = "normalisation layers with affine parameters"

    def __init__(self) -> None:
        pass

    def select(self, model: nn.Module) -> list[str]:
        return _norm_names(model)


class AttentionTuning(_Selective):
    """Weights and biases of every attention block (Touvron et al. 2022).

    Args:
        scope: ``"blocks"`` (default): ViT ``qkv`` + ``proj``; diffusers UNet: every parameter under
            ``attentions.*`` (whole Transformer2D blocks, as in the seed paper's lineage).
            ``"projections"``: ViT ``qkv`` + ``proj``; UNet ``to_q``/``to_k``/``to_v``/``to_out.0`` only.
    """

    selects = (
        "attention layers (ViT modules with fused 'qkv' and 'proj' Linear layers, or diffusers "
        "modules with 'to_q'/'to_k'/'to_v'/'to_out' Linear layers)"
    )

    def __init__(self, scope: Literal["blocks", "projections"] = "blocks") -> None:
        if scope not in ("blocks", "projections"):
            raise ValueError(f"AttentionTuning scope must be 'blocks' or 'projections', got {scope!r}.")
        self.scope = scope

    def select(self, model: nn.Module) -> list[str]:
        return _attention_names(model, self.scope)


class NormBiasAttention(_Selective):
    """The union of BitFit, NormTuning and AttentionTuning."""

    selects = "biases, normalisation layers or attention layers"

    def __init__(self) -> None:
        pass

    def select(self, model: nn.Module) -> list[str]:
        names = _bias_names(model) + _norm_names(model) + _attention_names(model)
        return list(dict.fromkeys(names))
