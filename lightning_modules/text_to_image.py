"""TextToImage: Stable Diffusion fine-tuning where only the UNet is adapted by a PeftMethod.

The text encoder and VAE are frozen (half precision on GPU under mixed precision); the UNet's
trainable parameters stay fp32. Training minimises the noise-prediction MSE (epsilon or v) with
caption dropout for classifier-free guidance, optional min-SNR weighting and EMA. Validation logs
``val/loss`` (fixed noise) and image grids of fixed prompts; test computes FID of generated vs
real test images; predict writes PNGs for a prompts file. Checkpoints hold trainable tensors only.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules import results
from lightning_modules.metrics import eval_loss_means, log_eval_loss
from lightning_modules.resume import seed_batch
from lightning_modules.t2i_data import LatentCache, TextEncoding
from lightning_modules.t2i_evaluation import EvaluationHooks
from lightning_modules.t2i_fid import FIDFeatureExtractor
from lightning_modules.t2i_sampling import Sampler, SamplingHooks, scheduler_from_config
from lightning_modules.t2i_training import TrainableEMA, diffusion_loss
from peft_methods.base import (
    PeftMethod,
    build_method,
    count_params,
    keep_frozen_in_eval,
    state_mismatch,
    trainable_state_dict,
)

log = logging.getLogger("medpeft")
CKPT_KEY = "medpeft_t2i"
DEFAULT_PROMPTS = ("a chest x-ray with a large round bright lesion in the upper left lung",
                   "a chest x-ray with a small oval bright lesion in the lower right lung",
                   "a normal chest x-ray with clear lungs")


class TextToImage(SamplingHooks, EvaluationHooks, L.LightningModule):
    """Text-to-image fine-tuning of a Stable Diffusion UNet with any PeftMethod.

    Args:
        pretrained: hub id or local directory (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``).
        tiny: build a small random-init model instead (fixed weights): true for the offline demo's,
            ``sd15`` for Stable Diffusion v1.5's architecture at 1/4 width (see ``build_tiny_components``).
        peft: the PEFT method applied to the UNet (default: full fine-tuning).
        image_size: training / sampling resolution (linked from the datamodule).
        prediction_type: ``epsilon`` or ``v_prediction`` training target.
        caption_dropout: probability of replacing a caption by "" (classifier-free guidance).
        snr_gamma: min-SNR-gamma loss weighting (e.g. 5.0); None: plain MSE.
        ema_decay: EMA of the trainable weights (used for validation, sampling, test, export).
        gradient_checkpointing: UNet gradient checkpointing (less memory, slower).
        optimizer: optimizer factory (default AdamW lr 1e-4, weight decay 1e-2 on matrices only).
        lr_scheduler: scheduler factory stepped every step (default: constant lr).
        guidance_scale, num_inference_steps, sampler: sampling settings.
        validation_prompts: prompts sampled every ``sample_every_n_steps`` steps (fixed seeds).
        sample_every_n_steps: 0 disables sample grids.
        fid_num_images: cap on generated test images (None: ``fid_images_per_caption`` per caption).
        fid_images_per_caption: generated images per test caption.
        fid_feature_extractor: FID features: Inception (standard) or a timm model (see t2i_fid).
        precompute: encode every training image and caption once at the start of fit; steps then
            run the UNet only. Memory: ~2 x latent size per image plus 77 x width per distinct caption.
        frozen_dtype: dtype of the text encoder and VAE; ``auto``: half on GPU with mixed precision.
        seed: seed of validation noise and sampling.
        export_adapter: export the adapter to ``<run dir>/adapter/`` at the end of fit.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tiny: bool | Literal["demo", "sd15"] = False,
        peft: PeftMethod | None = None,
        image_size: int = 224,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        caption_dropout: float = 0.1,
        snr_gamma: float | None = None,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        guidance_scale: float = 4.0,
        num_inference_steps: int = 50,
        sampler: Sampler = "ddim",
        validation_prompts: list[str] | None = None,
        sample_every_n_steps: int = 1000,
        fid_num_images: int | None = None,
        fid_images_per_caption: int = 1,
        fid_feature_extractor: FIDFeatureExtractor | dict[str, Any] | None = None,
        precompute: bool = False,
        frozen_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
        seed: int = 0,
        export_adapter: bool = True,
    ) -> None:
        super().__init__()
        _check_args(pretrained, tiny, prediction_type, caption_dropout, snr_gamma, ema_decay,
                    num_inference_steps, sample_every_n_steps, fid_images_per_caption)
        self.peft = build_method(peft)
        spec = fid_feature_extractor or FIDFeatureExtractor()
        self.fid_spec = FIDFeatureExtractor(**spec) if isinstance(spec, dict) else spec
        self.save_hyperparameters(ignore=["peft", "optimizer", "lr_scheduler", "fid_feature_extractor"])
        # Plain dicts only: checkpoints must load with torch.load(weights_only=True).
        self.hparams["peft"] = self.peft.config()
        self.hparams["fid_feature_extractor"] = asdict(self.fid_spec)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler

        from diffusers import DDPMScheduler

        from lightning_modules.t2i_components import build_tiny_components, load_components, tiny_layout

        try:
            layout = tiny_layout(tiny) if tiny else None
        except ValueError as err:
            raise ValueError(f"model.init_args.{err}") from None
        comps = build_tiny_components(image_size, layout=layout) if layout else load_components(str(pretrained))
        if image_size % comps.vae_factor:
            raise ValueError(
                f"model.init_args.image_size={image_size} is not divisible by the VAE's downsampling "
                f"factor {comps.vae_factor}; use e.g. {image_size // comps.vae_factor * comps.vae_factor}."
            )
        self.vae, self.text_encoder = comps.vae.eval(), comps.text_encoder.eval()
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        #: The full scheduler config (DDIM sampling reads keys the DDPM training scheduler drops).
        self.scheduler_config = {**comps.scheduler_config, "prediction_type": prediction_type}
        self.noise_scheduler = scheduler_from_config(DDPMScheduler, self.scheduler_config)
        self.val_loss_mean, self.test_loss_mean = eval_loss_means()  # see log_eval_loss
        self.unet = self.peft.apply(comps.unet)
        trainable, total = count_params(self.unet)
        if trainable == 0:
            raise ValueError(
                f"{type(self.peft).__name__} leaves no trainable parameter in the UNet (it has no task "
                "head); choose a method that adapts the UNet (e.g. LoRA, DiffFit, SVDiff, BitFit)."
            )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.text = TextEncoding(comps.tokenizer)
        self.latent_cache: LatentCache | None = None
        self.ema = TrainableEMA(self.unet, ema_decay) if ema_decay is not None else None
        self.validation_prompts = list(validation_prompts or DEFAULT_PROMPTS)
        self.strict_loading = False  # frozen weights are not in checkpoints; on_load_checkpoint checks
        self._fid: torch.nn.Module | None = None
        self._timer: results.StageTimer | None = None
        self._step_times: list[float] = []
        self._counts: dict[str, int] = {}
        self._rows: list[dict[str, Any]] = []
        self._last_sampled = -1

    # ------------------------------------------------------------------ encoding
    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer

    def base_info(self) -> dict[str, Any]:
        """How to rebuild the base components (recorded in checkpoints and exports)."""
        hp = self.hparams
        tiny = True if hp.tiny == "demo" else hp.tiny  # the demo's layout is recorded as true, as before layouts
        return {"pretrained": hp.pretrained, "tiny": tiny, "image_size": hp.image_size, "tiny_seed": 0,
                "prediction_type": hp.prediction_type, "sampler": hp.sampler}

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """CLIP hidden states [B, 77, D] (long captions truncated with a warning)."""
        ids = self.text.token_ids(captions).to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, H, W] -> VAE posterior (mean, std), unscaled."""
        size = self.hparams.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"Batch images are {tuple(images.shape[-2:])} but model.init_args.image_size is {size}; "
                "set the datamodule's image_size to the same value."
            )
        dtype = next(self.vae.parameters()).dtype
        x = images.to(self.device, dtype=torch.float32) / 127.5 - 1.0
        dist = self.vae.encode(x.to(dtype)).latent_dist
        return dist.mean, dist.std

    def _latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(mean.shape, generator=generator).to(mean) if generator is not None else torch.randn_like(mean)
        return ((mean + std * noise) * self.vae.config.scaling_factor).float()

    def _inputs(self, batch: dict[str, Any], captions: list[str], generator: torch.Generator | None = None,
                cached: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if cached and self.latent_cache is not None:
            mean, std = self.latent_cache.latents(batch["id"], self.device)
            return self._latents(mean, std, generator), self.latent_cache.text(captions, self.device).float()
        mean, std = self.encode_images(batch["image"])
        return self._latents(mean, std, generator), self.encode_text(captions).float()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = list(batch["caption"])
        drop = torch.rand(len(captions)) < self.hparams.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        latents, embeddings = self._inputs(batch, captions, cached=True)
        loss = diffusion_loss(self.unet, self.noise_scheduler, latents, embeddings, self.hparams.snr_gamma)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss is {loss.item()} at step {self.global_step}: lower the learning rate "
                "(model.init_args.optimizer) or use bf16-mixed / 32-true instead of 16-mixed."
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(captions))
        return loss

    def _eval_loss(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + batch_idx)
        latents, embeddings = self._inputs(batch, list(batch["caption"]), generator=g)
        loss = diffusion_loss(self.unet, self.noise_scheduler, latents, embeddings, self.hparams.snr_gamma, g)
        log_eval_loss(self, stage, loss, latents.shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_loss(batch, batch_idx, "val")

    # ------------------------------------------------------------------ modes and hooks
    def train(self, mode: bool = True) -> TextToImage:
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        if mode:
            keep_frozen_in_eval(self.unet)
        return self

    def _place_frozen(self) -> None:
        choice = self.hparams.frozen_dtype
        if choice == "auto":
            precision = str(self._trainer.precision) if self._trainer else "32"
            mixed = self.device.type == "cuda" and precision in ("16-mixed", "bf16-mixed")
            choice = ("bfloat16" if precision.startswith("bf16") else "float16") if mixed else "float32"
        dtype = getattr(torch, choice)
        for module in (self.vae, self.text_encoder):
            if next(module.parameters()).dtype != dtype:
                module.to(dtype)

    def on_fit_start(self) -> None:
        self._timer = results.StageTimer()
        self._place_frozen()
        trainable, total = count_params(self.unet)
        log.info("UNet + %s: %s of %s parameters trainable (%.4f%%)", type(self.peft).__name__,
                 f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)

    def on_train_start(self) -> None:
        if self.hparams.precompute:
            self.latent_cache = LatentCache.build(self, self.hparams.caption_dropout > 0)
        if self.hparams.sample_every_n_steps > 0:
            self.log_samples()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Noise, timesteps and caption dropout of batch k depend on (seed, epoch, k, rank) alone: exact resume.
        seed_batch(self.current_epoch, batch_idx, self.global_rank)
        self._step_start = results.StageTimer()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step_times.append(self._step_start.seconds)
        if self.ema is not None and self.global_step > self.ema.num_updates:
            self.ema.update(self.unet)
        every = self.hparams.sample_every_n_steps
        if every > 0 and self.global_step % every == 0:
            self.log_samples()

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.swap_in(self.unet)

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None:
            self.ema.swap_out(self.unet)

    def on_fit_end(self) -> None:
        times = self._step_times[5:] or self._step_times  # the first steps include warm-up
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or ""
        results.write_fit_summary(self.trainer, {
            "wall_time_s": self._timer.seconds if self._timer else None,
            "peak_memory_mb": results.peak_memory_mb(self.device),
            "global_steps": self.global_step,
            "mean_step_time_s": sum(times) / len(times) if times else None,
            "best_checkpoint": best,
        })
        if self.hparams.export_adapter and self.trainer.is_global_zero:
            self._export_best(best)

    def _export_best(self, best: str) -> None:
        """Exports the validation-selected weights (the ones test evaluates), EMA ones if enabled."""
        from lightning_modules.t2i_export import export_adapter

        saved = {k: v.detach().clone() for k, v in trainable_state_dict(self.unet).items()}
        saved_ema = self.ema.state_dict() if self.ema is not None else None
        if best and Path(best).is_file():
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            self.on_load_checkpoint(ckpt)
            self.unet.load_state_dict({k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items()}, strict=False)
        with self.ema_weights():
            export_adapter(self.unet, self.peft, results.run_dir(self.trainer) / "adapter",
                           {**self.base_info(), "checkpoint": best or None})
        self.unet.load_state_dict(saved, strict=False)
        if saved_ema is not None:
            self.ema.load_state_dict(saved_ema)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        base = getattr(self.peft, "param_groups", None)
        groups = base(self.unet) if callable(base) else [{"params": [p for p in self.unet.parameters() if p.requires_grad]}]
        split: list[dict[str, Any]] = []
        for g in groups:  # no weight decay on 1-D tensors (biases, norms, scales, spectral shifts)
            name = g.get("name", f"group{len(split)}")
            mats = [p for p in g["params"] if p.ndim >= 2]
            vecs = [p for p in g["params"] if p.ndim < 2]
            split += [{**g, "params": mats, "name": f"{name}_matrices"}] if mats else []
            split += [{**g, "params": vecs, "name": name, "weight_decay": 0.0}] if vecs else []
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(split, lr=1e-4, weight_decay=1e-2)
        else:
            optimizer = self.optimizer_factory(split)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = trainable_state_dict(self.unet)
        if self.ema is not None:  # the trained weights, even if the EMA ones are swapped in
            state = {k: self.ema.raw(k, v) for k, v in state.items()}
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["state_dict"] = {f"unet.{k}": v for k, v in state.items()}
        checkpoint[CKPT_KEY] = {"method": self.peft.config(), "base": self.base_info(), "keys": sorted(state)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get(CKPT_KEY)
        if info is None:
            raise ValueError("This checkpoint was not written by TextToImage (no medpeft_t2i record).")
        theirs, ours = info["base"], self.base_info()
        # The method and what the weights mean (tiny vs SD, training target) must match; the
        # resolution, sampler and where the base weights are read from may change.
        for key, value in (("method", self.peft.config()), *((k, ours[k]) for k in ("tiny", "prediction_type"))):
            found = info["method"] if key == "method" else theirs.get(key)
            if found != value:
                raise ValueError(
                    f"Checkpoint was made for {key}={found!r} but this run has {key}={value!r}; "
                    "resume or test with the configuration that wrote it."
                )
        if theirs.get("pretrained") != ours["pretrained"]:
            rank_zero_warn(
                f"Checkpoint was trained on pretrained={theirs.get('pretrained')!r}, loading onto "
                f"{ours['pretrained']!r}: make sure both are the same model."
            )
        expected = trainable_state_dict(self.unet)
        stored = {k.removeprefix("unet."): v for k, v in checkpoint["state_dict"].items()}
        problem = state_mismatch(stored, expected)
        if problem:
            raise ValueError(f"Checkpoint tensors do not match this UNet: {problem}.")
        if self.ema is not None:
            if "ema" not in checkpoint:
                rank_zero_warn("The checkpoint has no EMA weights; the EMA restarts from its weights.")
            else:
                self.ema.load_state_dict(checkpoint["ema"])


def _check_args(pretrained: str | None, tiny: bool | str, prediction_type: str, caption_dropout: float,
                snr_gamma: float | None, ema_decay: float | None, steps: int, every: int, per_caption: int) -> None:
    if bool(pretrained) == bool(tiny):
        raise ValueError(
            "Set exactly one of model.init_args.pretrained (hub id or local Stable Diffusion directory) "
            "and model.init_args.tiny (true, demo or sd15: a small random-init model)."
        )
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"model.init_args.prediction_type must be epsilon or v_prediction, got {prediction_type!r}.")
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"model.init_args.caption_dropout must be in [0, 1), got {caption_dropout}.")
    if snr_gamma is not None and snr_gamma <= 0:
        raise ValueError(f"model.init_args.snr_gamma must be positive (e.g. 5.0) or null, got {snr_gamma}.")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"model.init_args.ema_decay must be in (0, 1) (e.g. 0.999) or null, got {ema_decay}.")
    if steps < 1 or every < 0 or per_caption < 1:
        raise ValueError("num_inference_steps and fid_images_per_caption must be >= 1, sample_every_n_steps >= 0.")
