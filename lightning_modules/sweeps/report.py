"""Sweep report: ``results.csv`` (one row per run), ``results.md`` (mean ± std over seeds) and plots.

Everything is read back from the run directories (``metrics.json``, ``fit_summary.json``), so a
sweep interrupted half-way reports the runs that finished. A table cell that has fewer finite values
than the runs planned for it says so (``0.950 (1 of 3)``) and is never ranked best; runs finished with
other settings than the sweep's current ones (status ``stale``) are listed in ``results.csv`` only.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from lightning_modules.sweeps.plots import finite
from lightning_modules.sweeps.state import DONE, STALE, STATE_FILE, read_json

SWEEP_INFO = "sweep.json"
LOWER_IS_BETTER = {"loss", "ece", "fid"}
PREFERRED = ("auroc", "acc", "balanced_acc", "f1", "fid")
RESOURCE_KEYS = ("trainable_params", "total_params", "trainable_pct", "fit_wall_time_s",
                 "test_wall_time_s", "peak_memory_mb")


def collect(out: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Rows of the final runs, the axis columns and the metric columns."""
    state = read_json(out / STATE_FILE)
    if state is None:
        raise FileNotFoundError(f"{out} has no readable {STATE_FILE}: it is not a sweep output directory.")
    rows, axes, metrics = [], [], []
    planned = (state.get("plan") or {}).get("final")
    for key, entry in state.get("runs", {}).items():
        if entry.get("stage") != "final" or (planned is not None and key not in planned):
            continue  # tuning runs, and runs of an earlier plan (e.g. another tuned value)
        version = Path(entry["dir"]) / "version_0"
        result = read_json(version / "metrics.json")
        summary = read_json(version / "fit_summary.json") or {}
        status = STALE if entry.get("status") == STALE else DONE if result else entry.get("status")
        row: dict[str, Any] = {"name": entry["name"], "status": status}
        for label, value in entry.get("labels", {}).items():
            row[label] = value
            axes += [] if label in axes else [label]
        for key, value in ((result or {}).get("metrics") or {}).items():
            row[key] = value
            metrics += [] if key in metrics else [key]
        fit = (result or {}).get("fit") or summary
        row["val_best_score"] = fit.get("best_score")
        if result:
            row.update({k: result.get(k) for k in ("trainable_params", "total_params", "trainable_pct",
                                                  "test_wall_time_s")})
            row["fit_wall_time_s"] = fit.get("wall_time_s")
            peaks = [p for p in (fit.get("peak_memory_mb"), result.get("peak_memory_mb")) if p is not None]
            row["peak_memory_mb"] = max(peaks) if peaks else None
        row["error"] = None if result else entry.get("error")
        rows.append(row)
    return rows, axes, metrics


def _stale_tuning_runs(out: Path) -> int:
    """Tuning runs of the current plan that finished with other settings."""
    state = read_json(out / STATE_FILE) or {}
    planned = set((state.get("plan") or {}).get("tune") or [])
    return sum(entry.get("status") == STALE for key, entry in (state.get("runs") or {}).items() if key in planned)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _stats(values: Iterable[Any]) -> tuple[float, float, int] | None:
    """(mean, std, count) of the finite values; missing and non-finite values are not counted."""
    vals = [x for x in map(finite, values) if x is not None]
    if not vals:
        return None
    return mean(vals), stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def _fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


class Layout:
    """Which axis makes rows, table splits, columns, the x axis of curves, and the seeds."""

    def __init__(self, axes: list[str], info: dict[str, Any], metrics: list[str]) -> None:
        report = info.get("report") or {}
        labels = {a["key"]: a["label"] for a in info.get("axes", [])}
        labels.update({a: a for a in axes})
        pick = lambda key: labels.get(key, key) if key else None  # noqa: E731 - keys or labels accepted
        config_axes = [a["label"] for a in info.get("axes", []) if a.get("is_config")]
        self.seed = "seed" if "seed" in axes else None
        self.tuned = (info.get("tune") or {}).get("label")
        self.rows = pick(report.get("rows")) or ("method" if "method" in axes else
                                                 (config_axes[0] if config_axes else None))
        self.tables = [pick(t) for t in report.get("tables") or []]
        fractions = [a["label"] for a in info.get("axes", []) if str(a["key"]).endswith(("train_fraction",
                                                                                       "shots_per_class"))]
        self.x = pick(report.get("x")) or (fractions[0] if fractions else None)
        skip = {self.rows, self.seed, self.tuned, *self.tables}
        self.columns = [a for a in axes if a not in skip]
        wanted = report.get("metrics") or [m for m in PREFERRED if m in metrics][:2] or metrics[:1]
        self.metrics = [m for m in wanted if m in metrics]


