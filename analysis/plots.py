"""Figures of the analysis (DESIGN §7): "accuracy on the line" scatter plots.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot, no
global backend switch, nothing happens at import.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.correlate import correlate, probit

#: Raw-value ticks tried on probit axes, coarsest first: the first set that puts at least
#: ``_MIN_TICKS`` ticks inside the axis range is used (the last set in any case).
_TICK_SETS = (
    (0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99),
    (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
    tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.97, 0.98, 0.99),
)
_MIN_TICKS = (4, 3, 0)
#: Ticks closer than (axis range / _MAX_TICKS) to a kept neighbour are dropped (labels overlap).
_MAX_TICKS = 10


def safe_name(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name))


def probit_ticks(lo: float, hi: float) -> list[float]:
    """Raw values whose probits lie in ``[lo, hi]`` (probit units), for tick labels."""
    ticks: list[float] = []
    for cands, need in zip(_TICK_SETS, _MIN_TICKS):
        ticks = [v for v in cands if lo <= float(probit(v)) <= hi]
        if len(ticks) >= need:
            break
    if len(ticks) < 2:  # a very narrow range: three rounded raw values spread over it
        raw = stats.norm.cdf(np.linspace(lo, hi, 5)[1:-1])
        return sorted({float(f"{v:.3g}") for v in raw})
    return _thin(ticks, min_gap=(hi - lo) / _MAX_TICKS)


def _thin(ticks: list[float], min_gap: float) -> list[float]:
    """Drop ticks closer than ``min_gap`` (probit units) to a kept one, walking out from the middle."""
    pos = [float(probit(v)) for v in ticks]
    mid = len(ticks) // 2
    keep = [mid]
    for side in (range(mid + 1, len(ticks)), range(mid - 1, -1, -1)):
        last = mid
        for i in side:
            if abs(pos[i] - pos[last]) >= min_gap:
                keep.append(i)
                last = i
    return [ticks[i] for i in sorted(keep)]


def _fmt_r(stats_: dict) -> str:
    r = stats_["pearson_r"]
    if not math.isfinite(r):
        return f"Pearson r = n/a (n = {stats_['n']})"
    return (f"Pearson r = {r:.2f} [{stats_['pearson_ci_low']:.2f}, {stats_['pearson_ci_high']:.2f}]"
            f" (n = {stats_['n']})")


def plot_on_the_line(perf: pd.DataFrame, target: str, path: str | os.PathLike, metric: str | None = None,
                     x_col: str = "id_score", y_col: str = "ood_score") -> Path:
    """Scatter OOD vs ID performance on probit axes for one target site (paper Fig. 4).

    Points are the pool members (coloured by architecture); the dashed line is y = x and the
    solid line the least-squares fit in probit space. Ticks show raw values.

    Args:
        perf: a ``performance_table``.
        target: the target site to plot.
        path: the PNG to write (parent folders are created).
        metric: the metric's name for the labels (default: ``perf["metric"]``).
        x_col: the indicator column (x axis).
        y_col: the OOD performance column (y axis).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``target`` has no rows in ``perf``.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = perf[perf["target"].astype(str) == str(target)]
    if g.empty:
        raise ValueError(f"no rows for target {target!r}; targets: {sorted(perf['target'].astype(str).unique())}")
    if metric is None:
        metric = str(g["metric"].iloc[0]) if "metric" in g.columns else "score"
    source = ", ".join(sorted(g["source"].astype(str).unique()))
    g = g[np.isfinite(g[x_col].astype(float)) & np.isfinite(g[y_col].astype(float))]
    st = correlate(g[x_col].to_numpy(), g[y_col].to_numpy())
    px, py = probit(g[x_col].to_numpy()), probit(g[y_col].to_numpy())

    fig = Figure(figsize=(5.6, 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(px):
        lo, hi = float(min(px.min(), py.min())), float(max(px.max(), py.max()))
    else:
        lo, hi = float(probit(0.1)), float(probit(0.9))
    pad = max(0.1 * (hi - lo), 0.15)
    lo, hi = lo - pad, hi + pad

    archs = sorted(g["arch"].astype(str).unique())
    cmap = colormaps["tab10"]
    for i, arch in enumerate(archs):
        m = (g["arch"].astype(str) == arch).to_numpy()
        ax.scatter(px[m], py[m], s=28, color=cmap(i % 10), edgecolor="black", linewidth=0.4, label=arch, zorder=3)
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1, label="y = x", zorder=1)
    if math.isfinite(st["probit_slope"]):
        xs = np.array([lo, hi])
        fit_lbl = f"probit fit (slope {st['probit_slope']:.2f}"
        fit_lbl += f", R² {st['probit_r2']:.2f})" if math.isfinite(st["probit_r2"]) else ")"
        ax.plot(xs, st["probit_slope"] * xs + st["probit_intercept"], color="tab:red", lw=1.5,
                label=fit_lbl, zorder=2)

    ticks = probit_ticks(lo, hi)
    for set_ticks, set_labels in ((ax.set_xticks, ax.set_xticklabels), (ax.set_yticks, ax.set_yticklabels)):
        set_ticks([float(probit(v)) for v in ticks])
        set_labels([f"{v:g}" for v in ticks])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.grid(True, lw=0.4, alpha=0.5)
    ax.set_xlabel(f"ID {metric} (source {source}, test split; probit scale)")
    ax.set_ylabel(f"OOD {metric} (target {target}; probit scale)")
    ax.set_title(f"Accuracy on the line: {source} → {target}\n{_fmt_r(st)}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_all_on_the_line(perf: pd.DataFrame, plot_dir: str | os.PathLike, metric: str | None = None) -> list[Path]:
    """One ``plot_on_the_line`` PNG per target: ``<plot_dir>/accuracy_on_the_line_<target>.png``."""
    targets = list(dict.fromkeys(perf["target"].astype(str)))
    return [plot_on_the_line(perf, t, Path(plot_dir) / f"accuracy_on_the_line_{safe_name(t)}.png", metric)
            for t in targets]
