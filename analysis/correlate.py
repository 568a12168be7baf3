"""Correlation of an indicator with OOD performance across the pool (DESIGN §7).

Statistics come from ``scipy.stats``: Pearson r with its Fisher-z confidence interval, Spearman ρ,
Kendall τ (τ-b), least squares (``linregress``) for the probit fit, and ``bootstrap`` for the
intervals of r, ρ and τ. This module only chooses what to resample (pool members, also when the
points are pairs of members) and guards the degenerate cases (too few points, constant input) so
that they give NaN instead of warnings or exceptions.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats

#: Fewer finite (x, y) pairs than this give NaN statistics (the 95% CI needs n > 3).
MIN_POINTS = 4

#: Bootstrap resamples for the intervals of r, ρ and τ (percentile intervals; modest, to stay fast).
N_RESAMPLES = 199
#: Seed of the bootstrap's generator: the same records give the same intervals.
SEED = 0
#: Confidence level of every interval.
CONFIDENCE = 0.95

#: Keys of ``correlate``'s result, in order. ``pearson_ci_*``: Fisher z (scipy), which assumes
#: independent points; ``*_boot_*`` / ``spearman_ci_*`` / ``kendall_ci_*``: percentile bootstrap over
#: pool members; ``n_units``: the members resampled (``n`` counts points: members or pairs).
STAT_KEYS = ("n", "n_units", "pearson_r", "pearson_p", "pearson_ci_low", "pearson_ci_high",
             "pearson_boot_low", "pearson_boot_high",
             "spearman_rho", "spearman_p", "spearman_ci_low", "spearman_ci_high",
             "kendall_tau", "kendall_p", "kendall_ci_low", "kendall_ci_high",
             "probit_slope", "probit_intercept", "probit_r2", "probit_r")

#: Leading columns of ``correlations``' and ``pair_correlations``' results (then ``STAT_KEYS``).
ID_COLUMNS = ("indicator", "metric", "source", "target", "unit", "x", "y")


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
    return bool(a.size == 0 or np.all(a == a[0]))


def _rank_stats(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(Pearson r, Spearman ρ, Kendall τ) of one resample; NaN where an input is constant."""
    if _is_constant(x) or _is_constant(y):
        return np.full(3, np.nan)
    return np.array([stats.pearsonr(x, y).statistic, stats.spearmanr(x, y).statistic,
                     stats.kendalltau(x, y).statistic])


def _rank_stats_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``_rank_stats`` of every row of ``x, y`` (``B x n``) at once: ``3 x B``.

    ``stats.spearmanr`` of 2-D input gives a correlation matrix, not row-wise values, so ρ is
    computed as what spearmanr computes: Pearson r (``stats.pearsonr(axis=-1)``) of the average
    ranks (``stats.rankdata(axis=-1)``). Kendall's τ has no row-wise form in scipy: one call per row.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        r = stats.pearsonr(x, y, axis=-1).statistic
        rho = stats.pearsonr(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1), axis=-1).statistic
    tau = np.array([stats.kendalltau(a, b).statistic if not (_is_constant(a) or _is_constant(b)) else np.nan
                    for a, b in zip(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))]).reshape(x.shape[:-1])
    out = np.stack([np.asarray(r, dtype=float), np.asarray(rho, dtype=float), tau])
    const = (np.ptp(x, axis=-1) == 0) | (np.ptp(y, axis=-1) == 0)
    out[:, const] = np.nan
    return out


