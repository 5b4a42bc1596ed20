"""Diffusion-specific methods: DiffFit (Xie et al. 2023) and SVDiff (Han et al. 2023).

DiffFit wraps the three residual branches of every diffusers ``BasicTransformerBlock`` with a
learnable per-channel scale; SVDiff re-parameterises every weight through its singular values with
``torch.nn.utils.parametrize``. Both start as the identity and merge into plain weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from peft_methods.base import (
    NORM_TYPES,
    PeftMethod,
    backbone_modules,
    freeze,
    head_param_names,
    unfreeze_head,
    unfreeze_named,
)
from peft_methods.selective import _bias_names, _norm_names


# ---------------------------------------------------------------------- DiffFit
class DiffFitScale(nn.Module):
    """A residual branch whose output is scaled per channel: ``branch(x) * difffit_gamma``."""

    def __init__(self, branch: nn.Module, dim: int) -> None:
        super().__init__()
        self.branch = branch
        self.difffit_gamma = nn.Parameter(torch.ones(dim))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.branch(*args, **kwargs)
        # Cast so that a bf16 branch output keeps the residual stream in bf16 under autocast.
        return out * self.difffit_gamma.to(out.dtype)


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    return [m for _, m in backbone_modules(model) if isinstance(m, BasicTransformerBlock)]


def _output_linear(branch: nn.Module) -> nn.Linear:
    """The linear layer that produces a branch's output (where a DiffFit scale folds in)."""
    to_out = getattr(branch, "to_out", None)
    if isinstance(to_out, nn.ModuleList) and isinstance(to_out[0], nn.Linear):
        if getattr(branch, "residual_connection", False):
            raise ValueError(
                "DiffFit cannot fold its scale into an attention layer with residual_connection=True; "
                "keep the unmerged model for inference."
            )
        return to_out[0]
    linears = [m for m in branch.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"DiffFit found no output Linear layer in branch {type(branch).__name__}.")
    return linears[-1]


class DiffFit(PeftMethod):
    """Biases, norm parameters and a per-channel scale (init 1) on each residual branch.

    In every diffusers ``BasicTransformerBlock``: ``h = h + g1 * attn1(.)``, ``h = h + g2 * attn2(.)``,
    ``h = h + g3 * ff(.)``. Trainable count: |biases U norm params| + dim per branch.
    Merge folds each gamma into the branch's output projection (W <- g[:, None] W, b <- g b).
    """

    mergeable = True
    param_prefix = "difffit_"
    branches = ("attn1", "attn2", "ff")

    def __init__(self) -> None:
        pass

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if not _transformer_blocks(model):
            return (
                "it scales the residual branches of diffusers BasicTransformerBlocks (Stable Diffusion "
                "UNets, DiT-style transformers), and this model has none."
            )
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        for block in _transformer_blocks(model):
            for name in self.branches:
                branch = getattr(block, name, None)
                if branch is None or isinstance(branch, DiffFitScale):
                    continue
                dim = _output_linear(branch).out_features
                setattr(block, name, DiffFitScale(branch, dim).to(_output_linear(branch).weight.device))
        unfreeze_named(model, _bias_names(model) + _norm_names(model))
        for module in model.modules():
            if isinstance(module, DiffFitScale):
                module.difffit_gamma.requires_grad_(True)
        unfreeze_head(model)
        return model

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        for block in _transformer_blocks(model):
            for name in self.branches:
                wrapper = getattr(block, name, None)
                if not isinstance(wrapper, DiffFitScale):
                    continue
                linear = _output_linear(wrapper.branch)
                gamma = wrapper.difffit_gamma.to(linear.weight.dtype)
                linear.weight.mul_(gamma[:, None])
                if linear.bias is not None:
                    linear.bias.mul_(gamma)
                setattr(block, name, wrapper.branch)
        return model


