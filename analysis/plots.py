"""Figures of the analysis (docs/architecture.md "Analysis"): the paper's Fig. 3, Fig. 4 and Fig. 6.

* ``figure_fig4``: OOD against ID performance, OOD performance against ID agreement and OOD
  against ID agreement over pairs of members ("on the line"), on probit axes with raw-value
  ticks, y = x and the probit fit; points coloured by architecture.
* ``figure_fig3``: uncertain area against OOD performance, one panel per target, r in the title.
* ``figure_fig6``: one member and slice: image, truth, prediction, μ of δ, error map, uncertainty
  map; below, the uncertainty maps of other members on the same slice, most uncertain first.

Every ``figure_*`` returns a ``matplotlib.figure.Figure`` drawn on the Agg canvas directly (no
pyplot, no global backend switch, nothing happens at import); ``save_figure`` writes it.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from analysis.correlate import correlate, correlate_pairs, probit

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from analysis.agreement import Agreement
    from analysis.examples import Example

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
#: Colour of pairs of members of different architectures (Fig. 4, agreement panel).
_MIXED = "0.6"


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


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders are created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def arch_colors(archs: list[str] | np.ndarray | pd.Series) -> dict[str, tuple]:
    """A fixed tab10 colour per architecture name (sorted), the same in every panel."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(sorted({str(a) for a in archs}))}


def _finite(v: object) -> bool:
    return isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))


def _fmt_r(st: dict, boot: bool = False, probit_space: bool = False) -> str:
    """``r = 0.80 [0.42, 0.94], ρ = 0.92 (n = 12 members)`` from a ``correlate`` result.

    ``probit_space``: lead with the Pearson r of the probit values, the r of the line a probit plot
    draws (Fig. 4), then the raw r."""
    n, n_units = st.get("n"), st.get("n_units", st.get("n"))
    unit = st.get("resample") or "member"
    count = f"n = {n} pairs, {n_units} {unit}s" if st.get("unit") == "pair" or (n != n_units and unit == "member") \
        else (f"n = {n} members, {n_units} runs" if n != n_units else f"n = {n} members")
    if probit_space:
        pr = st.get("probit_r")
        raw = st.get("pearson_r")
        head = f"probit r = {pr:.2f}" if _finite(pr) else "probit r = n/a"
        return head + (f"; raw r = {raw:.2f}" if _finite(raw) else "") + f" ({count})"
    r = st.get("pearson_r")
    if not _finite(r):
        return f"Pearson r = n/a ({count})"
    lo, hi = ((st.get("pearson_boot_low"), st.get("pearson_boot_high")) if boot
              else (st.get("pearson_ci_low"), st.get("pearson_ci_high")))
    ci = f" [{lo:.2f}, {hi:.2f}]" if _finite(lo) and _finite(hi) else ""
    rho = st.get("spearman_rho")
    rho_s = f", ρ = {rho:.2f}" if _finite(rho) else ""
    return f"r = {r:.2f}{ci}{rho_s} ({count})"


def _probit_axes(ax: Axes, lo: float, hi: float) -> None:
    ticks = probit_ticks(lo, hi)
    for set_ticks, set_labels in ((ax.set_xticks, ax.set_xticklabels), (ax.set_yticks, ax.set_yticklabels)):
        set_ticks([float(probit(v)) for v in ticks])
        set_labels([f"{v:g}" for v in ticks])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.grid(True, lw=0.4, alpha=0.5)


