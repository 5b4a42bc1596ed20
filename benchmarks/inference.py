"""Inference latency of adapted models (merged and unmerged) relative to the plain backbone.

Latency is one image's forward pass (batch 1), the unit a diagnostic query waits for. It is also the
unit that measures best on a shared machine: a ratio is the fastest of many short passes of the
case over the fastest of the plain model's passes run beside them, so a burst of other work spoils
a few samples rather than a whole measurement. Six identical models measured 0.93-1.18 of the plain
one with 3 rounds of one batch-8 pass, and 0.97-1.02 with batch 1, 6 rounds of 5, in the same time
(one process each, on a loaded host).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.harness import (
    NUM_CLASSES,
    VIT,
    Timings,
    adjacent_ratios,
    autocast,
    batch,
    classifier,
    method,
    precision,
    seconds,
)
from lightning_modules.backbones import create_backbone
from lightning_modules.speedups import prefers_fused_attention, set_fused_attention

#: Images per timed forward pass: latency.
INFER_BATCH = 1


class Forward:
    """One eval-mode forward pass under inference_mode and ``autocast()`` (as predict runs)."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model.eval(), x
        set_fused_attention(model, prefers_fused_attention(model, "cpu", precision()))

    def __call__(self) -> None:
        with torch.inference_mode(), autocast():
            self.model(self.x)


def _trained(module: Any) -> nn.Module:
    """The module's adapted backbone with its trainable tensors moved off their init (as after training),
    so that a merge folds real, non-zero updates."""
    model = module.model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.01)
    return model


def merged_twin(name: str) -> nn.Module:
    """The merged model of ``_trained(classifier(VIT, method(name)))``, built afresh (same seeds, same
    values): a deep copy of a model with ``torch.nn.utils.parametrize`` layers (SVDiff) loses their
    weights, so the unmerged model is not copied."""
    module = classifier(VIT, method(name))
    return module.peft.merge(_trained(module))


def infer_ratios(
    names: tuple[str, ...], rounds: int, repeats: int = 2, unmerged_names: tuple[str, ...] | None = None,
    max_seconds: float | None = None, min_rounds: int = 1,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(merged / plain, unmerged / plain, details) for ViT-S configs; merged only for mergeable methods,
    unmerged only for ``unmerged_names`` (None: every config). ``details["control"]``: a second plain
    model with the same weights / the plain model, measured alongside (the run's noise on a ratio of 1).

    Selective methods (BitFit, NormTuning, LinearProbe...) add no modules: their model is plain
    before and after merging and is measured once. ``max_seconds`` / ``min_rounds``: the rounds' time
    budget (``harness.adjacent_ratios``); the details record the rounds run.
    """
    images, _ = batch(size=INFER_BATCH)
    plain_module = classifier(VIT, method("full"))
    x = plain_module.preprocess(images)

    def plain() -> nn.Module:
        model = create_backbone(VIT, NUM_CLASSES, pretrained=False, img_size=plain_module.hparams.image_size)
        model.load_state_dict(plain_module.model.state_dict())
        return model

    # The null control: a second plain model with the same weights. Its ratio is what this run's
    # measurement gives for two identical models, the yardstick for every merged ratio.
    cases: dict[str, Forward] = {"plain": Forward(plain(), x), "control.plain_twin": Forward(plain(), x)}
    skipped: dict[str, str] = {}
    selective: set[str] = set()  # methods that add nothing: the unmerged model is already plain
    for name in names:
        if name == "full":
            continue
        try:
            module = classifier(VIT, method(name))
        except ValueError as err:
            skipped[name] = str(err).split(": ", 1)[-1]
            continue
        if not module.peft.param_prefix:
            selective.add(name)
        elif unmerged_names is None or name in unmerged_names:
            cases[f"unmerged.{name}"] = Forward(_trained(module), x)
        if module.peft.mergeable:
            cases[f"merged.{name}"] = Forward(merged_twin(name), x)
    plain_forward = cases.pop("plain")
    # The plain model's passes beside the cases': their fastest is the plain pass's time (a minimum
    # over rounds x cases x repeats passes; before 2026-12-02 a separate 15 passes).
    plain_rounds = Timings()
    results = adjacent_ratios(cases, plain_forward, rounds=rounds, repeats=repeats, ref_rounds=plain_rounds,
                              max_seconds=max_seconds, min_rounds=min_rounds)
    control = results.pop("control.plain_twin")
    merged: dict[str, dict[str, float]] = {}
    unmerged: dict[str, dict[str, float]] = {}
    for case, value in results.items():
        kind, _, name = case.partition(".")
        (merged if kind == "merged" else unmerged)[name] = value
    for name in selective & set(merged):  # measured once: the unmerged model is the merged one
        unmerged[name] = merged[name]
    plain_seconds = seconds({"plain": plain_rounds})["plain"]
    details = {"batch": INFER_BATCH, "rounds": len(plain_rounds.wall) // len(cases),
               "plain_seconds_per_pass": plain_seconds, "skipped": skipped, "control": control}
    return merged, unmerged, details
