"""The PeftMethod interface and the helpers every method shares.

A method turns a pretrained backbone into a parameter-efficiently trainable one: ``apply`` freezes
the backbone, injects the method's own modules (or unfreezes a chosen subset) and leaves the task
head trainable; ``merge`` folds a mergeable method back into plain backbone weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

try:  # timm's DropPath has no parameters but must follow the same train/eval policy as dropout.
    from timm.layers import DropPath as _TimmDropPath

    _DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, _TimmDropPath)
except ImportError:  # pragma: no cover - timm is a hard dependency, this only guards odd installs
    _DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)

# Every normalisation layer whose affine parameters NormTuning trains. _NormBase covers BatchNorm
# and InstanceNorm (and timm's BatchNormAct2d); timm's LayerNorm / LayerNorm2d subclass nn.LayerNorm.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, _NormBase, nn.RMSNorm)


class PeftMethod:
    """Turns a pretrained backbone into a parameter-efficiently trainable one.

    Subclasses store every constructor argument as an attribute of the same name: the arguments
    ARE the method's config (``hparams``) and are what an exported adapter records.
    """

    mergeable: ClassVar[bool] = False
    #: Name prefix of the parameters a method adds (``lora_``, ``ssf_``...); empty for selective ones.
    param_prefix: ClassVar[str] = ""
    #: False when the method changes the model's outputs at init (SSF's random scales, VPT's prompts).
    identity_at_init: ClassVar[bool] = True

    def apply(self, model: nn.Module) -> nn.Module:
        """Freezes the backbone, injects the method, and returns the model to train (head trainable)."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Folds the method into plain weights: same outputs, no extra modules, original param count."""
        if not self.mergeable:
            raise ValueError(
                f"{type(self).__name__} cannot be merged into the backbone: it adds modules or tokens "
                "that have no equivalent plain weights; keep the unmerged model for inference."
            )
        return model

    def unsupported_reason(self, model: nn.Module) -> str | None:
        """Why this method cannot be applied to ``model``, or None when it can."""
        return None

    # ------------------------------------------------------------------ shared behaviour
    def check_supported(self, model: nn.Module) -> None:
        """Raises one clear ValueError when the method does not apply to ``model``."""
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise ValueError(
                f"{type(self).__name__} does not support backbone '{backbone_name(model)}': {reason}"
            )

    @property
    def hparams(self) -> dict[str, Any]:
        """The constructor arguments, read back from the attributes of the same name."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: getattr(self, n) for n in names}

    def config(self) -> dict[str, Any]:
        """A ``{class_path, init_args}`` mapping that rebuilds this method (YAML / checkpoint form)."""
        return {"class_path": class_path(type(self)), "init_args": dict(self.hparams)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.hparams == other.hparams  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))


def class_path(cls: type) -> str:
    """The public import path of a method class (``peft_methods.LoRA`` where it is exported there)."""
    import peft_methods

    if getattr(peft_methods, cls.__name__, None) is cls:
        return f"peft_methods.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def build_method(spec: PeftMethod | dict[str, Any] | None) -> PeftMethod:
    """Returns a PeftMethod from an instance, a ``{class_path, init_args}`` mapping, or None (full)."""
    if spec is None:
        from peft_methods.selective import FullFineTuning

        return FullFineTuning()
    if isinstance(spec, PeftMethod):
        return spec
    if isinstance(spec, dict) and "class_path" in spec:
        module_name, _, name = str(spec["class_path"]).rpartition(".")
        import importlib

        try:
            cls = getattr(importlib.import_module(module_name or "peft_methods"), name)
        except (ImportError, AttributeError):
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, PeftMethod)):
            import peft_methods

            known = ", ".join(c.__name__ for c in peft_methods.ALL_METHODS)
            raise ValueError(
                f"Unknown PEFT method '{spec['class_path']}'; use one of: {known} "
                "(e.g. class_path: peft_methods.LoRA)."
            )
        return cls(**dict(spec.get("init_args") or {}))
    raise ValueError(
        f"A PEFT method must be given as {{class_path, init_args}}, got {spec!r}; "
        "see configs/peft/*.yaml for examples."
    )


# ---------------------------------------------------------------------- model helpers
def backbone_name(model: nn.Module) -> str:
    """The timm architecture name of ``model`` (its class name when it is not a timm model)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def head_module(model: nn.Module) -> nn.Module | None:
    """The task head of a timm classifier (``head`` / ``fc`` / ``classifier``), if any."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            return head
    return None


def head_param_names(model: nn.Module) -> set[str]:
    """Qualified names of the task head's parameters (empty for num_classes=0)."""
    head = head_module(model)
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def freeze(model: nn.Module) -> None:
    """Sets requires_grad=False on every parameter."""
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model: nn.Module) -> None:
    """Makes the task head trainable (every method trains it)."""
    head = head_module(model)
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)


