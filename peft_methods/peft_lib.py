"""Shared machinery of the methods that wrap the ``peft`` library (LoRA, DoRA, LoHa, LoKr, ...).

peft matches ``target_modules`` entries by name suffix, so ``"proj"`` would also hit
``patch_embed.proj``. Here the user's short target names are resolved to full module paths over the
layers a method may adapt for the backbone's family, and peft only ever sees those full paths.

Families and target vocabularies:

- ``vit``: timm ViTs (``timm.layers.Attention`` with a fused ``qkv`` Linear). Targets ``q``, ``k``,
  ``v`` (slices of the fused ``qkv``), ``qkv`` (fused), ``proj`` (attention output), ``fc1``, ``fc2``.
  A slice target replaces each ``attn.qkv`` by a :class:`QKVSplit` (same outputs, separate q/k/v
  Linear layers) so that peft can adapt q and v alone; ``merge`` fuses it back exactly.
- ``cnn``: timm CNNs. Targets are module-name suffixes (``conv1``, ``conv2``, ``downsample.0``...)
  over the Conv2d (groups=1) and Linear layers outside the stem (the top-level module holding the
  model's ``first_conv``) and the head. Default: every 1x1 / 3x3 Conv2d and every Linear there,
  i.e. all convolutions of the residual stages (plus MLP layers of ConvNeXt-like blocks).
- Other attention modules (BEiT's, EVA's, Swin's ``WindowAttention``) are not adapted: some read
  ``self.qkv.weight`` directly, which would silently bypass an injected layer.
- ``unet``: diffusers ``UNet2DConditionModel``. Targets are module-name suffixes over all Linear /
  Conv2d layers; default the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from peft_methods.base import (
    PeftMethod,
    backbone_modules,
    backbone_name,
    freeze,
    unfreeze_head,
    unfreeze_named,
)
from peft_methods.qkv_split import QKVSplit, fuse_qkv, set_submodule, split_qkv

if TYPE_CHECKING:
    from peft import PeftConfig

VIT_TARGETS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2")
UNET_DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "default"


# ---------------------------------------------------------------------- argument checks
def check_positive(method: str, **values: float) -> None:
    """One ValueError for a non-positive size argument."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{method} needs {name} > 0, got {name}={value!r}.")


def check_probability(method: str, **values: float) -> None:
    """One ValueError for a dropout-like argument outside [0, 1)."""
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{method} needs 0 <= {name} < 1, got {name}={value!r}.")


def check_targets(method: str, targets: list[str] | None) -> list[str] | None:
    """``targets`` as a list of names (None = the backbone's default); one ValueError otherwise."""
    if targets is None:
        return None
    if isinstance(targets, str) or not targets:
        raise ValueError(
            f"{method} targets must be a non-empty list of layer names (e.g. [q, v]) or null for "
            f"the backbone's default, got {targets!r}."
        )
    return [str(t) for t in targets]


# ---------------------------------------------------------------------- backbone families
def _is_unet(model: nn.Module) -> bool:
    return any(
        c.__name__ == "UNet2DConditionModel" and c.__module__.startswith("diffusers")
        for c in type(model).__mro__
    )


def _is_vit_attention(module: nn.Module) -> bool:
    from timm.layers import Attention

    return isinstance(module, Attention) and isinstance(module.qkv, (nn.Linear, QKVSplit))


def _foreign_attention(model: nn.Module) -> str | None:
    """The class name of an attention module that is not timm.layers.Attention, if any.

    Some (BEiT, EVA) read ``self.qkv.weight`` in ``F.linear`` instead of calling ``self.qkv``, which
    would silently bypass an injected adapter; they are therefore not adapted at all.
    """
    for _, module in backbone_modules(model):
        if "Attention" in type(module).__name__ and not _is_vit_attention(module):
            if any(isinstance(getattr(module, n, None), nn.Linear) for n in ("qkv", "q_proj", "q")):
                return type(module).__name__
    return None


def backbone_family(model: nn.Module) -> str | None:
    """``"unet"``, ``"vit"``, ``"cnn"`` or None (not supported by the peft-library methods)."""
    if _is_unet(model):
        return "unet"
    modules = [m for _, m in backbone_modules(model)]
    if any(_is_vit_attention(m) for m in modules):
        return "vit"
    if any(isinstance(m, nn.Conv2d) for m in modules) and _foreign_attention(model) is None:
        return "cnn"
    return None


def _stem_prefix(model: nn.Module) -> str | None:
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    return first_conv.split(".")[0] if first_conv else None


