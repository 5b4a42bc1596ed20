"""Sweep files: parsing, validation of their structure, and expansion into named runs.

A sweep file lists base configs, grid axes (config-file axes whose values are YAML files, and
override axes keyed by a dotted ``run.py`` option), exclude rules and an optional tuning stage; see
``sweep.py`` for the format. Every run gets a deterministic name built from its axis values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SEED_KEY = "seed_everything"
TOP_KEYS = ("name", "out", "configs", "overrides", "grid", "exclude", "tune", "slurm", "report", "max_parallel")
SLURM_KEYS = ("partition", "account", "qos", "constraint", "gpus_per_node", "nodes", "cpus_per_task",
              "mem_gb", "time_min", "setup", "additional_parameters")
DEFAULT_OVERRIDES = {"trainer.enable_progress_bar": False}  # tqdm bars make unreadable log files
MAX_NAME = 120


@dataclass(frozen=True)
class Axis:
    """One grid dimension: ``values`` are absolute config paths for config-file axes."""

    key: str
    values: tuple[Any, ...]
    is_config: bool
    label: str
    value_labels: tuple[str, ...]

    def index(self, value: Any, where: str) -> int:
        """Position of ``value`` (a value, a config path or its label) in this axis."""
        if self.is_config:
            if value in self.value_labels:
                return self.value_labels.index(value)
            path = find_config(str(value))
            if path is not None and str(path) in self.values:
                return self.values.index(str(path))
        else:
            for i, v in enumerate(self.values):
                same_kind = type(v) is type(value) or (_number(v) and _number(value))
                if same_kind and v == value:
                    return i
        raise ValueError(
            f"{where}: '{value}' is not a value of axis '{self.key}' (its values: {list(self.value_labels)})."
        )


@dataclass(frozen=True)
class Tune:
    """The tuning stage: one value of ``axis`` per group, chosen on a validation metric."""

    axis: str
    values: tuple[Any, ...]
    metric: str | None
    mode: str | None
    seeds: tuple[int, ...] | None
    label: str = ""


@dataclass
class Sweep:
    """A parsed sweep file."""

    path: Path
    name: str
    out: Path
    configs: list[str]
    overrides: dict[str, Any]
    axes: list[Axis]
    exclude: list[dict[str, Any]]
    tune: Tune | None
    slurm: dict[str, Any]
    report: dict[str, Any]
    max_parallel: int | None

    def points(self) -> list[dict[str, Any]]:
        """Every combination of axis values (grid order) that no exclude rule removes."""
        combos = itertools.product(*(range(len(a.values)) for a in self.axes))
        points = []
        for combo in combos:
            if any(all(combo[self._pos(k)] in idx for k, idx in rule.items()) for rule in self.exclude):
                continue
            points.append({a.key: a.values[i] for a, i in zip(self.axes, combo, strict=True)})
        return points

    def _pos(self, key: str) -> int:
        return next(i for i, a in enumerate(self.axes) if a.key == key)


def find_config(value: str) -> Path | None:
    """A config path as given: absolute, else relative to the current directory, else to the project."""
    path = Path(value).expanduser()
    for candidate in ([path] if path.is_absolute() else [Path.cwd() / path, ROOT / path]):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _config(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.endswith((".yaml", ".yml")):
        raise ValueError(f"{where}: '{value}' is not a YAML config file path.")
    path = find_config(value)
    if path is None:
        raise FileNotFoundError(
            f"{where}: config file '{value}' does not exist (relative paths are read from the current "
            f"directory, then from the project root {ROOT})."
        )
    return str(path)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def format_value(value: Any) -> str:
    """The ``run.py`` command-line text of an override value (parsed back as YAML)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        mantissa, _, exponent = repr(value).partition("e")  # YAML 1.1 reads 1e-05 as a string
        return f"{mantissa}{'' if '.' in mantissa or not exponent else '.0'}{'e' + exponent if exponent else ''}"
    return json.dumps(value, separators=(",", ":"))


def sanitize(part: str) -> str:
    """One path-safe name component: no separators, no ``.``/``..``, no leading dot."""
    text = re.sub(r"[^A-Za-z0-9._=+-]+", "_", part)
    text = re.sub(r"\.{2,}", "_", text).lstrip(".")
    return text or "_"


def run_name(parts: list[str]) -> str:
    """Joins sanitised parts; over-long names keep a prefix plus a hash of the full name."""
    name = "__".join(sanitize(p) for p in parts) or "run"
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def _value_label(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else format_value(value)


def _key_labels(keys: list[str]) -> dict[str, str]:
    """Short column names: the last dotted part (``lr``), the full key where two would clash."""
    short = {k: "seed" if k == SEED_KEY else k.rsplit(".", 1)[-1] for k in keys}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clashes else s) for k, s in short.items()}


