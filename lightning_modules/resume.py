"""Exact resumption: per-batch random streams, and a clean stop with a mid-epoch checkpoint on pre-emption.

Together with the resumable training order (``datamodules.sampling``) a run stopped at any training
batch continues as if it had never stopped:

- ``seed_batch`` reseeds torch / numpy / random before every training batch from (global seed,
  epoch, batch, rank), so dropout, noise and caption dropout of batch k never depend on how the
  process got there; no random state has to be carried in checkpoints.
- ``Preemption`` turns SIGTERM (pre-emption, ``scancel``, a job's time limit) and SIGUSR1 (SLURM's
  early warning, ``sbatch --signal=USR1@90``) into: finish the current optimizer step (and a
  validation or epoch end that follows it), write ``last.ckpt`` there (atomically), requeue the
  SLURM job where asked, and exit with 128 + signal (``Preempted``; run.py prints its message last).
  ``--ckpt_path last`` (or ``auto`` in a requeued job) then resumes at the next batch.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

log = logging.getLogger("medpeft")


def seed_batch(epoch: int, batch_idx: int, rank: int) -> None:
    """Reseeds every global RNG from (``PL_GLOBAL_SEED``, epoch, batch, rank)."""
    base = int(os.environ.get("PL_GLOBAL_SEED", 0))
    # Ranks get distinct streams (dropout differs per shard, as in one large batch).
    seed = int(np.random.SeedSequence([base % 2**32, epoch, batch_idx, rank]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Preempted(SystemExit):
    """Raised on every rank after a pre-emption checkpoint; exit code 128 + signal, ``message`` on rank 0."""

    def __init__(self, code: int, message: str | None) -> None:
        super().__init__(code)
        self.message = message


class Preemption(Checkpoint):
    """On SIGTERM / SIGUSR1 during training: save ``last.ckpt`` at the next clean point and stop.

    A clean point is where Lightning itself checkpoints, so that a resume neither repeats nor skips
    work: the end of a training batch that completes an optimizer step and is followed by no
    validation, else the end of that validation, else the end of the epoch. Being a ``Checkpoint``
    callback it runs after the ModelCheckpoints, so ``best.ckpt`` has seen that validation.

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
        self._received = signum  # acted on at the next clean point: a handler must not touch the model

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning's own SLURM requeue would write hpc_ckpt_*.ckpt into the working directory
        # (shared by every run of a sweep) and then resume any run from it: this callback owns it.
        env = trainer._accelerator_connector.cluster_environment
        if hasattr(env, "auto_requeue"):
            env.auto_requeue = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Registered after Lightning's handlers, which would stop the run without a checkpoint; a
        # SIGTERM that reached them during setup or the sanity check is carried over.
        connector = getattr(trainer, "_signal_connector", None)
        self._received = 0
        if connector is not None and getattr(connector, "received_sigterm", False):
            self._received, connector.received_sigterm = signal.SIGTERM, False
        for sig in self.signals:
            self._previous.setdefault(sig, signal.signal(sig, self._handler))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ clean points
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if _mid_accumulation(trainer, batch_idx):
            return  # the gradients of this step are in no checkpoint
        if epoch_loop.batch_progress.is_last_batch or _validates_now(trainer):
            return  # validation and the epoch's end come first (their own clean points follow)
        self._stop_if_signalled(trainer, f"at epoch {trainer.current_epoch}, batch {batch_idx + 1} of {trainer.num_training_batches}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only a validation inside the epoch (val_check_interval < 1): after the epoch's last batch the
        # ModelCheckpoints save at on_train_epoch_end, which is where this callback stops then.
        if trainer.state.fn != "fit" or trainer.sanity_checking or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        self._stop_if_signalled(trainer, f"after the validation at epoch {trainer.current_epoch}, batch {_batches_done(trainer)}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer, f"at the end of epoch {trainer.current_epoch}")

    def _stop_if_signalled(self, trainer: L.Trainer, where: str) -> None:
        signum = self._received
        if trainer.world_size > 1:  # every rank must save and stop at the same point
            flag = torch.tensor([signum], device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not signum:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full training state
        requeued = self._requeue(trainer, signum)
        message = None
        if trainer.is_global_zero:
            message = (
                f"Stopped by {signal.Signals(signum).name} {where} "
                f"(step {trainer.global_step}): saved {path}; "
                + ("the SLURM job is requeued and resumes with --ckpt_path auto." if requeued
                   else "resume with the same command and --ckpt_path last (or auto).")
            )
        raise Preempted(128 + signum, message)

    def _requeue(self, trainer: L.Trainer, signum: int) -> bool:
        job = slurm_job_id()
        wanted = self.requeue if self.requeue is not None else (signum == signal.SIGUSR1 and job is not None)
        if not wanted or job is None or not trainer.is_global_zero:
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        except FileNotFoundError:
            log.warning("scontrol is not on PATH, so SLURM job %s was not requeued; resubmit it by hand.", job)
            return False
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed (%s); resubmit the job by hand.", job, result.stderr.strip())
            return False
        return True


def _batches_done(trainer: L.Trainer) -> int:
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def _mid_accumulation(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether this batch's gradients wait for the next batch's (``accumulate_grad_batches``)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:
        return bool(epoch_loop._should_accumulate())
    except AttributeError:  # another Lightning version: its documented rule
        last = epoch_loop.batch_progress.is_last_batch
        return (batch_idx + 1) % trainer.accumulate_grad_batches != 0 and not last


def _validates_now(trainer: L.Trainer) -> bool:
    """Whether Lightning runs validation right after this training batch (True when unsure)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning version: waiting for validation is safe
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
