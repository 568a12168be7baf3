"""Correlation of an indicator with OOD performance across the pool (docs/architecture.md "Analysis").

Statistics come from ``scipy.stats``: Pearson r with its Fisher-z confidence interval, Spearman ρ,
Kendall τ (τ-b), least squares (``linregress``) for the probit fit, and ``bootstrap`` (BCa where it
is defined, else percentile) for the intervals. This module chooses what to resample and guards the
degenerate cases (too few points, constant input) so that they give NaN instead of warnings.

**The unit of resampling is the training run** (``run_id``): the snapshot members of one run (and
the pairs they are in) are not independent, so a bootstrap resample draws runs with replacement and
takes every member of a drawn run (docs/architecture.md "Records"). Without run ids, each member is its own unit (the
caller warns). Fisher z and the p-values treat points as independent: they are kept for member
rows (read them with that caveat) and left out (NaN) on pair rows, where they are plainly wrong.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats

from analysis.agreement import one_blas_thread
from analysis.probit_clip import CLIP_COLUMNS, axis_site

#: Fewer finite (x, y) pairs than this give NaN statistics (the 95% CI needs n > 3).
MIN_POINTS = 4

#: Bootstrap resamples for the intervals (2,000: about 50 draws beyond each end of a 95% interval).
N_RESAMPLES = 2000
#: Resamples evaluated per vectorised batch (bounds the memory: B x points per statistic).
BOOT_BATCH = 500
#: Seed of the bootstrap's generator: the same records give the same intervals.
SEED = 0
#: Confidence level of every interval.
CONFIDENCE = 0.95

#: Keys of ``correlate``'s result, in order. ``pearson_ci_*``: Fisher z (scipy), which assumes
#: independent points (NaN on pair rows); ``*_boot_*`` / ``spearman_ci_*`` / ``kendall_ci_*``: bootstrap
#: (BCa, else percentile) over training runs (``resample`` says which unit); ``n_units``: the units
#: resampled (``n`` counts points: members or pairs). ``kendall_ci_*`` stay NaN (no vectorised τ; see
#: ``weighted_rank_stats``); pair rows bootstrap r only (ρ over tens of thousands of pairs per
#: resample costs too much; its point value is given).
STAT_KEYS = ("n", "n_units", "pearson_r", "pearson_p", "pearson_ci_low", "pearson_ci_high",
             "pearson_boot_low", "pearson_boot_high",
             "spearman_rho", "spearman_p", "spearman_ci_low", "spearman_ci_high",
             "kendall_tau", "kendall_p", "kendall_ci_low", "kendall_ci_high",
             "probit_slope", "probit_intercept", "probit_r2", "probit_r")

#: Leading columns of ``correlations``' and ``pair_correlations``' results (then ``STAT_KEYS``).
#: ``members``: ``"label-free"`` (members whose evaluation used no labels) or ``"all"``; ``resample``:
#: the bootstrap's unit (``"run"`` or ``"member"``).
#: ``n_degenerate``: points of this row's data below the degenerate floor (rows whose ``members`` ends in
#: ``(non-degenerate)`` leave them out: see ``correlations``).
ID_COLUMNS = ("indicator", "metric", "members", "source", "target", "unit", "resample", "n_degenerate", "x", "y")

#: Default floor below which a score or agreement marks a member as degenerate (``analysis.degenerate_floor``).
DEGENERATE_FLOOR = 0.01


def resampling_units(groups: np.ndarray | pd.Series | list | None, n: int) -> tuple[np.ndarray, str]:
    """The bootstrap's units: ``(units, name)`` with ``units`` an ``R x K`` int array (-1 padded).

    Row r lists the point indices of unit r. ``groups``: a run id per point (None, or any missing
    value, makes every point its own unit: ``name`` is then ``"member"``, else ``"run"``).
    """
    if groups is None or len(groups) == 0 or pd.isna(pd.Series(groups, dtype=object)).any():
        return np.arange(n, dtype=np.int64)[:, None], "member"
    codes, uniq = pd.factorize(pd.Series(groups).astype(str), sort=True)
    counts = np.bincount(codes, minlength=len(uniq))
    units = np.full((len(uniq), int(counts.max())), -1, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    pos = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    units[codes[order], pos] = order
    return units, ("member" if counts.max() == 1 else "run")


def expand_units(units: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Unit indices ``... x u`` -> point indices ``... x (u * K)`` (-1 for padding)."""
    idx = np.asarray(idx, dtype=np.int64)
    return units[idx].reshape(*idx.shape[:-1], -1)


