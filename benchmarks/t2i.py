"""Text-to-image training step with precomputed latents and text embeddings against encoding every step."""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import lightning as L

from benchmarks.harness import Timings, now, ratio, seconds

#: The offline demo's setting (configs/demo_t2i.yaml): tiny SD, LoRA r=8 on the UNet, 64 px, batch 16.
IMAGE_SIZE, BATCH_SIZE = 64, 16


class _StepClock(L.Callback):
    """Per training step: its time, and the time spent inside the module's two encoders."""

    def __init__(self) -> None:
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


def _steps(precompute: bool, steps: int) -> tuple[_StepClock, dict[str, int]]:
    from datamodules.captions import SyntheticCaptionDataModule
    from lightning_modules.text_to_image import TextToImage
    from peft_methods import LoRA

    module = TextToImage(tiny=True, image_size=IMAGE_SIZE, peft=LoRA(r=8, alpha=8), precompute=precompute,
                         sample_every_n_steps=0, export_adapter=False)
    data = SyntheticCaptionDataModule(num_train=4 * BATCH_SIZE, num_val=4, num_test=4, image_size=IMAGE_SIZE,
                                      batch_size=BATCH_SIZE, num_workers=0)
    clock = _StepClock()
    clock.time_encoders(module)
    parts = {"unet": module.unet, "vae_encoder": module.vae.encoder, "text_encoder": module.text_encoder}
    params = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock], default_root_dir=root,
        )
        trainer.fit(module, data)
    return clock, params


def t2i_cached_latents_ratio(rounds: int, steps: int = 5, warmup: int = 1) -> tuple[dict[str, float], dict[str, Any]]:
    """Step time with ``precompute: true`` / with ``precompute: false`` (demo_t2i setting): the
    fastest round of each, a round's time being the median step of one fit.

    Precompute can remove at most the encoders' share of an encoding step: the details give that
    share (median over rounds, measured inside the same steps) and the bound 1 - share it sets on
    the ratio, up to timing noise.
    """
    per_round = {"precomputed": Timings(), "encoding_every_step": Timings()}
    share = Timings()
    precompute_seconds = []
    for r in range(rounds):
        for precompute in (True, False) if r % 2 == 0 else (False, True):
            clock, params = _steps(precompute, steps)
            t = clock.steps
            name = "precomputed" if precompute else "encoding_every_step"
            per_round[name].wall.append(statistics.median(t.wall[warmup:]))
            per_round[name].cpu.append(statistics.median(t.cpu[warmup:]))
            if precompute:
                precompute_seconds.append(clock.first_batch[0] - clock.fit_start[0])
            else:
                enc = clock.encoders
                share.wall.append(statistics.median(e / s for e, s in zip(enc.wall[warmup:], t.wall[warmup:], strict=True)))
                share.cpu.append(statistics.median(e / s for e, s in zip(enc.cpu[warmup:], t.cpu[warmup:], strict=True)))
    encoder_share = {"wall": round(share.median, 3), "cpu": round(share.median_cpu, 3)}
    details = {"seconds_per_step": seconds(per_round),
               "encoder_share_of_encoding_step": encoder_share,
               "bound_1_minus_encoder_share": {k: round(1 - v, 3) for k, v in encoder_share.items()},
               "startup_seconds_with_precompute": round(statistics.median(precompute_seconds), 2),
               "image_size": IMAGE_SIZE, "batch_size": BATCH_SIZE, "precision": "32-true (as configs/demo_t2i.yaml)",
               "params": params}
    return ratio(per_round["precomputed"], per_round["encoding_every_step"]), details
