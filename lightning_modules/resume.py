"""Exact resumption: per-batch random streams, and a clean stop with a mid-epoch checkpoint on pre-emption.

Together with the resumable training order (``datamodules.sampling``) a run stopped at any training
batch continues as if it had never stopped:

- ``seed_batch`` reseeds torch / numpy / random before every training batch from (global seed,
  epoch, batch, rank), so dropout, noise and caption dropout of batch k never depend on how the
  process got there; no random state has to be carried in checkpoints.
- ``Preemption`` turns SIGTERM (pre-emption, ``scancel``, a job's time limit) and SIGUSR1 (SLURM's
  early warning, ``sbatch --signal=USR1@90``) into: finish the current optimizer step, write
  ``last.ckpt`` there (atomically), requeue the SLURM job where asked, and exit with 128 + signal.
  ``--ckpt_path last`` (or ``auto`` in a requeued job) then resumes at the next batch.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger("medpeft")


def seed_batch(epoch: int, batch_idx: int, rank: int) -> None:
    """Reseeds every global RNG from (``PL_GLOBAL_SEED``, epoch, batch, rank)."""
    base = int(os.environ.get("PL_GLOBAL_SEED", 0))
    # Ranks get distinct streams (dropout differs per shard, as in one large batch).
    seed = int(np.random.SeedSequence([base % 2**32, epoch, batch_idx, rank]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Preemption(Callback):
    """On SIGTERM / SIGUSR1 during training: save ``last.ckpt`` at the next optimizer step and stop.

    Args:
        signals: Signal names that pre-empt the run.
        requeue: Run ``scontrol requeue`` for the SLURM job after saving: True, False, or None for
            "on SIGUSR1 inside a SLURM job" (SIGTERM usually means ``scancel``, or a pre-emption
            that SLURM requeues by itself).
    """

    def __init__(self, signals: list[str] | None = None, requeue: bool | None = None) -> None:
        names = ["SIGTERM", "SIGUSR1"] if signals is None else list(signals)
        unknown = [n for n in names if not isinstance(getattr(signal, n, None), signal.Signals)]
        if unknown:
            raise ValueError(f"Preemption signals {unknown} are not signal names of this system (e.g. SIGTERM).")
        self.signals = [signal.Signals[n] for n in names]
        self.requeue = requeue
        self._received: int = 0
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signal handling
    def _handler(self, signum: int, _frame: Any) -> None:
        self._received = signum  # acted on at the next batch end: a handler must not touch the model

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning's own SLURM requeue would write hpc_ckpt_*.ckpt into the working directory
        # (shared by every run of a sweep) and then resume any run from it: this callback owns it.
        env = trainer._accelerator_connector.cluster_environment
        if hasattr(env, "auto_requeue"):
            env.auto_requeue = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Registered after Lightning's handlers, which would stop the run without a checkpoint.
        self._received = 0
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ the stop
    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal any rank received (all ranks must save and stop at the same step)."""
        received = self._received
        if trainer.world_size > 1:
            flag = torch.tensor([received], device=trainer.strategy.root_device)
            received = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return received

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0 and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # mid-accumulation: the gradients of this step are not in any checkpoint
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        where = f"epoch {trainer.current_epoch}, batch {batch_idx + 1} of {trainer.num_training_batches}"
        requeued = self._requeue(trainer, signum)
        if trainer.is_global_zero:
            print(
                f"Stopped by {name} at {where} (step {trainer.global_step}): saved {path}; "
                + ("the SLURM job is requeued and resumes with --ckpt_path auto." if requeued
                   else "resume with the same command and --ckpt_path last (or auto)."),
                file=sys.stderr, flush=True,
            )
        raise SystemExit(128 + signum)

    def _requeue(self, trainer: L.Trainer, signum: int) -> bool:
        job = slurm_job_id()
        wanted = self.requeue if self.requeue is not None else (signum == signal.SIGUSR1 and job is not None)
        if not wanted or job is None or not trainer.is_global_zero:
            return False
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed (%s); resubmit the job by hand.", job, result.stderr.strip())
            return False
        return True


def slurm_job_id() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` inside an array), or None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this run's ``last.ckpt`` lives: the folder of its last-checkpoint callback."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor is None and callback.dirpath:
            name = (callback.filename or "last") + callback.FILE_EXTENSION
            return Path(callback.dirpath) / name
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / "last.ckpt"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
