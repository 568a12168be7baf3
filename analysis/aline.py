"""Agreement-on-the-line: Baek et al.'s test and the ALine-S / ALine-D estimators (docs/architecture.md "Analysis").

Baek, Jiang, Raghunathan, Kolter, "Agreement-on-the-line: Predicting the performance of neural
networks under distribution shift" (NeurIPS 2022). Across a pool of models, OOD accuracy is linear
in ID accuracy in probit space (the *accuracy line*), and when it is, OOD agreement between two
models is linear in their ID agreement with **the same slope and intercept** (the *agreement line*).
Agreement needs no labels, so the agreement line, fitted on unlabelled target predictions, gives
the accuracy line, and each model's OOD accuracy follows from its ID accuracy.

Here accuracy is the performance metric and agreement one member scored against another's masks
with the same metric (``analysis.agreement``), so both lines are on one scale. With Φ⁻¹ the probit,
``p_i = Φ⁻¹(ID score of i)``, ``g_ij = Φ⁻¹(ID agreement)``, ``h_ij = Φ⁻¹(OOD agreement)``:

* **ALine-S**: fit ``h_ij = a g_ij + b`` by least squares over the pairs; estimate
  ``OOD score of i = Φ(a p_i + b)``.
* **ALine-D**: averaging the accuracy line over i and j and subtracting the agreement line gives,
  per pair, ``(w_i + w_j) / 2 = h_ij + a ((p_i + p_j) / 2 - g_ij)`` in the unknown probit OOD
  scores ``w``; solve the over-determined system (one row per pair) by least squares (its normal
  equations, ``numpy.linalg.lstsq``) and estimate ``Φ(w_i)``. Baek et al. found it more robust than ALine-S
  when the lines do not pass through the pool exactly.

Both use only the source labels (ID scores) and unlabelled target predictions (agreements). The
test (``lines_test``) fits both lines on the labelled target too and asks whether their slopes and
intercepts agree: a bootstrap over training runs of the differences, "agree" when both 95%
intervals contain 0.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from analysis.agreement import one_blas_thread
from analysis.probit_clip import CLIP_COLUMNS
from analysis.correlate import (BOOT_BATCH, CONFIDENCE, ID_COLUMNS, MIN_POINTS, STAT_KEYS, correlate_pairs,
                                moments_line, pair_mats, pair_moments, point_weights, probit, resampling_units,
                                unit_of_points)

#: The pair-level agreement-on-the-line test's name in the correlation table (``pair_correlations``).
PAIRS = "agreement_on_the_line"
#: Estimators of ``aline_estimates``.
ALINE_METHODS = ("aline_s", "aline_d")

#: Keys of ``lines_test``'s result (each ``*_low`` / ``*_high`` pair is a bootstrap interval).
LINE_KEYS = ("n_members", "n_pairs", "n_units", "acc_slope", "acc_slope_low", "acc_slope_high", "acc_intercept",
             "acc_intercept_low", "acc_intercept_high", "agr_slope", "agr_slope_low", "agr_slope_high",
             "agr_intercept", "agr_intercept_low", "agr_intercept_high", "slope_diff_low", "slope_diff_high",
             "intercept_diff_low", "intercept_diff_high", "pair_r_low", "pair_r_high", "lines_agree")


def _pairs(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(m, k=1)


def aline_estimates(id_score: np.ndarray, id_agreement: np.ndarray, ood_agreement: np.ndarray,
                    eps: float | tuple[float, float] = 1e-3) -> dict[str, object]:
    """ALine-S and ALine-D estimates of every member's OOD score (see the module docstring).

    Args:
        id_score: ``M`` ID scores (source test split, labels of the source only).
        id_agreement: ``M x M`` agreement on the source test split.
        ood_agreement: ``M x M`` agreement on the target's (unlabelled) images.
        eps: clip margin of ``probit``: one, or ``(the source's, the target's)`` (``analysis.probit_clip``).

    Returns:
        ``{"aline_s": M array, "aline_d": M array, "slope": a, "intercept": b, "n_pairs": int}``;
        NaN estimates where a member has no finite ID score (ALine-S) or no usable pair (ALine-D),
        all NaN when fewer than ``MIN_POINTS`` pairs are usable.
    """
    acc = np.asarray(id_score, dtype=float)
    m = len(acc)
    ia, ib = _pairs(m)
    e_id, e_ood = eps if isinstance(eps, tuple) else (eps, eps)
    g = probit(np.asarray(id_agreement, dtype=float)[ia, ib], e_id)
    h = probit(np.asarray(ood_agreement, dtype=float)[ia, ib], e_ood)
    p = probit(acc, e_id)
    ok = np.isfinite(g) & np.isfinite(h) & np.isfinite(p[ia]) & np.isfinite(p[ib])
    out: dict[str, object] = {"aline_s": np.full(m, np.nan), "aline_d": np.full(m, np.nan), "slope": math.nan,
                              "intercept": math.nan, "n_pairs": int(ok.sum())}
    if ok.sum() < MIN_POINTS or np.ptp(g[ok]) == 0:
        return out
    fit = stats.linregress(g[ok], h[ok])
    a, b = float(fit.slope), float(fit.intercept)
    out.update(slope=a, intercept=b, aline_s=stats.norm.cdf(a * p + b))
    # Least squares of the pair system A w = rhs (row (i, j): 1/2 at i and at j) through its normal
    # equations, M x M: A^T A = (deg + adjacency) / 4 and A^T rhs = (Σ_j rhs_ij) / 2. Forming A (pairs x M)
    # and calling lstsq on it took 4 s per target for 200 members; the M x M system is the same solution.
    rows = np.flatnonzero(ok)
    i, j = ia[rows], ib[rows]
    rhs = h[rows] + a * ((p[i] + p[j]) / 2.0 - g[rows])
    ata = np.zeros((m, m))
    np.add.at(ata, (i, j), 0.25)
    ata += ata.T
    ata[np.diag_indices(m)] = 0.25 * np.bincount(np.r_[i, j], minlength=m)
    atb = 0.5 * (np.bincount(i, rhs, minlength=m) + np.bincount(j, rhs, minlength=m))
    used = ata.diagonal() > 0
    w, *_ = np.linalg.lstsq(ata[np.ix_(used, used)], atb[used], rcond=None)
    est = np.full(m, np.nan)
    est[used] = stats.norm.cdf(w)
    out["aline_d"] = est
    return out


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise weighted least squares ``y = slope x + intercept`` (``w``: draws per point): (slope, intercept)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = w.sum(-1)
        mx, my = (x * w).sum(-1) / n, (y * w).sum(-1) / n
        dx = x - mx[..., None]
        slope = (w * dx * (y - my[..., None])).sum(-1) / (w * dx * dx).sum(-1)
        return slope, my - slope * mx


def lines_test(id_score: np.ndarray, ood_score: np.ndarray, id_agreement: np.ndarray, ood_agreement: np.ndarray,
               groups: np.ndarray | list | None = None, n_resamples: int = 2000, seed: int = 0,
               eps: float | tuple[float, float] = 1e-3) -> dict[str, object]:
    """Baek et al.'s question for one target: do the accuracy and agreement lines coincide?

    Accuracy line: least squares of probit(OOD score) on probit(ID score) over members; agreement
    line: of probit(OOD agreement) on probit(ID agreement) over pairs (i < j). The intervals (and
    that of the pairs' Pearson r of the raw agreements, ``pair_r_*``) come from one percentile
    bootstrap over training runs (``groups``; None: members) of 2,000 resamples: both lines are
    refitted on the same resampled runs, so the differences' intervals account for their
    dependence. ``lines_agree``: both differences' 95% intervals contain 0 (None if undefined). ``eps``: the
    probit clip, one or ``(the source's, the target's)`` (``analysis.probit_clip``).

    Returns:
        A dict with ``LINE_KEYS`` and ``resample`` (the unit).
    """
    acc_id = np.asarray(id_score, dtype=float)
    acc_ood = np.asarray(ood_score, dtype=float)
    a_id = np.asarray(id_agreement, dtype=float)
    a_ood = np.asarray(ood_agreement, dtype=float)
    m = len(acc_id)
    out: dict[str, object] = {k: math.nan for k in LINE_KEYS}
    out["lines_agree"] = None
    e_id, e_ood = eps if isinstance(eps, tuple) else (eps, eps)
    pi, po = probit(acc_id, e_id), probit(acc_ood, e_ood)
    gi, go = probit(a_id, e_id), probit(a_ood, e_ood)
    mem = np.isfinite(pi) & np.isfinite(po)
    ia, ib = _pairs(m)
    pair_ok = np.isfinite(gi[ia, ib]) & np.isfinite(go[ia, ib])
    units, unit_name = resampling_units(groups, m)
    out.update(n_members=int(mem.sum()), n_pairs=int(pair_ok.sum()), n_units=int(len(units)), resample=unit_name)
    if mem.sum() < MIN_POINTS or pair_ok.sum() < MIN_POINTS:
        return out
    acc = stats.linregress(pi[mem], po[mem])
    agr = stats.linregress(gi[ia, ib][pair_ok], go[ia, ib][pair_ok])
    out.update(acc_slope=float(acc.slope), acc_intercept=float(acc.intercept), agr_slope=float(agr.slope),
               agr_intercept=float(agr.intercept))
    if n_resamples <= 0 or len(units) < MIN_POINTS:
        return out
    pi0, po0 = np.where(mem, pi, 0.0), np.where(mem, po, 0.0)
    unit_of = unit_of_points(units, m)
    probit_mats, raw_mats = pair_mats(gi, go), pair_mats(a_id, a_ood)

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        c = point_weights(idx, unit_of, len(units))           # draws per member
        s_acc, i_acc = _wls(pi0, po0, c * mem)
        s_agr, i_agr, _ = moments_line(pair_moments(probit_mats, c))
        r = moments_line(pair_moments(raw_mats, c))[2]
        return np.stack([s_acc, i_acc, s_agr, i_agr, s_acc - s_agr, i_acc - i_agr, r])

    with warnings.catch_warnings(), one_blas_thread():  # small products: threads only contend (correlate)
        warnings.simplefilter("ignore")
        res = stats.bootstrap((np.arange(len(units)),), statistic, n_resamples=n_resamples, vectorized=True,
                              batch=BOOT_BATCH, method="percentile", confidence_level=CONFIDENCE,
                              rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution)
    alpha = (1.0 - CONFIDENCE) / 2.0
    names = ("acc_slope", "acc_intercept", "agr_slope", "agr_intercept", "slope_diff", "intercept_diff", "pair_r")
    for k, name in enumerate(names):
        finite = dist[k][np.isfinite(dist[k])]
        if finite.size >= 0.9 * dist.shape[1]:
            out[f"{name}_low"], out[f"{name}_high"] = (float(v) for v in np.quantile(finite, [alpha, 1 - alpha]))
    sd = (out["slope_diff_low"], out["slope_diff_high"], out["intercept_diff_low"], out["intercept_diff_high"])
    if all(math.isfinite(v) for v in sd):
        out["lines_agree"] = bool(sd[0] <= 0 <= sd[1] and sd[2] <= 0 <= sd[3])
    return out


#: Columns of ``aline_table``'s result (``analysis/aline.csv``).
ALINE_COLUMNS = ["members", "source", "target", "member_id", "arch", "oracle_prompt", "method", "estimate", "truth",
                 "error", "probit_clip_id", "probit_clip_ood"]


def aline_table(table: pd.DataFrame, agreement, members: str = "label-free",
                clips=None) -> tuple[pd.DataFrame, list[dict]]:
    """ALine-S and ALine-D estimates for every (member, target) of an indicator table.

    Args:
        table: an ``indicator_table`` (its members are the pool the lines are fitted on).
        agreement: an ``analysis.agreement.Agreement`` over the same members.
        members: written in the ``members`` column.
        clips: the probit clips (``analysis.probit_clip.Clips``; None: 1e-3 on every site), written in
            ``probit_clip_id`` (the source's) and ``probit_clip_ood`` (the target's).

    Returns:
        ``(per_member, fits)``: per_member has ``ALINE_COLUMNS`` (``error = |estimate - truth|``);
        fits one dict per (target, method) with the agreement line's slope/intercept, the MAE and the clips.
    """
    rows: list[pd.DataFrame] = []
    fits: list[dict] = []
    id_site = agreement.id_site if agreement is not None else None
    if id_site is None:
        return pd.DataFrame(columns=ALINE_COLUMNS), fits
    index = {m: i for i, m in enumerate(agreement.member_ids)}
    for (source, target), g in table.groupby(["source", "target"], sort=False):
        target = str(target)
        if target not in agreement.matrices:
            continue
        g = g[g["member_id"].astype(str).isin(index)]
        pos = np.array([index[m] for m in g["member_id"].astype(str)], dtype=np.int64)
        if len(pos) < 3:
            continue
        a_id = agreement.matrices[id_site][np.ix_(pos, pos)]
        a_t = agreement.matrices[target][np.ix_(pos, pos)]
        eps = (1e-3, 1e-3) if clips is None else clips.pair(source, target)
        est = aline_estimates(g["id_score"].to_numpy(dtype=float), a_id, a_t, eps)
        truth = g["ood_score"].to_numpy(dtype=float)
        for method in ALINE_METHODS:
            e = np.asarray(est[method], dtype=float)
            err = np.abs(e - truth)
            rows.append(pd.DataFrame({
                "members": members, "source": str(source), "target": target,
                "member_id": g["member_id"].astype(str).to_numpy(), "arch": g["arch"].astype(str).to_numpy(),
                "oracle_prompt": (g["oracle_prompt"].to_numpy(dtype=bool) if "oracle_prompt" in g.columns
                                  else np.zeros(len(g), dtype=bool)),
                "method": method, "estimate": e, "truth": truth, "error": err, "probit_clip_id": eps[0],
                "probit_clip_ood": eps[1]}))
            ok = np.isfinite(err)
            fits.append({"members": members, "source": str(source), "target": target, "method": method,
                         "n": int(ok.sum()), "slope": est["slope"], "intercept": est["intercept"],
                         "mae": float(err[ok].mean()) if ok.any() else math.nan, "probit_clip_id": eps[0],
                         "probit_clip_ood": eps[1]})
    per_member = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=ALINE_COLUMNS)
    return per_member[ALINE_COLUMNS], fits


def pair_correlations(agreement, table: pd.DataFrame, n_resamples: int, seed: int, members: str,
                       run_of: dict[str, object], clips=None) -> tuple[pd.DataFrame, list[dict]]:
    """The agreement-on-the-line test per target: OOD against ID agreement over pairs of members, and
    Baek et al.'s comparison of the agreement line with the accuracy line (``lines_test``).

    One run-level bootstrap per target (``lines_test``) gives both lines' intervals and the interval
    of the pairs' Pearson r, which goes into the correlation row (``pearson_boot_*``). ``clips``: the probit
    clips (``analysis.probit_clip.Clips``; None: 1e-3), written in both results."""
    rows, lines = [], []
    id_site = agreement.id_site
    if id_site is None:
        return pd.DataFrame(columns=[*ID_COLUMNS, *STAT_KEYS]), lines
    source = ", ".join(sorted(table["source"].astype(str).unique()))
    groups = np.array([run_of.get(m) for m in agreement.member_ids], dtype=object)
    for t, g in table.groupby("target", sort=False):
        t = str(t)
        if t not in agreement.matrices:
            continue
        eps = (1e-3, 1e-3) if clips is None else clips.pair(id_site, t)
        st = correlate_pairs(agreement.matrices[id_site], agreement.matrices[t], eps=eps, n_resamples=0, seed=seed,
                             groups=groups)
        score = g.set_index(g["member_id"].astype(str))
        lt = lines_test(score["id_score"].reindex(agreement.member_ids).to_numpy(dtype=float),
                        score["ood_score"].reindex(agreement.member_ids).to_numpy(dtype=float),
                        agreement.matrices[id_site], agreement.matrices[t], groups=groups,
                        n_resamples=n_resamples, seed=seed, eps=eps)
        st["pearson_boot_low"], st["pearson_boot_high"] = lt["pair_r_low"], lt["pair_r_high"]
        rows.append({"indicator": PAIRS, "metric": agreement.metric, "members": members, "source": source,
                     "target": t, "unit": "pair", "x": f"agreement on {id_site}", "y": f"agreement on {t}", **st,
                     **dict(zip(CLIP_COLUMNS, eps))})
        lines.append({"members": members, "source": source, "target": t, "metric": agreement.metric, **lt,
                      "probit_clip_id": eps[0], "probit_clip_ood": eps[1]})
    return pd.DataFrame(rows, columns=[*ID_COLUMNS, *STAT_KEYS, *CLIP_COLUMNS]), lines