# ---------------------------------------------------------------------- SVDiff
class SpectralShift(nn.Module):
    """Parametrisation W' = W + U diag(ReLU(sigma + delta) - sigma) V^T, i.e. U diag(ReLU(sigma + delta)) V^T.

    Written as a correction on the frozen W so that delta = 0 reproduces W bit for bit (sigma >= 0).
    The SVD is taken once in fp32; U, sigma, V^T are non-persistent buffers (they follow ``.to()``
    and stay out of checkpoints). Without autograd, W' is materialised once and reused until delta
    or W changes (evaluation and sampling run at the plain layer's cost).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        matrix = weight.detach().float().reshape(1 if weight.ndim == 1 else weight.shape[0], -1)
        if matrix.shape[0] < matrix.shape[1]:
            # LAPACK is ~10x faster on tall matrices: W^T = U' S V'^T gives W = V' S U'^T.
            ut, s, vht = torch.linalg.svd(matrix.T, full_matrices=False)
            u, vh = vht.T.contiguous(), ut.T.contiguous()
        else:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("svd_u", u, persistent=False)
        self.register_buffer("svd_s", s, persistent=False)
        self.register_buffer("svd_vh", vh, persistent=False)
        self.svdiff_delta = nn.Parameter(torch.zeros_like(s))
        #: 1-D weights (normalisation scales) are 1 x N matrices with a single singular value.
        self.is_1d = weight.ndim == 1
        self.param_order: list[str] = ["weight"]
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def _compute(self, original: torch.Tensor) -> torch.Tensor:
        # The weight itself is built in fp32 even under autocast; the layer then casts it as usual.
        with torch.autocast(original.device.type, enabled=False):
            shift = F.relu(self.svd_s + self.svdiff_delta.float()) - self.svd_s
            update = (self.svd_u * shift) @ self.svd_vh
        return original + update.reshape(original.shape).to(original.dtype)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self._cache = None
            return self._compute(original)
        key = (
            self.svdiff_delta._version,
            self.svdiff_delta.data_ptr(),
            original._version,
            original.data_ptr(),
            original.dtype,
            torch.is_inference_mode_enabled(),
        )
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._compute(original))
        return self._cache[1]


_SVDIFF_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, *NORM_TYPES)


class SVDiff(PeftMethod):
    """Spectral shifts: learn only a zero-init delta on the singular values of every weight.

    Targets every Linear / Conv / Embedding weight (conv kernels as c_out x rest) and every
    normalisation weight (a 1 x N matrix: one scalar). Biases stay frozen. Trainable count:
    sum of min(rows, cols) over the matrices plus one per normalisation weight. Memory: each target
    keeps W plus U, sigma, V^T (about twice W) so that the identity at init is exact.

    Args:
        lr_1d: learning rate of the 1-D (normalisation) deltas; the matrix deltas use the optimizer's
            learning rate (the SVDiff paper: 1e-3 for matrices, 1e-6 for 1-D weights). None: same for both.
    """

    mergeable = True
    param_prefix = "svdiff_"

    def __init__(self, lr_1d: float | None = 1e-6) -> None:
        if lr_1d is not None and lr_1d <= 0:
            raise ValueError(f"SVDiff lr_1d must be positive (or None to share the main lr), got {lr_1d}.")
        self.lr_1d = lr_1d

    def _targets(self, model: nn.Module) -> list[nn.Module]:
        head = head_param_names(model)
        targets = []
        for mname, module in backbone_modules(model):
            # An already parametrised weight is no longer in _parameters, so apply is not repeated.
            weight = module._parameters.get("weight") if isinstance(module, _SVDIFF_TYPES) else None
            if isinstance(weight, nn.Parameter) and (f"{mname}.weight" if mname else "weight") not in head:
                targets.append(module)
        return targets

    def unsupported_reason(self, model: nn.Module) -> str | None:
        if not self._targets(model):
            return "it shifts the singular values of Linear / Conv / Embedding / norm weights, and this model has none."
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        self.check_supported(model)
        freeze(model)
        for module in self._targets(model):
            shift = SpectralShift(module.weight)
            shift.param_order = list(module._parameters)  # merge restores the original key order
            parametrize.register_parametrization(module, "weight", shift)
        unfreeze_head(model)
        return model

    @staticmethod
    def shifts(model: nn.Module) -> list[SpectralShift]:
        """Every SpectralShift parametrisation in ``model``."""
        return [m for m in model.modules() if isinstance(m, SpectralShift)]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups: matrix deltas (+ head) at the optimizer's lr, 1-D deltas at ``lr_1d``."""
        one_d = [s.svdiff_delta for s in self.shifts(model) if s.is_1d]
        ids = {id(p) for p in one_d}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        if self.lr_1d is None:
            return [{"params": rest + one_d, "name": "svdiff"}]
        groups: list[dict[str, Any]] = [{"params": rest, "name": "svdiff_matrix"}]
        if one_d:
            groups.append({"params": one_d, "lr": self.lr_1d, "name": "svdiff_1d"})
        return groups

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        for module in list(model.modules()):
            if not parametrize.is_parametrized(module, "weight"):
                continue
            shifts = [p for p in module.parametrizations["weight"] if isinstance(p, SpectralShift)]
            if shifts:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
                params = module._parameters
                order = [k for k in shifts[0].param_order if k in params] + [k for k in params if k not in shifts[0].param_order]
                module._parameters = {k: params[k] for k in order}
        return model
