"""The claims report: which of the paper's claims the experiment reproduces (issue 16).

One row per claim of Nguyen, Pham et al. 2023 (and the project's own questions), each with a named
statistic, its 95% bootstrap interval **over training runs** (``run_id``: the snapshot members of a
run move together; the bootstrap is ``analysis.correlate``'s, never a second one), the members it is
computed on, and a verdict decided from the interval alone by the rule ``rule_text`` states:

* ``reproduced``: the whole interval lies on the claim's side of its threshold;
* ``refuted``: the whole interval lies on the other side;
* ``inconclusive``: the interval straddles the threshold, or there is no interval (too few runs);
* ``not testable``: an input the claim needs is missing (the row says which, and why).

The claims:

======  =============================================================  ==========================
C1      the foundation model (SAM family, oracle-prompted) drops less   SAM drop − CNN drop (pp) < 0
        from Same-Dom. to the targets than every other architecture     (per CNN; overall: the max)
        (Tables 1–3, configurations chosen on the validation split)
C2      ID performance is a weak indicator of OOD performance           |Pearson r| < 0.5
        (accuracy on the line does not hold)                            (per target; overall: mean r)
C3      ID agreement is a weak indicator (agreement on the line does    |pair Pearson r| < 0.5
        not hold): OOD agreement vs ID agreement over pairs (Fig. 4)
C4      the uncertain area (δ's Otsu area) correlates strongly and      Pearson r ≤ −0.5
        negatively with OOD performance (Fig. 3)
C5      δ has the lowest Table-4 error among the uncertainty methods    δ MSE − best baseline MSE < 0
======  =============================================================  ==========================

Beside them, not claims: the other indicators' correlations (``kind = "extra"``), and the project's
rows (``kind = "project"``): each indicator's model-selection regret against a random pick, and the
ALine estimates' mean absolute error (a number, no verdict). Their verdicts use the same rule on their
own side and read ``holds`` / ``does not hold`` / ``inconclusive``. Where the pool has degenerate
members (``analysis.degenerate_floor``), C2–C4 are repeated without them, and a verdict that changes
without them is reported as inconclusive (``_check_degenerate``). C2–C4 and the project rows use the label-free members only
(DESIGN §3); C1 and C5 include the oracle-prompted SAM members, as the paper's tables do, and say so.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.correlate import (MIN_POINTS, N_RESAMPLES, SEED, run_bootstrap, expand_units, point_weights,
                                weighted_rank_stats, correlate, correlate_pairs, moments_line, pair_mats,
                                pair_moments, probit, resampling_units, unit_of_points)
from analysis.indicators import INDICATORS
from analysis.tables import markdown_table, select_best_configs

#: |r| below this is "weak", at or above it "strong" (C2, C3: weak; C4: strong and negative).
WEAK = 0.5

REPRODUCED, REFUTED, INCONCLUSIVE, NOT_TESTABLE, NO_VERDICT = (
    "reproduced", "refuted", "inconclusive", "not testable", "–")

#: Columns of ``claims.csv``. ``kind``: ``claim`` (the paper's), ``extra`` (another indicator, not a
#: claim), ``project`` (the project's own questions); ``scope``: ``overall`` or a target site;
#: ``side``: the claim's side of the threshold (see ``SIDES``); ``unit``: what the bootstrap resampled.
CLAIM_COLUMNS = ["claim", "kind", "scope", "claim_text", "statistic", "value", "ci_low", "ci_high", "side", "members",
                 "n_members", "n_units", "unit", "verdict", "note"]

#: The claim's side of each threshold: (words for the report, the test on an interval [lo, hi] that
#: reproduces, the test that refutes). Anything else is inconclusive.
SIDES: dict[str, tuple[str, Callable[[float, float], bool], Callable[[float, float], bool]]] = {
    "weak": (f"|r| < {WEAK:g}", lambda lo, hi: -WEAK < lo and hi < WEAK, lambda lo, hi: lo >= WEAK or hi <= -WEAK),
    "strong_negative": (f"r ≤ −{WEAK:g}", lambda lo, hi: hi <= -WEAK, lambda lo, hi: lo > -WEAK),
    "negative": ("< 0", lambda lo, hi: hi < 0, lambda lo, hi: lo > 0),
    "none": ("(a number, no claim)", lambda lo, hi: False, lambda lo, hi: False),
}

CLAIM_TEXT = {
    "C1": "The foundation model (SAM family) generalises better: its mean drop from Same-Dom. to the targets is "
          "smaller than every other architecture's (Tables 1–3)",
    "C2": "ID performance is a weak indicator of OOD performance (accuracy on the line does not hold)",
    "C3": "ID agreement is a weak indicator of OOD agreement (agreement on the line does not hold; Fig. 4)",
    "C4": "The uncertain area (δ's Otsu area) correlates strongly and negatively with OOD performance (Fig. 3)",
    "C5": "δ has the lowest Table-4 error among the uncertainty methods",
}

#: Methods of the uncertainty records that are not baselines of C5 (our own ablation of δ).
NOT_BASELINES = ("ggd", "ggd_yhat_only")

def rule_text(n_resamples: int = N_RESAMPLES, floor: float | None = None) -> str:
    """The decision rule as the report states it."""
    deg = ("" if floor is None else
           f" Members below the degenerate floor ({floor:g}) on an axis predict almost nothing and can make a "
           f"correlation by themselves: C2, C3 and C4 are repeated without them (`overall (non-degenerate)`), and a "
           f"verdict that differs without them is reported as **inconclusive**.")
    return (f"**Decision rule.** Every interval is a 95% bootstrap interval ({n_resamples} resamples, BCa where "
            f"defined, else percentile) that resamples **training runs** (`run_id`: a run's snapshot members move "
            f"together; C1 resamples each architecture's runs separately). A claim is **reproduced** when the whole "
            f"interval lies on the claim's side of its threshold, **refuted** when the whole interval lies on the "
            f"other side, **inconclusive** when it straddles the threshold or no interval exists (fewer than "
            f"{MIN_POINTS} runs, or fewer than 2 runs per architecture for C1). Thresholds: \"weak\" = |r| < {WEAK:g}, "
            f"\"strong\" = |r| ≥ {WEAK:g} (Pearson r on the raw scores); C1: SAM drop − CNN drop < 0 pp; C5: δ's "
            f"error − the best baseline's < 0. The overall row of a claim is its verdict; per-target rows use the "
            f"same rule and are given for reading. Other indicators and the project's rows use the same rule on "
            f"their column `side` (holds / does not hold / inconclusive).{deg}")


def decide(lo: float, hi: float, side: str) -> str:
    """The verdict of an interval [lo, hi] against the claim's ``side`` (``SIDES``)."""
    if side == "none":
        return NO_VERDICT
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    _, yes, no = SIDES[side]
    return REPRODUCED if yes(lo, hi) else REFUTED if no(lo, hi) else INCONCLUSIVE


