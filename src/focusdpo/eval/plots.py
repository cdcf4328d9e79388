"""Plots (matplotlib, PNG): training curves from a run's ``metrics.csv`` and metric comparisons across methods.

Uses matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``, so it holds no global state and
needs no display.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# Panels of the training-curve figure: title -> the metrics.csv columns drawn in it (absent columns are skipped).
CURVE_PANELS = {
    "loss": ("loss",),
    "implicit accuracy": ("implicit_acc",),
    "reward margin": ("margin",),
    "errors": ("err_w", "err_l", "ref_err_w", "ref_err_l"),
    "focus: alignment and gate": ("a", "gate"),
    "focus: mean weight": ("w_in_prior", "w_out_prior"),
    "gradient norm": ("grad_norm",),
}


def read_metrics_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a run's ``metrics.csv`` as float arrays (empty or non-numeric cells -> NaN).

    Requires the columns ``step`` and ``loss``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run folder written by `focusdpo train`")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "step" not in rows[0] or "loss" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with at least the columns step, loss and one row")

    def num(v: str | None) -> float:
        try:
            return float(v) if v not in (None, "") else math.nan
        except ValueError:
            return math.nan
    return {k: np.array([num(r.get(k)) for r in rows]) for k in rows[0]}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average: mean of the finite values among the last ``window`` entries; NaN stays NaN."""
    out = np.full_like(values, np.nan, dtype=float)
    finite = np.isfinite(values)
    csum = np.cumsum(np.where(finite, values, 0.0))
    ccount = np.cumsum(finite)
    for i in np.flatnonzero(finite):
        lo = i - window
        s = csum[i] - (csum[lo] if lo >= 0 else 0.0)
        c = ccount[i] - (ccount[lo] if lo >= 0 else 0)
        out[i] = s / c
    return out


def _figure(n_panels: int, width: float = 4.0, height: float = 3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path, window: int = 10,
                         title: str | None = None) -> list[str]:
    """Training curves of one run: one panel per :data:`CURVE_PANELS` entry whose columns are present.

    Raw values are drawn faint, the trailing ``window``-step moving average solid. Returns the panel titles drawn.
    """
    cols = read_metrics_csv(metrics_csv)
    panels = {name: [c for c in names if c in cols and np.isfinite(cols[c]).any()]
              for name, names in CURVE_PANELS.items()}
    panels = {k: v for k, v in panels.items() if v}
    fig, axes = _figure(len(panels))
    step = cols["step"]
    for ax, (name, columns) in zip(axes, panels.items(), strict=True):
        for c in columns:
            line, = ax.plot(step, cols[c], alpha=0.25, linewidth=0.8)
            ax.plot(step, smooth(cols[c], window), color=line.get_color(), linewidth=1.6, label=c)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(columns) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(out_png, dpi=100)
    return list(panels)


def _mean_std(value: object) -> tuple[float, float] | None:
    if isinstance(value, Mapping) and "mean" in value:
        return float(value["mean"]), float(value.get("std", 0.0))
    return None


def plot_method_comparison(metrics: Mapping[str, Mapping[str, object]], out_png: str | Path,
                           names: tuple[str, ...] | None = None, title: str | None = None) -> list[str]:
    """Bars of mean with std error bars, one panel per metric, one bar per method.

    ``metrics``: ``{method: {metric: {"mean": m, "std": s}, ...}}`` (the toy ``metrics.json``); entries that
    are not of that shape are ignored. ``names`` picks and orders the metrics (default: those of the first
    method). Returns the metrics drawn.
    """
    methods = list(metrics)
    if not methods:
        raise ValueError("metrics is empty: nothing to compare")
    names = names or tuple(k for k, v in metrics[methods[0]].items() if _mean_std(v) is not None)
    if not names:
        raise ValueError(f"method {methods[0]!r} has no {{'mean', 'std'}} metrics to plot")
    fig, axes = _figure(len(names), width=3.2)
    for ax, name in zip(axes, names, strict=True):
        vals = [_mean_std(metrics[m].get(name)) or (math.nan, 0.0) for m in methods]
        x = np.arange(len(methods))
        ax.bar(x, [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=4,
               color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(out_png, dpi=100)
    return list(names)
