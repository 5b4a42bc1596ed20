"""LightningModules: ImageClassifier (classification) and TextToImage (diffusion)."""

from lightning_modules.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
