"""Frozen-feature cache of a linear probe: the backbone runs once per distinct image, not once per epoch.

When only the task head trains, everything before the head is a fixed function of the image, so
the head's input can be computed once and reused in every later epoch (and every validation pass).
Entries are keyed by a 128-bit hash of the image's bytes, shape and dtype: an image that differs in
any pixel (augmentation) is a miss, never a wrong hit, so cached training equals uncached training.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from peft_methods.base import _DROPOUT_TYPES, head_module

log = logging.getLogger("medpeft")


def image_key(image: torch.Tensor) -> bytes:
    """128-bit digest of one image's bytes, shape and dtype."""
    data = image.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(data.shape)}{data.dtype}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.dtype != torch.uint8 else data.numpy().tobytes())
    return h.digest()


class FrozenFeatureCache:
    """The task head's input per distinct image, for a model whose only trainable part is its head.

    ``logits(model, images, x)`` equals ``model(x)``: on a miss the whole batch runs through the
    frozen backbone (same batch as the uncached path, so the same numbers) and the head's input is
    kept per image; the head then runs on the cached inputs with gradients. Memory: one feature
    vector per distinct image (e.g. 780 images x 384 floats = 1.2 MB for ViT-S).
    """

    def __init__(self) -> None:
        self.features: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.features)

    @staticmethod
    def unsupported_reason(model: nn.Module) -> str | None:
        """Why the head's input is not a fixed function of the image, or None when it is."""
        head = head_module(model)
        if head is None:
            return "the backbone has no single task-head module (num_classes=0 or a multi-head model)"
        head_ids = {id(p) for p in head.parameters()}
        outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in head_ids]
        if outside:
            return f"parameters before the head train ({outside[0]}{', ...' if len(outside) > 1 else ''})"
        return None

    @staticmethod
    def stochastic_layers(model: nn.Module) -> list[str]:
        """Dropout / drop-path layers outside the head that are active now (their output is random)."""
        head = head_module(model)
        head_ids = {id(m) for m in head.modules()} if head is not None else set()
        names = []
        for name, module in model.named_modules():
            if id(module) in head_ids or not isinstance(module, _DROPOUT_TYPES) or not module.training:
                continue
            p = getattr(module, "p", getattr(module, "drop_prob", 0.0))
            if p and p > 0:
                names.append(name)
        return names

    def clear(self) -> None:
        self.features.clear()
        self.hits = self.misses = 0

    def logits(self, model: nn.Module, images: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """``model(x)`` through the cache (``images`` are the raw inputs that ``x`` was made from).

        Returns None when the frozen part is random right now (active dropout before the head):
        the caller then runs the model itself.
        """
        if self.stochastic_layers(model):
            return None
        head = head_module(model)
        keys = [image_key(img) for img in images]
        missing = sum(k not in self.features for k in keys)
        if missing:
            self.misses += missing
            for key, feature in zip(keys, self._head_inputs(model, head, x), strict=True):
                self.features.setdefault(key, feature)
        self.hits += len(keys) - missing
        return head(torch.stack([self.features[k] for k in keys]))

    @staticmethod
    def _head_inputs(model: nn.Module, head: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []

        def grab(_module: nn.Module, args: tuple) -> None:
            captured.append(args[0].detach())

        handle = head.register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(
                f"cache_features needs a backbone whose task head runs once per forward, but it ran "
                f"{len(captured)} times; set model.init_args.cache_features to false for this backbone."
            )
        return [f.clone() for f in captured[0]]
