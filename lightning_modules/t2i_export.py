"""Adapter export for TextToImage and a loader that rebuilds a ready StableDiffusionPipeline.

``<run dir>/adapter/`` is a ``peft_methods.export`` directory for the UNet (peft's own format for
LoRA / LoHa / LoKr / OFT..., ``adapter.safetensors`` + ``adapter_method.json`` for the others, and
``medpeft_adapter.json`` whose ``meta`` says which Stable Diffusion to apply it to). A LoRA export
also holds ``pytorch_lora_weights.safetensors`` in the diffusers format, so a plain
``StableDiffusionPipeline.load_lora_weights(<adapter dir>)`` accepts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from peft_methods.base import PeftMethod
from peft_methods.export import META_FILE
from peft_methods.export import export_adapter as export_peft_adapter
from peft_methods.export import load_adapter as load_peft_adapter

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def is_diffusers_lora(method: PeftMethod) -> bool:
    """Plain LoRA (not DoRA / LoHa / ...) is what ``load_lora_weights`` reads."""
    import peft_methods

    return type(method) is peft_methods.LoRA


def export_adapter(unet: nn.Module, method: PeftMethod, out_dir: str | Path, base: dict[str, Any]) -> Path:
    """Writes the adapter of ``unet`` (after ``method.apply``) to ``out_dir``.

    Args:
        unet: the adapted UNet with the weights to export.
        method: the PeftMethod applied to it.
        out_dir: destination directory (created).
        base: how to rebuild the base components (``TextToImage.base_info()``): ``pretrained``,
            ``tiny``, ``image_size``, ``tiny_seed``, ``prediction_type``, ``sampler``.
    """
    out = export_peft_adapter(unet, method, out_dir, {**base, "backbone": type(unet).__name__})
    if is_diffusers_lora(method):
        save_diffusers_lora(unet, out)
    return out


def save_diffusers_lora(unet: nn.Module, out_dir: Path) -> Path:
    """The UNet's LoRA tensors in diffusers' ``pytorch_lora_weights.safetensors`` (rank / alpha in metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from peft_methods.peft_lib import ADAPTER_NAME

    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    config = unet.peft_config[ADAPTER_NAME].to_dict()
    metadata = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    return out_dir / LORA_WEIGHTS


def read_base(adapter_dir: str | Path) -> dict[str, Any]:
    """The base-model record (``meta``) of an exported TextToImage adapter."""
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the adapter/ directory that a TextToImage fit exported.")
    meta = json.loads(path.read_text()).get("meta") or {}
    if "tiny" not in meta:
        raise ValueError(f"{path} was not exported by TextToImage (its meta names no Stable Diffusion base).")
    return meta


def build_pipeline(
    adapter_dir: str | Path | None = None,
    pretrained: str | None = None,
    merge: bool = True,
    sampler: str | None = None,
) -> Any:
    """A ready ``StableDiffusionPipeline`` with an exported adapter applied (and merged if possible).

    Args:
        adapter_dir: an exported ``adapter/`` directory; None gives the plain base model.
        pretrained: base model (hub id / local dir); default: the one recorded in the adapter.
        merge: fold mergeable methods into plain UNet weights (a stock UNet, no extra modules).
        sampler: sampling scheduler (default: the one the run used, else ``ddim``).
    """
    from lightning_modules.t2i_components import build_tiny_components, load_components
    from lightning_modules.t2i_sampling import make_pipeline

    base = read_base(adapter_dir) if adapter_dir is not None else {}
    if pretrained is None and base.get("tiny"):
        comps = build_tiny_components(int(base["image_size"]), int(base.get("tiny_seed", 0)), base["tiny"])
    else:
        source = pretrained or base.get("pretrained")
        if not source:
            raise ValueError("build_pipeline needs pretrained=<hub id or local SD directory> or an adapter_dir.")
        comps = load_components(source)
    if base.get("prediction_type"):
        comps.scheduler_config["prediction_type"] = base["prediction_type"]
    unet = comps.unet
    if adapter_dir is not None:
        unet, method = load_peft_adapter(adapter_dir, model=unet)
        if merge and method.mergeable:
            unet = method.merge(unet)
    for module in (unet, comps.vae, comps.text_encoder):
        module.eval().requires_grad_(False)
    return make_pipeline(
        unet, comps.vae, comps.text_encoder, comps.tokenizer, comps.scheduler_config,
        sampler or base.get("sampler", "ddim"),
    )
