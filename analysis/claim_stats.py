"""The statistics behind each claim of the report (``analysis.claims``): one function per claim, each
returning the claim's rows (``analysis.claim_rule.claim_row``): C2/C4 and the other indicators (an
indicator's Pearson r with OOD performance), C3 (agreement on the line over pairs), and the project's rows
(model selection regret against a random pick, the ALine estimates' error). C1 and C5, which compare arms of a
few runs, are in ``analysis.claim_arms``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats

from analysis.claim_rule import (CLAIM_TEXT, claim_row, count_text, members_label,
                                 pair_counts, point_value, run_interval, target_counts, untestable_row, wide_values)
from analysis.case_bootstrap import RUNS_X_CASES, CaseScores, aline_two_level, r_two_level
from analysis.correlate import (MIN_POINTS, N_RESAMPLES, SEED, correlate, correlate_pairs, expand_units, moments_line,
                                pair_mats, pair_moments, point_weights, probit, resampling_units, unit_of_points,
                                weighted_rank_stats)
from analysis.indicators import INDICATORS
from analysis.claim_arms import metric_scale
from analysis.probit_clip import axis_site, clips_or_default, scale_matrices, scale_table, scale_words, with_scale


# --- C2 / C4 / extras: an indicator's Pearson r with OOD performance -----------------------------

def _mean_r_statistic(x: np.ndarray, y: np.ndarray, units: np.ndarray) -> Callable[..., np.ndarray]:
    """Mean over targets of Pearson r(x[:, t], y[:, t]) on the members of the drawn runs."""
    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        pts = expand_units(units, idx)
        safe, valid = np.maximum(pts, 0), pts >= 0
        rs = []
        for t in range(x.shape[1]):
            xt, yt = x[safe, t], y[safe, t]
            rs.append(weighted_rank_stats(xt, yt, valid & np.isfinite(xt) & np.isfinite(yt), rank=False)[0])
        return np.mean(rs, axis=0)
    return statistic


def _with_cases(row: dict, side: str, cases: CaseScores | None, args: tuple, clips_xy=None) -> dict:
    """``row`` with the two-level interval (``case_bootstrap.r_two_level``: ``args`` its positional arguments,
    then the recorded OOD scores ``y``; ``clips_xy``: per target the probit clips of x and y on the probit scale)
    as its default interval, the run-level one beside it; unchanged (run-level only) where the case records
    cannot give one."""
    got = (None if cases is None else
           r_two_level(cases, *args[:-1], value=row["value"], y=args[-1], clips_xy=clips_xy))
    if got is None:
        return row
    lo, hi, note, drawn = got
    return claim_row(row["claim"], row["kind"], row["scope"], row["statistic"], row["value"], lo, hi, side,
                     row["members"] + f" × cases ({drawn})", row["n_members"], row["n_units"], row["unit"],
                     "; ".join(n for n in (row["note"], note) if n), row["claim_text"], row["ci_low"], row["ci_high"],
                     RUNS_X_CASES)


def _axis_clips(tb: pd.DataFrame, col: str, targets: list[str], scale: str | None, clips):
    """Per target, the probit clips of ``col``'s axis and of the OOD score's (None off the probit scale), as
    ``scale_table`` applied them, for the two-level bootstrap's recomputed scores."""
    if scale != "probit":
        return None
    c = clips_or_default(clips)
    src = (tb.drop_duplicates("target").set_index(tb.drop_duplicates("target")["target"].astype(str))["source"]
           if "source" in tb.columns else pd.Series({t: t for t in targets}))
    return ([c.clip(axis_site(col, src.get(t, t), t)) for t in targets], [c.clip(t) for t in targets])