#: Verdict words of rows that are not claims of the paper (extra indicators, the project's rows): the
#: same rule, but what it decides is whether the row's side holds.
NOT_CLAIM_WORDS = {REPRODUCED: "holds", REFUTED: "does not hold"}


def _row(claim: str, kind: str, scope: str, statistic: str, value: float, lo: float, hi: float, side: str,
         members: str, n_members: int, n_units: int, unit: str, note: str = "", text: str | None = None) -> dict:
    verdict = decide(float(lo), float(hi), side)
    if kind != "claim":
        verdict = NOT_CLAIM_WORDS.get(verdict, verdict)
    return {"claim": claim, "kind": kind, "scope": scope, "claim_text": text or CLAIM_TEXT.get(claim, ""),
            "statistic": statistic, "value": float(value), "ci_low": float(lo), "ci_high": float(hi),
            "side": SIDES[side][0], "members": members, "n_members": int(n_members), "n_units": int(n_units),
            "unit": unit, "verdict": verdict, "note": note}


def _untestable(claim: str, why: str, kind: str = "claim", statistic: str = "", text: str | None = None) -> dict:
    row = _row(claim, kind, "overall", statistic, math.nan, math.nan, math.nan, "none", "", 0, 0, "", why, text)
    row["verdict"] = NOT_TESTABLE
    return row


def _point(stat: Callable[..., np.ndarray], n_units: int | tuple[int, ...]) -> float:
    """A bootstrap statistic evaluated on the sample itself (every unit once)."""
    sizes = (n_units,) if np.ndim(n_units) == 0 else tuple(n_units)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.asarray(stat(*(np.arange(n)[None] for n in sizes), axis=-1)).ravel()[0])


def _interval(stat, n_units, n_resamples: int, seed: int) -> tuple[float, float]:
    lo, hi = run_bootstrap(stat, n_units, n_resamples, seed, n_stats=1)
    return float(lo[0]), float(hi[0])


# --- the member x target matrices the statistics read ------------------------------------------

def _wide(table: pd.DataFrame, column: str, members: list[str], targets: list[str]) -> np.ndarray:
    """``M x T`` values of ``column`` (NaN where missing), rows in ``members`` order."""
    w = table.pivot_table(index="member_id", columns="target", values=column, aggfunc="first", dropna=False)
    return w.reindex(index=members, columns=targets).to_numpy(dtype=float)


def _members_label(n: int, units: int, unit: str, who: str = "label-free") -> str:
    return f"{who}: {n} members, {units} {unit}s"


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


def indicator_rows(table: pd.DataFrame, indicator: str, claim: str, kind: str, side: str,
                   n_resamples: int = N_RESAMPLES, seed: int = SEED, floor: float | None = None,
                   per_target: bool = True) -> list[dict]:
    """Pearson r of ``indicator`` with the OOD score: one row per target and an overall row (the mean r
    over the targets, bootstrapped as one statistic over the runs, so its interval is honest).

    ``floor``: drop the (member, target) points below the degenerate floor (OOD score, and the indicator
    when higher is better) and name the row's scope ``... (non-degenerate)``. ``per_target``: False gives
    the overall row only.
    """
    col = INDICATORS[indicator].column
    label = f"extra: {indicator}" if kind == "extra" else claim
    text = CLAIM_TEXT.get(claim) if kind == "claim" else f"OOD performance vs `{indicator}` (not a claim of the paper)"
    if table is None or table.empty or col not in table.columns or not np.isfinite(table[col].astype(float)).any():
        return [_untestable(label, f"no `{indicator}` values for the label-free members", kind, "Pearson r", text)]
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
        return [_untestable(label, f"fewer than {MIN_POINTS} label-free members with `{indicator}` and an OOD score "
                                   f"on any target{suffix}", kind, "Pearson r", text)]
    tb = tb[tb["target"].astype(str).isin(targets)]
    members = sorted(tb["member_id"].astype(str).unique())
    run = tb.drop_duplicates("member_id").set_index(tb.drop_duplicates("member_id")["member_id"].astype(str))["run_id"]
    units, unit = resampling_units(run.reindex(members).to_numpy(dtype=object), len(members))
    x, y = _wide(tb, col, members, targets), _wide(tb, "ood_score", members, targets)
    rows = []
    stat = _mean_r_statistic(x, y, units)
    lo, hi = _interval(stat, len(units), n_resamples, seed)
    rows.append(_row(label, kind, "overall" + suffix, f"mean Pearson r over {len(targets)} targets ({col} vs OOD)",
                     _point(stat, len(units)), lo, hi, side, _members_label(len(members), len(units), unit),
                     len(members), len(units), unit, text=text))
    for t in targets if per_target else []:
        g = tb[tb["target"].astype(str) == t]
        st = correlate(g[col], g["ood_score"], n_resamples=n_resamples, seed=seed,
                       groups=g["run_id"].to_numpy(dtype=object))
        rows.append(_row(label, kind, t + suffix, f"Pearson r ({col} vs OOD)", st["pearson_r"], st["pearson_boot_low"],
                         st["pearson_boot_high"], side, _members_label(st["n"], st["n_units"], st["resample"]),
                         st["n"], st["n_units"], st["resample"], text=text))
    return rows


