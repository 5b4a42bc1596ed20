"""A fused ViT ``attn.qkv`` Linear as separate q / k / v Linear layers, and back.

peft adapts whole modules; LoRA on the q and v slices of timm's fused ``qkv`` (d -> 3d) therefore
needs the slices to be modules of their own. ``split_qkv`` swaps each targeted fused layer for an
exact structural equivalent, ``fuse_qkv`` swaps it back (after merging) so the model is plain timm.

Speed: a frozen Linear plus a low-rank update (LoRA on q / v here, FacT's increments) costs, done
module by module, extra full-size passes (one GEMM per slice, ``torch.cat``, the scale multiply, the
add, and in backward one input-gradient GEMM per branch plus their sum). ``low_rank_linear`` computes
``x W^T + b + alpha * dropout(x A^T) B^T`` as one fused GEMM for the frozen base whose output the
rank-r product accumulates into (``addmm_``), and in backward one input-gradient GEMM the rank-r
term accumulates into; it saves only ``x`` and rank-r tensors for backward. ``QKVSplit`` uses it for
the plain (unmerged, enabled, vanilla) peft LoRA state and runs the modules otherwise. Under
autocast the fused computation runs in the autocast dtype, as the module path's Linear layers would
(``fused_dtype``): its inputs are cast to it and the output is in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module

from peft_methods.base import backbone_name


# ---------------------------------------------------------------------- fused frozen Linear + low-rank update
class _LowRankLinear(torch.autograd.Function):
    """``x W^T + b + alpha * D B^T``, ``D = dropout(x A^T)`` viewed as ``chunks`` rows per input row."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, alpha: float, chunks: int, p: float, training: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        code = torch.mm(x2, a.t())  # (n, chunks r), row-major
        mask = None
        if training and p > 0:  # F.dropout's own mask (same random draws and scaling as on the code)
            mask = F.dropout(torch.ones_like(code), p, True)
            code = code * mask
        out.view(n * chunks, -1).addmm_(code.view(n * chunks, -1), b.t(), alpha=alpha)
        ctx.save_for_backward(x, weight, a, b, code, mask)
        ctx.alpha, ctx.chunks = alpha, chunks
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, code, mask = ctx.saved_tensors
        alpha, chunks = ctx.alpha, ctx.chunks
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        n = g2.shape[0]
        g3 = g2.view(n * chunks, -1)
        gx = gw = gbias = ga = gb = None
        # In the products with a rank-r output dimension or a contraction over the n rows, the rank-r
        # operand is passed column-major (a copy of r x d or n x r values): MKL's sgemm is up to 2x
        # slower on these shapes with it row-major (measured on ViT-S). The rank-r updates (addmm_)
        # take it as it is: their layout measured within 5%.
        if need_b:
            gb = torch.mm(_column_major(code.view(n * chunks, -1)).t(), g3).t()
            if alpha != 1:
                gb = gb * alpha
        if need_x or need_a:
            gcode = torch.mm(g3, _column_major(b)).view(n, -1)  # (n, chunks r), row-major
            if alpha != 1:
                gcode.mul_(alpha)
            if mask is not None:
                gcode.mul_(mask)
            if need_a:
                ga = torch.mm(_column_major(gcode).t(), x2)
            if need_x:
                gx = torch.mm(g2, weight).addmm_(gcode, a).view(x.shape)
        if need_w:
            gw = torch.mm(g2.t(), x2)
        if need_bias:
            gbias = g2.sum(0)
        return gx, gw, gbias, ga, gb, None, None, None, None


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with the same values laid out column-major."""
    return t.t().contiguous().t()


def low_rank_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
    alpha: float = 1.0, chunks: int = 1, dropout: float = 0.0, training: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + alpha * (dropout(x A^T).view(..., chunks, r) B^T).flatten(-2)``, fused.

    ``a``: (chunks r, in), ``b``: (out / chunks, r). Dropout (``F.dropout``'s mask) acts on the
    code ``x A^T``. Gradients flow to every input that requires them.
    Under autocast on ``x``'s device every operand is cast to the autocast dtype first (the casts of
    ``a`` and ``b`` are differentiable, so their gradients come back in their own dtype) and the
    product runs in that dtype with autocast off, like an autocast ``F.linear``; ``fused_dtype`` says
    whether the operands qualify.
    """
    args = (float(alpha), chunks, float(dropout), bool(training))
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return _LowRankLinear.apply(x, weight, bias, a, b, *args)
    dtype = torch.get_autocast_dtype(device)
    x, weight, a, b = (t.to(dtype) for t in (x, weight, a, b))
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return _LowRankLinear.apply(x, weight, bias, a, b, *args)


