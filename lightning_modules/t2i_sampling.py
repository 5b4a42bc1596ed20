"""Sampling for TextToImage: a diffusers StableDiffusionPipeline over the module's own components.

Sampling through the stock pipeline means an exported adapter loaded into a plain pipeline
(``load_lora_weights`` or ``t2i_export.build_pipeline``) gives the same images for the same seeds.
Each image has its own CPU generator, so an image depends only on its prompt and seed, never on
the batch it was generated in or on the device.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torchvision.io import write_png

from lightning_modules import results

Sampler = Literal["ddim", "dpmsolver", "euler", "pndm"]


def sampling_scheduler(scheduler_config: dict[str, Any], sampler: Sampler = "ddim") -> Any:
    """A fresh sampling scheduler built from the training (DDPM) scheduler's config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    classes = {
        "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler, "pndm": PNDMScheduler,
    }
    if sampler not in classes:
        raise ValueError(f"model.init_args.sampler must be one of {sorted(classes)}, got '{sampler}'.")
    return scheduler_from_config(classes[sampler], scheduler_config)


def scheduler_from_config(cls: type, config: dict[str, Any], **overrides: Any) -> Any:
    """``cls.from_config`` with only the keys ``cls`` accepts (SD's config is PNDM's, a superset)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config({k: v for k, v in {**config, **overrides}.items() if k in accepted})


def make_pipeline(
    unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
    scheduler_config: dict[str, Any], sampler: Sampler = "ddim",
) -> Any:
    """A StableDiffusionPipeline sharing (not copying) the given modules; no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=sampling_scheduler(scheduler_config, sampler), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], image_size: int,
    num_inference_steps: int, guidance_scale: float,
) -> torch.Tensor:
    """uint8 images [B, 3, H, W] for ``prompts``, image i from ``torch.Generator().manual_seed(seeds[i])``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"generate got {len(prompts)} prompts but {len(seeds)} seeds.")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    images = pipe(
        prompt=list(prompts), height=image_size, width=image_size, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=generators, output_type="pt",
    ).images
    return to_uint8(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8 (round to nearest)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def image_seed(base_seed: int, image_id: str, repeat: int = 0) -> int:
    """A seed that depends only on the run seed, an image id and a repeat index."""
    return (base_seed * 1_000_003 + zlib.crc32(image_id.encode()) * 31 + repeat) % 2**31


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> one uint8 [3, H', W'] grid (2 px padding)."""
    from torchvision.utils import make_grid

    return make_grid(images, nrow=max(1, nrow), padding=2, pad_value=0)


class SamplingHooks:
    """Mixed into TextToImage: sampling with its own components (EMA weights when enabled)."""

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Runs the block with the EMA weights in the UNet (no-op without EMA)."""
        active = self.ema is not None and not self.ema.active
        if active:
            self.ema.swap_in(self.unet)
        try:
            yield
        finally:
            if active:
                self.ema.swap_out(self.unet)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], num_inference_steps: int | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """uint8 images [B, 3, H, W]; image i is fully determined by prompts[i] and seeds[i]."""
        hp = self.hparams
        was_training = self.training
        self.eval()
        ctx = self._trainer.precision_plugin.forward_context() if self._trainer else contextlib.nullcontext()
        try:
            with ctx, self.ema_weights():
                pipe = make_pipeline(self.unet, self.vae, self.text_encoder, self.tokenizer,
                                     self.scheduler_config, hp.sampler)
                return generate(pipe, prompts, seeds, hp.image_size, num_inference_steps or hp.num_inference_steps,
                                hp.guidance_scale if guidance_scale is None else guidance_scale)
        finally:
            self.train(was_training)

    def log_samples(self) -> None:
        """Samples the validation prompts (fixed seeds) and logs / saves the grid (rank 0)."""
        if not self.trainer.is_global_zero or self._last_sampled == self.global_step:
            return
        self._last_sampled = self.global_step
        prompts = self.validation_prompts
        images = self.generate(prompts, [self.hparams.seed + i for i in range(len(prompts))])
        picture = grid(images, len(prompts))
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image("samples", picture, self.global_step)
        path = results.run_dir(self.trainer) / "samples" / f"step_{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(picture.cpu(), str(path))
