"""``<out>/sweep_state.json``: the status of every run, rewritten atomically after each change.

The run directories stay the ground truth: a run whose marker file (``metrics.json``, or
``fit_summary.json`` for tuning runs) exists is finished whatever the state says, so a sweep
process that crashed between a run's end and the state update loses nothing. A run that finished
with other arguments than its current ones (the fingerprint recorded when it started differs) is
``stale``: kept, since only ``--force`` overwrites finished runs, but neither reported nor used for
tuning as if it were current.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_modules.results import write_json_atomic
from lightning_modules.sweeps.plan import RunSpec

STATE_FILE = "sweep_state.json"
PENDING, RUNNING, DONE, FAILED, STALE = "pending", "running", "done", "failed", "stale"


def read_json(path: Path) -> Any:
    """The JSON value in ``path``, or None when it is missing or unreadable (a run that never wrote it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def run_status(run: RunSpec, entry: Mapping[str, Any]) -> str:
    """The status of ``run`` now: its marker file decides whether it finished (``DONE``, or ``STALE``
    when it finished with other arguments), else the status recorded in its state ``entry``."""
    if run.marker.is_file():
        return STALE if entry.get("fingerprint") not in (None, run.fingerprint()) else DONE
    status = entry.get("status", PENDING)
    return PENDING if status in (DONE, STALE) else status  # its results were removed since


class SweepState:
    """Thread-safe run statuses of one sweep output directory."""

    def __init__(self, out: Path, sweep_file: str) -> None:
        self.path = Path(out) / STATE_FILE
        self._lock = threading.Lock()
        self.data: dict[str, Any] = {"sweep": sweep_file, "runs": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
            except ValueError as err:
                raise ValueError(f"{self.path} is not valid JSON ({err}); delete it to rebuild it from the run "
                                 "directories, which keep every finished result.") from None
            self.data["runs"] = loaded.get("runs", {})
            self.data["plan"] = loaded.get("plan", {})

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        return self.data["runs"]

    def entry(self, run: RunSpec) -> dict[str, Any]:
        return self.runs.get(run.key, {})

    def register(self, runs: list[RunSpec], stage: str) -> None:
        """Records the current plan of ``stage`` (keeping what is known of earlier attempts) and saves."""
        with self._lock:
            self.data.setdefault("plan", {})[stage] = [run.key for run in runs]
            for run in runs:
                entry = self.runs.setdefault(run.key, {"status": PENDING})
                entry.update(name=run.name, stage=run.stage, group=run.group, labels=run.labels,
                             dir=str(run.run_dir))
            self._save()

    def update(self, run: RunSpec, status: str, **fields: Any) -> None:
        """Sets a run's status (and e.g. ``error``, ``seconds``, ``job_id``) and saves."""
        with self._lock:
            entry = self.runs.setdefault(run.key, {})
            entry.update(status=status, updated=_now(), **fields)
            if status == RUNNING:
                entry["fingerprint"] = run.fingerprint()
            if status != FAILED:
                entry.pop("error", None)
            self._save()

    def _save(self) -> None:
        self.data["updated"] = _now()
        write_json_atomic(self.path, self.data)
