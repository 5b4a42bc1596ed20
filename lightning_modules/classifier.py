"""ImageClassifier: a timm backbone + a PeftMethod, trained and evaluated with Lightning."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from lightning_modules import results
from lightning_modules.backbones import create_backbone
from lightning_modules.feature_cache import FrozenFeatureCache
from lightning_modules.metrics import (
    TASKS,
    classification_metrics,
    confusion_figure,
    eval_loss_means,
    log_eval_loss,
    per_group_metrics,
)
from lightning_modules.resume import seed_batch
from lightning_modules.speedups import (
    can_fuse_adamw,
    is_convolutional,
    prefers_fused_attention,
    set_fused_attention,
    to_channels_last,
)
from peft_methods.base import (
    PeftMethod,
    build_method,
    count_params,
    keep_frozen_in_eval,
    state_mismatch,
    trainable_state_dict,
)

log = logging.getLogger("medpeft")
CKPT_KEY = "medpeft"


class ImageClassifier(L.LightningModule):
    """Image classification with any timm backbone and any PeftMethod.

    Inputs are the datamodule's uint8 images; the model converts them to float and normalises them
    with the backbone's pretrained mean/std, so checkpoints and exports carry their own
    preprocessing. Checkpoints hold only the trainable tensors (see ``on_save_checkpoint``).

    Args:
        backbone: any timm model name.
        peft: the PEFT method (default: full fine-tuning).
        num_classes: outputs (linked from the datamodule).
        pretrained: True (timm hub), False, or a local weights file / ``package:<name>``.
        task: "multiclass", "binary" (two softmax outputs) or "multilabel" (linked).
        class_names: names of the classes (linked), used in the confusion matrix and predictions.
        input_channels: channels of the data (linked); grayscale is repeated to the backbone's 3
            channels unless ``adapt_input_conv`` builds the backbone with in_chans=1.
        adapt_input_conv: build the backbone with the data's channel count (timm adapts the
            pretrained first convolution).
        image_size: input size (linked); fixed-size backbones (ViTs) are built for it.
        optimizer: optimizer over the trainable parameters (default AdamW lr 1e-3, wd 0.05);
            biases, norms, tokens and prompts get no weight decay.
        lr_scheduler: scheduler factory; default linear warmup (``warmup_fraction`` of all steps)
            then cosine decay to zero, stepped every optimizer step.
        warmup_fraction: warmup share of the default scheduler.
        label_smoothing: cross-entropy label smoothing (multiclass / binary).
        grad_checkpointing: timm gradient checkpointing (less memory, ~30% slower).
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. drop_path_rate).
        export_adapter: at the end of fit, export the best weights to ``<run dir>/adapter/``.
        channels_last: keep weights and inputs in NHWC order: ~25% faster CNN training on CPU
            (ResNet-50, bf16); same results up to rounding, which bf16 BatchNorm statistics amplify.
        fused_attention: timm's fused attention kernel; None picks per device and precision at setup:
            the explicit path on CPU in bf16-mixed up to 400 tokens per image (it trains ViTs faster
            there), fused elsewhere (``lightning_modules.speedups``).
        compile: ``torch.compile`` the backbone (true, or a dict of ``torch.compile`` arguments);
            checkpoints and exports are unchanged.
        cache_features: when only the head trains (LinearProbe), run the frozen backbone once per
            distinct image and train the head on the stored features (``lightning_modules.feature_cache``).
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        peft: PeftMethod | None = None,
        num_classes: int = 2,
        pretrained: bool | str = True,
        task: Literal["multiclass", "binary", "multilabel"] = "multiclass",
        class_names: list[str] | None = None,
        input_channels: int = 3,
        adapt_input_conv: bool = False,
        image_size: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_fraction: float = 0.05,
        label_smoothing: float = 0.0,
        grad_checkpointing: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        export_adapter: bool = True,
        channels_last: bool = False,
        fused_attention: bool | None = None,
        compile: bool | dict[str, Any] = False,
        cache_features: bool = False,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"model.init_args.task must be one of {TASKS}, got '{task}'.")
        if num_classes < 1 or (task == "binary" and num_classes != 2):
            raise ValueError(
                f"model.init_args.num_classes={num_classes} is invalid for task '{task}' "
                "(binary tasks use 2 outputs); it is normally linked from the datamodule."
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"model.init_args.warmup_fraction must be in [0, 1), got {warmup_fraction}.")
        self.peft = build_method(peft)
        self.save_hyperparameters(ignore=["peft", "optimizer", "lr_scheduler"])
        self.hparams["peft"] = self.peft.config()
        self.task = task
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler

        backbone_chans = input_channels if adapt_input_conv else 3
        model = create_backbone(
            backbone, num_classes, pretrained, in_chans=backbone_chans, img_size=image_size,
            **(backbone_kwargs or {}),
        )
        self.model = self.peft.apply(model)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.channels_last = channels_last and is_convolutional(self.model)
        if self.channels_last:
            to_channels_last(self.model)
        self.feature_cache: FrozenFeatureCache | None = None
        if cache_features:
            reason = FrozenFeatureCache.unsupported_reason(self.model)
            if reason is not None:
                raise ValueError(
                    f"model.init_args.cache_features needs a method that trains only the task head "
                    f"(LinearProbe), but with {type(self.peft).__name__} {reason}; set it to false."
                )
            self.feature_cache = FrozenFeatureCache()
        if compile:
            self.model.compile(**(compile if isinstance(compile, dict) else {}))
        self.backbone_chans = backbone_chans
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        if backbone_chans != len(mean):  # a 1-channel backbone: one averaged statistic
            mean, std = mean.mean().repeat(backbone_chans), std.mean().repeat(backbone_chans)
        self.register_buffer("pixel_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, -1, 1, 1), persistent=False)

        self.train_metrics = classification_metrics(task, num_classes, "train/", only=("acc",))
        self.val_metrics = classification_metrics(task, num_classes, "val/")
        self.test_metrics = classification_metrics(task, num_classes, "test/")
        self.val_loss_mean, self.test_loss_mean = eval_loss_means()  # see log_eval_loss
        if task != "multilabel":
            self.val_confusion = MulticlassConfusionMatrix(num_classes)
            self.test_confusion = MulticlassConfusionMatrix(num_classes)
        # Frozen backbone weights are not in checkpoints, so loading must not demand them.
        self.strict_loading = False
        self._predictions: list[dict[str, Any]] = []
        self._group_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._per_group: dict[str, dict[str, float]] = {}
        self._timer: results.StageTimer | None = None

    # ------------------------------------------------------------------ forward / steps
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> normalised float input for the backbone."""
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[1] != self.backbone_chans:
            if x.shape[1] != 1:
                raise ValueError(
                    f"Images have {x.shape[1]} channels but the backbone expects {self.backbone_chans}."
                )
            x = x.expand(-1, self.backbone_chans, -1, -1)
        x = (x - self.pixel_mean) / self.pixel_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.feature_cache is not None and not (self.training and self._augmented_training):
            logits = self.feature_cache.logits(self.model, images, x)
            if logits is not None:
                return logits
        return self.model(x)

    @property
    def _augmented_training(self) -> bool:
        # Augmented training images never repeat: caching them would only fill memory.
        trainer = self._trainer
        return bool(getattr(getattr(trainer, "datamodule", None), "augment", False)) if trainer else False

    def setup(self, stage: str) -> None:
        self.select_attention(self.trainer.strategy.root_device, self.trainer.precision)
        if self.feature_cache is not None and stage == "fit" and self._augmented_training:
            log.warning("cache_features: training images are augmented (data.init_args.augment: true), so "
                        "only validation / test features are cached; set augment: false to cache them all.")

    def select_attention(self, device: torch.device | str, precision: str | None = "32-true") -> None:
        """Applies ``fused_attention`` (None: the faster kernel for ``device`` and ``precision``) to the backbone."""
        choice = self.hparams.get("fused_attention")
        if choice is None:
            choice = prefers_fused_attention(self.model, device, precision)
        set_fused_attention(self.model, choice)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.sigmoid() if self.task == "multilabel" else logits.softmax(dim=-1)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def _step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        target = batch["label"]
        loss = self._loss(logits, target)
        probs = self.probabilities(logits).detach()
        metric_target = target.long()
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(probs, metric_target)
        size = target.shape[0]
        if stage == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        else:
            log_eval_loss(self, stage, loss, size)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=size)
        if stage != "train" and self.task != "multilabel":
            getattr(self, f"{stage}_confusion").update(probs.argmax(-1), metric_target)
        return loss, probs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch, "train")
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss is {loss.item()} at step {self.global_step}: lower the learning rate "
                "(model.init_args.optimizer), or use bf16-mixed / 32-true instead of 16-mixed."
            )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, probs = self._step(batch, "test")
        if "group" in batch:  # subgroup labels (e.g. skin type): metrics per group at the end
            self._group_outputs.append((probs.cpu(), batch["label"].long().cpu(), batch["group"].long().cpu()))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        probs = self.probabilities(self(batch["image"])).cpu()
        out = {"id": list(batch["id"]), "probs": probs}
        self._predictions.append(out)
        return out

    # ------------------------------------------------------------------ train mode policy
    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.model)
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout of batch k depends on (seed, epoch, k, rank) alone, so a run resumed at any batch is exact.
        seed_batch(self.current_epoch, batch_idx, self.global_rank)

    # ------------------------------------------------------------------ epoch ends
    def _log_confusion(self, stage: str) -> None:
        if self.task == "multilabel":
            return
        confusion = getattr(self, f"{stage}_confusion")
        matrix = confusion.compute()
        confusion.reset()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                fig = confusion_figure(matrix, self.class_names, f"{stage} epoch {self.current_epoch}")
                logger.experiment.add_figure(f"{stage}/confusion_matrix", fig, self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._log_confusion("val")

    def on_test_epoch_end(self) -> None:
        self._log_confusion("test")
        self._per_group = {}
        if not self._group_outputs:
            return
        probs, target, groups = (torch.cat(t) for t in zip(*self._group_outputs, strict=True))
        self._group_outputs = []
        if self.trainer.world_size > 1:  # every rank holds a shard of the test set
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (probs, target, groups))
            probs, target, groups = (torch.cat(t) for t in zip(*gathered, strict=True))
        names = getattr(self.trainer.datamodule, "group_names", None)
        self._per_group = per_group_metrics(self.task, self.num_classes, probs, target, groups, names)

    def on_fit_start(self) -> None:
        self._timer = results.StageTimer()
        trainable, total = count_params(self.model)
        log.info("%s + %s: %s of %s parameters trainable (%.4f%%)", self.hparams.backbone,
                 type(self.peft).__name__, f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)

    def on_fit_end(self) -> None:
        seconds = self._timer.seconds if self._timer else None
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or ""
        score = getattr(self.trainer.checkpoint_callback, "best_model_score", None)
        results.write_fit_summary(self.trainer, {
            "wall_time_s": seconds,
            "peak_memory_mb": results.peak_memory_mb(self.device),
            "epochs": self.current_epoch,
            "global_steps": self.global_step,
            "best_checkpoint": best,
            "best_score": float(score) if score is not None else None,
        })
        if self.hparams.export_adapter and self.trainer.is_global_zero:
            self._export_best(best)

    def _export_best(self, best: str) -> None:
        from peft_methods.export import export_adapter

        state = None
        if best and Path(best).is_file():  # export the validation-selected weights, not the last
            state = {k: v.detach().clone() for k, v in trainable_state_dict(self.model).items()}
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            self.load_state_dict(ckpt["state_dict"], strict=False)
        export_adapter(self.model, self.peft, results.run_dir(self.trainer) / "adapter", self.export_meta())
        if state is not None:
            self.model.load_state_dict(state, strict=False)

    def export_meta(self) -> dict[str, Any]:
        """What a loader needs to rebuild this backbone."""
        hp = self.hparams
        return {
            "backbone": hp.backbone,
            "num_classes": hp.num_classes,
            "pretrained": hp.pretrained,
            "in_chans": self.backbone_chans,
            "img_size": hp.image_size,
            "task": hp.task,
            "class_names": self.class_names,
            "mean": self.pixel_mean.flatten().tolist(),
            "std": self.pixel_std.flatten().tolist(),
        }

    def on_test_start(self) -> None:
        self._timer = results.StageTimer()
        self._group_outputs = []

    def on_test_end(self) -> None:
        metrics = {
            k.split("/", 1)[1]: float(v)
            for k, v in self.trainer.callback_metrics.items()
            if k.startswith("test/")
        }
        trainable, total = count_params(self.model)
        results.write_metrics(self.trainer, metrics, {
            "backbone": self.hparams.backbone,
            "method": self.peft.config(),
            "task": self.task,
            "num_classes": self.num_classes,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_pct": 100.0 * trainable / total,
            "test_wall_time_s": self._timer.seconds if self._timer else None,
            "peak_memory_mb": results.peak_memory_mb(self.device),
            "checkpoint": self.trainer.ckpt_path,
            **({"per_group": self._per_group} if self._per_group else {}),
        })

    def on_predict_start(self) -> None:
        self._predictions = []

    def on_predict_end(self) -> None:
        rows = self._predictions
        if self.trainer.world_size > 1:  # every rank predicted a shard; rank 0 writes them all
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero:
            return
        path = results.run_dir(self.trainer) / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "predicted", *[f"p_{c}" for c in self.class_names]])
            for batch in rows:
                for ident, p in zip(batch["id"], batch["probs"], strict=True):
                    if ident in seen:  # distributed samplers pad with repeats
                        continue
                    seen.add(ident)
                    if self.task == "multilabel":
                        pred = ";".join(c for c, q in zip(self.class_names, p.tolist(), strict=True) if q >= 0.5)
                    else:
                        pred = self.class_names[int(p.argmax())]
                    writer.writerow([ident, pred, *[f"{q:.6f}" for q in p.tolist()]])
        os.replace(tmp, path)
        log.info("Wrote %d predictions to %s", len(seen), path)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        skip = set(getattr(self.model, "no_weight_decay", lambda: set())())
        names = {id(p): n for n, p in self.model.named_parameters()}
        # A method may ask for groups of its own (SVDiff: its 1-D deltas at their own learning rate).
        own = getattr(self.peft, "param_groups", None)
        method_groups = own(self.model) if callable(own) else [
            {"params": [p for p in self.model.parameters() if p.requires_grad]}
        ]
        groups = []
        for group in method_groups:
            decay, no_decay = [], []
            for p in group["params"]:
                name = names[id(p)]
                if p.ndim <= 1 or name in skip or name.split(".")[0] in skip or "vpt_" in name:
                    no_decay.append(p)
                else:
                    decay.append(p)
            quiet = {**group, "params": no_decay, "weight_decay": 0.0}
            if "name" in group:  # names stay unique (LearningRateMonitor)
                quiet["name"] = f"{group['name']}_no_decay"
            groups += [{**group, "params": decay}, quiet]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(
                f"{type(self.peft).__name__} left no trainable parameter on '{self.hparams.backbone}' "
                "(a linear probe needs num_classes > 0)."
            )
        if self.optimizer_factory is None:
            fused = can_fuse_adamw(p for g in groups for p in g["params"])
            optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05, fused=fused)
        else:
            optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_fraction * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = trainable_state_dict(self.model)
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in state.items()}
        checkpoint[CKPT_KEY] = {
            "backbone": self.hparams.backbone,
            "method": self.peft.config(),
            "num_classes": self.num_classes,
            "keys": sorted(state),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get(CKPT_KEY)
        if info is None:
            raise ValueError("This checkpoint was not written by ImageClassifier (no medpeft record).")
        mine = {"backbone": self.hparams.backbone, "method": self.peft.config(), "num_classes": self.num_classes}
        for key, value in mine.items():
            if info.get(key) != value:
                raise ValueError(
                    f"Checkpoint was made for {key}={info.get(key)!r} but this run has {key}={value!r}; "
                    "resume or test with the configuration that wrote it."
                )
        expected = trainable_state_dict(self.model)
        stored = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items()}
        problem = state_mismatch(stored, expected)
        if problem:
            raise ValueError(f"Checkpoint tensors do not match this model: {problem}.")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
