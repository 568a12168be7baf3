"""Table 4 of the paper: the uncertainty methods by the squared error between their uncertain masks and the
member's error masks (docs/architecture.md "Uncertainty", "Analysis"), computed from the uncertainty records and
laid out as a table.

Table 4 is the analysis's alone: the driver does not write it (``analysis/table4.csv`` and
``table4_readings.csv`` are written by ``analysis.uncertainty_indicators.uncertainty_sections``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.tables import fmt, markdown_table
from analysis.uncertainty_cases import case_sums, mean_over_images

#: Table 4's readings of the paper's "MSE between the uncertainty values and the actual errors".
TABLE4_READINGS = ("area", "pixel")


def table4(unc: pd.DataFrame, by: list[str] | tuple[str, ...] = ("method", "site"), reading: str = "area") -> pd.Series:
    """Table 4: the mean over images of a squared error between the uncertain mask and the error mask.

    ``unc``: the uncertainty slice records, or their case sums (``analysis.uncertainty_cases``).

    ``reading="area"``: (uncertain-area fraction - pixel-error fraction)^2 per image (where they are
    does not count); ``"pixel"``: the pixel-wise MSE between the binary uncertain mask and the binary
    error mask, (uncertain_px + error_px - 2 uncertain_error_px) / area_px per image (location counts).

    Only members scored by every method present are counted, so that the methods are compared on
    the same images (the baselines may run on a subset of the pool: uncertainty.baseline_members).
    """
    if reading not in TABLE4_READINGS:
        raise ValueError(f"unknown Table 4 reading {reading!r}; valid: {', '.join(TABLE4_READINGS)}")
    cs = case_sums(unc)  # per case: the sums of the squared errors over its images (the records may be per slice)
    methods = cs.groupby("member_id", observed=True)["method"].nunique()
    scored = cs["member_id"].isin(methods[methods == cs["method"].nunique()].index)
    if not scored.all():
        cs = cs[scored.to_numpy(dtype=bool)]
    out = mean_over_images(cs, f"sq_{reading}", [cs[c] for c in by])
    out.name = "mse"
    return out


#: Row labels of Table 4 (the paper's names for the uncertainty methods).
METHOD_LABELS = {"ggd": "Ours (GGD δ on {ŷ, x})", "bayescap": "BayesCap (as published, on ŷ)", "tta_noise": "TTDAp",
                 "tta_color": "TTDAc", "mc_dropout": "DropOut", "ggd_yhat_only": "Ablation: our δ on ŷ only"}


def table4_frame(mse: pd.Series, site_roles: dict[str, str], source: str) -> pd.DataFrame:
    """Table 4 as numbers: one row per uncertainty method, one column per setting.

    Args:
        mse: ``table4(unc)`` (indexed by method, site).
        site_roles: site -> role (``"id"`` / ``"ood"``); OOD sites become ``S → T`` columns, the
            ID site a ``S (same)`` column after them.
        source: the source site's name for the column labels.

    Returns:
        Columns ``method, label`` then one float column per setting; methods in the order of
        ``METHOD_LABELS`` (unknown ones after).
    """
    wide = mse.unstack("site")
    sites = [s for s, r in site_roles.items() if r == "ood" and s in wide.columns]
    sites += [s for s, r in site_roles.items() if r == "id" and s in wide.columns]
    sites += [s for s in wide.columns if s not in sites]
    order = [m for m in METHOD_LABELS if m in wide.index] + sorted(m for m in wide.index if m not in METHOD_LABELS)
    wide = wide.reindex(index=order, columns=sites)
    wide.columns = [f"{source} → {s}" if site_roles.get(s) == "ood" else f"{s} (same)" for s in sites]
    out = wide.reset_index().rename(columns={"index": "method"})
    out.insert(1, "label", [METHOD_LABELS.get(m, m) for m in out["method"]])
    return out


def table4_markdown(t4: pd.DataFrame, n_members: int | None = None, caption: str | None = None) -> str:
    """Table 4 in markdown: MSE with three decimals (or 3 significant digits when small), the smallest
    per column in bold; ``n_members``: how many members the uncertainty records cover; ``caption``
    replaces the default caption (the area reading)."""
    cols = [c for c in t4.columns if c not in ("method", "label")]
    values = t4[cols].to_numpy(dtype=float) if cols else np.zeros((0, 0))
    finite = values[np.isfinite(values)]
    # three decimals as in the paper, unless an MSE is so small that they would show 0.000
    spec = ".3f" if finite.size == 0 or finite[finite > 0].min(initial=1.0) >= 0.01 else ".2e"
    shown = pd.DataFrame({"method": t4["label"]})
    for c in cols:
        v = t4[c].astype(float)
        best = v.min(skipna=True)
        shown[c] = [("**" + fmt(x, spec) + "**") if math.isfinite(x) and x == best else fmt(x, spec) for x in v]
    caption = ("**Table 4.** Uncertainty methods by the mean squared error between each image's uncertain-area "
               "fraction (Otsu threshold of the method's per-pixel map) and its error fraction (fp + fn of the "
               "frozen member), averaged over every image of every pool member with uncertainty records"
               + (f" ({n_members})" if n_members is not None else "") + ". Smaller is better; the best per column "
               "in bold; n/a: the method did not score that split.") if caption is None else caption
    return caption + "\n\n" + markdown_table(shown)