def weighted_rank_stats(x: np.ndarray, y: np.ndarray, w: np.ndarray, rank: bool = True) -> np.ndarray:
    """(Pearson r, Spearman ρ) of every row of ``x, y`` (``B x L``) over the entries with ``w`` (0/1).

    Written out rather than calling scipy per resample: 2,000 run-level resamples of different sizes
    (runs hold different numbers of members) per row of the table made scipy's per-call overhead the
    whole cost. The formulas are scipy's: ρ is Pearson r of the average ranks (``stats.rankdata``,
    padding ranked last so that it does not move the others' ranks). NaN where an input is constant.
    Kendall's τ has no vectorised form (its O(L²) sign matrices per resample cost 40x the rest), so
    its bootstrap interval is not computed; its point value and p-value come from scipy.
    """
    w = w.astype(np.float64)
    n = w.sum(axis=-1)

    def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            ma = (a * w).sum(-1) / n
            mb = (b * w).sum(-1) / n
            da, db = (a - ma[..., None]) * w, (b - mb[..., None]) * w
            return (da * db).sum(-1) / np.sqrt((da * da).sum(-1) * (db * db).sum(-1))

    r = pearson(np.where(w > 0, x, 0.0), np.where(w > 0, y, 0.0))
    out = np.full((2,) + r.shape, np.nan)
    out[0] = r
    if rank:
        out[1] = pearson(stats.rankdata(np.where(w > 0, x, np.inf), axis=-1),
                         stats.rankdata(np.where(w > 0, y, np.inf), axis=-1))
    return np.clip(out, -1.0, 1.0)


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


#: Decimals the bootstrapped statistics are rounded to. A resample that draws every unit once, in another order,
#: gives the statistic itself, but summed in another order it can differ from it in the last place of a float64;
#: BCa's bias correction counts the replicates below the statistic (scipy counts exact ties as half), so without
#: rounding such float noise decides the count, and with 5 runs about 4% of the replicates are such permutations:
#: a change in the last place of an input moved an interval end by 0.005. Rounded, they are exact ties.
TIE_DECIMALS = 12