def draw_on_the_line(ax: Axes, x: np.ndarray, y: np.ndarray, groups: np.ndarray, colors: dict[str, object],
                     st: dict, xlabel: str, ylabel: str, title: str, size: float = 28, alpha: float = 1.0,
                     boot_ci: bool = False, oracle_xy: tuple[np.ndarray, np.ndarray] | None = None,
                     eps: float | tuple[float, float] = 1e-3) -> None:
    """Scatter ``y`` against ``x`` on probit axes: one point per entry, y = x, the probit fit.

    Args:
        ax: the axes to draw on.
        x: indicator values in [0, 1] (finite).
        y: OOD values in [0, 1] (finite), same length.
        groups: legend group of each point (an architecture name, or a key of ``colors``).
        colors: group -> colour; groups are drawn in this dict's order.
        st: ``correlate``'s result for these points (the fit and the title's r).
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: first title line (the second is r, its interval and ρ).
        size: marker size.
        alpha: marker opacity.
        boot_ci: show the bootstrap interval of r instead of the Fisher-z one (pairs).
        oracle_xy: oracle-prompted members' (x, y), drawn with their own marker and left out of the fit.
        eps: the probit clip, one or ``(x's, y's)`` (``analysis.probit_clip``; the labels should state it).

    The title gives the probit-space r (the line drawn is fitted in probit space), then the raw r.
    """
    ex, ey = eps if isinstance(eps, tuple) else (eps, eps)
    px, py = probit(x, ex), probit(y, ey)
    ox, oy = (probit(oracle_xy[0], ex), probit(oracle_xy[1], ey)) if oracle_xy is not None and len(oracle_xy[0]) \
        else (np.zeros(0), np.zeros(0))
    allx, ally = np.concatenate([px, ox]), np.concatenate([py, oy])
    if len(allx):
        lo, hi = float(min(allx.min(), ally.min())), float(max(allx.max(), ally.max()))
    else:
        lo, hi = float(probit(0.1)), float(probit(0.9))
    pad = max(0.1 * (hi - lo), 0.15)
    lo, hi = lo - pad, hi + pad
    groups = np.asarray(groups).astype(str)
    for g, color in colors.items():
        m = groups == g
        if m.any():
            ax.scatter(px[m], py[m], s=size, color=color, edgecolor="black" if size >= 20 else "none",
                       linewidth=0.4, alpha=alpha, label=g, zorder=3, rasterized=len(px) > 2000)
    if len(ox):
        ax.scatter(ox, oy, s=max(size, 20) * 1.3, marker="X", color="black", alpha=0.8, zorder=3,
                   label="oracle-prompted † (not in the fit)")
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1, label="y = x", zorder=1)
    slope, icpt = st.get("probit_slope"), st.get("probit_intercept")
    if _finite(slope) and _finite(icpt):
        xs = np.array([lo, hi])
        r2 = st.get("probit_r2")
        lbl = f"probit fit (slope {slope:.2f}" + (f", R² {r2:.2f})" if _finite(r2) else ")")
        ax.plot(xs, slope * xs + icpt, color="tab:red", lw=1.5, label=lbl, zorder=4)
    _probit_axes(ax, lo, hi)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(f"{title}\n{_fmt_r(st, boot=boot_ci, probit_space=True)}", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", framealpha=0.85, markerscale=1.0 if size >= 20 else 2.0)


def _stats_from(corr: pd.DataFrame | None, indicator: str, target: str) -> dict | None:
    if corr is None or corr.empty:
        return None
    hit = corr[(corr["indicator"] == indicator) & (corr["target"].astype(str) == str(target))]
    return None if hit.empty else {k: (None if pd.isna(v) else v) for k, v in hit.iloc[0].to_dict().items()}


def _finite_rows(g: pd.DataFrame, x_col: str, y_col: str) -> pd.DataFrame:
    return g[np.isfinite(g[x_col].astype(float)) & np.isfinite(g[y_col].astype(float))]


def _target_rows(table: pd.DataFrame, target: str) -> pd.DataFrame:
    g = table[table["target"].astype(str) == str(target)]
    if g.empty:
        raise ValueError(f"no rows for target {target!r}; targets: {sorted(table['target'].astype(str).unique())}")
    return g


def figure_on_the_line(perf: pd.DataFrame, target: str, metric: str | None = None, x_col: str = "id_score",
                       y_col: str = "ood_score", corr: pd.DataFrame | None = None) -> Figure:
    """One panel: OOD against ID performance on probit axes for one target (Fig. 4, left panel).

    Args:
        perf: a ``performance_table`` or ``indicator_table``.
        target: the target site to plot.
        metric: the metric's name for the labels (default: ``perf["metric"]``).
        x_col: the indicator column (x axis).
        y_col: the OOD performance column (y axis).
        corr: the correlations table to take the statistics from (default: computed, no bootstrap).

    Raises:
        ValueError: ``target`` has no rows in ``perf``.
    """
    g = _target_rows(perf, target)
    metric = metric or (str(g["metric"].iloc[0]) if "metric" in g.columns else "score")
    source = ", ".join(sorted(g["source"].astype(str).unique()))
    g = _finite_rows(g, x_col, y_col)
    st = _stats_from(corr, "id_performance", target) if x_col == "id_score" else None
    st = st or correlate(g[x_col].to_numpy(dtype=float), g[y_col].to_numpy(dtype=float), n_resamples=0)
    fig = _new_figure(5.6, 5.2)
    ax = fig.add_subplot()
    draw_on_the_line(ax, g[x_col].to_numpy(dtype=float), g[y_col].to_numpy(dtype=float), g["arch"].to_numpy(),
                     arch_colors(perf["arch"]), st, f"ID {metric} (source {source}, test split; probit scale, clip 0.001)",
                     f"OOD {metric} (target {target}; probit scale, clip 0.001)", f"Accuracy on the line: {source} → {target}")
    fig.tight_layout()
    return fig


def plot_on_the_line(perf: pd.DataFrame, target: str, path: str | os.PathLike, metric: str | None = None,
                     x_col: str = "id_score", y_col: str = "ood_score") -> Path:
    """Write ``figure_on_the_line`` as a PNG at ``path``; return the path."""
    return save_figure(figure_on_the_line(perf, target, metric, x_col, y_col), path)


def figure_fig4(table: pd.DataFrame, target: str, agreement: Agreement | None = None, metric: str | None = None,
                corr: pd.DataFrame | None = None, oracle: pd.DataFrame | None = None, clips=None) -> Figure:
    """The paper's Fig. 4 for one target: performance and agreement "on the line".

    Panels (those whose inputs exist): (a) OOD against ID performance, one point per member;
    (b) OOD performance against the member's mean ID agreement with the pool; (c) OOD against
    ID agreement, one point per pair of members (coloured by architecture when both members
    share one, grey otherwise). Probit axes with raw-value ticks, y = x, the probit fit.

    Args:
        table: an ``indicator_table``.
        target: the target site.
        agreement: the pool's pairwise agreement (for panel c).
        metric: the metric's name (default: ``table["metric"]``).
        corr: the correlations table to take the statistics from (default: computed, no bootstrap).
        oracle: indicator-table rows of oracle-prompted members (drawn with their own marker in the
            per-member panels, never in the fit).
        clips: the probit clips (``analysis.probit_clip.Clips``; None: 1e-3), stated in the axis labels.

    Raises:
        ValueError: ``target`` has no rows in ``table``.
    """
    g = _target_rows(table, target)
    clip = (lambda site: 1e-3) if clips is None else clips.clip  # noqa: E731 (the clip of an axis on a site)
    og = oracle[oracle["target"].astype(str) == str(target)] if oracle is not None and len(oracle) else None
    metric = metric or str(g["metric"].iloc[0])
    source = ", ".join(sorted(g["source"].astype(str).unique()))
    colors = arch_colors(table["arch"])
    panels: list[tuple] = [("id_performance", "id_score", f"ID {metric} (source {source})",
                            f"(a) OOD vs ID {metric}")]
    if "id_agreement" in g.columns and np.isfinite(g["id_agreement"].astype(float)).sum() >= 2:
        panels.append(("id_agreement", "id_agreement", f"ID agreement (mean with the pool, {source})",
                       f"(b) OOD {metric} vs ID agreement"))
    id_site = agreement.id_site if agreement is not None else None
    has_pairs = bool(agreement is not None and id_site is not None and target in agreement.matrices)
    n = len(panels) + has_pairs
    fig = _new_figure(5.0 * n, 5.3)
    for i, (name, col, xlabel, title) in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        f = _finite_rows(g, col, "ood_score")
        x, y = f[col].to_numpy(dtype=float), f["ood_score"].to_numpy(dtype=float)
        eps = (clip(source if col.startswith("id_") else target), clip(target))
        st = _stats_from(corr, name, target) or correlate(x, y, eps=eps, n_resamples=0)
        oxy = None
        if og is not None and col in og.columns:
            of = _finite_rows(og, col, "ood_score")
            oxy = (of[col].to_numpy(dtype=float), of["ood_score"].to_numpy(dtype=float))
        draw_on_the_line(ax, x, y, f["arch"].to_numpy(), colors, st, f"{xlabel}; probit scale, clip {eps[0]:.3g}",
                         f"OOD {metric} (target {target}; probit scale, clip {eps[1]:.3g})", title, oracle_xy=oxy,
                         eps=eps)
    if has_pairs:
        assert agreement is not None and id_site is not None
        ax = fig.add_subplot(1, n, n)
        a_id, a_t = agreement.matrices[id_site], agreement.matrices[target]
        iu = np.triu_indices(len(agreement.member_ids), k=1)
        x, y = a_id[iu], a_t[iu]
        arch_of = dict(zip(table["member_id"].astype(str), table["arch"].astype(str)))
        archs = np.array([arch_of.get(m, "?") for m in agreement.member_ids])
        same = archs[iu[0]] == archs[iu[1]]
        grp = np.where(same, archs[iu[0]], "mixed pairs")
        ok = np.isfinite(x) & np.isfinite(y)
        eps = (clip(id_site), clip(target))
        st = _stats_from(corr, "agreement_on_the_line", target) or correlate_pairs(a_id, a_t, eps=eps, n_resamples=0)
        size = 28 if ok.sum() <= 300 else 6
        draw_on_the_line(ax, x[ok], y[ok], grp[ok], {"mixed pairs": _MIXED, **colors}, st,
                         f"ID agreement of a pair ({agreement.metric}, {id_site}); probit scale, clip {eps[0]:.3g}",
                         f"OOD agreement of a pair ({agreement.metric}, {target}); probit scale, clip {eps[1]:.3g}",
                         "(c) agreement on the line", size=size, alpha=1.0 if size >= 20 else 0.5, boot_ci=True,
                         eps=eps)
    fig.suptitle(f"{source} → {target}", fontsize=11)
    fig.tight_layout()
    return fig


def figure_fig3(table: pd.DataFrame, metric: str | None = None, corr: pd.DataFrame | None = None,
                ncols: int = 3, oracle: pd.DataFrame | None = None) -> Figure:
    """The paper's Fig. 3: uncertain area against OOD performance, one panel per target.

    Raw axes (the uncertain area in % of the image, the OOD score in %), one point per member
    coloured by architecture, the least-squares line (``scipy.stats.linregress``); the title
    gives Pearson r with its interval and Spearman ρ.

    Args:
        table: an ``indicator_table`` with ``uncertain_area`` values.
        metric: the metric's name (default: ``table["metric"]``).
        corr: the correlations table to take the statistics from (default: computed, no bootstrap).
        ncols: panels per row.
        oracle: indicator-table rows of oracle-prompted members (their own marker, not in the fit).

    Raises:
        ValueError: no finite ``uncertain_area`` in ``table``.
    """
    have = _finite_rows(table, "uncertain_area", "ood_score")
    if have.empty:
        raise ValueError("no uncertain-area values in the indicator table: has the uncertainty stage run "
                         "(records/uncertainty.parquet or records/uncertainty/parts/)?")
    metric = metric or str(table["metric"].iloc[0])
    targets = list(dict.fromkeys(table["target"].astype(str)))
    colors = arch_colors(table["arch"])
    ncols = max(1, min(ncols, len(targets)))
    nrows = math.ceil(len(targets) / ncols)
    fig = _new_figure(4.6 * ncols, 4.2 * nrows)
    for i, t in enumerate(targets):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        g = _finite_rows(table[table["target"].astype(str) == t], "uncertain_area", "ood_score")
        x, y = 100 * g["uncertain_area"].to_numpy(dtype=float), 100 * g["ood_score"].to_numpy(dtype=float)
        for arch, color in colors.items():
            m = (g["arch"].astype(str) == arch).to_numpy()
            if m.any():
                ax.scatter(x[m], y[m], s=28, color=color, edgecolor="black", linewidth=0.4, label=arch, zorder=3)
        if oracle is not None and len(oracle):
            o = _finite_rows(oracle[oracle["target"].astype(str) == t], "uncertain_area", "ood_score")
            if len(o):
                ax.scatter(100 * o["uncertain_area"].to_numpy(dtype=float), 100 * o["ood_score"].to_numpy(dtype=float),
                           s=36, marker="X", color="black", alpha=0.8, zorder=3,
                           label="oracle-prompted † (not in the fit)")
        st = _stats_from(corr, "uncertain_area", t) or correlate(x / 100, y / 100, n_resamples=0)
        if len(x) >= 2 and np.ptp(x) > 0:
            fit = stats.linregress(x, y)
            xs = np.array([x.min(), x.max()])
            ax.plot(xs, fit.slope * xs + fit.intercept, color="tab:red", lw=1.5, label="least squares", zorder=2)
        source = ", ".join(sorted(g["source"].astype(str).unique())) or "?"
        ax.set_title(f"{source} → {t}\n{_fmt_r(st, boot=True)}", fontsize=9)  # the run bootstrap, not Fisher z
        ax.set_xlabel("uncertain area (% of the image, GGD δ)", fontsize=9)
        ax.set_ylabel(f"OOD {metric} (%)", fontsize=9)
        ax.grid(True, lw=0.4, alpha=0.5)
        if i == 0:
            ax.legend(fontsize=6.5, framealpha=0.85)
    fig.suptitle("Uncertainty against OOD performance (one point per pool member)", fontsize=11)
    fig.tight_layout()
    return fig


def figure_fig6(example: Example, others: list[tuple[str, np.ndarray, float]] | None = None) -> Figure:
    """The paper's Fig. 6 for one member and slice.

    Top row: image, truth, the member's prediction, μ of the δ net, error map (truth XOR
    prediction) and uncertainty map. Bottom row (when ``others`` holds two members or more):
    uncertainty maps of members on the same slice, most uncertain first, each titled with its
    uncertain area.

    Args:
        example: the chosen member's slice (``analysis.examples.Example``).
        others: ``(label, uncertainty map H x W, uncertain-area fraction)`` per member, in the
            order to draw.
    """
    others = others if others and len(others) >= 2 else []  # one map alone repeats the top row's
    ncols = max(6, len(others))
    nrows = 2 if others else 1
    fig = _new_figure(2.3 * ncols, 2.6 * nrows + 0.4)
    top = [("image", example.image, "gray", None), ("truth", example.truth, "gray", (0, 1)),
           ("prediction", example.pred, "gray", (0, 1)), ("μ (δ net)", example.mu, "gray", (0, 1)),
           ("error map", example.error, "Reds", (0, 1)), ("uncertainty", example.uncertainty, "magma", None)]
    for i, (title, img, cmap, lim) in enumerate(top):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        vmin, vmax = lim if lim else (None, None)
        im = ax.imshow(np.asarray(img, dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
        if title == "uncertainty":
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    vmax = max((float(np.nanmax(u)) for _, u, _ in others), default=None)
    for j, (label, unc, area) in enumerate(others):
        ax = fig.add_subplot(nrows, ncols, ncols + j + 1)
        ax.imshow(np.asarray(unc, dtype=float), cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{label}\nuncertain {100 * area:.1f}%", fontsize=6)
        ax.set_axis_off()
    err = 100 * float(np.mean(example.error))
    fig.suptitle(f"{example.member_id} on {example.site}, {example.case_id} slice {example.slice_idx} "
                 f"(error {err:.1f}% of the image)" + ("; bottom: uncertainty of the pool on this slice, most "
                                                       "uncertain first" if others else ""), fontsize=9)
    fig.tight_layout()
    return fig
