"""Text-to-image training step with precomputed latents and text embeddings against encoding every step."""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import lightning as L
import torch
from torch import nn

from benchmarks.harness import Timings, now, ratio, seconds

#: (tiny layout, image size, batch) of each setting, LoRA r=8 on the UNet in both. "sd15": SD v1.5's
#: architecture at 1/4 width, whose encoders take SD v1.5's share of the computation (the target's
#: setting); "demo": the offline demo's model and data (configs/demo_t2i.yaml), whose 4x VAE of 16-32
#: channels is far lighter than SD's.
SETTINGS: dict[str, tuple[bool | str, int, int]] = {"sd15": ("sd15", 128, 4), "demo": (True, 64, 16)}


class _StepClock(L.Callback):
    """Per training step of one fit: its time, and the time spent inside the module's two encoders."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forgets the previous fit's steps."""
        self.steps = Timings()
        self.encoders = Timings()
        self._start = (0.0, 0.0)
        self._in_encoders = [0.0, 0.0]
        self.fit_start = (0.0, 0.0)
        self.first_batch = (0.0, 0.0)

    def time_encoders(self, module: Any) -> None:
        """Wraps ``encode_images`` and ``encode_text`` of ``module`` so their time is counted per step."""
        for name in ("encode_images", "encode_text"):
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                end = now()
                self._in_encoders[0] += end[0] - start[0]
                self._in_encoders[1] += end[1] - start[1]

        return call

    def on_train_start(self, *args: Any) -> None:  # runs before the module's own hook builds the cache
        self.fit_start = now()

    def on_train_batch_start(self, *args: Any) -> None:
        self._in_encoders = [0.0, 0.0]
        self._start = now()
        if not self.steps.wall and self.first_batch == (0.0, 0.0):
            self.first_batch = self._start

    def on_train_batch_end(self, *args: Any) -> None:
        end = now()
        self.steps.wall.append(end[0] - self._start[0])
        self.steps.cpu.append(end[1] - self._start[1])
        self.encoders.wall.append(self._in_encoders[0])
        self.encoders.cpu.append(self._in_encoders[1])


class _Alternate(L.Callback):
    """Every other training step encodes its batch: the module's latent cache is set aside for it, so
    the step takes the path of ``precompute: false`` (the same code, the VAE and text encoder run)."""

    def __init__(self) -> None:
        self.first_encodes = False
        self.encoded: list[bool] = []  # per step of the current fit
        self._held: Any = None  # the cache set aside during an encoding step

    def on_train_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
        encode = (len(self.encoded) % 2 == 1) != self.first_encodes
        self.encoded.append(encode)
        if encode:
            self._held, module.latent_cache = module.latent_cache, None

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self._restore(module)

    def on_exception(self, trainer: Any, module: Any, *args: Any) -> None:
        self._restore(module)

    def _restore(self, module: Any) -> None:
        if self.encoded and self.encoded[-1] and module.latent_cache is None:
            module.latent_cache = self._held


class _Fits:
    """One TextToImage (LoRA r=8 on the UNet, ``precompute: true``) and its data, fitted again each
    round (a new Trainer, optimizer and latent cache each time), its steps alternating between the
    precomputed inputs and encoding the batch."""

    def __init__(self, setting: str) -> None:
        from datamodules.captions import SyntheticCaptionDataModule
        from lightning_modules.text_to_image import TextToImage
        from peft_methods import LoRA

        tiny, size, batch = SETTINGS[setting]
        self.module = TextToImage(tiny=tiny, image_size=size, peft=LoRA(r=8, alpha=8), precompute=True,
                                  sample_every_n_steps=0, export_adapter=False)
        self.data = SyntheticCaptionDataModule(num_train=4 * batch, num_val=4, num_test=4, image_size=size,
                                               batch_size=batch, num_workers=0)
        self.clock, self.alternate = _StepClock(), _Alternate()
        self.clock.time_encoders(self.module)

    def params(self) -> dict[str, int]:
        from peft_methods import count_params

        m = self.module
        parts = {"unet": m.unet, "vae_encoder": m.vae.encoder, "text_encoder": m.text_encoder}
        return {name: count_params(part)[1] for name, part in parts.items()}

    def run(self, steps: int, first_encodes: bool) -> tuple[_StepClock, list[bool]]:
        """Fits ``steps`` steps: the clock's times and, per step, whether it encoded its batch."""
        self.clock.reset()
        self.alternate.first_encodes, self.alternate.encoded = first_encodes, []
        with tempfile.TemporaryDirectory() as root:
            trainer = L.Trainer(
                accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0, num_sanity_val_steps=0, callbacks=[self.alternate, self.clock],
                default_root_dir=root,
            )
            trainer.fit(self.module, self.data)
        if len(self.alternate.encoded) != len(self.clock.steps.wall):
            raise RuntimeError("a training step of the t2i benchmark was skipped; its steps cannot be paired.")
        return self.clock, self.alternate.encoded


