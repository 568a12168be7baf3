"""Model selection for a new site (docs/architecture.md "Analysis"): which pool member to deploy without target labels.

Two questions a hospital asks of the pool, answered on every target site of the experiment as if
it were the new one:

* **Ranking** (``select_models``): rank the pool by a label-free indicator (``INDICATORS``: the
  direction says whether higher or lower is better), deploy the top member, and compare its true
  OOD score with the best member's (the regret; 0 when the indicator puts the best member first).
* **Estimation** (``loto_estimates``): estimate each member's OOD score on the held-out target
  from its indicator value there, with the line fitted on the other targets (leave one target
  out), and report the mean absolute error. The fit is least squares in probit space
  (``probit(ood) = a * probit(indicator) + b``), the "on the line" model; it needs at least two
  targets. As a reference, the member's mean OOD score on the other targets is scored the same way.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from analysis.correlate import probit
from analysis.indicators import INDICATORS
from analysis.probit_clip import CLIP_COLUMNS, axis_site

#: Columns of ``select_models``' result.
SELECTION_COLUMNS = ["source", "target", "indicator", "direction", "n", "chosen_member", "chosen_arch",
                     "chosen_value", "chosen_ood", "chosen_rank", "best_member", "best_ood", "regret",
                     "pool_mean_ood", "random_regret", "chosen_oracle_prompt"]

#: The reference estimate of ``loto_estimates`` (not an indicator: it uses other targets' labels).
BASELINE = "mean_ood_other_targets"


def select_models(table: pd.DataFrame, indicators: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Per (source, target) and indicator: the member the indicator ranks first, and its regret.

    Members whose indicator or OOD score is NaN take no part. Ties in the indicator go to the
    first member in ``member_id`` order.

    Args:
        table: an ``indicator_table`` (one row per member and target).
        indicators: names in ``INDICATORS``.

    Returns:
        ``SELECTION_COLUMNS``: ``chosen_rank`` is the chosen member's rank by true OOD score
        (1 = best); ``regret = best_ood - chosen_ood``; ``random_regret = best_ood -
        pool_mean_ood``, the expected regret of a random pick; ``chosen_oracle_prompt``: the chosen
        member's evaluation used labels (only possible on an all-member table). An indicator without
        values on a target gives no row there.
    """
    rows = []
    for (source, target), g in table.groupby(["source", "target"], sort=False):
        g = g.sort_values("member_id", kind="stable")
        for name in indicators:
            info = INDICATORS[name]
            x = g[info.column].to_numpy(dtype=float)
            y = g["ood_score"].to_numpy(dtype=float)
            ok = np.isfinite(x) & np.isfinite(y)
            if not ok.any():
                continue
            sub = g[ok]
            x, y = x[ok], y[ok]
            pick = int(np.argmax(x) if info.higher_is_better else np.argmin(x))  # first of ties
            best = int(np.argmax(y))
            rows.append({
                "source": str(source), "target": str(target), "indicator": name,
                "direction": "higher" if info.higher_is_better else "lower", "n": int(ok.sum()),
                "chosen_member": str(sub["member_id"].iloc[pick]), "chosen_arch": str(sub["arch"].iloc[pick]),
                "chosen_value": float(x[pick]), "chosen_ood": float(y[pick]),
                "chosen_rank": int(1 + np.sum(y > y[pick])),
                "best_member": str(sub["member_id"].iloc[best]), "best_ood": float(y[best]),
                "regret": float(y[best] - y[pick]), "pool_mean_ood": float(y.mean()),
                "random_regret": float(y[best] - y.mean()),
                "chosen_oracle_prompt": bool(sub["oracle_prompt"].iloc[pick]) if "oracle_prompt" in sub else False,
            })
    return pd.DataFrame(rows, columns=SELECTION_COLUMNS)


def _fit_probit_line(x: np.ndarray, y: np.ndarray, eps) -> tuple[float, float] | None:
    ok = np.isfinite(x) & np.isfinite(y)
    ex, ey = (np.broadcast_to(np.asarray(e, dtype=float), x.shape)[ok] for e in _pair(eps))
    px, py = probit(x[ok], ex), probit(y[ok], ey)
    if px.size < 2 or np.all(px == px[0]):
        return None
    fit = stats.linregress(px, py)
    return float(fit.slope), float(fit.intercept)