def unfreeze_named(model: nn.Module, names: Iterable[str]) -> int:
    """Makes the named parameters trainable; returns how many tensors were unfrozen."""
    wanted = set(names)
    count = 0
    for n, p in model.named_parameters():
        if n in wanted:
            p.requires_grad_(True)
            count += 1
    return count


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def backbone_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the task head's subtree."""
    head = head_module(model)
    head_ids = {id(m) for m in head.modules()} if head is not None else set()
    for name, module in model.named_modules():
        if id(module) not in head_ids:
            yield name, module


def keep_frozen_in_eval(model: nn.Module) -> None:
    """Puts the frozen parts of a model in eval mode after ``model.train()``.

    Policy: a normalisation layer with running statistics whose own affine parameters are all
    frozen keeps its statistics frozen (eval); a dropout / drop-path layer whose parent module has
    no trainable parameter at all is off (eval), so a fully frozen block behaves exactly as the
    pretrained one. Layers that train keep training behaviour.
    """
    modules = dict(model.named_modules())
    for path, parent in modules.items():
        parent_trains: bool | None = None
        owner = parent  # a dropout kept in a ModuleDict / ModuleList (peft's lora_dropout) belongs to its owner
        while isinstance(owner, nn.ModuleDict | nn.ModuleList) and path:
            path = path.rpartition(".")[0]
            owner = modules[path]
        for child in parent.children():
            if isinstance(child, _NormBase) and child.track_running_stats:
                if not any(p.requires_grad for p in child.parameters(recurse=False)):
                    child.eval()
            elif isinstance(child, _DROPOUT_TYPES):
                if parent_trains is None:
                    parent_trains = any(p.requires_grad for p in owner.parameters())
                if not parent_trains:
                    child.eval()
                    # timm's fused attention reads its own flag (not its attn_drop child's) for dropout.
                    parent.training = False


def state_mismatch(
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    optional: set[str] | frozenset[str] = frozenset(),
    limit: int = 5,
) -> str | None:
    """How ``state`` differs from ``expected`` (missing / unexpected / shape mismatch), or None.

    ``optional`` keys may be absent from ``state``. The text lists at most ``limit`` keys per kind,
    for error messages about weights, checkpoints and adapters that were made for another model.
    """
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state if k in expected and state[k].shape != expected[k].shape
    )
    parts = [
        f"{label} ({len(keys)}): {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    return "; ".join(parts) or None


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: trainable tensors plus the running statistics that train.

    Running statistics (BatchNorm buffers) change only in layers whose affine parameters train
    (see ``keep_frozen_in_eval``), so those buffers are saved with them; everything else is the
    pretrained backbone and is rebuilt from its weights.
    """
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for mname, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            non_persistent = getattr(module, "_non_persistent_buffers_set", set())
            for bname, buf in module.named_buffers(recurse=False):
                if buf is not None and bname not in non_persistent:
                    state[f"{mname}.{bname}" if mname else bname] = buf.detach()
    return state
