"""Checkpoint writes that a kill can never leave half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_modules.results import usual_permissions


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temp file in the same folder, fsyncs it, then renames it.

    A SIGKILL during a save leaves the previous ``last.ckpt`` intact (a rename is atomic on one
    file system), never a truncated file that a resume would then fail to read. Non-local paths
    (s3://, gs://) fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            usual_permissions(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Checkpoints hold tensors and plain Python values only: never unpickle code.
        if map_location is None:
            return super().load_checkpoint(path, weights_only=True)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
