"""A callback for pre-emption tests: it holds training at a chosen batch until a signal has arrived.

``run.py`` subprocesses load it with ``--trainer.callbacks+=...`` (``tests/`` on PYTHONPATH), so the
test can send SIGTERM from outside at a known batch instead of at a random moment.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L

from lightning_modules.resume import Preemption


class HoldForSignal(L.Callback):
    """At batch ``batch`` of epoch ``epoch`` (rank 0): writes ``marker``, then waits for a pre-emption signal."""

    def __init__(self, epoch: int, batch: int, marker: str, timeout: float = 120.0) -> None:
        self.epoch, self.batch, self.marker, self.timeout = epoch, batch, Path(marker), timeout

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch) or not trainer.is_global_zero:
            return
        preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
        self.marker.write_text(f"{trainer.global_step}\n")
        deadline = time.monotonic() + self.timeout
        while not preemption._received and time.monotonic() < deadline:
            time.sleep(0.01)
