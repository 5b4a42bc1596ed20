"""Runs of a sweep: names, directories and ``run.py`` arguments of tuning and final runs.

A run's directory is ``<save_dir>/<name>``: it holds ``log.txt`` and Lightning's ``version_0``
(``config.yaml``, TensorBoard events, ``checkpoints/``, ``fit_summary.json``, ``metrics.json``),
laid out by ``run.py`` itself through ``--trainer.logger.init_args.{save_dir,name,version}``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_modules.sweeps.grid import SEED_KEY, Sweep, format_value, run_name

FINAL, TUNE = "final", "tune"


@dataclass
class RunSpec:
    """Everything an executor needs to run one grid point (picklable for SLURM jobs)."""

    name: str
    stage: str
    labels: dict[str, str]
    group: str
    configs: list[str]
    overrides: list[tuple[str, Any]]
    save_dir: str
    cwd: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Unique id in the sweep state: ``<stage>/<name>``."""
        return f"{self.stage}/{self.name}"

    @property
    def run_dir(self) -> Path:
        return Path(self.save_dir) / self.name

    @property
    def version_dir(self) -> Path:
        return self.run_dir / "version_0"

    @property
    def stages(self) -> tuple[str, ...]:
        """Tuning runs only fit: their test split must never be looked at."""
        return ("fit", "test") if self.stage == FINAL else ("fit",)

    @property
    def marker(self) -> Path:
        """The file whose presence means this run finished."""
        return self.version_dir / ("metrics.json" if self.stage == FINAL else "fit_summary.json")

    def args(self) -> list[str]:
        """``run.py`` arguments after the subcommand: configs, then overrides, then the run dir."""
        out: list[str] = []
        for config in self.configs:
            out += ["--config", config]
        for key, value in self.overrides:
            out += [f"--{key}", format_value(value)]
        out += [
            "--trainer.logger.init_args.save_dir", self.save_dir,
            "--trainer.logger.init_args.name", self.name,
            "--trainer.logger.init_args.version", "0",
        ]
        return out

    def fingerprint(self) -> str:
        """Changes whenever the run's arguments do (a stale partial run is then started afresh)."""
        return hashlib.sha1(json.dumps([self.stages, self.args()]).encode()).hexdigest()[:16]


def _parts(sweep: Sweep, point: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    parts, labels = [], {}
    for axis in sweep.axes:
        if axis.key not in point:
            continue
        label = axis.value_labels[axis.values.index(point[axis.key])]
        parts.append(label if axis.is_config else f"{axis.label}={label}")
        labels[axis.label] = label
    return parts, labels


def group_of(sweep: Sweep, point: dict[str, Any]) -> str:
    """The tuning group of a grid point: its name without the seed."""
    parts = _parts(sweep, {k: v for k, v in point.items() if k != SEED_KEY})[0]
    return run_name(parts) if parts else "all"


def _spec(sweep: Sweep, stage: str, point: dict[str, Any], extra: list[tuple[str, str, Any]]) -> RunSpec:
    """A run of ``point`` plus ``extra`` (key, label, value) overrides (tuned value, tuning seed)."""
    parts, labels = _parts(sweep, point)
    configs = list(sweep.configs)
    overrides = list(sweep.overrides.items())
    values = {}
    for axis in sweep.axes:
        if axis.key in point:
            values[axis.key] = point[axis.key]
            if axis.is_config:
                configs.append(point[axis.key])
            else:
                overrides.append((axis.key, point[axis.key]))
    for key, label, value in extra:
        text = format(value, "g") if isinstance(value, float) else format_value(value)
        parts.append(f"{label}={text}")
        labels[label] = text
        overrides.append((key, value))
        values[key] = value
    save_dir = sweep.out / ("runs" if stage == FINAL else "tune")
    return RunSpec(
        name=run_name(parts), stage=stage, labels=labels, group=group_of(sweep, point), configs=configs,
        overrides=overrides, save_dir=str(save_dir), cwd=str(Path.cwd()), values=values,
    )


def _dedupe(runs: list[RunSpec]) -> list[RunSpec]:
    """Distinct values that sanitise to the same name get a hash of their values appended."""
    counts = Counter(r.name for r in runs)
    for run in runs:
        if counts[run.name] > 1:
            digest = hashlib.sha1(json.dumps(run.values, sort_keys=True, default=str).encode()).hexdigest()
            run.name = f"{run.name}-{digest[:8]}"
    return runs


def tune_runs(sweep: Sweep) -> list[RunSpec]:
    """Tuning runs: every group x tuned value x tuning seed (fit only)."""
    tune = sweep.tune
    if tune is None:
        return []
    groups: dict[str, dict[str, Any]] = {}
    for point in sweep.points():
        groups.setdefault(group_of(sweep, point), {k: v for k, v in point.items() if k != SEED_KEY})
    runs = []
    for point in groups.values():
        for value in tune.values:
            for seed in tune.seeds or [None]:
                extra = [(tune.axis, tune.label, value)]
                if seed is not None:
                    extra.append((SEED_KEY, "seed", seed))
                runs.append(_spec(sweep, TUNE, point, extra))
    return _dedupe(runs)


def final_runs(sweep: Sweep, selection: dict[str, Any] | None = None) -> list[RunSpec]:
    """The grid's runs; with a tuning stage, groups without a selected value are left out."""
    runs = []
    for point in sweep.points():
        extra = []
        if sweep.tune is not None:
            group = group_of(sweep, point)
            if selection is None or group not in selection:
                continue
            extra = [(sweep.tune.axis, sweep.tune.label, selection[group])]
        runs.append(_spec(sweep, FINAL, point, extra))
    return _dedupe(runs)


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves to a location strictly under ``root``."""
    path, root = path.resolve(), root.resolve()
    return path != root and path.is_relative_to(root)