def _short_name(path: str) -> str:
    """The last path component, or the last two when the last is an index (``to_out.0``)."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def candidate_layers(
    model: nn.Module, family: str, adapts: Callable[[nn.Module], bool]
) -> dict[str, str]:
    """Full path -> short target name of every layer a method may adapt in ``model``."""
    out: dict[str, str] = {}
    if family == "vit":
        for path, module in backbone_modules(model):
            if _is_vit_attention(module):
                for name in ("q", "k", "v"):
                    out[f"{path}.qkv.{name}"] = name
                out[f"{path}.qkv"] = "qkv"
                if isinstance(module.proj, nn.Linear):
                    out[f"{path}.proj"] = "proj"
            elif isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(
                getattr(module, "fc2", None), nn.Linear
            ):
                out[f"{path}.fc1"] = "fc1"
                out[f"{path}.fc2"] = "fc2"
        return out  # every ViT target is a Linear layer, which all methods support
    stem = _stem_prefix(model) if family == "cnn" else None
    for path, module in backbone_modules(model):
        if not path or (stem and path.split(".")[0] == stem):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) and adapts(module):
            out[path] = _short_name(path)
    return out


def resolve_targets(
    method: PeftLibMethod, model: nn.Module, family: str, targets: Sequence[str] | None
) -> list[str]:
    """Full module paths (in model order) of the layers ``method`` adapts; one ValueError otherwise."""
    candidates = candidate_layers(model, family, method.adapts)
    shorts = set(candidates.values())
    valid = [t for t in VIT_TARGETS if t in shorts] if family == "vit" else sorted(shorts)
    where = f"{type(method).__name__} on backbone '{backbone_name(model)}'"
    if targets is None and family == "cnn":
        chosen = {p for p in candidates if method.cnn_default(model.get_submodule(p))}
    else:
        names = list(targets) if targets is not None else list(method.default_targets(family))
        if family == "vit" and "qkv" in names and {"q", "k", "v"} & set(names):
            raise ValueError(
                f"{where}: targets {names} mix the fused 'qkv' with its q/k/v slices; use either "
                "'qkv' or some of 'q', 'k', 'v'."
            )
        chosen = set()
        for name in names:
            hit = {p for p in candidates if p == name or p.endswith(f".{name}")}
            if not hit:
                raise ValueError(
                    f"{where}: target '{name}' matches no adaptable layer; valid targets are "
                    f"{', '.join(valid)} (set targets to some of them, or leave it unset for the default)."
                )
            chosen |= hit
    if not chosen:
        raise ValueError(f"{where}: no layer to adapt; valid targets are {', '.join(valid)}.")
    return [p for p in candidates if p in chosen]


def adapter_param_names(model: nn.Module, prefix: str) -> list[str]:
    """Names of the parameters peft added (a name component starts with the tuner's prefix)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner_paths = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    names = []
    for name, _ in model.named_parameters():
        for path in tuner_paths:
            if name.startswith(f"{path}."):
                rest = name[len(path) + 1:].split(".")
                if rest[0].startswith(prefix):
                    names.append(name)
                break
    return names


class PeftLibMethod(PeftMethod):
    """A method implemented by the ``peft`` library: resolve targets, inject, enforce trainability.

    Subclasses store their constructor arguments and build the peft config in ``peft_config``.
    """

    mergeable = True
    #: The layers ``adapts`` accepts, as errors name them.
    adapts_desc: ClassVar[str] = "Linear and Conv2d (groups=1)"
    #: Default short target names for ViTs and UNets (CNNs: every 1x1 / 3x3 conv of the stages).
    vit_targets: ClassVar[tuple[str, ...]] = ("q", "v")
    unet_targets: ClassVar[tuple[str, ...]] = UNET_DEFAULT_TARGETS
    targets: list[str] | None

    def peft_config(self, target_paths: list[str], model: nn.Module) -> PeftConfig:
        """The peft config adapting exactly ``target_paths`` (full module paths)."""
        raise NotImplementedError

    def adapts(self, module: nn.Module) -> bool:
        """Whether the peft tuner implements this method exactly for ``module``."""
        if isinstance(module, nn.Conv2d):
            return module.groups == 1  # peft's conv layers do not handle grouped / depthwise convs
        return isinstance(module, nn.Linear)

    def cnn_default(self, module: nn.Module) -> bool:
        """Whether an adaptable CNN layer is a default target: every 1x1 / 3x3 conv and Linear."""
        if isinstance(module, nn.Conv2d):
            return tuple(module.kernel_size) in {(1, 1), (3, 3)}
        return isinstance(module, nn.Linear)

    def default_targets(self, family: str) -> tuple[str, ...]:
        return self.vit_targets if family == "vit" else self.unet_targets

    def unsupported_reason(self, model: nn.Module) -> str | None:
        family = backbone_family(model)
        if family is None:
            other = _foreign_attention(model)
            found = f"its attention modules are {other}, not timm.layers.Attention; " if other else ""
            return (
                f"{found}it adapts timm ViTs (timm.layers.Attention), CNNs (Conv2d layers) and "
                "diffusers UNet2DConditionModel."
            )
        if not candidate_layers(model, family, self.adapts):
            return f"it adapts {self.adapts_desc} layers only, and there are none outside the stem and the head."
        return None

    def target_paths(self, model: nn.Module) -> list[str]:
        """Full module paths this method adapts in ``model`` (before ``apply``)."""
        self.check_supported(model)
        return resolve_targets(self, model, backbone_family(model) or "", self.targets)

    def _inject(self, config: PeftConfig, model: nn.Module) -> None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)

    def apply(self, model: nn.Module) -> nn.Module:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                f"{type(self).__name__}: backbone '{backbone_name(model)}' already has peft adapter "
                "layers; apply a method once, to a freshly built backbone."
            )
        paths = self.target_paths(model)
        freeze(model)
        split_qkv(model, paths)
        self._inject(self.peft_config(paths, model), model)
        # peft's own trainability rules differ from ours: backbone frozen, adapter + head trainable.
        freeze(model)
        trainable = adapter_param_names(model, self.param_prefix)
        if not trainable:
            raise ValueError(
                f"{type(self).__name__} added no parameters to backbone '{backbone_name(model)}'; "
                f"check targets={self.targets}."
            )
        unfreeze_named(model, trainable)
        unfreeze_head(model)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """peft's merge-and-unload on every injected layer, then fused qkv layers restored."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for path, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[ADAPTER_NAME])
                set_submodule(model, path, module.get_base_layer())
        fuse_qkv(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        return model
