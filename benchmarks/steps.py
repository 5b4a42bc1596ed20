"""Training-step time of each PEFT config relative to full fine-tuning, our LoRA against plain peft,
and the size of each exported adapter."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    NUM_CLASSES,
    VIT,
    ClassifierStep,
    PlainStep,
    batch,
    classifier,
    interleaved,
    method,
    paired_median_ratio,
    peft_configs,
    ratio,
    ratios,
    seconds,
)

#: Methods that need no backbone weight gradient (the 0.75 step-ratio target) and LinearProbe.
NO_WEIGHT_GRAD = ("lora", "ssf", "bitfit", "norm_tuning", "vpt_shallow", "adaptformer", "fact_tt")
#: The configs of ``--quick``: the ViT-S step and inference targets.
QUICK = ("full", "linear_probe", *NO_WEIGHT_GRAD)


def build_modules(backbone: str, names: tuple[str, ...] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """ImageClassifiers for the configs that apply to ``backbone`` (all configs when ``names`` is None)."""
    modules, skipped = {}, {}
    for name in names or tuple(peft_configs()):
        try:
            modules[name] = classifier(backbone, method(name))
        except ValueError as err:  # the method does not support this backbone
            skipped[name] = str(err).split(": ", 1)[-1]
    if "full" not in modules:
        raise ValueError("configs/peft/full.yaml is needed as the reference of every step ratio.")
    return modules, skipped


def floor_module(backbone: str) -> Any:
    """The cheapest step that back-propagates through every block: no parameter gradient but the head's.

    A LinearProbe whose patch / stem output is made to require a gradient, so backward computes the
    input gradient of every block and nothing else: a lower bound for every method that trains
    something in or before the first block (all of them but LinearProbe).
    """
    module = classifier(backbone, method("linear_probe"))
    first = getattr(module.model, "patch_embed", None) or getattr(module.model, "conv1", None)
    if first is None:
        raise ValueError(f"no patch embedding or stem conv found in {backbone} for the floor measurement.")
    first.register_forward_hook(lambda _m, _i, out: out.requires_grad_() if module.training else out)
    return module


def step_ratios(
    backbone: str, names: tuple[str, ...] | None, rounds: int, max_seconds: float | None = None, min_rounds: int = 1
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{config: {"wall", "cpu"} step time / full fine-tuning step time}`` and the details behind it.

    ``floor`` is the step of ``floor_module``: what no method that trains inside the blocks can beat.
    ``max_seconds`` / ``min_rounds``: the rounds' time budget (``harness.interleaved``); the details
    record the rounds run.
    """
    modules, skipped = build_modules(backbone, names)
    images, labels = batch()
    steps = {name: ClassifierStep(m, images, labels) for name, m in modules.items()}
    steps["floor"] = ClassifierStep(floor_module(backbone), images, labels)
    times = interleaved(steps, rounds=rounds, max_seconds=max_seconds, min_rounds=min_rounds)
    details = {
        "rounds": len(times["full"].wall),
        "seconds_per_step": seconds(times),
        "paired_median_ratio": {n: paired_median_ratio(t, times["full"]) for n, t in times.items() if n != "full"},
        "trainable_params": {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in modules.items()},
        "floor": "LinearProbe + input gradients through every block (benchmarks.steps.floor_module)",
        "skipped": skipped,
    }
    if backbone == VIT:
        details["adapter_bytes"] = {n: adapter_bytes(m) for n, m in modules.items()}
    return ratios(times, "full"), details


def adapter_bytes(module: Any) -> int:
    """Bytes on disk of ``peft_methods.export.export_adapter`` for the module's trained adapter."""
    from peft_methods.export import export_adapter

    with tempfile.TemporaryDirectory() as tmp:
        out = export_adapter(module.model, module.peft, Path(tmp) / "adapter", module.export_meta())
        return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def peft_lib_ratio(rounds: int, compare_qv: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """Our LoRA step (ImageClassifier, r=8 on the fused qkv) / a plain timm + peft script's step.

    The plain script: ``timm.create_model`` + ``peft.get_peft_model(LoraConfig(r=8, lora_alpha=8,
    target_modules=["qkv"], modules_to_save=["head"]))``, AdamW with its defaults over the trainable
    parameters, float inputs normalised outside the step. Details also compare our default LoRA
    (separate q and v slices of qkv, which plain peft cannot target; ``compare_qv``) and, where our attention kernel
    differs from timm's default (explicit attention on CPU in bf16), the plain script with our kernel.
    """
    import timm
    from peft import LoraConfig, get_peft_model

    from lightning_modules.speedups import set_fused_attention, uses_fused_attention
    from peft_methods import LoRA

    images, labels = batch()
    ours = classifier(VIT, LoRA(r=8, alpha=8, targets=["qkv"]))
    x = ours.preprocess(images).detach()
    our_kernel_fused = uses_fused_attention(ours.model)

    def plain(fused_attention: bool | None) -> PlainStep:
        torch.manual_seed(0)
        model = timm.create_model(VIT, pretrained=False, num_classes=NUM_CLASSES)
        if fused_attention is not None:
            set_fused_attention(model, fused_attention)
        config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["qkv"], modules_to_save=["head"])
        model = get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return PlainStep(model, optimizer, x, labels)

    cases = {"ours": ClassifierStep(ours, images, labels), "plain_peft": plain(None)}
    if compare_qv:
        cases["ours_qv"] = ClassifierStep(classifier(VIT, LoRA(r=8, alpha=8)), images, labels)
    if uses_fused_attention(cases["plain_peft"].model) != our_kernel_fused:
        cases["plain_peft_same_kernels"] = plain(our_kernel_fused)
    times = interleaved(cases, rounds=rounds)
    details = {
        "seconds_per_step": seconds(times),
        "our_attention": "fused (scaled_dot_product_attention)" if our_kernel_fused else "explicit",
    }
    if compare_qv:
        details["ours_qv_over_plain_peft"] = ratio(times["ours_qv"], times["plain_peft"])
    if "plain_peft_same_kernels" in times:
        details["ours_over_plain_peft_same_kernels"] = ratio(times["ours"], times["plain_peft_same_kernels"])
    return ratio(times["ours"], times["plain_peft"]), details


def channels_last_ratio(backbone: str, config: str, rounds: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Training step with ``channels_last: true`` / with the default layout (a CNN)."""
    images, labels = batch()
    steps = {
        "default": ClassifierStep(classifier(backbone, method(config)), images, labels),
        "channels_last": ClassifierStep(classifier(backbone, method(config), channels_last=True), images, labels),
    }
    times = interleaved(steps, rounds=rounds)
    return ratio(times["channels_last"], times["default"]), {"config": config, "seconds_per_step": seconds(times)}