# --- C3: agreement on the line over pairs ------------------------------------------------------

def agreement_rows(agreement, run_of: dict[str, object], n_resamples: int = N_RESAMPLES,
                   seed: int = SEED, suffix: str = "") -> list[dict]:
    """C3: Pearson r of OOD agreement against ID agreement over pairs of label-free members, per target
    and overall (the mean r over targets, one run-level bootstrap). ``suffix``: the overall row only,
    its scope ``"overall" + suffix`` (e.g. the members left after the degenerate ones)."""
    id_site = agreement.id_site if agreement is not None else None
    if agreement is None or id_site is None or id_site not in agreement.matrices:
        return [_untestable("C3", "no agreement on the source test split (no stored predictions for the label-free "
                                  "members)", statistic="pair Pearson r")]
    targets = [s for s, r in agreement.roles.items() if r == "ood" and s in agreement.matrices]
    ids = list(agreement.member_ids)
    if not targets or len(ids) < 3:
        return [_untestable("C3", f"agreement needs at least 3 label-free members with predictions on the source "
                                  f"and a target ({len(ids)} members, {len(targets)} targets)",
                            statistic="pair Pearson r")]
    groups = np.array([run_of.get(m) for m in ids], dtype=object)
    units, unit = resampling_units(groups, len(ids))
    unit_of = unit_of_points(units, len(ids))
    mats = [pair_mats(agreement.matrices[id_site], agreement.matrices[t]) for t in targets]

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        c = point_weights(idx, unit_of, len(units))
        return np.mean([moments_line(pair_moments(m, c))[2] for m in mats], axis=0)

    lo, hi = _interval(statistic, len(units), n_resamples, seed)
    n_pairs = len(ids) * (len(ids) - 1) // 2
    rows = [_row("C3", "claim", "overall" + suffix,
                 f"mean over {len(targets)} targets of the pairs' Pearson r (OOD agreement vs ID agreement)",
                 _point(statistic, len(units)), lo, hi, "weak",
                 _members_label(len(ids), len(units), unit) + f", {n_pairs} pairs", len(ids), len(units), unit)]
    for t in targets if not suffix else []:
        st = correlate_pairs(agreement.matrices[id_site], agreement.matrices[t], n_resamples=n_resamples, seed=seed,
                             groups=groups)
        rows.append(_row("C3", "claim", t, "pairs' Pearson r (OOD agreement vs ID agreement)", st["pearson_r"],
                         st["pearson_boot_low"], st["pearson_boot_high"], "weak",
                         _members_label(len(ids), st["n_units"], st["resample"]) + f", {st['n']} pairs", len(ids),
                         st["n_units"], st["resample"]))
    return rows


# --- C1: the foundation model's drop against each CNN's ----------------------------------------

def sam_archs(perf: pd.DataFrame) -> list[str]:
    """The SAM-family architectures of a performance table: ``medsam*`` names, or box-prompted members."""
    m = perf.drop_duplicates("member_id")
    prompted = m["oracle_prompt"].fillna(False).astype(bool) if "oracle_prompt" in m.columns else False
    return sorted(set(m.loc[m["arch"].astype(str).str.startswith("medsam") | prompted, "arch"].astype(str)))