def indicator_rows(table: pd.DataFrame, indicator: str, claim: str, kind: str, side: str,
                   n_resamples: int = N_RESAMPLES, seed: int = SEED, floor: float | None = None,
                   per_target: bool = True, scale: str | None = None, clips=None,
                   cases: CaseScores | None = None) -> list[dict]:
    """Pearson r of ``indicator`` with the OOD score: one row per target and an overall row (the mean r
    over the targets, bootstrapped as one statistic over the runs, so its interval is honest).

    ``floor``: drop the (member, target) points below the degenerate floor (OOD score, and the indicator
    when higher is better) and name the row's scope ``... (non-degenerate)``. ``per_target``: False gives
    the overall row only. ``scale``: ``"probit"`` reads both axes on the probit scale (``scale_table``; the
    floor still applies to the raw values), ``"raw"`` the values as they are; either is named in the
    statistic and the ``scale`` column (None: neither, as before the scales were reported).
    ``cases``: the members' case sums (``case_bootstrap.case_scores``): every row's interval is then the
    two-level one (runs × cases, on the row's scale), the run-level one beside it.
    """
    col = INDICATORS[indicator].column
    label = f"extra: {indicator}" if kind == "extra" else claim
    text = CLAIM_TEXT.get(claim) if kind == "claim" else f"OOD performance vs `{indicator}` (not a claim of the paper)"
    if table is None or table.empty or col not in table.columns or not np.isfinite(table[col].astype(float)).any():
        return [untestable_row(label, f"no `{indicator}` values for the label-free members", kind, "Pearson r", text)]
    tb = table[np.isfinite(table[col].astype(float)) & np.isfinite(table["ood_score"].astype(float))]
    suffix = ""
    if floor is not None:
        deg = tb["ood_score"] < floor
        if INDICATORS[indicator].higher_is_better:
            deg |= tb[col] < floor
        if not deg.any():
            return []
        tb, suffix = tb[~deg], " (non-degenerate)"
    counts = tb["target"].astype(str).value_counts()
    targets = [t for t in dict.fromkeys(tb["target"].astype(str)) if counts[t] >= MIN_POINTS]
    if not targets:
        return [untestable_row(label, f"fewer than {MIN_POINTS} label-free members with `{indicator}` and an OOD score "
                                   f"on any target{suffix}", kind, "Pearson r", text)]
    tb = scale_table(tb[tb["target"].astype(str).isin(targets)], col, scale, clips)
    members = sorted(tb["member_id"].astype(str).unique())
    run = tb.drop_duplicates("member_id").set_index(tb.drop_duplicates("member_id")["member_id"].astype(str))["run_id"]
    units, unit = resampling_units(run.reindex(members).to_numpy(dtype=object), len(members))
    x, y = wide_values(tb, col, members, targets), wide_values(tb, "ood_score", members, targets)
    rows = []
    stat = _mean_r_statistic(x, y, units)
    lo, hi = run_interval(stat, len(units), n_resamples, seed)
    words = scale_words(scale)
    unit_of, present = unit_of_points(units, len(members)), np.isfinite(x) & np.isfinite(y)
    cxy = _axis_clips(tb, col, targets, scale, clips)
    rows.append(_with_cases(claim_row(
        label, kind, "overall" + suffix, f"mean Pearson r over {len(targets)} targets ({col} vs OOD{words})",
        point_value(stat, len(units)), lo, hi, side, members_label(*target_counts(tb, targets), unit),
        len(members), len(units), unit, text=text), side,
        cases, (members, targets, col, x, present, unit_of, len(units), n_resamples, seed, y), cxy))
    for t in targets if per_target else []:
        g = tb[tb["target"].astype(str) == t]
        st = correlate(g[col], g["ood_score"], n_resamples=n_resamples, seed=seed,
                       groups=g["run_id"].to_numpy(dtype=object))
        j = targets.index(t)
        rows.append(_with_cases(claim_row(label, kind, t + suffix, f"Pearson r ({col} vs OOD{words})", st["pearson_r"],
                                          st["pearson_boot_low"], st["pearson_boot_high"], side,
                                          members_label(st["n"], st["n_units"], st["resample"]),
                                          st["n"], st["n_units"], st["resample"], text=text), side,
                                cases, (members, [t], col, x[:, [j]], present[:, [j]], unit_of, len(units),
                                        n_resamples, seed, y[:, [j]]),
                                None if cxy is None else (cxy[0][j:j + 1], cxy[1][j:j + 1])))
    return with_scale(rows, scale)


# --- C3: agreement on the line over pairs ------------------------------------------------------

