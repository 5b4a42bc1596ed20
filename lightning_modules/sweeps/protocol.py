"""The evaluation protocol: checking runs before they start, and choosing tuned values on validation.

Tuning runs only ever fit, so their test split is never evaluated; a value is chosen from the best
validation score of each run's checkpoint callback (``best_score`` in ``fit_summary.json``), and only
from values whose tuning runs all finished under the sweep's current settings.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from collections.abc import Callable, Mapping
from statistics import mean
from typing import Any
from unittest import mock

import yaml

from lightning_modules.sweeps.grid import SEED_KEY, Tune, format_value
from lightning_modules.sweeps.plan import RunSpec
from lightning_modules.sweeps.state import DONE, FAILED, STALE, read_json, run_status

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
    """The best validation score a finished fit recorded in its ``fit_summary.json`` (None if absent).

    Only a finished fit has one: the ``last.ckpt`` of a fit that failed or stopped is no result.
    """
    summary = read_json(run.version_dir / "fit_summary.json")
    score = summary.get("best_score") if isinstance(summary, dict) else None
    return float(score) if isinstance(score, (int, float)) else None


def _why_excluded(run: RunSpec, status: str, entry: Mapping[str, Any], score: float | None) -> str | None:
    """Why ``run`` cannot contribute a score (None when it can): only finished, current, finite fits count."""
    if status == DONE:
        return None if score is not None and math.isfinite(score) else (
            f"{run.name} finished without a finite validation score (best_score: {score})")
    if status == STALE:
        return f"{run.name} finished with other settings (--force reruns it)"
    if status == FAILED:
        return f"{run.name} failed: {entry.get('error') or 'no error recorded'}"
    return f"{run.name} did not finish ({status})"


def select(tune: Tune, runs: list[RunSpec], metric: str, mode: str,
           entries: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Per group, the tuned value with the best mean validation score over the tuning seeds.

    ``entries`` are the sweep state's records by run key (statuses, errors, fingerprints). A value is
    selectable only when every one of its tuning runs finished under the current settings with a finite
    score: a diverged value must lose, and means over different seed sets are not comparable. Each
    group records its ``excluded`` values with the reasons. Ties keep the value listed first; groups
    whose values are all excluded get no selection.
    """
    entries = entries or {}
    groups: dict[str, dict[str, dict[str, float]]] = {}
    excluded: dict[str, dict[str, list[str]]] = {}
    values: dict[str, Any] = {}
    for run in runs:
        value = run.values[tune.axis]
        label = format_value(value)
        values[label] = value
        entry = entries.get(run.key, {})
        status = run_status(run, entry)
        score = best_score(run) if status == DONE else None
        per_value = groups.setdefault(run.group, {}).setdefault(label, {})
        reason = _why_excluded(run, status, entry, score)
        if reason is None:
            per_value[str(run.values.get(SEED_KEY, "base"))] = score
        else:
            excluded.setdefault(run.group, {}).setdefault(label, []).append(reason)
    order = [format_value(v) for v in tune.values]
    result: dict[str, Any] = {"axis": tune.axis, "metric": metric, "mode": mode, "groups": {}}
    for group, per_value in groups.items():
        left_out = excluded.get(group, {})
        means = {label: mean(s.values()) for label, s in per_value.items() if s and label not in left_out}
        record: dict[str, Any] = {
            "scores": {label: {"mean": means.get(label), "seeds": per_value[label]}
                       for label in order if label in per_value},
            "excluded": {label: left_out[label] for label in order if label in left_out},
        }
        if means:
            ranked = sorted(means, key=lambda lb: (-means[lb] if mode == "max" else means[lb], order.index(lb)))
            record["selected"] = values[ranked[0]]
        result["groups"][group] = record
    return result
