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
CLAIM_COLUMNS = ["claim", "kind", "scope", "claim_text", "statistic", "value", "ci_low", "ci_high", "ci_runs_low",
                 "ci_runs_high", "interval", "side", "members", "n_members", "n_units", "unit", "verdict", "note"]

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


def rule_text(n_resamples: int = N_RESAMPLES, floor: float | None = None, two_level: bool = True) -> str:
    """The decision rule as the report states it. ``two_level``: whether the rows carry the two-level interval
    (False: the report was built without per-case records, and every interval is over runs only)."""
    deg = ("" if floor is None else
           f" Members below the degenerate floor ({floor:g}) on an axis predict almost nothing and can make a "
           f"correlation by themselves: C2, C3 and C4 are repeated without them (`overall (non-degenerate)`), and a "
           f"verdict that differs without them is reported as **inconclusive**.")
    runs = (f"**{RUNS}**: the run-level bootstrap, which resamples **training runs** (`run_id`: a run's snapshot "
            f"members move together; C1 resamples each architecture's runs separately; BCa where defined, else "
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
    return (f"**Decision rule.** Every interval is a 95% bootstrap interval ({n_resamples} resamples). {which} "
            f"A claim is **reproduced** when the whole "
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


def members_label(n: int, units: int, unit: str, who: str = "label-free") -> str:
    """The ``members`` cell of a row: who, how many members, how many resampled units."""
    return f"{who}: {n} members, {units} {unit}s"
