"""Exporting a trained adapter to a small directory, and loading it onto a fresh backbone.

An export directory holds:

- ``medpeft_adapter.json``: ``format_version``, ``format`` (``"peft"`` or ``"medpeft"``), the
  method's ``{class_path, init_args}`` and ``meta`` (backbone, num_classes, in_chans, img_size and
  the pretrained weights source: ``true`` for the hub, a local file, or ``false``).
- methods implemented by the peft library (LoRA, DoRA, LoHa, LoKr, OFT, BOFT, IA3, VeRA): peft's own
  format, ``adapter_model.safetensors`` (keys ``base_model.model.<module>.<param>`` without the adapter
  name) + ``adapter_config.json`` (``target_modules`` as full module paths, the task head under
  ``modules_to_save``). ``PeftModel.from_pretrained`` or ``inject_adapter_in_model`` +
  ``set_peft_model_state_dict`` load it onto the same timm model; an adapter on q/v slices
  (targets ending in ``.qkv.q`` / ``.qkv.v``) first needs ``peft_methods.qkv_split.split_qkv(model,
  config.target_modules)``, which gives the fused ``attn.qkv`` separate q/k/v layers.
- every other method: ``adapter.safetensors`` (``trainable_state_dict``) + ``adapter_method.json``.

Only JSON and safetensors are read: loading an adapter never unpickles anything.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_methods.base import (
    PeftMethod,
    backbone_name,
    build_method,
    head_param_names,
    state_mismatch,
    trainable_state_dict,
)
from peft_methods.peft_lib import ADAPTER_NAME, PeftLibMethod
from peft_methods.qkv_split import QKVSplit

FORMAT_VERSION = 1
META_FILE = "medpeft_adapter.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
WEIGHTS, METHOD_FILE = "adapter.safetensors", "adapter_method.json"
PEFT_PREFIX = "base_model.model."


def peft_key(key: str, prefix: str) -> str:
    """Our parameter name -> peft's saved name (adapter name dropped, PeftModel prefix added)."""
    parts = key.split(".")
    kept = [p for i, p in enumerate(parts) if not (p == ADAPTER_NAME and i and parts[i - 1].startswith(prefix))]
    return PEFT_PREFIX + ".".join(kept)


def _in_chans(model: nn.Module) -> int | None:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    try:
        return int(model.get_submodule(first).in_channels) if first else None
    except AttributeError:
        return None


def _model_meta(model: nn.Module) -> dict[str, Any]:
    """What can be read off a timm model (the caller's meta takes precedence)."""
    meta: dict[str, Any] = {}
    if getattr(model, "pretrained_cfg", None):
        meta["backbone"] = backbone_name(model)
    if isinstance(getattr(model, "num_classes", None), int):
        meta["num_classes"] = model.num_classes
    if (chans := _in_chans(model)) is not None:
        meta["in_chans"] = chans
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        meta["img_size"] = size[0] if isinstance(size, tuple | list) and size[0] == size[-1] else list(size)
    return meta


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"Adapter metadata for {path} must be JSON-serialisable: {err}.") from err
    path.write_text(text + "\n")