def agreement_rows(agreement, run_of: dict[str, object], n_resamples: int = N_RESAMPLES,
                   seed: int = SEED, suffix: str = "", scale: str | None = None, clips=None) -> list[dict]:
    """C3: Pearson r of OOD agreement against ID agreement over pairs of label-free members, per target
    and overall (the mean r over targets, one run-level bootstrap). ``suffix``: the overall row only,
    its scope ``"overall" + suffix`` (e.g. the members left after the degenerate ones). ``scale``,
    ``clips``: as ``indicator_rows`` (``"probit"``: each site's agreement on the probit scale)."""
    id_site = agreement.id_site if agreement is not None else None
    if agreement is None or id_site is None or id_site not in agreement.matrices:
        return [untestable_row("C3", "no agreement on the source test split (no stored predictions for the label-free "
                                  "members)", statistic="pair Pearson r")]
    targets = [s for s, r in agreement.roles.items() if r == "ood" and s in agreement.matrices]
    ids = list(agreement.member_ids)
    if not targets or len(ids) < 3:
        return [untestable_row("C3", f"agreement needs at least 3 label-free members with predictions on the source "
                                  f"and a target ({len(ids)} members, {len(targets)} targets)",
                               statistic="pair Pearson r")]
    groups = np.array([run_of.get(m) for m in ids], dtype=object)
    units, unit = resampling_units(groups, len(ids))
    unit_of = unit_of_points(units, len(ids))
    on = scale_matrices(agreement.matrices, [id_site, *targets], scale, clips)
    mats = [pair_mats(on[id_site], on[t]) for t in targets]

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        c = point_weights(idx, unit_of, len(units))
        return np.mean([moments_line(pair_moments(m, c))[2] for m in mats], axis=0)

    lo, hi = run_interval(statistic, len(units), n_resamples, seed)
    used = [pair_counts(agreement.matrices[id_site], agreement.matrices[t], groups) for t in targets]  # per target
    rows = [claim_row("C3", "claim", "overall" + suffix,
                      f"mean over {len(targets)} targets of the pairs' Pearson r (OOD agreement vs ID agreement"
                      f"{scale_words(scale)})",
                      point_value(statistic, len(units)), lo, hi, "weak",
                      members_label([u[0] for u in used], [u[1] for u in used], unit) + ", "
                      + count_text([u[2] for u in used], "pairs"), len(ids), len(units), unit)]
    for t, (n_used, _, _) in zip(targets, used) if not suffix else []:
        st = correlate_pairs(on[id_site], on[t], n_resamples=n_resamples, seed=seed,
                             groups=groups)
        rows.append(claim_row("C3", "claim", t, f"pairs' Pearson r (OOD agreement vs ID agreement{scale_words(scale)})", st["pearson_r"],
                              st["pearson_boot_low"], st["pearson_boot_high"], "weak",
                              members_label(n_used, st["n_units"], st["resample"]) + f", {st['n']} pairs", len(ids),
                              st["n_units"], st["resample"]))
    return with_scale(rows, scale)


# --- the project's rows: selection regret, ALine error -----------------------------------------

