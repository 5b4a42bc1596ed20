"""Multiplicative weight updates implemented by the ``peft`` library: OFT, BOFT (rotations) and IA3 (scales).

Targets follow ``peft_methods.lora`` (ViT default q and v slices; IA3: k, v and the FFN). peft's OFT
rotates the unfolded input patches of a k x k convolution, which is not W R for k > 1, so OFT adapts
1x1 convolutions only; BOFT's CNN default is the 1x1 convolutions too (its dense rotation of a 3x3
kernel costs seconds per CPU step). All are the identity at init and mergeable.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import nn

from peft_methods.peft_lib import (
    PeftLibMethod,
    backbone_family,
    check_positive,
    check_probability,
    check_targets,
)

if TYPE_CHECKING:
    from peft import PeftConfig


class OFT(PeftLibMethod):
    """OFT (Qiu et al. 2023): W' = W R with R block-diagonal orthogonal (Cayley), identity at init.

    Args:
        block_size: size of each orthogonal block (must divide every target's input size).
        coft: constrained OFT (R stays within eps of the identity); eps: its radius.
        block_share: one block shared by all blocks of a layer.
        module_dropout: multiplicative dropout (blocks set to identity).
        targets: as LoRA.
    """

    param_prefix = "oft_"
    adapts_desc = "Linear and 1x1 Conv2d"

    def __init__(
        self, block_size: int = 32, coft: bool = False, eps: float = 6e-5, block_share: bool = False,
        module_dropout: float = 0.0, targets: list[str] | None = None,
    ) -> None:
        name = type(self).__name__
        check_positive(name, block_size=block_size, eps=eps)
        check_probability(name, module_dropout=module_dropout)
        self.block_size, self.coft, self.eps = block_size, coft, eps
        self.block_share, self.module_dropout = block_share, module_dropout
        self.targets = check_targets(name, targets)

    def adapts(self, module: nn.Module) -> bool:
        # peft rotates unfolded input patches of a k x k conv and folds them back, which is not
        # W R (not even the identity at init) for k > 1; for 1x1 convs it is exact.
        if isinstance(module, nn.Conv2d):
            return module.groups == 1 and tuple(module.kernel_size) == (1, 1)
        return isinstance(module, nn.Linear)

    def peft_config(self, target_paths: list[str], model: nn.Module) -> PeftConfig:
        from peft import OFTConfig

        # The exact Cayley transform (no Neumann-series approximation): R stays orthogonal.
        return OFTConfig(
            r=0, oft_block_size=self.block_size, coft=self.coft, eps=self.eps,
            block_share=self.block_share, module_dropout=self.module_dropout,
            use_cayley_neumann=False, target_modules=target_paths,
        )


class BOFT(PeftLibMethod):
    """BOFT (Liu et al. 2024): OFT with a butterfly product of block-diagonal orthogonal factors.

    Args:
        block_size: size of each orthogonal block; n_butterfly_factor: number of butterfly
        factors (1 = OFT; more needs peft's compiled CUDA kernel); dropout: multiplicative
        dropout; targets: as LoRA.
    """

    param_prefix = "boft_"

    def __init__(
        self, block_size: int = 4, n_butterfly_factor: int = 1, dropout: float = 0.0,
        targets: list[str] | None = None,
    ) -> None:
        name = type(self).__name__
        check_positive(name, block_size=block_size, n_butterfly_factor=n_butterfly_factor)
        check_probability(name, dropout=dropout)
        self.block_size, self.n_butterfly_factor, self.dropout = block_size, n_butterfly_factor, dropout
        self.targets = check_targets(name, targets)

    def cnn_default(self, module: nn.Module) -> bool:
        # peft builds a dense (c_in k^2)^2 rotation per forward; on 3x3 convs that costs seconds
        # per step on CPU, so the CNN default is the 1x1 convs (3x3 ones may still be targeted).
        if isinstance(module, nn.Conv2d):
            return tuple(module.kernel_size) == (1, 1)
        return isinstance(module, nn.Linear)

    def peft_config(self, target_paths: list[str], model: nn.Module) -> PeftConfig:
        from peft import BOFTConfig
        from peft.tuners.boft.layer import get_fbd_cuda

        if self.n_butterfly_factor > 1 and not get_fbd_cuda():
            # Without the kernel peft silently drops to one factor; a different model must not pass unnoticed.
            raise ValueError(
                f"BOFT(n_butterfly_factor={self.n_butterfly_factor}) needs peft's compiled fbd_cuda "
                "kernel (CUDA + ninja), which is not available here; use n_butterfly_factor=1."
            )
        return BOFTConfig(
            boft_block_size=self.block_size, boft_block_num=0,
            boft_n_butterfly_factor=self.n_butterfly_factor, boft_dropout=self.dropout,
            target_modules=target_paths,
        )

    def _inject(self, config: PeftConfig, model: nn.Module) -> None:
        with warnings.catch_warnings():
            if self.n_butterfly_factor == 1:  # one factor needs no CUDA kernel: peft's notices do not apply
                warnings.filterwarnings("ignore", message="Failed to load the CUDA extension")
                warnings.filterwarnings("ignore", message="Setting boft_n_butterfly_factor to 1")
            super()._inject(config, model)


class IA3(PeftLibMethod):
    """(IA)^3 (Liu et al. 2022): learned per-channel scales (init 1) of keys, values and the FFN.

    Args:
        targets: layer names or None (ViT: k, v, fc2; UNet: to_k, to_v, ff.net.2; CNN: convs).
        feedforward: targets whose INPUT is scaled (the FFN's hidden activation); None: the
            default feed-forward layer (ViT fc2, UNet ff.net.2) where it is targeted.
    """

    param_prefix = "ia3_"
    vit_targets = ("k", "v", "fc2")
    unet_targets = ("to_k", "to_v", "ff.net.2")

    def __init__(self, targets: list[str] | None = None, feedforward: list[str] | None = None) -> None:
        self.targets = check_targets(type(self).__name__, targets)
        self.feedforward = None if feedforward is None else [str(f) for f in feedforward]

    def peft_config(self, target_paths: list[str], model: nn.Module) -> PeftConfig:
        from peft import IA3Config

        family = backbone_family(model)
        names = self.feedforward
        if names is None:
            names = {"vit": ["fc2"], "unet": ["ff.net.2"]}.get(family or "", [])

        def hits(n: str) -> list[str]:
            return [p for p in target_paths if p == n or p.endswith(f".{n}")]

        missing = [n for n in names if not hits(n)]
        if self.feedforward is not None and missing:
            raise ValueError(
                f"IA3 feedforward entries {missing} match none of its targets "
                f"({self.targets or 'the defaults'}); name layers that are also targets."
            )
        ff = [p for n in names for p in hits(n)]
        return IA3Config(target_modules=target_paths, feedforward_modules=ff, init_ia3_weights=True)