def _bootstrap(statistic: Callable[..., np.ndarray], n_units: int, n_resamples: int,
               seed: int, vectorized: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap intervals of a vector ``statistic(unit indices)`` over ``n_units`` units.

    ``scipy.stats.bootstrap`` resamples the unit indices; the statistic maps them to the points
    (members, or the pairs of the resampled members). A resample whose input is constant gives NaN;
    when scipy's interval is NaN for that reason, it is taken from the finite part of scipy's
    bootstrap distribution (``np.quantile`` of the finite values), provided at least 90% of the
    resamples are finite. ``vectorized``: ``statistic(idx, axis=-1)`` takes a batch of resamples.
    """
    nan = np.full(3, np.nan)
    if n_resamples <= 0 or n_units < MIN_POINTS:
        return nan, nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples: NaN statistics, handled below
        res = stats.bootstrap((np.arange(n_units),), statistic, n_resamples=n_resamples, vectorized=vectorized,
                              method="percentile", confidence_level=CONFIDENCE, rng=np.random.default_rng(seed))
    lo = np.asarray(res.confidence_interval.low, dtype=float)
    hi = np.asarray(res.confidence_interval.high, dtype=float)
    dist = np.atleast_2d(res.bootstrap_distribution)
    alpha = (1.0 - CONFIDENCE) / 2.0
    for i in np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi))):
        finite = dist[i][np.isfinite(dist[i])]
        if finite.size >= 0.9 * dist.shape[1]:
            lo[i], hi[i] = np.quantile(finite, [alpha, 1.0 - alpha])
    return lo, hi


def _point_stats(x: np.ndarray, y: np.ndarray, eps: float) -> dict[str, float]:
    """Every statistic of ``STAT_KEYS`` but the bootstrap ones, on finite points ``x, y``."""
    out: dict[str, float] = {k: math.nan for k in STAT_KEYS}
    out["n"] = int(x.size)
    out["n_units"] = int(x.size)
    if x.size < MIN_POINTS:
        return out
    if not (_is_constant(x) or _is_constant(y)):
        pr = stats.pearsonr(x, y)
        ci = pr.confidence_interval(CONFIDENCE)
        sr = stats.spearmanr(x, y)
        kt = stats.kendalltau(x, y)
        out.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
                   pearson_ci_low=float(ci.low), pearson_ci_high=float(ci.high),
                   spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue),
                   kendall_tau=float(kt.statistic), kendall_p=float(kt.pvalue))
    px, py = probit(x, eps), probit(y, eps)
    if not _is_constant(px):
        fit = stats.linregress(px, py)
        out.update(probit_slope=float(fit.slope), probit_intercept=float(fit.intercept))
        if not _is_constant(py):
            out.update(probit_r=float(fit.rvalue), probit_r2=float(fit.rvalue) ** 2)
    return out


def _put_intervals(out: dict[str, float], lo: np.ndarray, hi: np.ndarray) -> dict[str, float]:
    for i, (kl, kh) in enumerate((("pearson_boot_low", "pearson_boot_high"), ("spearman_ci_low", "spearman_ci_high"),
                                  ("kendall_ci_low", "kendall_ci_high"))):
        out[kl], out[kh] = float(lo[i]), float(hi[i])
    return out


def correlate(x: np.ndarray | pd.Series, y: np.ndarray | pd.Series, eps: float = 1e-3,
              n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict[str, float]:
    """Correlate an indicator ``x`` with OOD performance ``y`` (both in [0, 1]), one point per member.

    Pairs where either value is not finite are dropped first. Pearson r, its 95% confidence
    interval (Fisher z), Spearman ρ and Kendall τ are computed on the raw values; the intervals of
    r, ρ and τ also come from a percentile bootstrap over the points. ``probit_*`` is the
    least-squares fit ``probit(y) = slope * probit(x) + intercept`` (the "on the line" fit), with
    ``probit_r`` the Pearson r of the probit values and ``probit_r2`` its square.

    Args:
        x: indicator values, e.g. ID scores.
        y: OOD scores, same length as ``x``.
        eps: clip margin of ``probit``.
        n_resamples: bootstrap resamples (0: no bootstrap, its keys stay NaN).
        seed: the bootstrap generator's seed.

    Returns:
        A dict with the keys ``STAT_KEYS``; every statistic is NaN when fewer than
        ``MIN_POINTS`` pairs remain or an input it needs is constant.

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = _point_stats(x, y, eps)
    if x.size >= MIN_POINTS and not (_is_constant(x) or _is_constant(y)):
        lo, hi = _bootstrap(lambda idx, axis=-1: _rank_stats_rows(x[idx], y[idx]), x.size, n_resamples, seed,
                            vectorized=True)
        _put_intervals(out, lo, hi)
    return out


def correlate_pairs(ax: np.ndarray, ay: np.ndarray, eps: float = 1e-3, n_resamples: int = N_RESAMPLES,
                    seed: int = SEED) -> dict[str, float]:
    """Correlate two symmetric member x member matrices over the pairs of members (i < j).

    The agreement-on-the-line test: ``ax`` the ID agreement, ``ay`` the OOD agreement of each
    pair. Points are the pairs with both values finite; the bootstrap resamples pool members
    (a pair is in a resample when both its members are, once per draw of each, never a member
    with itself), since pairs that share a member are not independent. For the same reason the
    Fisher-z interval and the p-values, which treat the pairs as independent points, are too
    narrow; the bootstrap intervals are the ones to read.

    Args:
        ax: ``M x M`` indicator matrix (e.g. ID agreement).
        ay: ``M x M`` performance matrix (e.g. OOD agreement on a target).
        eps: clip margin of ``probit``.
        n_resamples: bootstrap resamples (0: none).
        seed: the bootstrap generator's seed.

    Returns:
        A dict with the keys ``STAT_KEYS``; ``n`` counts pairs, ``n_units`` members.
    """
    ax = np.asarray(ax, dtype=np.float64)
    ay = np.asarray(ay, dtype=np.float64)
    if ax.shape != ay.shape or ax.ndim != 2 or ax.shape[0] != ax.shape[1]:
        raise ValueError(f"expected two square matrices of one shape, got {ax.shape} and {ay.shape}")
    members = np.flatnonzero(np.isfinite(ax).any(axis=1) & np.isfinite(ay).any(axis=1))
    ax, ay = ax[np.ix_(members, members)], ay[np.ix_(members, members)]
    iu = np.triu_indices(len(members), k=1)
    x, y = ax[iu], ay[iu]
    keep = np.isfinite(x) & np.isfinite(y)
    out = _point_stats(x[keep], y[keep], eps)
    out["n_units"] = int(len(members))
    if keep.sum() >= MIN_POINTS and not (_is_constant(x[keep]) or _is_constant(y[keep])):
        def statistic(idx: np.ndarray) -> np.ndarray:
            upper = np.triu(idx[:, None] != idx[None, :], k=1)  # positions a < b, never a member with itself
            sx, sy = ax[np.ix_(idx, idx)][upper], ay[np.ix_(idx, idx)][upper]
            ok = np.isfinite(sx) & np.isfinite(sy)
            return _rank_stats(sx[ok], sy[ok])

        lo, hi = _bootstrap(statistic, len(members), n_resamples, seed)
        _put_intervals(out, lo, hi)
    return out


def correlations(perf: pd.DataFrame, indicator: str = "id_performance", x_col: str = "id_score",
                 y_col: str = "ood_score", n_resamples: int = N_RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """Correlate ``x_col`` with ``y_col`` across the pool, one row per (source, target).

    Args:
        perf: a table with columns source, target, metric, ``x_col``, ``y_col`` (one row per
            member and target, e.g. ``performance_table`` or ``indicator_table``).
        indicator: the indicator's name written in the ``indicator`` column.
        x_col: the indicator column.
        y_col: the OOD performance column.
        n_resamples: bootstrap resamples per row.
        seed: the bootstrap generator's seed.

    Returns:
        Columns ``ID_COLUMNS`` then ``STAT_KEYS``, targets in the order they appear in ``perf``;
        ``unit`` is ``"member"``.

    Raises:
        KeyError: ``x_col`` or ``y_col`` is not a column of ``perf``.
    """
    for c in (x_col, y_col):
        if c not in perf.columns:
            raise KeyError(f"column {c!r} not in the table (columns: {list(perf.columns)})")
    rows = []
    metric = str(perf["metric"].iloc[0]) if "metric" in perf.columns and len(perf) else ""
    for (source, target), g in perf.groupby(["source", "target"], sort=False):
        st = correlate(g[x_col].to_numpy(dtype=float), g[y_col].to_numpy(dtype=float),
                       n_resamples=n_resamples, seed=seed)
        rows.append({"indicator": indicator, "metric": metric, "source": str(source), "target": str(target),
                     "unit": "member", "x": x_col, "y": y_col, **st})
    return pd.DataFrame(rows, columns=[*ID_COLUMNS, *STAT_KEYS])