def regret_rows(table: pd.DataFrame, indicators: list[str], n_resamples: int = N_RESAMPLES,
                seed: int = SEED) -> list[dict]:
    """Per indicator: regret − random-pick regret (pp), the mean over targets, = the pool's mean OOD score
    minus the picked member's; < 0: the indicator picks better than a uniform random pick."""
    rows = []
    if table is None or table.empty:
        return [untestable_row("selection", "no label-free members", "project", "regret − random-pick regret (pp)",
                               "Selecting by a label-free indicator beats a random pick")]
    targets = list(dict.fromkeys(table["target"].astype(str)))
    k = metric_scale(table)
    members = sorted(table["member_id"].astype(str).unique())  # ties go to the first member, as select_models
    mem = table.drop_duplicates("member_id").set_index(table.drop_duplicates("member_id")["member_id"].astype(str))
    units, unit = resampling_units(mem["run_id"].reindex(members).to_numpy(dtype=object), len(members))
    unit_of = unit_of_points(units, len(members))
    y = wide_values(table, "ood_score", members, targets)
    for name in indicators:
        info = INDICATORS[name]
        x = wide_values(table, info.column, members, targets)
        ok = np.isfinite(x) & np.isfinite(y)
        text = (f"Selecting the member with the {'highest' if info.higher_is_better else 'lowest'} `{name}` beats a "
                f"random pick")
        if ok.sum(axis=0).max(initial=0) < 2:
            rows.append(untestable_row(f"selection: {name}", "fewer than 2 members with values on every target",
                                       "project", "regret − random-pick regret (pp)", text))
            continue
        score = np.where(ok, x if info.higher_is_better else -x, -np.inf)
        ts = [t for t in range(len(targets)) if ok[:, t].sum() >= 2]

        def stat(idx, axis=-1, score=score, ok=ok, ts=ts):
            c = point_weights(idx, unit_of, len(units))
            out = []
            for t in ts:
                w = c * ok[:, t]
                pick = np.where(w > 0, score[:, t], -np.inf).argmax(-1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean = (w * np.nan_to_num(y[:, t])).sum(-1) / w.sum(-1)
                out.append(np.where(w.sum(-1) > 0, mean - y[pick, t], np.nan))
            return k * np.mean(out, axis=0)
        lo, hi = run_interval(stat, len(units), n_resamples, seed)
        regret = np.mean([np.nanmax(np.where(ok[:, t], y[:, t], np.nan))
                          - y[np.argmax(score[:, t]), t] for t in ts])
        rand = np.mean([np.nanmax(np.where(ok[:, t], y[:, t], np.nan)) - np.nanmean(np.where(ok[:, t], y[:, t], np.nan))
                        for t in ts])
        rows.append(claim_row(f"selection: {name}", "project", "overall",
                              f"regret − random-pick regret, mean over {len(ts)} targets (pp)",
                              point_value(stat, len(units)), lo, hi, "negative",
                              members_label([ok[:, t].sum() for t in ts],
                                            [len(set(unit_of[ok[:, t]])) for t in ts], unit),
                              len(members), len(units), unit,
                              note=f"regret {k * regret:.2f} pp, random-pick regret {k * rand:.2f} pp", text=text))
    return rows


def aline_rows(table: pd.DataFrame, agreement, aline_fits: list[dict] | None, n_resamples: int = N_RESAMPLES,
               seed: int = SEED, eps: float = 1e-3, clips=None, cases: CaseScores | None = None) -> list[dict]:
    """The ALine estimates' mean absolute error (pp), mean over targets: ALine-S with a run-level interval
    (its agreement line refitted on each resample's pairs); ALine-D as a point value (its least-squares
    solve per resample is not vectorised, so no interval). ``clips``: each site's probit clip
    (``analysis.probit_clip.Clips``, named in the rows' note); None: ``eps`` on every site. ``cases``:
    ALine-S's default interval is then the two-level one, its ID scores and true OOD scores recomputed from
    the drawn cases (the agreement line from the drawn runs only: the agreement records are per site)."""
    text = "How far the ALine estimates of each member's OOD score are from the truth (label-free)"
    id_site = agreement.id_site if agreement is not None else None
    if agreement is None or id_site is None or table is None or table.empty:
        return [untestable_row("ALine error", "no agreement on the source test split (no stored predictions)",
                               "project", "MAE (pp)", text)]
    ids = list(agreement.member_ids)
    targets = [t for t in dict.fromkeys(table["target"].astype(str)) if t in agreement.matrices]
    if len(ids) < 3 or not targets:
        return [untestable_row("ALine error", "needs 3 label-free members with predictions on the source and a target",
                               "project", "MAE (pp)", text)]
    mem = table.drop_duplicates("member_id").set_index(table.drop_duplicates("member_id")["member_id"].astype(str))
    clip = (lambda site: eps) if clips is None else clips.clip  # noqa: E731
    p_raw = mem["id_score"].reindex(ids).to_numpy(dtype=float)
    p = probit(p_raw, clip(id_site))
    units, unit = resampling_units(mem["run_id"].reindex(ids).to_numpy(dtype=object), len(ids))
    unit_of = unit_of_points(units, len(ids))
    g = probit(agreement.matrices[id_site], clip(id_site))
    g[~np.isfinite(p), :] = np.nan  # as aline_estimates: a pair counts only when both ID scores are known
    g[:, ~np.isfinite(p)] = np.nan
    parts = [(pair_mats(g, probit(agreement.matrices[t], clip(t))), wide_values(table, "ood_score", ids, [t])[:, 0])
             for t in targets]

    def mae(c, p, truths):
        out = []
        for (mats, _), truth in zip(parts, truths):
            a, b, _ = moments_line(pair_moments(mats, c))
            err = np.abs(stats.norm.cdf(a[..., None] * p + b[..., None]) - truth)
            w = c * np.isfinite(err)
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append((w * np.nan_to_num(err)).sum(-1) / w.sum(-1))
        return 100.0 * np.mean(out, axis=0)

    def stat(idx, axis=-1):
        return mae(point_weights(idx, unit_of, len(units)), p, [truth for _, truth in parts])
    lo, hi = run_interval(stat, len(units), n_resamples, seed)
    has = [np.isfinite(p) & np.isfinite(truth) for _, truth in parts]  # the members each target's MAE reads
    label = members_label([h.sum() for h in has], [len(set(unit_of[h])) for h in has], unit)
    rows = [claim_row("ALine error", "project", "overall", f"ALine-S MAE, mean over {len(targets)} targets (pp)",
                      point_value(stat, len(units)), lo, hi, "none", label,
                      len(ids), len(units), unit, text=text,
                      note="probit clip " + ", ".join(f"{s} {clip(s):.3g}" for s in [id_site, *targets]))]
    got = (None if cases is None else
           aline_two_level(cases, ids, targets, mae, p_raw, [t for _, t in parts], unit_of, len(units),
                           rows[0]["value"], clip(id_site), n_resamples, seed))
    if got is not None:
        r = rows[0]
        rows[0] = claim_row(r["claim"], r["kind"], r["scope"], r["statistic"], r["value"], got[0], got[1], "none",
                            r["members"] + f" × cases ({got[2]})", len(ids), len(units), unit,
                            r["note"] + "; cases resampled on the ID and OOD scores (the agreement line: runs only)",
                            text, lo, hi, RUNS_X_CASES)
    d = [f["mae"] for f in (aline_fits or []) if f.get("method") == "aline_d" and f.get("target") in targets]
    if d:
        rows.append(claim_row("ALine error", "project", "overall (ALine-D)",
                              f"ALine-D MAE, mean over {len(d)} targets (pp)",
                              100.0 * float(np.nanmean(d)), math.nan, math.nan, "none",
                              label, len(ids), len(units), unit,
                              note="point value only (no interval: its least-squares solve per resample is not "
                                   "vectorised)",
                              text=text))
    return rows