def fused_dtype(x: torch.Tensor, *tensors: torch.Tensor | None) -> torch.dtype | None:
    """The dtype ``low_rank_linear`` computes in for input ``x`` and these operands, or None (module path).

    Without autocast: ``x``'s dtype, if every operand has it. Under autocast on ``x``'s device: the
    autocast dtype, if every operand is fp32 or already in it (what autocast casts for a Linear).
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        castable = (torch.float32, dtype)
        return dtype if all(t.dtype in castable for t in (x, *tensors) if t is not None) else None
    return x.dtype if all(t.dtype == x.dtype for t in tensors if t is not None) else None


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (a fused path would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def fusable(x: torch.Tensor) -> bool:
    """Whether a fused computation may stand in for calling modules on ``x``: no global module hooks.

    The operands' dtypes are checked by ``fused_dtype``.
    """
    return not (_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _lora_linear_type() -> type | None:
    """peft's LoRA Linear layer class (looked up once: peft is imported only where it is used)."""
    global _LORA_LINEAR
    if _LORA_LINEAR is False:
        try:
            from peft.tuners.lora.layer import Linear
        except ImportError:  # pragma: no cover - peft is a dependency
            Linear = None
        _LORA_LINEAR = Linear
    return _LORA_LINEAR


_LORA_LINEAR: Any = False


def _slice_parts(layer: nn.Module, lora_type: type | None) -> tuple[nn.Linear, list[tuple]] | None:
    """(frozen base Linear, [(A, B, scaling), ...] of the active adapters), or None: not the plain case.

    The plain case: a plain frozen Linear, or peft's LoRA Linear unmerged, with adapters enabled and
    every active adapter vanilla LoRA (no DoRA / variant, no dropout, no lora_B bias, same dtype).
    """
    if type(layer) is nn.Linear:
        return (layer, []) if fusable_linear(layer) else None
    if lora_type is None or type(layer) is not lora_type:
        return None
    base = layer.base_layer
    if (
        type(base) is not nn.Linear or not fusable_linear(base) or hooked(layer)
        or layer.disable_adapters or layer.merged
    ):
        return None
    variants = getattr(layer, "lora_variant", None)
    if variants is None:  # a peft without the attribute this logic mirrors
        return None
    parts = []
    for name in layer.active_adapters:
        if name not in layer.lora_A.keys():
            continue
        lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        if (
            name in variants or layer.use_dora.get(name, False)
            or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear
            or lora_a.bias is not None or lora_b.bias is not None
            or type(dropout) is not nn.Identity
            or lora_a.weight.dtype != base.weight.dtype or lora_b.weight.dtype != base.weight.dtype
            or hooked(lora_a) or hooked(lora_b) or hooked(dropout)
        ):
            return None
        parts.append((lora_a.weight, lora_b.weight, layer.scaling[name]))
    return base, parts


def fusable_linear(layer: nn.Linear) -> bool:
    """A Linear whose weight and bias are frozen and which has no hooks."""
    return (
        not layer.weight.requires_grad
        and (layer.bias is None or not layer.bias.requires_grad)
        and not hooked(layer)
    )


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
        _lora_linear_type()  # resolved here, eagerly, so that forward (maybe compiled) only reads it

    #: Use the fused computation when the slices are in the plain case (False: always the modules).
    fast_path: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path and fusable(x):
            out = self._fused_forward(x)
            if out is not None:
                return out
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The slow path's output with one base GEMM on the fused weight, or None if not the plain case.

        The base is the frozen q, k, v weights concatenated (a cheap copy every call, so it always
        matches them); the LoRA deltas of every slice accumulate into it as one rank-R product, B
        block-diagonal (scaling folded in, a zero block for a slice without adapters).
        """
        lora_type = _lora_linear_type()
        slices = [_slice_parts(getattr(self, n), lora_type) for n in "qkv"]
        if any(s is None for s in slices):
            return None
        bases = [s[0] for s in slices]
        if fused_dtype(x, *(t for bs in bases for t in (bs.weight, bs.bias))) is None or any(
            bs.weight.device != x.device for bs in bases
        ):
            return None
        if any((bs.bias is None) != (bases[0].bias is None) for bs in bases):
            return None
        with torch.no_grad():
            weight = torch.cat([bs.weight for bs in bases])
            bias = torch.cat([bs.bias for bs in bases]) if bases[0].bias is not None else None
        a_parts = [a for s in slices for a, _, _ in s[1]]
        if not a_parts:
            return F.linear(x, weight, bias)
        blocks = []
        for bs, (_, parts) in zip(bases, slices, strict=True):
            if parts:
                cols = [bw if scale == 1 else bw * scale for _, bw, scale in parts]
                blocks.append(cols[0] if len(cols) == 1 else torch.cat(cols, dim=1))
            else:
                blocks.append(bs.weight.new_zeros(bs.out_features, 0))
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts)
        return low_rank_linear(x, weight, bias, a, torch.block_diag(*blocks))

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
