"""The claims report's decision rule and the shape of its rows (``analysis.claims``).

A claim's statistic gets a 95% bootstrap interval: over training runs and the sites' test cases
(``analysis.case_bootstrap``, the default where the statistic is recomputable from per-case records),
and over training runs alone (``analysis.correlate``'s bootstrap, given beside it);
:func:`decide` turns the default interval into a verdict by the rule :func:`rule_text` states, and
:func:`claim_row` is one row of ``claims.csv`` (``CLAIM_COLUMNS``).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.case_bootstrap import RUNS, RUNS_X_CASES
from analysis.correlate import MIN_POINTS, N_RESAMPLES, run_bootstrap
from analysis.run_intervals import MIN_RUNS

#: |r| below this is "weak", at or above it "strong" (C2, C3: weak; C4: strong and negative).
WEAK = 0.5

REPRODUCED, REFUTED, INCONCLUSIVE, NOT_TESTABLE, NO_VERDICT = (
    "reproduced", "refuted", "inconclusive", "not testable", "–")

#: Columns of ``claims.csv``. ``kind``: ``claim`` (the paper's), ``extra`` (another indicator, not a
#: claim), ``project`` (the project's own questions); ``scope``: ``overall`` or a target site;
#: ``side``: the claim's side of the threshold (see ``SIDES``); ``unit``: what the run-level bootstrap resampled.
#: ``ci_low``/``ci_high``: the interval the verdict is decided on, of the kind ``interval`` names
#: (``"runs × cases"``: the two-level bootstrap, ``analysis.case_bootstrap``; ``"runs"``: training runs only);
#: ``ci_runs_low``/``ci_runs_high``: the run-level interval (the same as ``ci_low``/``ci_high`` where
#: ``interval`` is ``"runs"``).
#: ``scale``: ``probit`` or ``raw`` for C2/C3 (the probit row decides; ``rule_text``), empty elsewhere.
#: ``*_nondegenerate``: the same statistic without the degenerate members (C2–C4's overall rows; the same
#: values where the pool has none), and its verdict.
CLAIM_COLUMNS = ["claim", "kind", "scope", "claim_text", "statistic", "value", "ci_low", "ci_high", "ci_runs_low",
                 "ci_runs_high", "interval", "side", "members", "n_members", "n_units", "unit", "verdict", "note",
                 "scale", "value_nondegenerate", "ci_low_nondegenerate", "ci_high_nondegenerate",
                 "n_members_nondegenerate", "verdict_nondegenerate"]

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

#: C1's caveat, in its note and in the report's words (``arch``: the SAM-family architecture).
ORACLE_CAVEAT = ("evaluation of {arch} is oracle-prompted (each slice's ground-truth box as its prompt, which no "
                 "other architecture gets), as in the paper, so part of its smaller drop is by construction")

#: Methods of the uncertainty records that are not baselines of C5 (our own ablation of δ).
NOT_BASELINES = ("ggd", "ggd_yhat_only")


def rule_text(n_resamples: int = N_RESAMPLES, floor: float | None = None, probit_clip: str = "",
              two_level: bool = True) -> str:
    """The decision rule as the report states it. ``probit_clip``: the clip in words ("" without a probit scale);
    ``two_level``: whether the rows carry the two-level interval (False: the report was built without per-case
    records, and every bootstrap interval is over runs only)."""
    deg = ("" if floor is None else
           f" Members below the degenerate floor ({floor:g}) on an axis predict almost nothing and can make a "
           f"correlation by themselves: the overall rows of C2, C3 and C4 give the same statistic without them "
           f"(columns `*_nondegenerate`), and a verdict that differs without them is reported as **inconclusive**.")
    scales = ("" if not probit_clip else
              f" **Scales.** C2 and C3 are computed on two scales, a row each: the **probit** scale (Φ⁻¹ of each "
              f"score and agreement) **decides**, because the paper reads accuracy and agreement on the line on "
              f"probit axes (its Fig. 4; Miller et al. and Baek et al. define the lines there); the **raw** scale "
              f"(`overall (raw scale)`) is reported beside it, and its verdict is for reading. The probit scale "
              f"clips a score to [clip, 1 − clip] first; {probit_clip}.")
    runs = (f"**{RUNS}**: the run-level bootstrap, which resamples **training runs** (`run_id`: a run's snapshot "
            f"members move together; BCa where defined, else "
            f"percentile)")
    if two_level:
        which = (f"The default interval, **{RUNS_X_CASES}**, is a two-level bootstrap: each resample draws the "
                 f"training runs with replacement (a run's snapshot members move together), then each site's test "
                 f"cases with replacement (one draw per site, shared by every member: all are scored on the same "
                 f"cases), recomputes every member's site scores from the drawn cases exactly as the metric forms "
                 f"them, and the statistic from those; its interval is the percentile interval. It decides C2 (ID "
                 f"and OOD scores both recomputed), C4 (OOD score and δ's uncertain area, whose records are per "
                 f"image, on the same case draw), their per-target rows, the other indicators' rows (δ's other "
                 f"readings are recomputed from the drawn cases too; the agreement indicators, whose records are per "
                 f"site, keep their recorded values and only the OOD scores' cases are drawn: the row's note says so) "
                 f"and the ALine-S error (ID and OOD scores; its agreement line from the runs "
                 f"only). Beside it, {runs}. C3 has the run-level interval only, and it decides C3: the agreement "
                 f"records are sums per site (one member x member matrix per site), so a case draw cannot be "
                 f"applied to them. C1, C5 and the selection rows keep their own intervals (the column `interval` "
                 f"says which kind decides each row).")
    else:
        which = (f"No per-case records were read for this report: every interval is {runs}, which treats each "
                 f"member's site score as exact (the sites' few test cases are not resampled).")
    return (f"**Decision rule.** C2, C3, C4 and the other rows: a 95% bootstrap interval ({n_resamples} "
            f"resamples). {which} C1 and C5 compare arms of a few runs each, where a bootstrap is "
            f"the range of a few values and covers less than it says: their interval is Student's t over the "
            f"**runs' means** (C1: Welch's t interval of SAM's run drops against each other architecture's; C5: "
            f"the one-sample t interval of the runs' δ − baseline differences, δ and the baselines scoring the "
            f"same runs), and needs at least {MIN_RUNS} runs per arm (with 2, an arm's spread rests on one degree "
            f"of freedom and the interval's coverage falls below 95% when that arm is the noisier one). Their "
            f"overall row is the worst case (C1: the largest SAM − other difference; C5: δ − the best baseline), "
            f"its interval [largest lower end, largest upper end] of the per-comparison intervals at the "
            f"Bonferroni level 1 − 0.05/K (K comparisons), which covers the worst case with probability ≥ 95%. A "
            f"claim is **reproduced** when the whole interval lies on the claim's side of its threshold, "
            f"**refuted** when the whole interval lies on the other side, **inconclusive** when it straddles the "
            f"threshold or no interval exists (fewer than {MIN_POINTS} runs for a bootstrap, fewer than "
            f"{MIN_RUNS} runs per arm for C1 and C5: the row says how many more runs would give one). "
            f"Thresholds: \"weak\" = |r| < {WEAK:g}, \"strong\" = |r| ≥ {WEAK:g} (Pearson r; C2 and C3 on the "
            f"scale their row names, C4 on the raw scores); "
            f"C1: SAM drop − CNN drop < 0 pp; C5: δ's error − the best baseline's < 0. C1's SAM family is "
            f"evaluated oracle-prompted (ground-truth box per slice): part of its advantage is by construction. "
            f"The overall row of a claim is its verdict; per-target rows use the same rule and are given for "
            f"reading. Other indicators and the project's rows use the same rule on their column `side` (holds / "
            f"does not hold / inconclusive). \"Computed on\" gives the members each target's statistic used (a "
            f"range, per target, where targets differ).{scales}{deg}")


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


def claim_row(claim: str, kind: str, scope: str, statistic: str, value: float, lo: float, hi: float, side: str,
              members: str, n_members: int, n_units: int, unit: str, note: str = "", text: str | None = None,
              runs_lo: float | None = None, runs_hi: float | None = None, interval: str = RUNS) -> dict:
    """One row of ``claims.csv`` (``CLAIM_COLUMNS``), its verdict decided from [lo, hi] by ``decide``.

    ``interval``: the kind of [lo, hi] (``RUNS`` or ``RUNS_X_CASES``); ``runs_lo``/``runs_hi``: the run-level
    interval beside it (None: [lo, hi] is the run-level one)."""
    verdict = decide(float(lo), float(hi), side)
    if kind != "claim":
        verdict = NOT_CLAIM_WORDS.get(verdict, verdict)
    return {"claim": claim, "kind": kind, "scope": scope, "claim_text": text or CLAIM_TEXT.get(claim, ""),
            "statistic": statistic, "value": float(value), "ci_low": float(lo), "ci_high": float(hi),
            "ci_runs_low": float(lo if runs_lo is None else runs_lo),
            "ci_runs_high": float(hi if runs_hi is None else runs_hi), "interval": interval,
            "side": SIDES[side][0], "members": members, "n_members": int(n_members), "n_units": int(n_units),
            "unit": unit, "verdict": verdict, "note": note}


def untestable_row(claim: str, why: str, kind: str = "claim", statistic: str = "", text: str | None = None) -> dict:
    """A "not testable" row: the claim's input is missing, and ``why`` (its note) says which."""
    row = claim_row(claim, kind, "overall", statistic, math.nan, math.nan, math.nan, "none", "", 0, 0, "", why, text)
    row["verdict"] = NOT_TESTABLE
    return row


