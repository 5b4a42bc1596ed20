"""Low-rank weight updates implemented by the ``peft`` library: LoRA, DoRA, LoHa, LoKr, VeRA.

Each class only maps its arguments to the peft config; target resolution, injection, trainability
and merging are shared (``peft_methods.peft_lib``). ``targets`` are short layer names: for timm ViTs
``q``, ``k``, ``v`` (slices of the fused ``attn.qkv``), ``qkv``, ``proj`` (attention output, never
``patch_embed.proj``), ``fc1``, ``fc2``; for CNNs and UNets module-name suffixes (``conv2``,
``downsample.0``, ``to_q``, ``to_out.0``). ``None`` picks the backbone's default: ViT q and v, CNN
every 1x1 / 3x3 conv of the residual stages (not the stem), UNet ``to_q``, ``to_k``, ``to_v``,
``to_out.0``. Every method is the identity at init and mergeable.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from peft_methods.peft_lib import (
    ADAPTER_NAME,
    PeftLibMethod,
    check_positive,
    check_probability,
    check_targets,
)

if TYPE_CHECKING:
    from peft import PeftConfig


class LoRA(PeftLibMethod):
    """LoRA (Hu et al. 2022): W' = W + (alpha / r) B A, B zero-init; default ViT targets q and v.

    Args:
        r: rank of the update.
        alpha: scale numerator (scale alpha / r); alpha = r = 8 is the LoRA-paper ViT setting and
            diffusers' convention (alpha = r) for UNets.
        dropout: dropout on the adapter's input.
        targets: layer names (see module docstring); None for the backbone's default.
    """

    param_prefix = "lora_"
    use_dora: ClassVar[bool] = False

    def __init__(
        self, r: int = 8, alpha: float = 8, dropout: float = 0.0, targets: list[str] | None = None
    ) -> None:
        name = type(self).__name__
        check_positive(name, r=r, alpha=alpha)
        check_probability(name, dropout=dropout)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.targets = check_targets(name, targets)

    def peft_config(self, target_paths: list[str], model: nn.Module) -> PeftConfig:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=target_paths, use_dora=self.use_dora,
        )


class DoRA(LoRA):
    """DoRA (Liu et al. 2024): LoRA on the direction plus a learned per-output magnitude.

    Same arguments as LoRA; the ViT default is the fused ``qkv`` (magnitude over all 3d outputs).
    """

    use_dora = True
    vit_targets = ("qkv",)


class LoHa(PeftLibMethod):
    """LoHa (Hyeon-Woo et al. 2022): dW = (B1 A1) * (B2 A2) (Hadamard product of two low-rank terms).

    Args:
        r: rank of each factor; alpha: scale numerator (alpha / r); rank_dropout, module_dropout:
        LyCORIS dropouts; targets: layer names or None.
    """

    param_prefix = "hada_"

    def __init__(
        self, r: int = 8, alpha: float = 8, rank_dropout: float = 0.0, module_dropout: float = 0.0,
        targets: list[str] | None = None,
    ) -> None:
        name = type(self).__name__
        check_positive(name, r=r, alpha=alpha)
        check_probability(name, rank_dropout=rank_dropout, module_dropout=module_dropout)
        self.r, self.alpha = r, alpha
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.targets = check_targets(name, targets)

    def peft_config(self, target_paths: list[str], model: nn.Module) -> PeftConfig:
        from peft import LoHaConfig

        return LoHaConfig(
            r=self.r, alpha=self.alpha, rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout, target_modules=target_paths,
        )


class LoKr(PeftLibMethod):
    """LoKr (Yeh et al. 2024): dW = C kron (B A) (Kronecker product with a low-rank factor).

    Args:
        r: rank of the low-rank factor; alpha: scale numerator (alpha / r); rank_dropout,
        module_dropout: LyCORIS dropouts; decompose_both: also factorise the small matrix;
        decompose_factor: Kronecker split factor (-1: as square as possible); targets: as LoRA.
    """

    param_prefix = "lokr_"

    def __init__(
        self, r: int = 8, alpha: float = 8, rank_dropout: float = 0.0, module_dropout: float = 0.0,
        decompose_both: bool = False, decompose_factor: int = -1, targets: list[str] | None = None,
    ) -> None:
        name = type(self).__name__
        check_positive(name, r=r, alpha=alpha)
        check_probability(name, rank_dropout=rank_dropout, module_dropout=module_dropout)
        self.r, self.alpha = r, alpha
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.decompose_both, self.decompose_factor = decompose_both, decompose_factor
        self.targets = check_targets(name, targets)

    def peft_config(self, target_paths: list[str], model: nn.Module) -> PeftConfig:
        from peft import LoKrConfig

        return LoKrConfig(
            r=self.r, alpha=self.alpha, rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout, decompose_both=self.decompose_both,
            decompose_factor=self.decompose_factor, target_modules=target_paths,
        )


class VeRA(PeftLibMethod):
    """VeRA (Kopiczko et al. 2024): frozen shared random A, B; learned vectors d, b: dW = diag(b) B diag(d) A.

    Linear layers only. The random matrices come from ``projection_prng_key`` and are rebuilt, not
    saved. Args: r (shared rank), d_initial (init of d; b starts at 0), dropout, projection_prng_key,
    targets (as LoRA).
    """

    param_prefix = "vera_lambda_"
    adapts_desc = "Linear"

    def adapts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def __init__(
        self, r: int = 256, d_initial: float = 0.1, dropout: float = 0.0, projection_prng_key: int = 0,
        targets: list[str] | None = None,
    ) -> None:
        name = type(self).__name__
        check_positive(name, r=r)
        check_probability(name, dropout=dropout)
        self.r, self.d_initial, self.dropout = r, d_initial, dropout
        self.projection_prng_key = projection_prng_key
        self.targets = check_targets(name, targets)

    def peft_config(self, target_paths: list[str], model: nn.Module) -> PeftConfig:
        from peft import VeraConfig

        with warnings.catch_warnings():  # not saving the projections is the point: they are rebuilt
            warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
            return VeraConfig(
                r=self.r, d_initial=self.d_initial, vera_dropout=self.dropout,
                projection_prng_key=self.projection_prng_key, save_projection=False,
                target_modules=target_paths,
            )

    def _inject(self, config: PeftConfig, model: nn.Module) -> None:
        # peft's inject_adapter_in_model refuses tuners with shared state; VeRA's shared random
        # matrices are referenced by every layer, so building the tuner injects the same way.
        from peft.tuners.vera import VeraModel

        VeraModel(model, config, ADAPTER_NAME)


