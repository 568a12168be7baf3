"""Metrics from the records' confusion counts: every stage aggregates the same counts the same way.

They live beside the schema because every stage (the trial's per-epoch report, the analysis)
must aggregate the same counts the same way (the counts themselves: ``trainables.metrics``).
Conventions (checked against MONAI in tests):

* ``dice_2d``: mean over slices whose ground truth is non-empty of 2tp / (2tp + fp + fn)
  (MONAI ``DiceMetric(ignore_empty=True)`` leaves empty-truth slices out of the mean);
* ``iou_3d``: per case TP / (TP + FP + FN) over all its slices; mean over cases;
* ``dice_global``: 2 TP / (2 TP + FP + FN) summed over every slice of the split.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .schema import LABEL_COLUMN

#: The metrics of the records (and of the analysis), per the conventions above.
METRICS = ("iou_3d", "dice_2d", "dice_global")
#: The same metrics on the counts summed over the label channels (the micro average) first.
MICRO_METRICS = tuple(f"{m}_micro" for m in METRICS)
#: Every name ``metric_by`` takes.
ALL_METRICS = METRICS + MICRO_METRICS
#: The surface metrics of the surface records (``surface_by``): HD95 in mm (lower is better) and NSD in [0, 1].
SURFACE_METRICS = ("hd95", "nsd")
#: Metrics whose lower values are better (the analysis scores them negated: docs/statistics.md).
LOWER_IS_BETTER = ("hd95",)
#: The column of the surface records each surface metric reads.
SURFACE_VALUE = {"hd95": "hd95_mm", "nsd": "nsd"}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def metric_by(slices: pd.DataFrame, metric: str, by: list[str] | tuple[str, ...] = ("member_id", "site")) -> pd.Series:
    """Aggregate per-slice confusion counts into ``metric`` per group of ``by`` columns.

    Multi-label records (a ``label`` column with more than one value): ``metric`` is computed per
    label and averaged over the labels where it is defined, as MONAI's ``DiceMetric`` averages per
    channel (``reduction="mean_batch"`` then the mean over channels); a missed 10-pixel lesion beside
    a perfect 1000-pixel one then scores 0.5, not 0.995. ``<metric>_micro`` sums the labels' counts
    per slice first (one pooled mask).

    Args:
        slices: rows with at least ``by``, ``case_id``, ``tp``, ``fp``, ``fn`` (and optionally ``label``).
        metric: one of ``ALL_METRICS``.
        by: grouping columns (default one value per member and site).

    Returns:
        A Series indexed by ``by`` with values in [0, 1] (NaN where undefined).
    """
    by = list(by)
    if metric not in ALL_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(ALL_METRICS)}")
    multi = LABEL_COLUMN in slices.columns and LABEL_COLUMN not in by and slices[LABEL_COLUMN].nunique() > 1
    if metric.endswith("_micro"):
        metric = metric[: -len("_micro")]
        if multi:
            keys = [c for c in slices.columns if c not in ("tp", "fp", "fn", "tn", "area_px", LABEL_COLUMN)]
            slices = slices.groupby(keys, sort=False, dropna=False)[["tp", "fp", "fn"]].sum().reset_index()
        out = metric_by(slices, metric, by)
        out.name = f"{metric}_micro"
        return out
    if multi:
        per_label = metric_by(slices, metric, by + [LABEL_COLUMN])
        out = per_label.groupby(level=list(range(len(by)))).mean()  # NaN (lesion absent) left out
        out.name = metric
        return out
    if metric == "dice_2d":
        s = slices[slices["tp"] + slices["fn"] > 0]
        per = pd.Series(_ratio(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"]), index=s.index)
        out = per.groupby([s[c] for c in by]).mean()
    elif metric == "iou_3d":
        case = slices.groupby(by + ["case_id"])[["tp", "fp", "fn"]].sum()
        case = case[case["tp"] + case["fn"] > 0]
        per = pd.Series(_ratio(case["tp"], case["tp"] + case["fp"] + case["fn"]), index=case.index)
        out = per.groupby(level=list(range(len(by)))).mean()
    else:  # dice_global
        tot = slices.groupby(by)[["tp", "fp", "fn"]].sum()
        out = pd.Series(_ratio(2 * tot["tp"], 2 * tot["tp"] + tot["fp"] + tot["fn"]), index=tot.index)
    out.name = metric
    return out


def uncertain_area(unc: pd.DataFrame, method: str = "ggd",
                   by: list[str] | tuple[str, ...] = ("member_id", "site")) -> pd.Series:
    """A model's uncertainty score on a split: the mean over its images of uncertain_px / area_px."""
    u = unc[unc["method"] == method]
    frac = u["uncertain_px"] / u["area_px"]
    out = frac.groupby([u[c] for c in by]).mean()
    out.name = "uncertain_area"
    return out


def surface_by(surface: pd.DataFrame, metric: str, by: list[str] | tuple[str, ...] = ("member_id", "site")) -> pd.Series:
    """The surface records' ``metric`` per group of ``by``: the mean over cases, per label, then over labels.

    A case whose prediction and truth are both empty (NaN: the label is absent there) is left out of the
    mean, as ``dice_2d`` leaves out slices without foreground; a case with one empty mask counts with its
    recorded worst value (HD95: the volume's diagonal; NSD: 0). ``hd95`` is in mm (lower is better).

    Args:
        surface: rows of ``SURFACE_COLUMNS`` (at least ``by``, ``label`` and the metric's column).
        metric: one of ``SURFACE_METRICS``.
        by: grouping columns.

    Returns:
        A Series indexed by ``by``, named ``metric`` (NaN where no case has a value).
    """
    by = list(by)
    if metric not in SURFACE_METRICS:
        raise ValueError(f"unknown surface metric {metric!r}; valid: {', '.join(SURFACE_METRICS)}")
    per_label = surface.groupby(by + [LABEL_COLUMN], sort=False)[SURFACE_VALUE[metric]].mean()  # NaN skipped
    out = per_label.groupby(level=list(range(len(by))), sort=False).mean()
    out.name = metric
    return out