def point_value(stat: Callable[..., np.ndarray], n_units: int | tuple[int, ...]) -> float:
    """A bootstrap statistic evaluated on the sample itself (every unit once)."""
    sizes = (n_units,) if np.ndim(n_units) == 0 else tuple(n_units)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.asarray(stat(*(np.arange(n)[None] for n in sizes), axis=-1)).ravel()[0])


def run_interval(stat, n_units, n_resamples: int, seed: int) -> tuple[float, float]:
    """The 95% run-level bootstrap interval of one statistic (``analysis.correlate.run_bootstrap``)."""
    lo, hi = run_bootstrap(stat, n_units, n_resamples, seed, n_stats=1)
    return float(lo[0]), float(hi[0])


# --- the member x target matrices the statistics read ------------------------------------------

def wide_values(table: pd.DataFrame, column: str, members: list[str], targets: list[str]) -> np.ndarray:
    """``M x T`` values of ``column`` (NaN where missing), rows in ``members`` order."""
    w = table.pivot_table(index="member_id", columns="target", values=column, aggfunc="first", dropna=False)
    return w.reindex(index=members, columns=targets).to_numpy(dtype=float)


def members_label(n, units, unit: str, who: str = "label-free") -> str:
    """The ``members`` cell of a row: who, how many members, how many resampled units.

    ``n`` and ``units``: a count, or the counts per target (one per target the statistic reads); counts
    that differ between targets are given as their range, "per target"."""
    def count(v, word: str) -> str:
        vs = [int(x) for x in np.ravel(v)] if np.ndim(v) else [int(v)]
        lo, hi = (min(vs), max(vs)) if vs else (0, 0)
        return f"{lo} {word}" if lo == hi else f"{lo}–{hi} {word} per target"
    return f"{who}: {count(n, 'members')}, {count(units, unit + 's')}"