def run_bootstrap(statistic: Callable[..., np.ndarray], n_units: int | tuple[int, ...], n_resamples: int,
                  seed: int, n_stats: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap intervals of a vector ``statistic(unit indices, axis=-1)`` over ``n_units`` units.

    ``n_units`` may be a tuple of sizes: then the units form independent strata (e.g. the runs of
    each architecture), each resampled on its own, and ``statistic(idx_1, idx_2, ..., axis=-1)`` gets
    one index array per stratum (scipy's multi-sample bootstrap; each stratum needs 2 units or more).

    ``scipy.stats.bootstrap`` resamples the unit indices (``BOOT_BATCH`` resamples at a time) and
    takes the BCa interval (its jackknife leaves one unit out); the statistic maps the indices to the
    points (the runs' members, or the pairs of those members). Where BCa is not defined (NaN: a
    resample whose input is constant, or a degenerate jackknife), the interval is the percentile
    interval of the finite part of the same bootstrap distribution, provided at least 90% of the
    resamples are finite. The statistic is rounded to ``TIE_DECIMALS`` decimals (its float noise is not a tie
    breaker).
    """
    nan = np.full(n_stats, np.nan)

    def rounded(*idx, axis=-1):  # see TIE_DECIMALS
        return np.round(statistic(*idx, axis=axis), TIE_DECIMALS)

    sizes = (int(n_units),) if np.ndim(n_units) == 0 else tuple(int(n) for n in n_units)
    if n_resamples <= 0 or (sizes[0] < MIN_POINTS if len(sizes) == 1 else min(sizes) < 2):
        return nan, nan
    data = tuple(np.arange(n) for n in sizes)
    # one BLAS thread: the products are small, and threads on a busy machine made them 6x slower here
    with warnings.catch_warnings(), one_blas_thread():
        warnings.simplefilter("ignore")  # degenerate resamples: NaN statistics, handled below
        try:
            res = stats.bootstrap(data, rounded, n_resamples=n_resamples, vectorized=True,
                                  batch=BOOT_BATCH, method="BCa", confidence_level=CONFIDENCE,
                                  rng=np.random.default_rng(seed))
        except ValueError:  # e.g. a degenerate jackknife: the percentile interval below
            res = stats.bootstrap(data, rounded, n_resamples=n_resamples, vectorized=True,
                                  batch=BOOT_BATCH, method="percentile", confidence_level=CONFIDENCE,
                                  rng=np.random.default_rng(seed))
    lo = np.atleast_1d(np.asarray(res.confidence_interval.low, dtype=float)).copy()
    hi = np.atleast_1d(np.asarray(res.confidence_interval.high, dtype=float)).copy()
    dist = np.atleast_2d(res.bootstrap_distribution)
    alpha = (1.0 - CONFIDENCE) / 2.0
    for i in np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi))):
        finite = dist[i][np.isfinite(dist[i])]
        if finite.size >= 0.9 * dist.shape[1]:
            lo[i], hi[i] = np.quantile(finite, [alpha, 1.0 - alpha])
    return lo, hi


def _point_stats(x: np.ndarray, y: np.ndarray, eps: float | tuple[float, float]) -> dict[str, float]:
    """Every statistic of ``STAT_KEYS`` but the bootstrap ones, on finite points ``x, y`` (``eps``: the probit
    clip, one for both axes or ``(x's, y's)``: ``analysis.probit_clip``)."""
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
    ex, ey = eps if isinstance(eps, tuple) else (eps, eps)
    px, py = probit(x, ex), probit(y, ey)
    if not _is_constant(px):
        fit = stats.linregress(px, py)
        out.update(probit_slope=float(fit.slope), probit_intercept=float(fit.intercept))
        if not _is_constant(py):
            out.update(probit_r=float(fit.rvalue), probit_r2=float(fit.rvalue) ** 2)
    return out


def _put_intervals(out: dict[str, float], lo: np.ndarray, hi: np.ndarray) -> dict[str, float]:
    for i, (kl, kh) in enumerate((("pearson_boot_low", "pearson_boot_high"), ("spearman_ci_low", "spearman_ci_high"),
                                  ("kendall_ci_low", "kendall_ci_high"))[: len(lo)]):
        out[kl], out[kh] = float(lo[i]), float(hi[i])
    return out


def correlate(x: np.ndarray | pd.Series, y: np.ndarray | pd.Series, eps: float = 1e-3,
              n_resamples: int = N_RESAMPLES, seed: int = SEED,
              groups: np.ndarray | pd.Series | list | None = None) -> dict[str, float]:
    """Correlate an indicator ``x`` with OOD performance ``y`` (both in [0, 1]), one point per member.

    Pairs where either value is not finite are dropped first. Pearson r, its 95% confidence
    interval (Fisher z), Spearman ρ and Kendall τ are computed on the raw values; the intervals of
    r and ρ also come from a bootstrap (BCa) over ``groups`` (the training runs: a run's
    members move together), or over the points when ``groups`` is None. ``probit_*`` is the
    least-squares fit ``probit(y) = slope * probit(x) + intercept`` (the "on the line" fit), with
    ``probit_r`` the Pearson r of the probit values and ``probit_r2`` its square.

    Args:
        x: indicator values, e.g. ID scores.
        y: OOD scores, same length as ``x``.
        eps: clip margin of ``probit``: one for both axes, or ``(x's, y's)`` (``analysis.probit_clip``).
        n_resamples: bootstrap resamples (0: no bootstrap, its keys stay NaN).
        seed: the bootstrap generator's seed.
        groups: the training run of each point (same length), or None.

    Returns:
        A dict with the keys ``STAT_KEYS`` and ``resample`` (``"run"`` or ``"member"``); every
        statistic is NaN when fewer than ``MIN_POINTS`` pairs remain or an input it needs is constant.
        ``n_units``: the runs (or members) resampled.

    Raises:
        ValueError: ``x``, ``y`` (and ``groups``) differ in length.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or (groups is not None and len(groups) != x.size):
        raise ValueError(f"x, y and groups differ in length: {x.size}, {y.size}, "
                         f"{None if groups is None else len(groups)}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    units, unit_name = resampling_units(None if groups is None else np.asarray(groups, dtype=object)[keep], x.size)
    out: dict = _point_stats(x, y, eps)
    out["n_units"] = int(len(units))
    out["resample"] = unit_name
    if x.size >= MIN_POINTS and not (_is_constant(x) or _is_constant(y)):
        def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            pts = expand_units(units, idx)
            safe = np.maximum(pts, 0)
            return weighted_rank_stats(x[safe], y[safe], pts >= 0)

        lo, hi = run_bootstrap(statistic, len(units), n_resamples, seed)
        _put_intervals(out, lo, hi)
    return out


def unit_of_points(units: np.ndarray, n: int) -> np.ndarray:
    """The inverse of ``resampling_units``: the unit (row) of each of the ``n`` points."""
    out = np.empty(n, dtype=np.int64)
    rows, cols = np.nonzero(units >= 0)
    out[units[rows, cols]] = rows
    return out


def point_weights(idx: np.ndarray, unit_of: np.ndarray, n_units: int) -> np.ndarray:
    """Resampled unit indices ``... x u`` -> how often each point is drawn, ``... x M`` (float64)."""
    idx = np.asarray(idx, dtype=np.int64)
    flat = idx.reshape(-1, idx.shape[-1])
    counts = np.zeros((len(flat), n_units))
    np.add.at(counts, (np.arange(len(flat))[:, None], flat), 1.0)
    return counts[:, unit_of].reshape(*idx.shape[:-1], len(unit_of))


def pair_mats(fx: np.ndarray, fy: np.ndarray) -> dict[str, np.ndarray]:
    """The ``M x M`` matrices whose quadratic forms ``pair_moments`` takes (computed once per bootstrap)."""
    ok = np.isfinite(fx) & np.isfinite(fy)
    np.fill_diagonal(ok, False)
    x, y = np.where(ok, fx, 0.0), np.where(ok, fy, 0.0)
    return {"n": ok.astype(np.float64), "sx": x, "sy": y, "sxx": x * x, "syy": y * y, "sxy": x * y}


def pair_moments(mats: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted sums over the pairs of a resample, without listing its pairs.

    A resample that draws member i ``c_i`` times holds ``c_i c_j`` pairs of members i != j (never a
    member with itself), so a sum over its pairs is the quadratic form ``Σ_{i<j} c_i c_j F_ij =
    c F cᵀ / 2`` of a symmetric ``F`` with zero diagonal: one matrix product for the whole batch of
    resamples instead of gathering ``B x M x M`` pair values.

    Args:
        mats: ``pair_mats(fx, fy)`` of the ``M x M`` symmetric pair values (NaN: the pair is left out).
        weights: ``... x M`` draws per member (``point_weights``).

    Returns:
        ``n, sx, sy, sxx, syy, sxy`` each of shape ``...``.
    """
    return {k: 0.5 * np.einsum("...i,...i->...", weights @ f, weights) for k, f in mats.items()}


def moments_line(mo: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slope, intercept, Pearson r) of least squares ``y = slope x + intercept`` from ``pair_moments``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = mo["n"]
        cxy = mo["sxy"] - mo["sx"] * mo["sy"] / n
        cxx = mo["sxx"] - mo["sx"] ** 2 / n
        cyy = mo["syy"] - mo["sy"] ** 2 / n
        slope = cxy / cxx
        r = np.clip(cxy / np.sqrt(cxx * cyy), -1.0, 1.0)
        return slope, (mo["sy"] - slope * mo["sx"]) / n, r


def correlate_pairs(ax: np.ndarray, ay: np.ndarray, eps: float = 1e-3, n_resamples: int = N_RESAMPLES,
                    seed: int = SEED, groups: np.ndarray | pd.Series | list | None = None) -> dict[str, float]:
    """Correlate two symmetric member x member matrices over the pairs of members (i < j).

    The agreement-on-the-line test: ``ax`` the ID agreement, ``ay`` the OOD agreement of each
    pair. Points are the pairs with both values finite; the bootstrap resamples training runs
    (``groups``, one run id per row of the matrices; None: members) and takes the pairs of the
    drawn runs' members (never a member with itself), since pairs that share a member or a run are
    not independent. For the same reason the Fisher-z interval and the p-values, which treat the
    pairs as independent points, are not reported (NaN); the bootstrap interval of r is the one.
    ρ and τ are given without an interval (their resampled values over ~M²/2 pairs cost too much).

    Args:
        ax: ``M x M`` indicator matrix (e.g. ID agreement).
        ay: ``M x M`` performance matrix (e.g. OOD agreement on a target).
        eps: clip margin of ``probit``: one for both axes, or ``(x's, y's)`` (``analysis.probit_clip``).
        n_resamples: bootstrap resamples (0: none).
        seed: the bootstrap generator's seed.
        groups: the training run of each member (``M``), or None.

    Returns:
        A dict with the keys ``STAT_KEYS`` and ``resample``; ``n`` counts pairs, ``n_units`` the
        runs (or members) resampled.
    """
    ax = np.asarray(ax, dtype=np.float64)
    ay = np.asarray(ay, dtype=np.float64)
    if ax.shape != ay.shape or ax.ndim != 2 or ax.shape[0] != ax.shape[1]:
        raise ValueError(f"expected two square matrices of one shape, got {ax.shape} and {ay.shape}")
    if groups is not None and len(groups) != len(ax):
        raise ValueError(f"groups has {len(groups)} entries for {len(ax)} members")
    members = np.flatnonzero(np.isfinite(ax).any(axis=1) & np.isfinite(ay).any(axis=1))
    ax, ay = ax[np.ix_(members, members)], ay[np.ix_(members, members)]
    iu = np.triu_indices(len(members), k=1)
    x, y = ax[iu], ay[iu]
    keep = np.isfinite(x) & np.isfinite(y)
    out: dict = _point_stats(x[keep], y[keep], eps)
    for k in ("pearson_p", "pearson_ci_low", "pearson_ci_high", "spearman_p", "kendall_p"):
        out[k] = math.nan  # they treat pairs as independent points
    units, unit_name = resampling_units(None if groups is None else np.asarray(groups, dtype=object)[members],
                                        len(members))
    out["n_units"] = int(len(units))
    out["resample"] = unit_name
    if keep.sum() >= MIN_POINTS and not (_is_constant(x[keep]) or _is_constant(y[keep])):
        unit_of = unit_of_points(units, len(members))
        mats = pair_mats(ax, ay)

        def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            return moments_line(pair_moments(mats, point_weights(idx, unit_of, len(units))))[2][None]

        lo, hi = run_bootstrap(statistic, len(units), n_resamples, seed, n_stats=1)
        _put_intervals(out, lo, hi)
    return out


def correlations(perf: pd.DataFrame, indicator: str = "id_performance", x_col: str = "id_score",
                 y_col: str = "ood_score", n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 members: str = "all", group_col: str = "run_id", floor: float | None = None,
                 floor_x: bool = True, clips=None) -> pd.DataFrame:
    """Correlate ``x_col`` with ``y_col`` across the pool, one row per (source, target).

    Args:
        perf: a table with columns source, target, metric, ``x_col``, ``y_col`` (one row per
            member and target, e.g. ``performance_table`` or ``indicator_table``).
        indicator: the indicator's name written in the ``indicator`` column.
        x_col: the indicator column.
        y_col: the OOD performance column.
        n_resamples: bootstrap resamples per row.
        seed: the bootstrap generator's seed.
        members: written in the ``members`` column (``"label-free"`` or ``"all"``).
        group_col: the training-run column the bootstrap resamples by (absent or with missing
            values: members).
        floor: degenerate floor: a point with ``y`` (or, if ``floor_x``, ``x``) below it is degenerate
            (a member that predicts (almost) nothing sits at the probit floor and can set a slope by
            itself). Where a target has such points, a second row, ``members`` suffixed
            ``" (non-degenerate)"``, repeats the statistics without them. None: no flagging.
        floor_x: whether the floor applies to ``x`` too (scores and agreements: yes; areas: no).
        clips: the probit clips (``analysis.probit_clip.Clips``: x's on the site ``x_col`` is measured on, y's on
            the target), written in ``probit_clip_x`` / ``probit_clip_y``; None: 1e-3 on both axes.

    Returns:
        Columns ``ID_COLUMNS`` then ``STAT_KEYS``, targets in the order they appear in ``perf``
        (a non-degenerate row right after its target's row); ``unit`` is ``"member"``.

    Raises:
        KeyError: ``x_col`` or ``y_col`` is not a column of ``perf``.
    """
    for c in (x_col, y_col):
        if c not in perf.columns:
            raise KeyError(f"column {c!r} not in the table (columns: {list(perf.columns)})")
    rows = []
    metric = str(perf["metric"].iloc[0]) if "metric" in perf.columns and len(perf) else ""
    for (source, target), g in perf.groupby(["source", "target"], sort=False):
        x, y = g[x_col].to_numpy(dtype=float), g[y_col].to_numpy(dtype=float)
        groups = g[group_col].to_numpy(dtype=object) if group_col in g.columns else None
        deg = np.zeros(len(g), dtype=bool)
        if floor is not None:
            deg = (y < floor) | ((x < floor) if floor_x else False)
        base = {"indicator": indicator, "metric": metric, "source": str(source), "target": str(target),
                "unit": "member", "x": x_col, "y": y_col}
        eps = (1e-3, 1e-3) if clips is None else clips.pair(axis_site(x_col, source, target), target)
        base.update(zip(CLIP_COLUMNS, eps))
        st = correlate(x, y, eps=eps, n_resamples=n_resamples, seed=seed, groups=groups)
        rows.append({**base, "members": members, "n_degenerate": int(deg.sum()), **st})
        if deg.any():
            keep = ~deg
            st = correlate(x[keep], y[keep], eps=eps, n_resamples=n_resamples, seed=seed,
                           groups=None if groups is None else groups[keep])
            rows.append({**base, "members": f"{members} (non-degenerate)", "n_degenerate": 0, **st})
    return pd.DataFrame(rows, columns=[*ID_COLUMNS, *STAT_KEYS, *CLIP_COLUMNS])