def export_adapter(model: nn.Module, method: PeftMethod, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Writes ``model``'s trained adapter (trainable tensors only) to ``directory``.

    Args:
        model: the model after ``method.apply`` (and training).
        method: the applied method.
        directory: output directory (created; existing adapter files are overwritten).
        meta: backbone, num_classes, in_chans, img_size, pretrained (weights source) as the caller
            built the backbone; missing keys are read off the model where possible.

    Returns:
        The directory.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in trainable_state_dict(model).items()}
    record = {
        "format_version": FORMAT_VERSION,
        "method": method.config(),
        "meta": {**_model_meta(model), **dict(meta)},
    }
    if isinstance(method, PeftLibMethod):
        config = (getattr(model, "peft_config", None) or {}).get(ADAPTER_NAME)
        if config is None:
            raise ValueError(f"export_adapter: the model has no {type(method).__name__} adapter; call method.apply(model) first.")
        config = copy.deepcopy(config)
        # peft rewrites target_modules to the shortest suffixes after injection; record the full
        # paths of the injected layers so that split_qkv (and a reader) know exactly what was adapted.
        layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        config.target_modules = list(layers)
        if hasattr(config, "feedforward_modules"):
            config.feedforward_modules = [n for n, m in layers.items() if getattr(m, "is_feedforward", False)]
        heads = sorted({n.rsplit(".", 1)[0] for n in head_param_names(model)})
        config.modules_to_save = heads or None  # so PeftModel restores the trained head too
        config.base_model_name_or_path = record["meta"].get("backbone")
        config.save_pretrained(str(directory))
        save_file({peft_key(k, method.param_prefix): v for k, v in state.items()}, str(directory / PEFT_WEIGHTS))
        record["format"] = "peft"
    else:
        save_file(state, str(directory / WEIGHTS))
        _write_json(directory / METHOD_FILE, method.config())
        record["format"] = "medpeft"
    _write_json(directory / META_FILE, record)
    return directory


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not an adapter exported by peft_methods.export_adapter."
        )
    record = json.loads(path.read_text())
    if record.get("format_version") != FORMAT_VERSION or record.get("format") not in ("peft", "medpeft"):
        raise ValueError(
            f"{path} has format {record.get('format')!r} version {record.get('format_version')!r}; "
            f"this version of medpeft reads format version {FORMAT_VERSION} ('peft' or 'medpeft')."
        )
    return record


def _build_backbone(meta: dict[str, Any], pretrained: bool | str | None, directory: Path) -> nn.Module:
    from lightning_modules.backbones import create_backbone

    if not meta.get("backbone"):
        raise ValueError(
            f"Adapter {directory} records no timm backbone name; pass the model to load it onto "
            "(load_adapter(directory, model=...))."
        )
    return create_backbone(
        meta["backbone"],
        num_classes=int(meta.get("num_classes", 0)),
        pretrained=meta.get("pretrained", False) if pretrained is None else pretrained,
        in_chans=int(meta.get("in_chans", 3)),
        img_size=meta.get("img_size"),
    )


def _check_model_fits(model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    """Compares a caller's model with what the adapter was exported for (one clear error)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer | QKVSplit) for m in model.modules()):
        raise ValueError(
            f"load_adapter({directory}) needs a plain backbone, but the model already has adapter "
            "layers injected; pass a freshly built backbone or model=None."
        )
    found = _model_meta(model)
    for key in ("backbone", "num_classes", "in_chans"):
        if key in meta and key in found and meta[key] != found[key]:
            raise ValueError(
                f"Adapter {directory} was exported for {key}={meta[key]!r}, but the model has "
                f"{key}={found[key]!r}; build the backbone with {key}={meta[key]!r} or pass model=None."
            )


def _check_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str, directory: Path
) -> None:
    problem = state_mismatch(state, expected, limit=3)
    if problem:
        raise ValueError(
            f"Adapter tensors in {directory} do not fit {where}: {problem}. They were made "
            "for another method, backbone or class count; export and load with the same ones."
        )


def load_adapter(
    directory: str | Path, model: nn.Module | None = None, pretrained: bool | str | None = None
) -> tuple[nn.Module, PeftMethod]:
    """Rebuilds the adapted model of an export: backbone (fresh or given) + method + trained tensors.

    Args:
        directory: an ``export_adapter`` directory.
        model: a plain backbone to load onto; None builds it from the recorded meta.
        pretrained: backbone weights source overriding the recorded one (True = hub, a local
            weights file, False); None uses the recorded source. Only used when model is None.

    Returns:
        (model with the method applied and the adapter loaded, the method).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    record = _read_record(directory)
    meta = dict(record.get("meta") or {})
    method = build_method(record["method"])
    if model is None:
        model = _build_backbone(meta, pretrained, directory)
    else:
        _check_model_fits(model, meta, directory)
    model = method.apply(model)
    expected = trainable_state_dict(model)
    weights = directory / (PEFT_WEIGHTS if record["format"] == "peft" else WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"Adapter weights {weights} are missing; re-export the adapter.")
    state = load_file(str(weights))
    if record["format"] == "peft":
        ours = {peft_key(k, method.param_prefix): k for k in expected}
        state = {ours.get(k, k): v for k, v in state.items()}
    where = f"{type(method).__name__} on backbone '{backbone_name(model)}' (num_classes={meta.get('num_classes')})"
    _check_state(state, expected, where, directory)
    model.load_state_dict(state, strict=False)
    return model, method
