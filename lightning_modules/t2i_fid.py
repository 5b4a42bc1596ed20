"""FID for TextToImage with a pluggable feature extractor.

``inception`` is the standard FID (torchmetrics + torch-fidelity's Inception-v3 weights). Any timm
model can replace it: with real weights (a local file, ``package:<name>``, ``hub``, or a classifier
trained and exported here as plain backbone weights) it gives a domain FID (the seed paper's
lineage used a chest-X-ray network); without weights it is a random-init, fixed-seed network, a
proxy that tracks distribution shifts but is not comparable to published FID values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peft_methods.export import META_FILE


@dataclass
class FIDFeatureExtractor:
    """Which image model computes FID features.

    Attributes:
        name: ``inception`` (standard FID) or a timm model name (e.g. ``resnet18``).
        weights: timm models: None (random init with ``seed``: a proxy), ``hub``, a local weights
            file / directory, ``package:<python package>``, or the ``adapter/`` directory of an
            ImageClassifier run (its fine-tuned backbone). Inception: optional local path of
            torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.
        input_size: timm models: images are resized to this size (None: the model's default).
        seed: seed of a random-init timm model.
    """

    name: str = "inception"
    weights: str | None = None
    input_size: int | None = None
    seed: int = 0

    def describe(self) -> str:
        """A label for metrics.json saying what the FID number is comparable with."""
        if self.name == "inception":
            return "inception-v3 (standard FID)"
        if self.weights is None:
            return f"timm:{self.name} random-init seed {self.seed} (proxy FID, not comparable to published FID)"
        return f"timm:{self.name} weights {self.weights} (not comparable to published Inception FID)"


class TimmFeatures(nn.Module):
    """uint8 images -> pooled features of a timm model (resized and normalised as it expects)."""

    def __init__(self, spec: FIDFeatureExtractor) -> None:
        super().__init__()
        from lightning_modules.backbones import create_backbone

        weights: bool | str = False if spec.weights is None else (True if spec.weights == "hub" else spec.weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            if isinstance(weights, str) and (Path(weights).expanduser() / META_FILE).is_file():
                self.model = _classifier_backbone(spec.name, Path(weights).expanduser())
            else:
                # Built with a classifier head so that weights files that include one load as saved.
                self.model = create_backbone(spec.name, num_classes=1000, pretrained=weights)
            self.model.reset_classifier(0)
        self.model.requires_grad_(False)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        self.size = int(spec.input_size or cfg.get("input_size", (3, 224, 224))[-1])
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.num_features = int(self.model.num_features)
        self.eval()

    def train(self, mode: bool = True) -> TimmFeatures:
        return super().train(False)  # a fixed feature extractor: never dropout / batch statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.model((x - self.mean) / self.std).float()


def _classifier_backbone(name: str, adapter_dir: Path) -> nn.Module:
    """The backbone of an ImageClassifier adapter export (method merged in where possible)."""
    from peft_methods.export import load_adapter

    model, method = load_adapter(adapter_dir)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch != name:
        raise ValueError(
            f"FID feature extractor name '{name}' does not match the classifier adapter in {adapter_dir} "
            f"(backbone '{arch}'); set model.init_args.fid_feature_extractor.name to '{arch}'."
        )
    return method.merge(model) if method.mergeable else model


def build_fid(spec: FIDFeatureExtractor) -> nn.Module:
    """A torchmetrics FrechetInceptionDistance over uint8 images with the chosen extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if spec.name != "inception":
        return FrechetInceptionDistance(feature=TimmFeatures(spec), normalize=False)
    how = (
        "or set model.init_args.fid_feature_extractor.name to a timm model (e.g. resnet18 with local "
        "weights) for a domain / proxy FID"
    )
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            f"Standard FID needs the torch-fidelity package for its Inception-v3: pip install torch-fidelity, {how}."
        )
    if spec.weights is not None and not Path(spec.weights).expanduser().is_file():
        raise FileNotFoundError(
            f"Inception weights file {spec.weights} (model.init_args.fid_feature_extractor.weights) does not exist."
        )
    try:
        return FrechetInceptionDistance(
            feature=2048, normalize=False,
            feature_extractor_weights_path=str(Path(spec.weights).expanduser()) if spec.weights else None,
        )
    except Exception as err:  # download errors come in many types; the cause stays chained
        raise OSError(
            "Could not get the Inception-v3 weights for FID (offline?): download "
            "weights-inception-2015-12-05-6726825d.pth from the torch-fidelity releases once and set "
            f"model.init_args.fid_feature_extractor.weights to it, {how}."
        ) from err