def _config_labels(paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    base = Path.cwd()
    rel = [Path(p).relative_to(base) if Path(p).is_relative_to(base) else Path(p) for p in paths]
    return [str(r.with_suffix("")).strip("/").replace("/", "-") for r in rel]


def _is_config_axis(values: list[Any]) -> bool:
    return all(isinstance(v, str) and v.endswith((".yaml", ".yml")) for v in values)


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Reads and checks a sweep file; raises one clear ValueError / FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Sweep file '{path}' does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must be a mapping with the keys {list(TOP_KEYS)}.")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; a sweep file has the keys {list(TOP_KEYS)}.")
    name = sanitize(str(raw.get("name") or path.stem))
    configs = raw.get("configs") or []
    if not isinstance(configs, list):
        raise ValueError(f"{path}: 'configs' must be a list of config files, e.g. [configs/demo.yaml].")
    configs = [_config(c, f"{path}: configs") for c in configs]
    overrides = _mapping(raw, "overrides", path)
    grid = _mapping(raw, "grid", path)
    if not grid:
        raise ValueError(f"{path}: the grid is empty; add at least one axis under 'grid:'.")
    axes = _axes(grid, path, overrides)
    defaults = {k: v for k, v in DEFAULT_OVERRIDES.items() if k not in grid}
    overrides = {**defaults, **overrides}
    tune = _tune(raw.get("tune"), path, axes)
    if tune is not None:
        labels = _key_labels([a.key for a in axes if not a.is_config] + [tune.axis])
        tune = Tune(tune.axis, tune.values, tune.metric, tune.mode, tune.seeds, labels[tune.axis])
    exclude = _exclude(raw.get("exclude") or [], path, axes)
    max_parallel = raw.get("max_parallel")
    if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
        raise ValueError(f"{path}: max_parallel must be a positive integer, got {max_parallel!r}.")
    unknown = sorted(set(_mapping(raw, "slurm", path)) - set(SLURM_KEYS))
    if unknown:
        raise ValueError(f"{path}: slurm: unknown key(s) {unknown}; use {list(SLURM_KEYS)}.")
    sweep = Sweep(
        path=path.resolve(), name=name, out=Path(out or raw.get("out") or Path("sweeps") / name).resolve(),
        configs=configs, overrides=overrides, axes=axes, exclude=exclude, tune=tune,
        slurm=_mapping(raw, "slurm", path), report=_mapping(raw, "report", path), max_parallel=max_parallel,
    )
    if not sweep.points():
        raise ValueError(f"{path}: the exclude rules remove every run of the grid; nothing to run.")
    return sweep


def _mapping(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: '{key}' must be a mapping, got {type(value).__name__}.")
    return dict(value)


def _axes(grid: dict[str, Any], path: Path, overrides: dict[str, Any]) -> list[Axis]:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid axis '{key}' must be a non-empty list of values.")
        if any(values.count(v) > 1 for v in values):
            raise ValueError(f"{path}: grid axis '{key}' repeats a value: {values}.")
        if key in overrides:
            raise ValueError(f"{path}: '{key}' is both a grid axis and a fixed override; keep one.")
    override_keys = [k for k, v in grid.items() if not _is_config_axis(v)]
    key_labels = _key_labels(override_keys)
    axes = []
    for key, values in grid.items():
        where = f"{path}: grid axis '{key}'"
        if _is_config_axis(values):
            resolved = [_config(v, where) for v in values]
            axes.append(Axis(key, tuple(resolved), True, key, tuple(_config_labels(resolved))))
            continue
        mixed = any(isinstance(v, str) and v.endswith((".yaml", ".yml")) for v in values)
        if mixed or ("." not in key and key != SEED_KEY):
            raise ValueError(
                f"{where}: values must all be YAML config files (a config-file axis) or the key must be a "
                f"dotted run.py option such as data.init_args.train_fraction or {SEED_KEY}."
            )
        labels = tuple(_value_label(v) for v in values)
        axes.append(Axis(key, tuple(values), False, key_labels[key], labels))
    return axes


def _tune(spec: Any, path: Path, axes: list[Axis]) -> Tune | None:
    if spec is None:
        return None
    where = f"{path}: tune"
    if not isinstance(spec, dict) or not {"axis", "values"} <= set(spec):
        raise ValueError(f"{where} needs 'axis' (a dotted run.py option) and 'values' (a list).")
    unknown = sorted(set(spec) - {"axis", "values", "metric", "mode", "seeds"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; use axis, values, metric, mode, seeds.")
    axis, values = str(spec["axis"]), spec["values"]
    if "." not in axis:
        raise ValueError(f"{where}: axis '{axis}' must be a dotted run.py option, e.g. "
                         "model.init_args.optimizer.init_args.lr.")
    if any(a.key == axis for a in axes):
        raise ValueError(f"{where}: '{axis}' is also a grid axis; tune it or sweep it, not both.")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: values must be a non-empty list.")
    mode = spec.get("mode")
    if mode not in (None, "max", "min"):
        raise ValueError(f"{where}: mode must be 'max' or 'min', got {mode!r}.")
    seeds = spec.get("seeds")
    if seeds is None:
        seed_axis = next((a for a in axes if a.key == SEED_KEY), None)
        seeds = [seed_axis.values[0]] if seed_axis else None
    elif not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}.")
    metric = spec.get("metric")
    return Tune(axis, tuple(values), str(metric) if metric else None, mode, tuple(seeds) if seeds else None)


def _exclude(rules: Any, path: Path, axes: list[Axis]) -> list[dict[str, set[int]]]:
    """Rules as {axis key: set of value positions}; a list value matches any of its items."""
    if not isinstance(rules, list):
        raise ValueError(f"{path}: 'exclude' must be a list of {{axis: value}} mappings.")
    by_key = {a.key: a for a in axes}
    parsed = []
    for i, rule in enumerate(rules):
        where = f"{path}: exclude[{i}]"
        if not isinstance(rule, dict) or not rule:
            raise ValueError(f"{where} must be a non-empty mapping of axis -> value.")
        entry = {}
        for key, value in rule.items():
            if key not in by_key:
                raise ValueError(f"{where}: '{key}' is not a grid axis (axes: {list(by_key)}).")
            axis = by_key[key]
            # A list means any of its items, unless the list itself is one value of an override axis.
            any_of = isinstance(value, list) and (axis.is_config or value not in axis.values)
            entry[key] = {axis.index(v, where) for v in (value if any_of else [value])}
        parsed.append(entry)
    return parsed
