"""The evaluation protocol: checking runs before they start, and choosing tuned values on validation.

Tuning runs only ever fit, so their test split is never evaluated; a value is chosen from the best
validation score of each run's checkpoint callback (``best_score`` in ``fit_summary.json``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from collections.abc import Callable
from statistics import mean
from typing import Any
from unittest import mock

import yaml

from lightning_modules.sweeps.grid import SEED_KEY, Tune, format_value
from lightning_modules.sweeps.plan import RunSpec

BOILERPLATE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
               "- Expected a <class 'NoneType'>", "Given value type:", "Given value:", "tip: ")


def _condense(stderr: str) -> str:
    """jsonargparse's multi-line parser error as one line."""
    text = stderr.rsplit("error:", 1)[-1]
    lines = [line.strip().removeprefix("- ").strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(BOILERPLATE))


def resolve_config(run: RunSpec, cli_main: Callable[[list[str]], Any],
                   describe: Callable[[BaseException], str] | None = None) -> dict[str, Any]:
    """The config ``run.py fit`` resolves for ``run`` (``--print_config``: nothing instantiated or written).

    ``describe`` turns a parser exception into one sentence (``run.parse_error_message``).
    """
    out, err = io.StringIO(), io.StringIO()
    detail = None
    try:
        # sys.argv is the sweep's own command line: hide it from LightningCLI.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                mock.patch.object(sys, "argv", sys.argv[:1]):
            cli_main(["fit", *run.args(), "--print_config"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            detail = _condense(err.getvalue())
    except Exception as exc:  # noqa: BLE001 - reported as the run's configuration error
        detail = describe(exc) if describe else _condense(f"error: {exc}")
    if detail is not None and describe is not None:
        raise ValueError(f"run '{run.name}' of the sweep is rejected by run.py: {detail}")
    if detail is not None:
        raise ValueError(
            f"run '{run.name}' of the sweep is rejected by run.py: {detail.rstrip('.')}. Check the sweep's axis "
            f"keys and values against: python run.py fit {' '.join(run.args()[:6])} ... --print_config"
        )
    return yaml.safe_load(out.getvalue()) or {}


def runs_to_check(runs: list[RunSpec]) -> list[RunSpec]:
    """One run per distinct config-file combination, plus runs that cover every override value."""
    chosen, combos, seen = [], set(), set()
    for run in runs:
        values = {(k, json.dumps(v, sort_keys=True, default=str)) for k, v in run.overrides}
        if tuple(run.configs) not in combos or not values <= seen:
            chosen.append(run)
            combos.add(tuple(run.configs))
            seen |= values
    return chosen


def checkpoint_monitor(config: dict[str, Any]) -> tuple[str | None, str]:
    """(monitor, mode) of the resolved config's ModelCheckpoint callback."""
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            args = callback.get("init_args") or {}
            return args.get("monitor"), args.get("mode") or "min"
    return None, "min"


def tune_target(tune: Tune, configs: list[dict[str, Any]], where: str) -> tuple[str, str]:
    """The metric and mode that select tuned values: those of every run's checkpoint callback."""
    monitors = {checkpoint_monitor(c) for c in configs}
    if len(monitors) != 1 or next(iter(monitors))[0] is None:
        raise ValueError(f"{where}: tuning needs one ModelCheckpoint monitor shared by every run, found {monitors}.")
    monitor, mode = monitors.pop()
    if tune.metric not in (None, monitor) or tune.mode not in (None, mode):
        raise ValueError(
            f"{where}: tune selects on {tune.metric or monitor} ({tune.mode or mode}) but the runs' best "
            f"checkpoint is chosen on {monitor} ({mode}); use metric: {monitor}, mode: {mode} so the "
            "selected value and the tested checkpoint agree."
        )
    return monitor, mode


def best_score(run: RunSpec) -> float | None:
    """The best validation score of a finished fit: fit_summary.json, else the checkpoint callback."""
    summary = run.version_dir / "fit_summary.json"
    if summary.is_file():
        score = json.loads(summary.read_text()).get("best_score")
        if score is not None:
            return float(score)
    last = run.version_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    import torch

    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint has no score
        return None
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None


def select(tune: Tune, runs: list[RunSpec], metric: str, mode: str) -> dict[str, Any]:
    """Per group, the tuned value with the best mean validation score over the tuning seeds.

    Ties keep the value listed first. Groups whose runs all failed get no selection.
    """
    groups: dict[str, dict[str, dict[str, float]]] = {}
    values: dict[str, Any] = {}
    for run in runs:
        value = run.values[tune.axis]
        label = format_value(value)
        values[label] = value
        score = best_score(run)
        per_value = groups.setdefault(run.group, {}).setdefault(label, {})
        if score is not None and math.isfinite(score):
            per_value[str(run.values.get(SEED_KEY, "base"))] = score
    order = [format_value(v) for v in tune.values]
    result: dict[str, Any] = {"axis": tune.axis, "metric": metric, "mode": mode, "groups": {}}
    for group, per_value in groups.items():
        means = {label: mean(s.values()) for label, s in per_value.items() if s}
        entry: dict[str, Any] = {"scores": {label: {"mean": means.get(label), "seeds": per_value[label]}
                                            for label in order if label in per_value}}
        if means:
            ranked = sorted(means, key=lambda lb: (-means[lb] if mode == "max" else means[lb], order.index(lb)))
            entry["selected"] = values[ranked[0]]
        result["groups"][group] = entry
    return result