def _groups(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    return out


def markdown(rows: list[dict[str, Any]], layout: Layout, info: dict[str, Any], n_failed: int,
             n_stale_tuning: int = 0) -> str:
    """Method rows x column-axis columns, ``mean ± std`` over seeds, best of each column in bold.

    A cell averages the finite values of its finished runs; one with fewer of them than runs planned
    for it shows ``(k of n)`` and is not ranked. Stale runs count as planned, never as finished.
    """
    done = [r for r in rows if r["status"] == DONE]
    n_stale = sum(r["status"] == STALE for r in rows)
    lines = [f"# Sweep {info.get('name', '')}".rstrip(), ""]
    n_seeds = len({r.get(layout.seed) for r in rows}) if layout.seed else 1
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one run per cell"
    header = (f"Test-split metrics, {seeds}; checkpoints and tuned values chosen on validation. "
              f"{len(done)} runs finished, {n_failed} failed.")
    if n_stale or n_stale_tuning:
        which = f" ({n_stale} final, {n_stale_tuning} tuning)" if n_stale_tuning else ""
        rerun = f"python sweep.py run {info.get('sweep_file') or '<sweep file>'} --force"
        header += (f" {n_stale + n_stale_tuning} runs{which} finished with other settings than the sweep's "
                   f"current ones and are left out of the tables and the tuning selection; `{rerun}` reruns them.")
    lines.append(header)
    row_key = [layout.rows] if layout.rows else []
    for metric, (table_key, table_rows) in itertools.product(layout.metrics,
                                                             _groups(rows, layout.tables).items()):
        better = min if metric in LOWER_IS_BETTER else max
        title = ", ".join(f"{k}={v}" for k, v in zip(layout.tables, table_key, strict=True))
        lines += ["", f"## {metric} ({'lower' if better is min else 'higher'} is better){' — ' + title if title else ''}", ""]
        columns = sorted(_groups(table_rows, layout.columns), key=lambda c: [_sort_key(v) for v in c])
        grouped = _groups(table_rows, row_key + layout.columns)
        row_values = sorted({k[0] for k in grouped} if row_key else {None}, key=_sort_key)
        cells, planned = {}, {}
        for key, group in grouped.items():
            cell = (key[0] if row_key else None, key[len(row_key):])
            cells[cell] = _stats(r.get(metric) for r in group if r["status"] == DONE)
            planned[cell] = len(group)
        complete = {c for c, s in cells.items() if s is not None and s[2] == planned[c]}
        best = {c: better((cells[(r, cc)][0] for (r, cc) in complete if cc == c), default=None) for c in columns}
        header = " · ".join(layout.columns) or metric
        lines.append(f"| {layout.rows or ''} | " + " | ".join(" · ".join(map(str, c)) or metric for c in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        partial = False
        for rkey in row_values:
            out = []
            for c in columns:
                s, n = cells.get((rkey, c)), planned.get((rkey, c), 0)
                text = "–" if s is None else _fmt(s[0]) + (f" ± {_fmt(s[1])}" if s[2] > 1 else "")
                if n and (rkey, c) not in complete:
                    text += f" ({s[2] if s else 0} of {n})"
                    partial = True
                out.append(f"**{text}**" if (rkey, c) in complete and s[0] == best[c] else text)
            lines.append(f"| {rkey if rkey is not None else 'all'} | " + " | ".join(out) + " |")
        lines.append(f"\nColumns: {header}.")
        if partial:
            lines.append("A cell marked (k of n) averages the k finite values of its n planned runs and is not ranked.")
    return "\n".join(lines) + "\n"


def _sort_key(value: Any) -> tuple:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def write_report(out: str | Path) -> list[Path]:
    """Writes results.csv, results.md and the plots into ``out``; returns the files written."""
    out = Path(out)
    rows, axes, metrics = collect(out)
    info = read_json(out / SWEEP_INFO) or {}
    order = [a["label"] for a in info.get("axes", [])] + [(info.get("tune") or {}).get("label")]
    axes.sort(key=lambda a: order.index(a) if a in order else len(order))  # the sweep file's axis order
    layout = Layout(axes, info, metrics)
    columns = ["name", "status", *axes, *metrics, "val_best_score", *RESOURCE_KEYS, "error"]
    written = [out / "results.csv", out / "results.md"]
    _write_csv(written[0], rows, columns)
    n_failed = sum(r["status"] not in (DONE, STALE) for r in rows)
    text = markdown(rows, layout, info, n_failed, _stale_tuning_runs(out))
    selection = read_json(out / "selection.json")
    if selection:
        text += f"\n## Selected {selection['axis']} (validation {selection['metric']}, {selection['mode']})\n\n"
        text += "| group | value |\n|---|---:|\n"
        for group, entry in selection["groups"].items():
            text += f"| {group} | {entry.get('selected', 'none (no tuned value has all its tuning runs finished)')} |\n"
    (out / "results.md").write_text(text)
    from lightning_modules.sweeps.plots import plot_curves

    written += plot_curves(out, [r for r in rows if r["status"] == DONE], layout)
    return written
