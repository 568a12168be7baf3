"""Correlation of an indicator with OOD performance across the pool (DESIGN §7).

Statistics come from ``scipy.stats`` (Pearson r with its Fisher-z confidence interval,
Spearman rho, least squares); this module only guards the degenerate cases (too few points,
constant input) so that they give NaN instead of warnings or exceptions.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

#: Fewer finite (x, y) pairs than this give NaN statistics (the 95% CI needs n > 3).
MIN_POINTS = 4

#: Keys of ``correlate``'s result, in order.
STAT_KEYS = ("n", "pearson_r", "pearson_p", "pearson_ci_low", "pearson_ci_high",
             "spearman_rho", "spearman_p", "probit_slope", "probit_intercept", "probit_r2", "probit_r")


def probit(p: np.ndarray | pd.Series | float, eps: float = 1e-3) -> np.ndarray:
    """Probit (inverse standard-normal CDF) of ``p`` clipped to ``[eps, 1 - eps]``.

    Args:
        p: values in [0, 1] (NaN stays NaN).
        eps: clip margin so that 0 and 1 map to finite values.

    Returns:
        ``scipy.stats.norm.ppf(clip(p, eps, 1 - eps))`` as a float array.
    """
    return stats.norm.ppf(np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps))


def _is_constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0]))


def correlate(x: np.ndarray | pd.Series, y: np.ndarray | pd.Series, eps: float = 1e-3) -> dict[str, float]:
    """Correlate an indicator ``x`` with OOD performance ``y`` (both in [0, 1]).

    Pairs where either value is not finite are dropped first. Pearson r, its 95% confidence
    interval and Spearman rho are computed on the raw values; ``probit_*`` is the least-squares
    fit ``probit(y) = slope * probit(x) + intercept`` (the "on the line" fit), with
    ``probit_r`` the Pearson r of the probit values and ``probit_r2`` its square.

    Args:
        x: indicator values, e.g. ID scores.
        y: OOD scores, same length as ``x``.
        eps: clip margin of ``probit``.

    Returns:
        A dict with the keys ``STAT_KEYS``; every statistic is NaN when fewer than
        ``MIN_POINTS`` pairs remain or an input it needs is constant.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out: dict[str, float] = {k: math.nan for k in STAT_KEYS}
    out["n"] = int(x.size)
    if x.size < MIN_POINTS:
        return out
    if not (_is_constant(x) or _is_constant(y)):
        pr = stats.pearsonr(x, y)
        ci = pr.confidence_interval(0.95)
        sr = stats.spearmanr(x, y)
        out.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
                   pearson_ci_low=float(ci.low), pearson_ci_high=float(ci.high),
                   spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))
    px, py = probit(x, eps), probit(y, eps)
    if not _is_constant(px):
        fit = stats.linregress(px, py)
        out.update(probit_slope=float(fit.slope), probit_intercept=float(fit.intercept))
        if not _is_constant(py):
            out.update(probit_r=float(fit.rvalue), probit_r2=float(fit.rvalue) ** 2)
    return out


def correlations(perf: pd.DataFrame, indicator: str = "id_performance", x_col: str = "id_score",
                 y_col: str = "ood_score") -> pd.DataFrame:
    """Correlate ``x_col`` with ``y_col`` across the pool, one row per (source, target).

    Args:
        perf: a ``performance_table`` (columns source, target, metric, ``x_col``, ``y_col``).
        indicator: the indicator's name written in the ``indicator`` column.
        x_col: the indicator column.
        y_col: the OOD performance column.

    Returns:
        Columns ``indicator, metric, source, target`` then ``STAT_KEYS``, targets in the
        order they appear in ``perf``.
    """
    rows = []
    metric = str(perf["metric"].iloc[0]) if "metric" in perf.columns and len(perf) else ""
    for (source, target), g in perf.groupby(["source", "target"], sort=False):
        stats_ = correlate(g[x_col].to_numpy(), g[y_col].to_numpy())
        rows.append({"indicator": indicator, "metric": metric, "source": str(source), "target": str(target),
                     **stats_})
    return pd.DataFrame(rows, columns=["indicator", "metric", "source", "target", *STAT_KEYS])
