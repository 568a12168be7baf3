"""The claims report's decision rule and the shape of its rows (``analysis.claims``).

A claim's statistic gets a 95% bootstrap interval over training runs (``analysis.correlate``'s
bootstrap); :func:`decide` turns the interval into a verdict by the rule :func:`rule_text` states, and
:func:`claim_row` is one row of ``claims.csv`` (``CLAIM_COLUMNS``).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.correlate import MIN_POINTS, N_RESAMPLES, run_bootstrap

#: |r| below this is "weak", at or above it "strong" (C2, C3: weak; C4: strong and negative).
WEAK = 0.5

REPRODUCED, REFUTED, INCONCLUSIVE, NOT_TESTABLE, NO_VERDICT = (
    "reproduced", "refuted", "inconclusive", "not testable", "–")

#: Columns of ``claims.csv``. ``kind``: ``claim`` (the paper's), ``extra`` (another indicator, not a
#: claim), ``project`` (the project's own questions); ``scope``: ``overall`` or a target site;
#: ``side``: the claim's side of the threshold (see ``SIDES``); ``unit``: what the bootstrap resampled.
#: ``scale``: ``probit`` or ``raw`` for C2/C3 (the probit row decides; ``rule_text``), empty elsewhere.
#: ``*_nondegenerate``: the same statistic without the degenerate members (C2–C4's overall rows; the same
#: values where the pool has none), and its verdict.
CLAIM_COLUMNS = ["claim", "kind", "scope", "claim_text", "statistic", "value", "ci_low", "ci_high", "side", "members",
                 "n_members", "n_units", "unit", "verdict", "note", "scale", "value_nondegenerate",
                 "ci_low_nondegenerate", "ci_high_nondegenerate", "n_members_nondegenerate", "verdict_nondegenerate"]

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


def rule_text(n_resamples: int = N_RESAMPLES, floor: float | None = None, probit_clip: str = "") -> str:
    """The decision rule as the report states it (``probit_clip``: the clip in words; "" without a probit scale)."""
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
    return (f"**Decision rule.** Every interval is a 95% bootstrap interval ({n_resamples} resamples, BCa where "
            f"defined, else percentile) that resamples **training runs** (`run_id`: a run's snapshot members move "
            f"together; C1 resamples each architecture's runs separately). A claim is **reproduced** when the whole "
            f"interval lies on the claim's side of its threshold, **refuted** when the whole interval lies on the "
            f"other side, **inconclusive** when it straddles the threshold or no interval exists (fewer than "
            f"{MIN_POINTS} runs, or fewer than 2 runs per architecture for C1). Thresholds: \"weak\" = |r| < {WEAK:g}, "
            f"\"strong\" = |r| ≥ {WEAK:g} (Pearson r; C2 and C3 on the scale their row names, C4 on the raw scores); C1: SAM drop − CNN drop < 0 pp; C5: δ's "
            f"error − the best baseline's < 0. The overall row of a claim is its verdict; per-target rows use the "
            f"same rule and are given for reading. Other indicators and the project's rows use the same rule on "
            f"their column `side` (holds / does not hold / inconclusive).{scales}{deg}")


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
              members: str, n_members: int, n_units: int, unit: str, note: str = "", text: str | None = None) -> dict:
    """One row of ``claims.csv`` (``CLAIM_COLUMNS``), its verdict decided from [lo, hi] by ``decide``."""
    verdict = decide(float(lo), float(hi), side)
    if kind != "claim":
        verdict = NOT_CLAIM_WORDS.get(verdict, verdict)
    return {"claim": claim, "kind": kind, "scope": scope, "claim_text": text or CLAIM_TEXT.get(claim, ""),
            "statistic": statistic, "value": float(value), "ci_low": float(lo), "ci_high": float(hi),
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