def t2i_cached_latents_ratio(
    rounds: int, steps: int = 12, warmup: int = 2, setting: str = "sd15"
) -> tuple[dict[str, float], dict[str, Any]]:
    """Step time with precomputed latents and text embeddings / encoding the batch (one of
    ``SETTINGS``): the fastest step of each, as in every other ratio (other jobs on the machine only
    add time).

    The two kinds alternate step by step inside each of ``rounds`` fits of ``steps`` steps (the
    first ``warmup`` of each untimed; which kind comes first alternates by fit), so both kinds are
    sampled across the same stretch of time. The details add the median ratio of a precomputed step
    to the encoding step beside it; the encoders' median share of an encoding step, measured inside
    the same steps, which puts the ratio at about 1 - share (up to timing noise); and the encoders'
    share of the FLOPs.
    """
    fits = _Fits(setting)
    per_step = {"precomputed": Timings(), "encoding_every_step": Timings()}
    pairs = Timings()  # precomputed step / the encoding step beside it
    share = Timings()
    precompute_seconds = []
    in_encoders = 0.0  # the most CPU time a precomputed step spent in an encoder (0: it calls none)
    for r in range(rounds):
        clock, encoded = fits.run(steps, first_encodes=r % 2 == 1)
        t, enc = clock.steps, clock.encoders
        precompute_seconds.append(clock.first_batch[0] - clock.fit_start[0])
        kept = range(warmup, len(encoded))
        for i in kept:
            name = "encoding_every_step" if encoded[i] else "precomputed"
            per_step[name].wall.append(t.wall[i])
            per_step[name].cpu.append(t.cpu[i])
            if encoded[i]:
                share.wall.append(enc.wall[i] / t.wall[i])
                share.cpu.append(enc.cpu[i] / t.cpu[i])
            else:
                in_encoders = max(in_encoders, enc.cpu[i])
        for i in kept[::2]:
            if i + 1 < len(encoded):
                p, e = (i + 1, i) if encoded[i] else (i, i + 1)
                pairs.wall.append(t.wall[p] / t.wall[e])
                pairs.cpu.append(t.cpu[p] / t.cpu[e])
    encoder_share = {"wall": round(share.median, 3), "cpu": round(share.median_cpu, 3)}
    tiny, size, batch = SETTINGS[setting]
    m = fits.module
    details = {"seconds_per_step": seconds(per_step),
               "steps_timed": {name: len(t.wall) for name, t in per_step.items()},
               "encoder_seconds_in_a_precomputed_step": in_encoders,
               "median_adjacent_step_ratio": {"wall": round(pairs.median, 3), "cpu": round(pairs.median_cpu, 3)},
               "encoder_share_of_encoding_step": encoder_share,
               "bound_1_minus_encoder_share": {k: round(1 - v, 3) for k, v in encoder_share.items()},
               "encoder_share_of_flops": round(encoder_flop_share(m.unet, m.vae, m.text_encoder, size, batch), 3),
               "startup_seconds_with_precompute": round(statistics.median(precompute_seconds), 2),
               "tiny": tiny, "image_size": size, "batch_size": batch,
               "precision": "32-true (as configs/demo_t2i.yaml)", "params": fits.params()}
    return ratio(per_step["precomputed"], per_step["encoding_every_step"]), details


def encoder_flop_share(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, image_size: int, batch: int) -> float:
    """FLOPs of the VAE encoder + text encoder / those plus a UNet forward and input-gradient backward.

    A LoRA step's computation but the weight gradients of its rank-r factors (<1% of it), counted by
    ``torch.utils.flop_counter`` (matrix products, convolutions and attention). The modules may live on
    the meta device: a full-size architecture is counted without allocating its weights.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_modules.t2i_components import vae_factor

    device = next(unet.parameters()).device
    factor = vae_factor(vae)
    images = torch.zeros(batch, 3, image_size, image_size, device=device)
    ids = torch.zeros(batch, text_encoder.config.max_position_embeddings, dtype=torch.long, device=device)
    latents = torch.zeros(batch, unet.config.in_channels, image_size // factor, image_size // factor, device=device)
    context = torch.zeros(batch, ids.shape[1], unet.config.cross_attention_dim, device=device)
    timesteps = torch.zeros(batch, dtype=torch.long, device=device)

    def flops(fn: Any) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    def unet_step() -> None:
        unet(latents.requires_grad_(), timesteps, context).sample.sum().backward()

    with torch.no_grad():
        encoders = flops(lambda: vae.encode(images)) + flops(lambda: text_encoder(ids))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    unet.requires_grad_(False)
    try:
        step = flops(unet_step)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return encoders / (encoders + step)


def sd15_on_meta() -> tuple[nn.Module, nn.Module, nn.Module]:
    """Stable Diffusion v1.5's UNet, VAE and CLIP ViT-L/14 text encoder (their published configs) on the
    meta device: the architecture, no weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        )
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        ))
    return unet, vae, text
