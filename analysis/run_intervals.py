"""Small-sample intervals over training runs for the claims that compare arms of a few runs (C1, C5).

C1 compares the foundation model's runs with each CNN's runs; C5 compares δ with each baseline on the
same runs. Both have only a handful of runs per arm (the study: 2 or 3), where a run-level bootstrap
is not an interval: with 2 runs an arm's resampled mean takes 3 values, and the "95% interval" is the
range of a few numbers, which covers the true difference far less often than 95%. Here the interval is
Student's t over **run means** instead, whose small-sample coverage is known:

* two independent arms (C1: SAM runs vs a CNN's runs): Welch's t interval of the difference of the
  arms' means (``scipy.stats.ttest_ind(..., equal_var=False).confidence_interval``);
* one arm measured twice (C5: δ and a baseline on the same members, so per run one difference): the
  one-sample t interval of the runs' differences (``scipy.stats.ttest_1samp(...).confidence_interval``).

**At least ``MIN_RUNS`` (3) runs per arm.** With 2 runs an arm's between-run variance rests on one
degree of freedom: Welch's t quantile reaches 12.7 (df = 1) and its coverage depends on which arm is
the noisy one (2 runs against 6 with a 4:1 SD ratio: 90%, not 95%). From 3 runs per arm it stays within
93–97% in the same simulations (``tests/test_interval_coverage.py`` checks 3 and 6 runs).

**The worst case over several comparisons** (C1: SAM against every CNN; C5: δ against every baseline)
is the largest difference, max_k θ_k. Its interval is ``[max_k lo_k, max_k hi_k]`` over the K
comparisons' intervals at the Bonferroni level 1 − 0.05 / K: when every one of them covers its θ_k
(probability ≥ 95% by Bonferroni), max_k θ_k lies between max_k lo_k and max_k hi_k. So "reproduced"
(the whole interval below 0) means every comparison's adjusted upper bound is below 0, and "refuted"
means at least one comparison lies wholly above 0.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

#: Fewest runs per arm for an interval (see the module's docstring for why not 2).
MIN_RUNS = 3
#: Confidence level of the claims' intervals.
LEVEL = 0.95


def _quiet_ci(result, level: float) -> tuple[np.ndarray, np.ndarray]:
    """scipy's interval, without its warning on identical runs (then the interval is the point itself)."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = result.confidence_interval(level)
    return np.asarray(ci.low, dtype=float), np.asarray(ci.high, dtype=float)


def welch_interval(a, b, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t interval of mean(a) − mean(b), the runs along the last axis (batches allowed).

    ``a``, ``b``: run means of the two arms (``... x n_a``, ``... x n_b``). NaN when an arm has fewer
    than ``MIN_RUNS`` runs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(a.shape[-1], b.shape[-1]) < MIN_RUNS:
        shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return np.full(shape, math.nan), np.full(shape, math.nan)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, axis=-1, equal_var=False)
    return _quiet_ci(res, level)


def paired_interval(d, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The one-sample t interval of mean(d), ``d`` the runs' paired differences along the last axis.

    NaN with fewer than ``MIN_RUNS`` runs."""
    d = np.asarray(d, dtype=float)
    if d.shape[-1] < MIN_RUNS:
        return np.full(d.shape[:-1], math.nan), np.full(d.shape[:-1], math.nan)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_1samp(d, 0.0, axis=-1)
    return _quiet_ci(res, level)


def bonferroni_level(k: int, level: float = LEVEL) -> float:
    """Each of ``k`` intervals' level so that all ``k`` cover together with probability ≥ ``level``."""
    return 1.0 - (1.0 - level) / max(int(k), 1)


def worst_case_interval(lows, highs) -> tuple[np.ndarray, np.ndarray]:
    """The interval of max_k θ_k from K intervals (axis 0) at the Bonferroni level: [max lo, max hi].

    NaN where any of them is NaN (a missing comparison could be the worst one)."""
    lows, highs = np.asarray(lows, dtype=float), np.asarray(highs, dtype=float)
    return lows.max(axis=0), highs.max(axis=0)  # NaN propagates through max


def arms_worst_case(first, others, level: float = LEVEL):
    """C1's overall statistic over independent arms: (max_k mean(first) − mean(others[k]), its interval by
    ``worst_case_interval`` of Welch intervals at the Bonferroni level). Runs along the last axis; leading
    axes are a batch of data sets (then each of the three is an array, else a float)."""
    first = np.asarray(first, dtype=float)
    others = [np.asarray(o, dtype=float) for o in others]
    value = np.max([first.mean(-1) - o.mean(-1) for o in others], axis=0)
    lv = bonferroni_level(len(others), level)
    lo, hi = zip(*(welch_interval(first, o, lv) for o in others))
    return _out(value, *worst_case_interval(lo, hi))


def paired_worst_case(diffs, level: float = LEVEL):
    """C5's overall statistic from paired differences ``diffs`` (``... x K x runs``: K comparisons): (max_k of
    the runs' mean difference, its interval by ``worst_case_interval`` of one-sample t intervals at the
    Bonferroni level). Leading axes are a batch of data sets (then arrays, else floats)."""
    diffs = np.asarray(diffs, dtype=float)
    diffs = diffs[None] if diffs.ndim == 1 else diffs
    lo, hi = paired_interval(diffs, bonferroni_level(diffs.shape[-2], level))
    return _out(diffs.mean(-1).max(-1), *worst_case_interval(np.moveaxis(lo, -1, 0), np.moveaxis(hi, -1, 0)))


def _out(*values):
    """Floats for one data set, arrays for a batch."""
    return tuple(float(v) if np.ndim(v) == 0 else np.asarray(v) for v in values)


def runs_short(n_runs: dict[str, int]) -> str:
    """Why there is no interval: which arms have fewer than ``MIN_RUNS`` runs and how many more each needs
    ("" when none)."""
    short = {a: n for a, n in n_runs.items() if n < MIN_RUNS}
    if not short:
        return ""
    return (f"no interval: a small-sample interval needs at least {MIN_RUNS} runs per arm; "
            + ", ".join(f"{a} has {n} ({MIN_RUNS - n} more run{'s' if MIN_RUNS - n != 1 else ''} would give one)"
                        for a, n in short.items()))
