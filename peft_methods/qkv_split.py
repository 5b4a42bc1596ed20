"""A fused ViT ``attn.qkv`` Linear as separate q / k / v Linear layers, and back.

peft adapts whole modules; LoRA on the q and v slices of timm's fused ``qkv`` (d -> 3d) therefore
needs the slices to be modules of their own. ``split_qkv`` swaps each targeted fused layer for an
exact structural equivalent, ``fuse_qkv`` swaps it back (after merging) so the model is plain timm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peft_methods.base import backbone_name


class QKVSplit(nn.Module):
    """A fused ``qkv`` Linear (d -> 3 d') as three separate Linear layers ``q``, ``k``, ``v``.

    Outputs are the concatenation ``[q(x), k(x), v(x)]``: exactly the fused layer's layout, so the
    attention module using it is unchanged. Each slice owns its own parameters (nothing shared), so
    a per-slice adapter on ``q`` and ``v`` leaves ``k`` untouched.
    """

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        if fused.out_features % 3:
            raise ValueError(f"A fused qkv layer needs 3 * d outputs, got {fused.out_features}.")
        d = fused.out_features // 3
        for i, name in enumerate("qkv"):
            # Built on the meta device (no wasted init), then given the fused layer's slice.
            layer = nn.Linear(fused.in_features, d, bias=fused.bias is not None, device="meta")
            rows = slice(i * d, (i + 1) * d)
            layer.weight = nn.Parameter(fused.weight.detach()[rows].clone(), fused.weight.requires_grad)
            if fused.bias is not None:
                layer.bias = nn.Parameter(fused.bias.detach()[rows].clone(), fused.bias.requires_grad)
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fuse(self) -> nn.Linear:
        """The equivalent single fused Linear (call after merging adapters into q, k, v)."""
        parts = [getattr(self, n) for n in "qkv"]
        if not all(isinstance(p, nn.Linear) for p in parts):
            raise ValueError("QKVSplit.fuse needs plain Linear slices; merge the adapters first.")
        w = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=parts[0].bias is not None, device="meta")
        fused.weight = nn.Parameter(w, parts[0].weight.requires_grad)
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), parts[0].bias.requires_grad)
        return fused


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replaces the submodule at dotted ``path`` by ``module``."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def split_qkv(model: nn.Module, target_paths: Sequence[str]) -> nn.Module:
    """Replaces every fused ``qkv`` that a target path ``....qkv.{q,k,v}`` points into by a QKVSplit.

    This is also what a plain-peft user must call before loading an exported slice adapter.
    """
    slices = [p for p in target_paths if p.rsplit(".", 1)[-1] in ("q", "k", "v")]
    for path in sorted({p.rsplit(".", 1)[0] for p in slices}):
        try:
            module = model.get_submodule(path) if "." in path else None
        except AttributeError:
            module = None
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] == "qkv":
            set_submodule(model, path, QKVSplit(module))
        elif not isinstance(module, QKVSplit):
            raise ValueError(
                f"split_qkv: '{path}' (from targets {slices[:2]}...) is not a fused qkv Linear of "
                f"'{backbone_name(model)}'; pass the full module paths of adapter_config.json."
            )
    return model


def fuse_qkv(model: nn.Module) -> nn.Module:
    """Replaces every QKVSplit by its equivalent fused Linear."""
    for path, module in list(model.named_modules()):
        if isinstance(module, QKVSplit):
            set_submodule(model, path, module.fuse())
    return model
