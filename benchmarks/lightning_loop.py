"""Per-step time of ImageClassifier inside a Lightning Trainer against a plain PyTorch loop doing the
same work (forward + loss under the benchmark precision, backward, AdamW, warmup-cosine scheduler) on the same
in-memory batches.

The two loops are interleaved step by step: a callback runs one plain-loop step (same module, its
own optimizer) after every Trainer step and takes its time out of the Trainer's step interval, so
both see the same moments of the machine's load.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks.harness import (
    VIT,
    RoundBudget,
    Timings,
    autocast,
    batch,
    classifier,
    constant_lr,
    method,
    now,
    paired_median_ratio,
    precision,
    ratio,
    seconds,
)
from lightning_modules.classifier import warmup_cosine


class Batches:
    """Prebuilt in-memory batches as one iterable (a plain list would be read as a list of loaders)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)


class PlainLoop:
    """The step a hand-written script would run, with the module's optimizer and the same schedule."""

    def __init__(self, module: Any, total_steps: int) -> None:
        self.module = module
        default_schedule = module.scheduler_factory
        module.scheduler_factory = constant_lr  # the module's optimizer, without needing a Trainer
        try:
            self.optimizer = module.configure_optimizers()["optimizer"]
        finally:
            module.scheduler_factory = default_schedule
        warm = int(module.hparams.warmup_fraction * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warm, total_steps)
        )

    def step(self, b: dict[str, Any]) -> None:
        module = self.module  # in train mode: it runs inside the Trainer's fit
        with autocast():
            loss = F.cross_entropy(module.model(module.preprocess(b["image"])).float(), b["label"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


class _Interleave(L.Callback):
    """Stamps every Trainer step's start; after each Trainer step, runs and times one plain step."""

    def __init__(self, plain: PlainLoop, batches: Batches, max_seconds: float | None = None, min_steps: int = 1) -> None:
        self.plain, self.batches = plain, batches
        self.max_seconds, self.min_steps = max_seconds, min_steps
        self.budget: RoundBudget | None = None
        self.starts: list[tuple[float, float]] = []
        self.plain_times: list[tuple[float, float]] = []

    def on_train_start(self, *args: Any) -> None:
        self.budget = RoundBudget(self.max_seconds, self.min_steps)

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(now())

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, b: Any, batch_idx: int) -> None:
        w0, c0 = now()
        self.plain.step(self.batches.batches[batch_idx])
        w1, c1 = now()
        self.plain_times.append((w1 - w0, c1 - c0))
        # Another pair of steps only if it would end within the budget (the fit stops after this step).
        if self.budget is not None and not self.budget.allows_round(len(self.plain_times)):
            trainer.should_stop = True

    def timings(self, warmup: int) -> tuple[Timings, Timings]:
        """(Trainer, plain) per-step times: start-to-start minus the plain step run in between."""
        trainer, plain = Timings(), Timings()
        for i in range(warmup, len(self.starts) - 1):
            (w0, c0), (w1, c1) = self.starts[i], self.starts[i + 1]
            pw, pc = self.plain_times[i]
            trainer.wall.append(w1 - w0 - pw)
            trainer.cpu.append(c1 - c0 - pc)
            plain.wall.append(pw)
            plain.cpu.append(pc)
        return trainer, plain


def lightning_overhead(
    config: str, steps: int = 10, warmup: int = 2, max_seconds: float | None = None, min_steps: int = 1
) -> tuple[dict[str, float], dict[str, Any]]:
    """Trainer step time / plain-loop step time (fastest of the interleaved steps of each), ViT-S.

    ``max_seconds`` / ``min_steps``: after ``min_steps`` pairs of steps (warm-up included), another
    pair runs only if it would end (as long as the last pair) within ``max_seconds`` of the fit's
    start (``harness.RoundBudget``); at most ``steps``. The details record the steps measured.
    """
    items = []
    for i in range(steps):
        images, labels = batch(seed=i)
        items.append({"image": images, "label": labels, "id": [f"{i}_{j}" for j in range(len(labels))]})
    batches = Batches(items)
    module = classifier(VIT, method(config), lr_scheduler=None)  # one module: no instance gets luckier memory
    clock = _Interleave(PlainLoop(module, steps), batches, max_seconds, min(min_steps, steps))
    with tempfile.TemporaryDirectory() as root:  # the run's fit summary lands here, not in the cwd
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision=precision(), max_steps=steps, max_epochs=1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock], default_root_dir=root,
        )
        trainer.fit(module, train_dataloaders=batches)
    in_trainer, plain = clock.timings(warmup)
    details = {"config": config, "seconds_per_step": seconds({"trainer": in_trainer, "plain": plain}),
               "paired_median_ratio": paired_median_ratio(in_trainer, plain), "measured_steps": len(plain.wall)}
    return ratio(in_trainer, plain), details
