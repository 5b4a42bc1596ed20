"""Run-directory outputs shared by every LightningModule: fit summary and metrics.json.

Writes are atomic (temp file + rename) so a crash never leaves a half-written file that claims a
result.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

FIT_SUMMARY = "fit_summary.json"
METRICS = "metrics.json"


def run_dir(trainer: L.Trainer) -> Path:
    """The run's directory: the logger's versioned folder, else the trainer's root dir.

    ``trainer.log_dir`` is a collective (a broadcast) that rank-0-only writers would deadlock on
    under DDP; rank 0's own logger already knows the folder.
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    path = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return Path(path or trainer.default_root_dir)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Writes ``obj`` as JSON to ``path`` through a temp file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def usual_permissions(path: str | os.PathLike[str]) -> None:
    """Gives a ``mkstemp`` file (mode 0600) the mode a plain ``open`` would: 0666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU (MiB)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class StageTimer:
    """Wall-clock timer for a stage (fit / test)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def write_fit_summary(trainer: L.Trainer, summary: dict[str, Any]) -> Path | None:
    """Records what a finished fit cost (rank 0 only): read back into metrics.json by test."""
    if not trainer.is_global_zero:
        return None
    return write_json_atomic(run_dir(trainer) / FIT_SUMMARY, summary)


def write_metrics(trainer: L.Trainer, metrics: dict[str, Any], extra: dict[str, Any]) -> Path | None:
    """Writes ``metrics.json`` in the run dir (rank 0 only), merging in the fit summary if any."""
    if not trainer.is_global_zero:
        return None
    directory = run_dir(trainer)
    payload: dict[str, Any] = {"metrics": metrics, **extra}
    fit_file = directory / FIT_SUMMARY
    if fit_file.is_file():
        payload["fit"] = json.loads(fit_file.read_text())
    return write_json_atomic(directory / METRICS, payload)
