"""Test (FID of generated vs real images) and predict (prompts file -> PNGs) hooks of TextToImage."""

from __future__ import annotations

import csv
import logging
import os
from typing import Any

import torch
from torchvision.io import write_png

from lightning_modules import results
from lightning_modules.t2i_fid import build_fid
from lightning_modules.t2i_sampling import grid, image_seed
from peft_methods.base import count_params

log = logging.getLogger("medpeft")


class EvaluationHooks:
    """Mixed into TextToImage: uses its ``generate``, ``_eval_loss``, ``fid_spec``, ``ema`` and ``unet``."""

    # ------------------------------------------------------------------ test: FID
    def on_test_start(self) -> None:
        self._timer = results.StageTimer()
        self._place_frozen()
        self._fid = build_fid(self.fid_spec).to(self.device)
        self._counts = {"generated": 0, "real": 0}
        if self.ema is not None:
            self.ema.swap_in(self.unet)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_loss(batch, batch_idx, "test")
        hp = self.hparams
        cap = None if hp.fid_num_images is None else -(-hp.fid_num_images // self.trainer.world_size)
        prompts, seeds = [], []
        for caption, ident in zip(batch["caption"], batch["id"], strict=True):
            for r in range(hp.fid_images_per_caption):
                if cap is None or self._counts["generated"] + len(prompts) < cap:
                    prompts.append(caption)
                    seeds.append(image_seed(hp.seed, ident, r))
        with torch.autocast(self.device.type, enabled=False):
            self._fid.update(batch["image"].to(self.device), real=True)
            self._counts["real"] += len(batch["image"])
            if prompts:
                fake = self.generate(prompts, seeds).to(self.device)
                self._fid.update(fake, real=False)
                self._counts["generated"] += len(prompts)
                if batch_idx == 0 and self.trainer.is_global_zero:
                    for logger in self.loggers:
                        if hasattr(getattr(logger, "experiment", None), "add_image"):
                            logger.experiment.add_image("test/samples", grid(fake[:16], 4), self.global_step)

    def on_test_epoch_end(self) -> None:
        n_real = int(self._fid.real_features_num_samples)
        n_fake = int(self._fid.fake_features_num_samples)
        if min(n_real, n_fake) < 2:
            raise ValueError(
                f"FID needs at least 2 real and 2 generated images, got {n_real} and {n_fake}; "
                "raise model.init_args.fid_num_images or the test split size."
            )
        self.log("test/fid", self._fid.compute().float(), sync_dist=False)
        self._counts = {"generated": n_fake, "real": n_real}

    def on_test_end(self) -> None:
        if self.ema is not None:
            self.ema.swap_out(self.unet)
        metrics = {k.split("/", 1)[1]: float(v) for k, v in self.trainer.callback_metrics.items()
                   if k.startswith("test/")}
        metrics.update(num_images=self._counts["generated"], num_real_images=self._counts["real"])
        trainable, total = count_params(self.unet)
        hp = self.hparams
        results.write_metrics(self.trainer, metrics, {
            "method": self.peft.config(), "base": self.base_info(),
            "fid_feature_extractor": self.fid_spec.describe(),
            "sampling": {"sampler": hp.sampler, "steps": hp.num_inference_steps, "guidance_scale": hp.guidance_scale},
            "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total,
            "test_wall_time_s": self._timer.seconds if self._timer else None,
            "peak_memory_mb": results.peak_memory_mb(self.device), "checkpoint": self.trainer.ckpt_path,
        })
        self._fid = None

    # ------------------------------------------------------------------ predict: prompts -> PNGs
    def on_predict_start(self) -> None:
        self._place_frozen()
        self._rows = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        prompts = list(batch["caption"])
        seeds = [self.hparams.seed + int(i) for i in batch["index"]]
        images = self.generate(prompts, seeds).cpu()
        out_dir = results.run_dir(self.trainer) / "predictions"
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for prompt, seed, ident, image in zip(prompts, seeds, batch["id"], images, strict=True):
            write_png(image, str(out_dir / f"{ident}.png"))
            rows.append({"prompt": prompt, "seed": seed, "file": f"{ident}.png"})
        self._rows += rows
        return rows

    def on_predict_end(self) -> None:
        rows = self._rows
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero:
            return
        path = results.run_dir(self.trainer) / "predictions" / "predictions.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "seed", "file"])
            writer.writeheader()
            writer.writerows(sorted({r["file"]: r for r in rows}.values(), key=lambda r: r["file"]))
        os.replace(tmp, path)
        log.info("Wrote %d images and %s", len(rows), path)