def target_counts(table: pd.DataFrame, targets: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Per target (``targets`` order, default first seen): the members and the runs of the long ``table``'s
    rows (one per member and target; rows already restricted to those the statistic uses). A member
    without a run id counts as its own run."""
    t = table["target"].astype(str)
    targets = list(dict.fromkeys(t)) if targets is None else targets
    run = table["run_id"].astype(object).where(table["run_id"].notna(), "member:" + table["member_id"].astype(str))
    g = pd.DataFrame({"t": t, "m": table["member_id"].astype(str), "r": run.astype(str)}).groupby("t")
    members, runs = g["m"].nunique(), g["r"].nunique()
    return ([int(members.get(x, 0)) for x in targets], [int(runs.get(x, 0)) for x in targets])


def pair_counts(fx: np.ndarray, fy: np.ndarray, groups) -> tuple[int, int, int]:
    """Of ``M x M`` symmetric pair values on two sites: (members in a pair with both values finite, their
    runs, such pairs). ``groups``: a run id per member (None: the member is its own run)."""
    ok = np.isfinite(fx) & np.isfinite(fy)
    np.fill_diagonal(ok, False)
    used = np.flatnonzero(ok.any(axis=1))
    runs = {str(groups[i]) if groups is not None and pd.notna(groups[i]) else f"member:{i}" for i in used}
    return len(used), len(runs), int(np.triu(ok, 1).sum())


def count_text(values, word: str) -> str:
    """``"N word"``, or ``"lo–hi word per target"`` where the per-target counts differ."""
    vs = [int(x) for x in np.ravel(values)] if np.ndim(values) else [int(values)]
    lo, hi = (min(vs), max(vs)) if vs else (0, 0)
    return f"{lo} {word}" if lo == hi else f"{lo}–{hi} {word} per target"
