"""Report plots (matplotlib, Agg): metric vs training-set size, and metric vs % trainable parameters.

One panel per combination of the table and column axes other than the x axis (e.g. per dataset),
one line or point per method, error bars = standard deviation over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from lightning_modules.sweeps.grid import sanitize


def finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, nan or inf)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return mean(values), stdev(values) if len(values) > 1 else 0.0


def _by(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    return out


def _figure(n: int):  # noqa: ANN202 - matplotlib types
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _title(keys: list[str], values: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) or "all runs"


def _save(plt, fig, path: Path) -> Path:  # noqa: ANN001
    handles, labels = [], []
    for ax in fig.axes:
        for h, lb in zip(*ax.get_legend_handles_labels(), strict=True):
            if lb not in labels:
                handles.append(h)
                labels.append(lb)
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(out: Path, rows: list[dict[str, Any]], layout: Any) -> list[Path]:
    """Writes the plots of the first report metric; returns their paths."""
    if not rows or not layout.metrics:
        return []
    metric = layout.metrics[0]
    line_key = [layout.rows] if layout.rows else []
    panel_keys = [*layout.tables, *[c for c in layout.columns if c != layout.x]]
    panels = sorted(_by(rows, panel_keys).items(), key=lambda kv: [str(v) for v in kv[0]])
    files = []
    if layout.x:
        files.append(_fraction_plot(out, metric, layout, panels, panel_keys, line_key))
    files.append(_params_plot(out, metric, layout, panels, panel_keys, line_key))
    return files


def _fraction_plot(out, metric, layout, panels, panel_keys, line_key) -> Path:  # noqa: ANN001
    plt, fig, axes = _figure(len(panels))
    for ax, (key, group) in zip(axes, panels, strict=True):
        xs_all = []
        for line, members in sorted(_by(group, line_key).items(), key=lambda kv: str(kv[0])):
            points = []
            for x, at_x in _by(members, [layout.x]).items():
                vals = [v for v in (finite(r.get(metric)) for r in at_x) if v is not None]
                if finite(x[0]) is not None and vals:
                    points.append((finite(x[0]), *_mean_std(vals)))
            if not points:
                continue
            points.sort()
            xs_all += [p[0] for p in points]
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="o", capsize=3, label=str(line[0]) if line else metric)
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
            ax.set_xscale("log")
        ax.set(title=_title(panel_keys, key), xlabel=layout.x, ylabel=f"test {metric}")
        ax.grid(alpha=0.3)
    return _save(plt, fig, out / f"plot_{sanitize(metric)}_vs_{sanitize(layout.x)}.png")


def _params_plot(out, metric, layout, panels, panel_keys, line_key) -> Path:  # noqa: ANN001
    plt, fig, axes = _figure(len(panels))
    for ax, (key, group) in zip(axes, panels, strict=True):
        title = _title(panel_keys, key)
        if layout.x:  # the full-data end of the curve: the largest training-set size
            largest = max((finite(r.get(layout.x)) for r in group if finite(r.get(layout.x)) is not None), default=None)
            group = [r for r in group if finite(r.get(layout.x)) == largest]
            title = f"{title if panel_keys else ''}{', ' if panel_keys else ''}{layout.x}={largest:g}"
        for line, members in sorted(_by(group, line_key).items(), key=lambda kv: str(kv[0])):
            pct = [p for p in (finite(r.get("trainable_pct")) for r in members) if p is not None and p > 0]
            vals = [v for v in (finite(r.get(metric)) for r in members) if v is not None]
            if not pct or not vals:
                continue
            y, err = _mean_std(vals)
            name = str(line[0]) if line else metric
            ax.errorbar([mean(pct)], [y], yerr=[err], marker="o", capsize=3, label=name)
            ax.annotate(name, (mean(pct), y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set(title=title, xlabel="% trainable parameters", ylabel=f"test {metric}")
        ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, out / f"plot_{sanitize(metric)}_vs_trainable_pct.png")
