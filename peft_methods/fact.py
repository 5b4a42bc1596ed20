"""FacT (Jie & Deng, AAAI 2023): factor-tuning of ViT weight increments.

All increments share U (d -> r) and V (r -> d, zero-initialised, so the model starts at the
pretrained function). For a weight W made of out_c x in_c square d x d blocks, the increment is
dW[o, i] = s * V Sigma[o, i] U, with Sigma an (out_c r) x (in_c r) core: qkv is 3 x 1 blocks (q, k, v),
proj 1 x 1, fc1 (d -> 4d) 4 x 1 and fc2 (4d -> d) 1 x 4. Dropout acts on the r-dim code Sigma U x.

- TT: every layer owns its core (q, k, v, proj: r x r each; fc1: 4r x r; fc2: r x 4r).
- TK: one tensor C (r x r x r) and P (r x (4 + 2m) L) for m = mlp_ratio; slice j of a layer is
  Sigma_j = sum_k C[:, :, k] P[k, j] (q, k, v, o, m fc1 chunks, m fc2 chunks; 12 per block for m=4).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from peft_methods._vit import embed_dim, reference_param, set_module, vit_blocks, vit_blocks_reason
from peft_methods.base import PeftMethod, freeze, unfreeze_head
from peft_methods.qkv_split import fusable, fusable_linear, fused_dtype, low_rank_linear

FacTKind = Literal["tt", "tk"]
_DEFAULT_RANK = {"tt": 8, "tk": 32}
_DEFAULT_SCALE = {"tt": 1.0, "tk": 0.1}


class FacTFactors(nn.Module):
    """The factors shared by every layer: U, V and (TK) the core tensor C and its mixing matrix P."""

    def __init__(self, dim: int, rank: int, slices: int, kind: str, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.u = nn.Parameter(torch.empty(rank, dim, **kw))
        self.v = nn.Parameter(torch.zeros(dim, rank, **kw))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))  # nn.Linear's default init
        if kind == "tk":
            self.core = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, rank, rank, **kw)))
            self.mix = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, slices, **kw)))

    def slices(self, index: list[int]) -> torch.Tensor:
        """(len(index), r, r) TK cores Sigma_j = sum_k C[:, :, k] P[k, j]."""
        return torch.einsum("abk,kj->jab", self.core, self.mix[:, index])


class FacTLinear(nn.Module):
    """A frozen Linear plus its FacT increment s * blockdiag(V) Sigma blockdiag(U)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        factors: FacTFactors,
        out_chunks: int,
        in_chunks: int,
        scale: float,
        dropout: float,
        tk_slices: list[int] | None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        # A plain tuple keeps the shared factors out of this module's state dict: they are
        # registered once, on the model, so checkpoints hold them once.
        self._factors = (factors,)
        self.out_chunks, self.in_chunks = out_chunks, in_chunks
        self.scale, self.dropout = scale, dropout
        self.tk_slices = tk_slices
        if tk_slices is None:
            r = factors.u.shape[0]
            core = torch.empty(out_chunks * r, in_chunks * r, device=factors.u.device, dtype=factors.u.dtype)
            bound = 1.0 / math.sqrt(in_chunks * r)  # nn.Linear's default init for an (in r -> out r) core
            self.fact_core = nn.Parameter(core.uniform_(-bound, bound))

    def core(self) -> torch.Tensor:
        """Sigma: (out_chunks r) x (in_chunks r)."""
        if self.tk_slices is None:
            return self.fact_core
        s = self._factors[0].slices(self.tk_slices)  # (out_c * in_c, r, r), one chunk pair each
        r = s.shape[-1]
        s = s.view(self.out_chunks, self.in_chunks, r, r).permute(0, 2, 1, 3)
        return s.reshape(self.out_chunks * r, self.in_chunks * r)

    #: Use the fused computation (``low_rank_linear``) when possible (False: always the module path).
    fast_path: bool = True

    def in_factor(self) -> torch.Tensor:
        """Sigma blockdiag(U): (out_chunks r) x in_features, the map x -> the r-dim code(s) Sigma U x."""
        f = self._factors[0]
        core = self.core()
        rows = core.shape[0]
        return (core.view(rows, self.in_chunks, -1) @ f.u).view(rows, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._factors[0]
        base = self.base_layer
        if (
            self.fast_path and type(base) is nn.Linear and fusable_linear(base) and fusable(x)
            and fused_dtype(x, base.weight, base.bias, f.u, f.v) is not None
        ):
            # One base GEMM; the r -> d product accumulates into its output (alpha = scale); in
            # backward the input gradients of both terms accumulate into one buffer.
            return low_rank_linear(
                x, base.weight, base.bias, self.in_factor(), f.v, self.scale, self.out_chunks,
                self.dropout, self.training,
            )
        code = x.unflatten(-1, (self.in_chunks, -1)) @ f.u.t()  # (..., in_c, r)
        code = code.flatten(-2) @ self.core().t()  # (..., out_c r)
        code = F.dropout(code, self.dropout, self.training)
        delta = code.unflatten(-1, (self.out_chunks, -1)) @ f.v.t()  # (..., out_c, d)
        return self.base_layer(x) + self.scale * delta.flatten(-2)

    def delta_weight(self) -> torch.Tensor:
        """The dense increment dW (out_features x in_features) this layer adds."""
        f = self._factors[0]
        r = f.u.shape[0]
        sigma = self.core().view(self.out_chunks, r, self.in_chunks, r)
        dw = torch.einsum("ar,orie,eb->oaib", f.v, sigma, f.u)
        return self.scale * dw.reshape(self.base_layer.out_features, self.base_layer.in_features)


class FacT(PeftMethod):
    """Factor-tuning of every ViT block's q, k, v, proj, fc1 and fc2 weights (mergeable).

    Args:
        kind: ``"tt"`` (tensor-train: per-layer cores) or ``"tk"`` (Tucker: one shared core tensor).
        rank: Factor rank r; None means 8 (tt) or 32 (tk).
        scale: Factor s on the increment; None means 1.0 (tt) or 0.1 (tk). The paper tunes it.
        dropout: Dropout on the r-dim code.
    """

    mergeable: ClassVar[bool] = True
    param_prefix: ClassVar[str] = "fact_"

    def __init__(
        self, kind: FacTKind = "tt", rank: int | None = None, scale: float | None = None, dropout: float = 0.1
    ) -> None:
        if kind not in get_args(FacTKind):
            raise ValueError(f"FacT kind={kind!r} is not supported; use 'tt' or 'tk'.")
        rank = _DEFAULT_RANK[kind] if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"FacT rank must be a positive integer, got {rank!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FacT dropout must be in [0, 1), got {dropout}.")
        self.kind = kind
        self.rank = rank
        self.scale = _DEFAULT_SCALE[kind] if scale is None else float(scale)
        self.dropout = dropout

    def unsupported_reason(self, model: nn.Module) -> str | None:
        reason = vit_blocks_reason(model)
        if reason is None:
            d = embed_dim(model)
            widths = {b.mlp.fc1.out_features for _, b in vit_blocks(model)}
            if len(widths) > 1 or widths.pop() % d:
                return "its fc1 / fc2 factorisation needs one MLP width, a multiple of the ViT width."
        return reason

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        d, blocks = embed_dim(model), vit_blocks(model)
        m = blocks[0][1].mlp.fc1.out_features // d
        per_block = 4 + 2 * m
        factors = FacTFactors(d, self.rank, per_block * len(blocks), self.kind, reference_param(model.blocks))
        for i, (name, block) in enumerate(blocks):
            first = i * per_block
            layout = {  # layer -> (out chunks, in chunks, its TK slices)
                "attn.qkv": (3, 1, [first, first + 1, first + 2]),
                "attn.proj": (1, 1, [first + 3]),
                "mlp.fc1": (m, 1, list(range(first + 4, first + 4 + m))),
                "mlp.fc2": (1, m, list(range(first + 4 + m, first + 4 + 2 * m))),
            }
            for layer, (out_c, in_c, tk) in layout.items():
                base = block.get_submodule(layer)
                wrapped = FacTLinear(
                    base, factors, out_c, in_c, self.scale, self.dropout, tk if self.kind == "tk" else None
                )
                set_module(model, f"{name}.{layer}", wrapped)
        model.fact_factors = factors
        unfreeze_head(model)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FacTLinear)]
        if not layers or not isinstance(getattr(model, "fact_factors", None), FacTFactors):
            raise ValueError("FacT.merge found no FacT layers in the model; call FacT().apply(model) first.")
        with torch.no_grad():
            for name, layer in layers:
                layer.base_layer.weight.add_(layer.delta_weight().to(layer.base_layer.weight.dtype))
                set_module(model, name, layer.base_layer)
        del model.fact_factors
        return model
