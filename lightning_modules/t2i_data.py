"""Text tokenisation and the precomputed latent / text-embedding cache of TextToImage."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.results import StageTimer

if TYPE_CHECKING:
    from lightning_modules.text_to_image import TextToImage

log = logging.getLogger("medpeft")


class TextEncoding:
    """Tokenises captions to the text encoder's fixed length; warns (once) when one is truncated."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.warned = False

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        limit = int(self.tokenizer.model_max_length)
        if not self.warned:
            long = [c for c in captions if len(self.tokenizer.tokenize(c)) + 2 > limit]
            if long:
                self.warned = True
                rank_zero_warn(
                    f"A caption is longer than the text encoder's {limit}-token limit and is truncated "
                    f"(further truncations are not reported): {long[0][:120]!r}..."
                )
        return self.tokenizer(
            captions, padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
        ).input_ids


class LatentCache:
    """VAE posteriors (mean, std) per training image id and text embeddings per distinct caption.

    Built once at the start of fit; training steps then skip the VAE and the text encoder (the
    latent is still sampled from the stored posterior every step, so training is unchanged).
    Each rank encodes the whole training set, so any distributed sampler shard finds its ids.
    """

    def __init__(self, means: dict[str, torch.Tensor], stds: dict[str, torch.Tensor],
                 texts: dict[str, torch.Tensor]) -> None:
        self.means, self.stds, self.texts = means, stds, texts

    @classmethod
    @torch.no_grad()
    def build(cls, module: TextToImage, with_empty_caption: bool, chunk: int = 64) -> LatentCache:
        timer = StageTimer()
        trainer = module.trainer
        # The whole training set in order on every rank (the train loader is a shuffled shard per rank).
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "encoding_dataloader"):
            loader = datamodule.encoding_dataloader()
        else:
            loader = datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader
        means: dict[str, torch.Tensor] = {}
        stds: dict[str, torch.Tensor] = {}
        captions: set[str] = {""} if with_empty_caption else set()
        for batch in loader:
            mean, std = module.encode_images(batch["image"])
            for i, ident in enumerate(batch["id"]):
                means[ident], stds[ident] = mean[i].cpu(), std[i].cpu()
            captions.update(batch["caption"])
        ordered = sorted(captions)
        texts: dict[str, torch.Tensor] = {}
        for start in range(0, len(ordered), chunk):
            part = ordered[start:start + chunk]
            for caption, emb in zip(part, module.encode_text(part).cpu(), strict=True):
                texts[caption] = emb
        log.info("Precomputed %d latents and %d caption embeddings in %.1f s", len(means), len(texts), timer.seconds)
        return cls(means, stds, texts)

    def latents(self, ids: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [i for i in ids if i not in self.means]
        if missing:
            raise ValueError(
                f"precompute: image id {missing[0]!r} was not in the training set encoded at the start "
                "of fit; the datamodule's ids must be unique and stable (or set precompute: false)."
            )
        return (torch.stack([self.means[i] for i in ids]).to(device),
                torch.stack([self.stds[i] for i in ids]).to(device))

    def text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        missing = [c for c in captions if c not in self.texts]
        if missing:
            raise ValueError(f"precompute: caption {missing[0]!r} was not encoded at the start of fit.")
        return torch.stack([self.texts[c] for c in captions]).to(device)