def c1_rows(perf: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> list[dict]:
    """C1: per (SAM arch, other arch), the difference of their mean drops (Same-Dom. − mean over targets,
    pp) on the configuration Table 1 reports (chosen on the validation split), each architecture's runs
    resampled separately; overall: the largest difference over the other architectures (< 0: SAM drops
    less than every one of them)."""
    sams = sam_archs(perf)
    others = sorted(set(perf["arch"].astype(str)) - set(sams))
    if not sams or not others:
        return [_untestable("C1", f"needs a SAM-family member and another architecture; the pool has SAM: "
                                  f"{', '.join(sams) or 'none'}, others: {', '.join(others) or 'none'}",
                            statistic="SAM drop − CNN drop (pp)")]
    best = select_best_configs(perf)
    drops: dict[str, np.ndarray] = {}
    chosen: dict[str, str] = {}
    for b in best.itertuples(index=False):
        sel = perf[(perf["arch"] == b.arch) & (perf["lr"] == b.lr) & (perf["epochs"] == b.epochs)
                   & (perf["source"] == b.source)]
        # per run: its Same-Dom. score minus its mean over the targets (the configuration's seeds are its runs)
        per = sel.groupby(sel["run_id"].astype(str) if sel["run_id"].notna().all() else sel["member_id"].astype(str))
        d = 100.0 * (per["id_score"].first() - per["ood_score"].mean()).to_numpy(dtype=float)
        drops[str(b.arch)] = d[np.isfinite(d)]
        n = int(np.isfinite(d).sum())
        chosen[str(b.arch)] = f"lr {b.lr:g}, {b.epochs} epochs, {n} run{'s' if n != 1 else ''}"
    sel_on = str(best["selected_on"].iloc[0]) if len(best) else "val_score"
    note_sel = ("configurations chosen on the validation split as Table 1" if sel_on == "val_score" else
                "configurations chosen on the source test split (no validation split in the records: optimistic)")
    rows = []
    for s in sams:
        if not len(drops.get(s, [])):
            rows.append(_untestable("C1", f"{s}: no finite drop (no ID or OOD score)"))
            continue
        cnns = [c for c in others if len(drops.get(c, []))]
        for c in cnns:
            ds, dc = drops[s], drops[c]

            def stat(i, j, axis=-1, ds=ds, dc=dc):
                return ds[i].mean(-1) - dc[j].mean(-1)
            lo, hi = _interval(stat, (len(ds), len(dc)), n_resamples, seed)
            rows.append(_row("C1", "claim", f"{s} vs {c}", f"drop({s}) − drop({c}), pp",
                             _point(stat, (len(ds), len(dc))), lo, hi, "negative",
                             f"{s} ({chosen[s]}; oracle-prompted) vs {c} ({chosen[c]})",
                             len(ds) + len(dc), len(ds) + len(dc), "run (per architecture)",
                             note=f"{s}: drop {ds.mean():.2f} pp; {c}: drop {dc.mean():.2f} pp; {note_sel}"))
        if not cnns:
            continue
        pools = [drops[s]] + [drops[c] for c in cnns]

        def stat_all(*idx, axis=-1, pools=pools):
            sam = pools[0][idx[0]].mean(-1)
            return np.max([sam - p[i].mean(-1) for p, i in zip(pools[1:], idx[1:])], axis=0)
        sizes = tuple(len(p) for p in pools)
        lo, hi = _interval(stat_all, sizes, n_resamples, seed)
        rows.insert(len(rows) - len(cnns), _row(
            "C1", "claim", "overall" if len(sams) == 1 else f"overall ({s})",
            f"max over {len(cnns)} architectures of drop({s}) − drop(other), pp", _point(stat_all, sizes), lo, hi,
            "negative", f"{s} (oracle-prompted: ground-truth box prompts) vs {', '.join(cnns)}", sum(sizes), sum(sizes),
            "run (per architecture)",
            note=f"evaluation of {s} is oracle-prompted (each slice's ground-truth box), as in the paper; {note_sel}; "
                 f"runs per architecture: {', '.join(f'{a} {n}' for a, n in zip([s, *cnns], sizes))}"))
    return rows or [_untestable("C1", "no architecture has a finite drop")]


# --- C5: δ against the Table-4 baselines --------------------------------------------------------

def c5_rows(unc: pd.DataFrame | None, perf: pd.DataFrame, n_resamples: int = N_RESAMPLES,
            seed: int = SEED, sam_members: set[str] | None = None) -> list[dict]:
    """C5: δ's Table-4 error minus the best baseline's, on the target sites' images, per reading.

    Members: those scored by δ and every baseline; the SAM family (box-prompted) by default, as the
    paper's Table 4, else every such member (the row says which). The statistic's means are over the
    drawn members (each member's mean over its target images); the best baseline is the one with the
    lowest mean in each resample, so its choice is resampled too. ``sam_members``: the box-prompted
    members as Table 4 reads them (the uncertainty site records' ``prompted``); None: the members'
    ``oracle_prompt``.
    """
    stat_name = "δ MSE − best baseline MSE"
    if unc is None or unc.empty:
        return [_untestable("C5", "no uncertainty records (run the uncertainty stage; the analysis reads them when "
                                  "analysis.indicators names an uncertainty indicator)", statistic=stat_name)]
    if not (unc["method"] == "ggd").any():
        return [_untestable("C5", "the uncertainty records hold no δ ('ggd') rows", statistic=stat_name)]
    baselines = sorted({str(m) for m in unc["method"].unique()} - set(NOT_BASELINES))
    if not baselines:
        return [_untestable("C5", "no baseline method in the uncertainty records (uncertainty.baselines is empty)",
                            statistic=stat_name)]
    methods = ["ggd", *baselines]
    # one pass over the (possibly millions of) slice rows: each member x method's mean per reading on the
    # target sites' images. NaN outside them and a groupby on the columns as they are: selecting the rows
    # first (all columns taken) or converting the keys to str cost 10 s at 200 members x 2,000 slices.
    keep = (unc["role"] == "ood").to_numpy(dtype=bool) & unc["method"].isin(methods).to_numpy(dtype=bool)
    area = unc["area_px"].to_numpy(dtype=float)
    unc_px, err_px = unc["uncertain_px"].to_numpy(dtype=float), unc["error_px"].to_numpy(dtype=float)
    per_image = {"area": np.where(keep, ((unc_px - err_px) / area) ** 2, np.nan)}
    if unc.loc[keep, "uncertain_error_px"].notna().all():
        both = unc["uncertain_error_px"].to_numpy(dtype=float, na_value=np.nan)
        per_image["pixel"] = np.where(keep, (unc_px + err_px - 2 * both) / area, np.nan)
    means = (pd.DataFrame(per_image, index=unc.index).groupby([unc["member_id"], unc["method"]], sort=False)
             .mean().dropna(how="all"))
    means.index.names = ["member_id", "method"]
    by_member = means.reset_index().groupby("member_id")["method"].nunique()
    complete = sorted(str(m) for m in by_member[by_member == len(methods)].index)
    means.index = pd.MultiIndex.from_arrays([means.index.get_level_values(0).astype(str),
                                             means.index.get_level_values(1).astype(str)], names=means.index.names)
    if not complete:
        return [_untestable("C5", f"no member was scored on a target by δ and every baseline ({', '.join(baselines)})",
                            statistic=stat_name)]
    oracle = (set(perf.loc[perf["oracle_prompt"].fillna(False).astype(bool), "member_id"].astype(str))
              if sam_members is None else set(sam_members))
    sam = [m for m in complete if m in oracle]
    who = ("SAM family (box-prompted), as the paper's Table 4" if sam else
           "every member scored by all methods (no SAM-family member was: unlike the paper's Table 4)")
    members = sam or complete
    run_of = dict(zip(perf["member_id"].astype(str), perf["run_id"]))
    units, unit = resampling_units(np.array([run_of.get(m) for m in members], dtype=object), len(members))
    unit_of = unit_of_points(units, len(members))
    rows = []
    for reading in per_image:
        e = means[reading].unstack("method").reindex(index=members, columns=methods).to_numpy(dtype=float)

        def stat(idx, axis=-1, e=e):
            c = point_weights(idx, unit_of, len(units))
            mean = (c @ np.nan_to_num(e)) / c.sum(-1, keepdims=True)
            return mean[..., 0] - mean[..., 1:].min(-1)
        lo, hi = _interval(stat, len(units), n_resamples, seed)
        full = np.nanmean(e, axis=0)
        best = baselines[int(np.argmin(full[1:]))]
        rows.append(_row("C5", "claim", "overall" if reading == "area" else "overall (pixel reading)",
                         f"{stat_name} ({reading} reading, target sites)", _point(stat, len(units)), lo, hi,
                         "negative", f"{who}: {len(members)} members, {len(units)} {unit}s", len(members), len(units),
                         unit, note=f"δ {full[0]:.4g}; best baseline {best} {full[1:].min():.4g}; baselines: "
                                    + ", ".join(f"{b} {v:.4g}" for b, v in zip(baselines, full[1:]))))
    return rows


# --- the project's rows: selection regret, ALine error -----------------------------------------

def regret_rows(table: pd.DataFrame, indicators: list[str], n_resamples: int = N_RESAMPLES,
                seed: int = SEED) -> list[dict]:
    """Per indicator: regret − random-pick regret (pp), the mean over targets, = the pool's mean OOD score
    minus the picked member's; < 0: the indicator picks better than a uniform random pick."""
    rows = []
    if table is None or table.empty:
        return [_untestable("selection", "no label-free members", "project", "regret − random-pick regret (pp)",
                            "Selecting by a label-free indicator beats a random pick")]
    targets = list(dict.fromkeys(table["target"].astype(str)))
    members = sorted(table["member_id"].astype(str).unique())  # ties go to the first member, as select_models
    mem = table.drop_duplicates("member_id").set_index(table.drop_duplicates("member_id")["member_id"].astype(str))
    units, unit = resampling_units(mem["run_id"].reindex(members).to_numpy(dtype=object), len(members))
    unit_of = unit_of_points(units, len(members))
    y = _wide(table, "ood_score", members, targets)
    for name in indicators:
        info = INDICATORS[name]
        x = _wide(table, info.column, members, targets)
        ok = np.isfinite(x) & np.isfinite(y)
        text = (f"Selecting the member with the {'highest' if info.higher_is_better else 'lowest'} `{name}` beats a "
                f"random pick")
        if ok.sum(axis=0).max(initial=0) < 2:
            rows.append(_untestable(f"selection: {name}", "fewer than 2 members with values on every target",
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
            return 100.0 * np.mean(out, axis=0)
        lo, hi = _interval(stat, len(units), n_resamples, seed)
        regret = np.mean([np.nanmax(np.where(ok[:, t], y[:, t], np.nan))
                          - y[np.argmax(score[:, t]), t] for t in ts])
        rand = np.mean([np.nanmax(np.where(ok[:, t], y[:, t], np.nan)) - np.nanmean(np.where(ok[:, t], y[:, t], np.nan))
                        for t in ts])
        rows.append(_row(f"selection: {name}", "project", "overall",
                         f"regret − random-pick regret, mean over {len(ts)} targets (pp)", _point(stat, len(units)),
                         lo, hi, "negative", _members_label(len(members), len(units), unit), len(members), len(units),
                         unit, note=f"regret {100 * regret:.2f} pp, random-pick regret {100 * rand:.2f} pp", text=text))
    return rows


def aline_rows(table: pd.DataFrame, agreement, aline_fits: list[dict] | None, n_resamples: int = N_RESAMPLES,
               seed: int = SEED, eps: float = 1e-3) -> list[dict]:
    """The ALine estimates' mean absolute error (pp), mean over targets: ALine-S with a run-level interval
    (its agreement line refitted on each resample's pairs); ALine-D as a point value (its least-squares
    solve per resample is not vectorised, so no interval)."""
    text = "How far the ALine estimates of each member's OOD score are from the truth (label-free)"
    id_site = agreement.id_site if agreement is not None else None
    if agreement is None or id_site is None or table is None or table.empty:
        return [_untestable("ALine error", "no agreement on the source test split (no stored predictions)", "project",
                            "MAE (pp)", text)]
    ids = list(agreement.member_ids)
    targets = [t for t in dict.fromkeys(table["target"].astype(str)) if t in agreement.matrices]
    if len(ids) < 3 or not targets:
        return [_untestable("ALine error", "needs 3 label-free members with predictions on the source and a target",
                            "project", "MAE (pp)", text)]
    mem = table.drop_duplicates("member_id").set_index(table.drop_duplicates("member_id")["member_id"].astype(str))
    p = probit(mem["id_score"].reindex(ids).to_numpy(dtype=float), eps)
    units, unit = resampling_units(mem["run_id"].reindex(ids).to_numpy(dtype=object), len(ids))
    unit_of = unit_of_points(units, len(ids))
    g = probit(agreement.matrices[id_site], eps)
    g[~np.isfinite(p), :] = np.nan  # as aline_estimates: a pair counts only when both ID scores are known
    g[:, ~np.isfinite(p)] = np.nan
    parts = [(pair_mats(g, probit(agreement.matrices[t], eps)), _wide(table, "ood_score", ids, [t])[:, 0])
             for t in targets]

    def stat(idx, axis=-1):
        c = point_weights(idx, unit_of, len(units))
        out = []
        for mats, truth in parts:
            a, b, _ = moments_line(pair_moments(mats, c))
            err = np.abs(stats.norm.cdf(a[..., None] * p + b[..., None]) - truth)
            w = c * np.isfinite(err)
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append((w * np.nan_to_num(err)).sum(-1) / w.sum(-1))
        return 100.0 * np.mean(out, axis=0)
    lo, hi = _interval(stat, len(units), n_resamples, seed)
    rows = [_row("ALine error", "project", "overall", f"ALine-S MAE, mean over {len(targets)} targets (pp)",
                 _point(stat, len(units)), lo, hi, "none", _members_label(len(ids), len(units), unit), len(ids),
                 len(units), unit, text=text)]
    d = [f["mae"] for f in (aline_fits or []) if f.get("method") == "aline_d" and f.get("target") in targets]
    if d:
        rows.append(_row("ALine error", "project", "overall (ALine-D)", f"ALine-D MAE, mean over {len(d)} targets (pp)",
                         100.0 * float(np.nanmean(d)), math.nan, math.nan, "none",
                         _members_label(len(ids), len(units), unit), len(ids), len(units), unit,
                         note="point value only (no interval: its least-squares solve per resample is not vectorised)",
                         text=text))
    return rows


# --- the whole report ---------------------------------------------------------------------------

def _check_degenerate(rows: list[dict], nondegenerate: list[dict]) -> None:
    """A verdict that does not survive leaving out the degenerate members is inconclusive (in place).

    Members that predict (almost) nothing sit together at the bottom of both axes and can make a
    correlation by themselves; where the verdict with them differs from the one without them, it is
    carried by them, and the overall row says so instead of reporting it."""
    ov = next((r for r in rows if r["scope"] == "overall"), None)
    nd = next((r for r in nondegenerate if r["scope"].startswith("overall")), None)
    if ov is None or nd is None or ov["verdict"] not in (REPRODUCED, REFUTED) or nd["verdict"] == ov["verdict"]:
        return
    ov["note"] = ((ov["note"] + "; ") if ov["note"] else "") + (
        f"with every member the interval says {ov['verdict']}, without the degenerate members {nd['verdict']}: the "
        f"verdict is carried by members that predict almost nothing, so it is reported as inconclusive")
    ov["verdict"] = INCONCLUSIVE


def claims_table(perf: pd.DataFrame, table: pd.DataFrame | None, agreement=None, unc: pd.DataFrame | None = None,
                 aline_fits: list[dict] | None = None, indicators: list[str] | None = None,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED, floor: float | None = None,
                 sam_members: set[str] | None = None) -> pd.DataFrame:
    """Every claim row (``CLAIM_COLUMNS``).

    Args:
        perf: ``performance_table`` of every member (oracle-prompted included: C1, C5).
        table: ``indicator_table`` of the label-free members (None or empty: C2–C4 not testable).
        agreement: the label-free members' ``Agreement`` (None: C3 and ALine not testable).
        unc: the uncertainty records (``records.load_uncertainty``; None: C5 not testable).
        aline_fits: ``aline.aline_table``'s fits (for ALine-D's point value).
        indicators: the indicators to give extra and regret rows for (default: those with values).
        n_resamples, seed: the run-level bootstrap's.
        floor: the degenerate floor: C2, C3 and C4 are repeated without the members below it (C2, C4: the
            points; C3: members with a score below it anywhere), and a verdict that changes without them is
            reported as inconclusive (``_check_degenerate``).
        sam_members: C5's SAM family as Table 4 reads it (``sam_members_of``); None: ``oracle_prompt``.
    """
    rows: list[dict] = []
    rows += c1_rows(perf, n_resamples, seed)
    have = [n for n in INDICATORS if table is not None and not table.empty
            and np.isfinite(table[INDICATORS[n].column].astype(float)).any()]
    indicators = [n for n in (indicators or have) if n in have]
    free = "no label-free member (every member is oracle-prompted)"
    empty = table is None or table.empty
    run_of = dict(zip(perf["member_id"].astype(str), perf["run_id"]))
    for claim, ind, side in (("C2", "id_performance", "weak"), ("C3", None, "weak"),
                             ("C4", "uncertain_area", "strong_negative")):
        if empty:
            rows.append(_untestable(claim, free, statistic="Pearson r"))
            continue
        if claim == "C4" and "uncertain_area" not in have:
            rows.append(_untestable("C4", "no uncertain-area values for the label-free members (no uncertainty stage, "
                                          "no δ 'ggd' records, or no uncertainty indicator in analysis.indicators)",
                                    statistic="Pearson r"))
            continue
        if claim == "C3":
            got = agreement_rows(agreement, run_of, n_resamples, seed)
            nd = []
            if floor is not None and agreement is not None and got[0]["verdict"] != NOT_TESTABLE:
                m = table.groupby(table["member_id"].astype(str)).agg(i=("id_score", "min"), o=("ood_score", "min"))
                keep = m.index[(m["i"] >= floor) & (m["o"] >= floor)].tolist()
                if len(keep) < len(m):
                    nd = agreement_rows(agreement.subset(keep), run_of, n_resamples, seed, " (non-degenerate)")
        else:
            got = indicator_rows(table, ind, claim, "claim", side, n_resamples, seed)
            nd = ([] if floor is None else
                  indicator_rows(table, ind, claim, "claim", side, n_resamples, seed, floor, per_target=False))
        _check_degenerate(got, nd)
        rows += got[:1] + nd + got[1:]
    rows += c5_rows(unc, perf, n_resamples, seed, sam_members)
    if not empty:
        for n in indicators:
            if n in ("id_performance", "uncertain_area"):
                continue
            rows += indicator_rows(table, n, "extra", "extra",
                                   "weak" if INDICATORS[n].higher_is_better else "strong_negative", n_resamples, seed,
                                   per_target=False)
    rows += regret_rows(None if empty else table, indicators, n_resamples, seed)
    rows += aline_rows(None if empty else table, agreement, aline_fits, n_resamples, seed)
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def _fmt(v: float, spec: str = ".3f") -> str:
    return format(float(v), spec) if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)) else "–"


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    """The rows as the report's tables show them."""
    return pd.DataFrame({
        "claim": df["claim"], "scope": df["scope"], "statistic": df["statistic"],
        "value": [_fmt(v) for v in df["value"]],
        "95% CI (runs)": [f"[{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else "none"
                          for lo, hi in zip(df["ci_low"], df["ci_high"])],
        "claim's side": df["side"], "computed on": df["members"], "verdict": df["verdict"]})


def verdict_rows(claims: pd.DataFrame) -> pd.DataFrame:
    """The rows that carry the paper's claims' verdicts: each claim's overall rows (and C1's per-CNN rows)."""
    return claims[(claims["kind"] == "claim") & (claims["scope"].str.startswith("overall") | (claims["claim"] == "C1"))]


def verdicts_markdown(claims: pd.DataFrame) -> str:
    """The verdict table alone (the Claims section of ``tables.md`` and the CLI's output)."""
    return markdown_table(_shown(verdict_rows(claims)))


def claims_markdown(claims: pd.DataFrame, experiment: str = "", metric: str = "", n_resamples: int = N_RESAMPLES,
                    floor: float | None = None) -> str:
    """``claims.md``: the decision rule, the verdicts (overall rows), plain-word notes, then every row."""
    shown = _shown
    main = verdict_rows(claims)
    md = [f"# Claims report{': ' + experiment if experiment else ''}", "",
          f"Does this experiment reproduce the claims of Nguyen, Pham et al. 2023? Metric: `{metric}`. "
          f"Built by `oodsweep report` (or `oodsweep analyze`) from the experiment's records; every row in "
          f"`claims.csv`.", "", rule_text(n_resamples, floor), "", "## Verdicts", ""]
    for c in ("C1", "C2", "C3", "C4", "C5"):
        md.append(f"- **{c}**: {CLAIM_TEXT[c]}.")
    md += ["", markdown_table(shown(main)), "", "## In plain words", ""]
    for c in ("C1", "C2", "C3", "C4", "C5"):
        g = claims[(claims["claim"] == c) & (claims["kind"] == "claim")]
        md.append(f"- **{c}**: " + _plain(c, g))
    md += ["", "## Per target (same rule; for reading, the overall row above is the verdict)", ""]
    per = claims[(claims["kind"] == "claim") & ~claims["scope"].str.startswith("overall") & (claims["claim"] != "C1")]
    md += [markdown_table(shown(per)) if len(per) else "(none)", ""]
    extra = claims[claims["kind"] == "extra"]
    md += ["## Other indicators (not claims of the paper)", "",
           "Mean Pearson r over the targets with OOD performance, label-free members; side: strong and negative for "
           "the uncertainty readings (as C4), weak for the agreement indicators (as C2/C3).", "",
           markdown_table(shown(extra)) if len(extra) else "(none)", ""]
    proj = claims[claims["kind"] == "project"]
    md += ["## The project's own rows", "",
           "Model selection: for each target, the member the indicator ranks first is deployed; the statistic is its "
           "regret (best member's OOD score − the picked one's) minus the expected regret of a uniform random pick "
           "(pp; < 0: the indicator beats a random pick). ALine: mean absolute error of the ALine estimates of each "
           "member's OOD score (pp), a number to read, no verdict.", "",
           markdown_table(shown(proj).assign(note=proj["note"].to_numpy())) if len(proj) else "(none)", ""]
    return "\n".join(md)


def _plain(claim: str, g: pd.DataFrame) -> str:
    """One sentence per claim: its verdict, the number behind it, and what limits it."""
    if g.empty:
        return "no row."
    ov = g[g["scope"].str.startswith("overall")]
    r = (ov if len(ov) else g).iloc[0]
    if r["verdict"] == NOT_TESTABLE:
        return f"not testable: {r['note']}."
    has_ci = math.isfinite(r["ci_low"]) and math.isfinite(r["ci_high"])
    ci = f"95% interval [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if has_ci else "no interval"
    s = f"{r['verdict']}: {r['statistic']} = {_fmt(r['value'])}, {ci}, on {r['members']}."
    carried = "carried by" in str(r["note"])
    if r["verdict"] == INCONCLUSIVE and not carried:
        s += (f" The interval does not lie wholly on either side of the threshold ({r['side']})." if has_ci else
              " Too few training runs to resample (" + ("fewer than 2 per architecture" if claim == "C1" else
                                                        f"fewer than {MIN_POINTS}") + "): more seeds would give one.")
    if r["note"]:
        note = str(r["note"])
        s += f" {note[:1].upper() if note[:1].isascii() else note[:1]}{note[1:]}."
    nd = g[g["scope"] == "overall (non-degenerate)"]
    if len(nd):
        n = nd.iloc[0]
        s += (f" Without the degenerate members: {_fmt(n['value'])} [{_fmt(n['ci_low'])}, {_fmt(n['ci_high'])}], "
              f"{n['verdict']}.")
    return s


def write_claims(claims: pd.DataFrame, out_dir: str | Path, experiment: str = "", metric: str = "",
                 n_resamples: int = N_RESAMPLES, floor: float | None = None) -> list[Path]:
    """Write ``claims.csv`` and ``claims.md`` under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claims.to_csv(out / "claims.csv", index=False)
    (out / "claims.md").write_text(claims_markdown(claims, experiment, metric, n_resamples, floor), encoding="utf-8")
    return [out / "claims.csv", out / "claims.md"]


def sam_members_of(experiment_dir: str | Path) -> set[str] | None:
    """The box-prompted members as Table 4 reads them: the uncertainty site records' ``prompted``
    (``analysis.uncertainty_indicators.uncertainty_sections``); None without site records."""
    from trainables.records import load_uncertainty_sites

    sites = load_uncertainty_sites(experiment_dir)
    return None if sites is None else set(sites.loc[sites["prompted"].astype(bool), "member_id"].astype(str))


def _spec_analysis(experiment_dir: Path) -> dict:
    """The frozen spec's ``analysis`` section (``{}`` without a readable ``spec.yaml``)."""
    import yaml

    try:
        raw = yaml.safe_load((experiment_dir / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    a = raw.get("analysis") if isinstance(raw, dict) else None
    return a if isinstance(a, dict) else {}


def build_claims(experiment_dir: str | Path, metric: str | None = None, out_dir: str | Path | None = None,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[pd.DataFrame, list[Path]]:
    """(Re)build the claims report of a finished experiment from its files alone (no Ray, no MLflow).

    Reads the records (``trainables.records``), recomputes the performance and indicator tables as
    ``run_analysis`` does, and writes ``claims.csv`` / ``claims.md`` under ``out_dir`` (default
    ``<experiment_dir>/analysis``); the rest of the analysis is left as it is.

    Args:
        experiment_dir: the experiment folder (holding ``records/``).
        metric: default the frozen spec's ``analysis.metric``, else ``iou_3d``.
        out_dir: where to write.
        n_resamples, seed: the run-level bootstrap's.

    Returns:
        ``(claims, [claims.csv, claims.md])``.

    Raises:
        FileNotFoundError: no records under ``experiment_dir`` (the message names the folder and the fix).
        ValueError: an unknown metric (the message lists the valid ones), or records without OOD evaluations.
    """
    from analysis.agreement import agreement_matrices
    from analysis.aline import aline_table
    from analysis.indicators import indicator_table
    from analysis.run import _check_records, site_roles
    from analysis.performance import check_metric, performance_table
    from analysis.uncertainty_indicators import uncertainty_indicator_frame
    from trainables.records import load_records, load_uncertainty, records_dir

    experiment_dir = Path(experiment_dir)
    spec = _spec_analysis(experiment_dir)
    metric = check_metric(metric or str(spec.get("metric") or "iou_3d"))
    floor = spec.get("degenerate_floor", 0.01)
    _check_records(experiment_dir)
    members, slices = load_records(experiment_dir)
    perf = performance_table(members, slices, metric)
    if perf.empty:
        raise ValueError(f"records in {records_dir(experiment_dir)} hold no OOD (target-site) evaluations: nothing "
                         f"to report; run the pool stage with data.targets set")
    free = sorted(perf.loc[~perf["oracle_prompt"].astype(bool), "member_id"].astype(str).unique())
    agreement = agreement_matrices(experiment_dir, free, site_roles(slices), metric=metric.removesuffix("_micro"))
    agreement = agreement if agreement.matrices else None
    unc = load_uncertainty(experiment_dir)
    ua = uncertainty_indicator_frame(unc) if unc is not None and (unc["method"] == "ggd").any() else None
    table = indicator_table(perf[perf["member_id"].astype(str).isin(free)], agreement, ua) if free else None
    fits = aline_table(table, agreement)[1] if table is not None and agreement is not None else []
    claims = claims_table(perf, table, agreement, unc, fits, n_resamples=n_resamples, seed=seed,
                          floor=None if floor is None else float(floor),
                          sam_members=sam_members_of(experiment_dir) if unc is not None else None)
    out = Path(out_dir) if out_dir is not None else experiment_dir / "analysis"
    return claims, write_claims(claims, out, experiment_dir.name, metric, n_resamples,
                                None if floor is None else float(floor))