def _pair(eps) -> tuple:
    return eps if isinstance(eps, tuple) else (eps, eps)


def _row_clips(frame: pd.DataFrame, col: str, source: object, clips, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``frame``: the probit clip of ``col``'s axis and of the OOD score's (its target's)."""
    if clips is None:
        return np.full(len(frame), eps), np.full(len(frame), eps)
    ts = frame["target"].astype(str)
    return (np.array([clips.clip(axis_site(col, source, t)) for t in ts], dtype=float),
            np.array([clips.clip(t) for t in ts], dtype=float))


def loto_estimates(table: pd.DataFrame, indicators: list[str] | tuple[str, ...],
                   eps: float = 1e-3, clips=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-one-target-out OOD estimates per member, and their mean absolute error per target.

    For a held-out target t and an indicator: fit ``probit(ood) = a * probit(indicator) + b`` by
    least squares on every (member, target) row of the other targets of the same source, then
    estimate ``Φ(a * probit(indicator at t) + b)`` for each member at t. The reference
    ``BASELINE`` estimates each member by its own mean OOD score on the other targets.

    Args:
        table: an ``indicator_table``.
        indicators: names in ``INDICATORS``.
        eps: clip margin of ``probit`` (when ``clips`` is None).
        clips: the probit clips (``analysis.probit_clip.Clips``): each row's on its sites; the summary's
            ``probit_clip_x`` / ``probit_clip_y`` are the held-out target's.

    Returns:
        ``(per_member, summary)``. ``per_member``: columns ``source, target, indicator,
        member_id, arch, value, estimate, ood_score, abs_error``. ``summary``: one row per
        (source, target, indicator) with ``n, slope, intercept, mae``. Both are empty when
        a source has fewer than two targets.
    """
    est_rows: list[pd.DataFrame] = []
    sum_rows: list[dict] = []
    for source, gs in table.groupby("source", sort=False):
        targets = list(dict.fromkeys(gs["target"].astype(str)))
        if len(targets) < 2:
            continue
        for t in targets:
            held = gs[gs["target"].astype(str) == t]
            rest = gs[gs["target"].astype(str) != t]
            y_true = held["ood_score"].to_numpy(dtype=float)
            for name in (*indicators, BASELINE):
                slope = intercept = math.nan
                hx = hy = [math.nan]
                if name == BASELINE:
                    value = held["member_id"].map(rest.groupby("member_id")["ood_score"].mean()).to_numpy(dtype=float)
                    est = value
                else:
                    col = INDICATORS[name].column
                    value = held[col].to_numpy(dtype=float)
                    fit = _fit_probit_line(rest[col].to_numpy(dtype=float),
                                           rest["ood_score"].to_numpy(dtype=float),
                                           _row_clips(rest, col, source, clips, eps))
                    if fit is None:
                        continue
                    slope, intercept = fit
                    hx, hy = _row_clips(held, col, source, clips, eps)
                    est = stats.norm.cdf(slope * probit(value, hx) + intercept)
                    est[~np.isfinite(value)] = np.nan
                err = np.abs(est - y_true)
                ok = np.isfinite(err)
                if not ok.any():
                    continue
                est_rows.append(pd.DataFrame({
                    "source": str(source), "target": t, "indicator": name, "member_id": held["member_id"].to_numpy(),
                    "arch": held["arch"].to_numpy(), "value": value, "estimate": est, "ood_score": y_true,
                    "abs_error": err}))
                sum_rows.append({"source": str(source), "target": t, "indicator": name, "n": int(ok.sum()),
                                 "slope": slope, "intercept": intercept, "mae": float(err[ok].mean()),
                                 "probit_clip_x": float(hx[0]) if len(hx) else math.nan,
                                 "probit_clip_y": float(hy[0]) if len(hy) else math.nan})
    per_member_cols = ["source", "target", "indicator", "member_id", "arch", "value", "estimate", "ood_score",
                       "abs_error"]
    per_member = (pd.concat(est_rows, ignore_index=True) if est_rows
                  else pd.DataFrame(columns=per_member_cols))[per_member_cols]
    summary = pd.DataFrame(sum_rows, columns=["source", "target", "indicator", "n", "slope", "intercept", "mae",
                                              *CLIP_COLUMNS])
    return per_member, summary
