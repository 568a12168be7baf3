"""The probit scale's clip: how far from 0 and 1 a score is held before its probit is taken.

The probit Φ⁻¹ is infinite at 0 and 1, so every probit-scale result (the fits of ``correlations.csv``,
Baek et al.'s lines, ALine, the leave-one-target-out estimates, Fig. 4, the probit rows of C2/C3) clips
a score ``p`` to ``[clip, 1 − clip]`` first. The clip sets where a member that got nothing (or
everything) right lands, and such members can set a slope by themselves, so it is a setting of the
analysis, stated wherever the probit scale is used (``analysis.probit_clip`` in the spec,
``--probit-clip`` on the command line):

* ``auto`` (default): **half a case**, ``1 / (2 n)`` with ``n`` the number of test cases the score
  averages over on that site (the source's test split for the ID axis, the target's cases for the OOD
  axis): a member with 0 of ``n`` cases right is read as if it had half a case right, the usual
  continuity correction of a proportion of ``n``, and the clip follows the evidence a site gives;
* a number in (0, 0.5): that clip on every site.

An axis measured on a site with unknown cases, or with a single case (half of it would clip every score to
0.5, a probit of 0), falls back to ``FALLBACK`` (and says so where the clip is stated).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

#: The spec key (and the name every error gives).
KEY = "analysis.probit_clip"
#: The default setting: half a case of each site.
AUTO = "auto"
#: The clip of a site whose number of cases is unknown (the analysis's clip before the setting existed).
FALLBACK = 1e-3


def check_probit_clip(value: object, where: str = KEY) -> str | float:
    """``"auto"`` or a float in (0, 0.5); else a ValueError naming ``where``, the value and the fix."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return AUTO
    try:
        v = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and 0.0 < v < 0.5):
        raise ValueError(f"{where}: {value!r} is not a probit clip; give 'auto' (half a case of each site: "
                         f"1/(2 x its number of test cases)) or a number strictly between 0 and 0.5, e.g. 0.001")
    return v


def half_case(n_cases: int | float | None) -> float:
    """``1 / (2 n)``: half a case of a site with ``n`` test cases (``FALLBACK`` when ``n`` is unknown or 1)."""
    if n_cases is None or not math.isfinite(float(n_cases)) or n_cases < 2:
        return FALLBACK
    return 1.0 / (2.0 * float(n_cases))


def site_cases(slices: pd.DataFrame | None) -> dict[str, int]:
    """Site -> the number of test cases its scores average over (distinct ``case_id`` of its ``id`` / ``ood``
    rows in the slice records; the validation split is not a test split and is left out)."""
    if slices is None or slices.empty or not {"site", "role", "case_id"} <= set(slices.columns):
        return {}
    test = slices[slices["role"].isin(("id", "ood"))]
    return {str(s): int(n) for s, n in test.groupby(test["site"].astype(str))["case_id"].nunique().items()}


def site_clips(setting: str | float | None, cases: Mapping[str, int]) -> dict[str, float]:
    """Site -> its clip under ``setting`` (``check_probit_clip``'s), for every site of ``cases``."""
    s = check_probit_clip(setting)
    return {site: (half_case(n) if s == AUTO else float(s)) for site, n in cases.items()}


class Clips:
    """The clips of one experiment: ``clip(site)`` for an axis measured on ``site``, and how to state them."""

    def __init__(self, setting: str | float | None = AUTO, cases: Mapping[str, int] | None = None):
        self.setting = check_probit_clip(setting)
        self.cases = dict(cases or {})
        self.by_site = site_clips(self.setting, self.cases)

    def clip(self, site: object) -> float:
        """The clip of an axis measured on ``site`` (``FALLBACK`` for an unknown site under ``auto``)."""
        if self.setting != AUTO:
            return float(self.setting)
        return self.by_site.get(str(site), FALLBACK)

    def pair(self, x_site: object, y_site: object) -> tuple[float, float]:
        """``(clip of the x axis, clip of the y axis)``."""
        return self.clip(x_site), self.clip(y_site)

    def text(self, sites: list[str] | None = None) -> str:
        """The clip in words, for a table's footnote or a plot's caption."""
        if self.setting != AUTO:
            return f"probit clip {float(self.setting):g} (analysis.probit_clip)"
        sites = list(sites) if sites is not None else list(self.by_site)
        groups: dict[str, list[str]] = {}  # sites that share a clip (and its reason) named together
        for s in sites:
            n = self.cases.get(s, 0)
            why = (f"1/(2·{n})" if n >= 2 else "1 case: too few, the fallback" if s in self.cases
                   else "cases unknown: the fallback")
            groups.setdefault(f"{self.clip(s):.3g} ({why})", []).append(s)
        parts = [f"{k} on {', '.join(v)}" for k, v in groups.items()]
        return "probit clip: half a case of each site, " + ("; ".join(parts) if parts else "no site") + \
            " (analysis.probit_clip: auto)"

    def short(self, site: object) -> str:
        """``clip 0.05`` for an axis label."""
        return f"clip {self.clip(site):.3g}"


def probit_scaled(values: np.ndarray, clip: float | np.ndarray) -> np.ndarray:
    """``Φ⁻¹(clip(values, clip, 1 − clip))`` as ``analysis.correlate.probit``, the clip broadcast (one per column
    of a member x target matrix)."""
    c = np.asarray(clip, dtype=float)
    return stats.norm.ppf(np.clip(np.asarray(values, dtype=np.float64), c, 1.0 - c))


def axis_site(column: str, source: object, target: object) -> str:
    """The site an indicator column is measured on: the source for the ID columns (``id_score``,
    ``id_agreement``), the target for the others (OOD scores, OOD agreement, δ's readings on the target)."""
    return str(source) if str(column).startswith("id_") else str(target)


#: Columns that state the probit clip of each axis (``correlations.csv``, ``lines.csv``, ``aline.csv``).
CLIP_COLUMNS = ["probit_clip_x", "probit_clip_y"]


# --- the claims' two scales (``analysis.claim_stats``: C2 and C3 on the raw and the probit scale) ---------

#: The scales C2 and C3 are read on; the probit scale decides (the paper reads accuracy and agreement on
#: the line on probit axes, its Fig. 4), the raw scale is reported beside it.
SCALES = ("probit", "raw")


def clips_or_default(clips) -> Clips:
    """``clips``, or the fallback clip on every site where None."""
    return clips if clips is not None else Clips(FALLBACK)


def scale_words(scale: str | None) -> str:
    """The words a row's statistic gets for its scale (``""`` for None: no scale named)."""
    return "" if scale is None else f", {scale} scale"


def scale_table(table: pd.DataFrame, column: str, scale: str | None, clips=None) -> pd.DataFrame:
    """``table`` with ``column`` and ``ood_score`` on ``scale`` (``"probit"``: each row's probit with its axis's
    clip, ``axis_site``; None or ``"raw"``: unchanged)."""
    if scale in (None, "raw"):
        return table
    if scale != "probit":
        raise ValueError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    c = clips_or_default(clips)
    src = table["source"].astype(str) if "source" in table.columns else table["target"].astype(str)
    tgt = table["target"].astype(str)
    ex = np.array([c.clip(axis_site(column, s, t)) for s, t in zip(src, tgt)], dtype=float)
    ey = np.array([c.clip(t) for t in tgt], dtype=float)
    out = table.copy()
    out[column] = probit_scaled(table[column].to_numpy(dtype=float), ex)
    if column != "ood_score":
        out["ood_score"] = probit_scaled(table["ood_score"].to_numpy(dtype=float), ey)
    return out


def scale_matrices(matrices: Mapping[str, np.ndarray], sites: list[str], scale: str | None,
                   clips=None) -> dict[str, np.ndarray]:
    """Each site's ``M x M`` agreement on ``scale`` (``"probit"``: with the site's clip)."""
    if scale in (None, "raw"):
        return {s: matrices[s] for s in sites}
    if scale != "probit":
        raise ValueError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    c = clips_or_default(clips)
    return {s: probit_scaled(matrices[s], c.clip(s)) for s in sites}


def with_scale(rows: list[dict], scale: str | None) -> list[dict]:
    """The rows with their ``scale`` (in place; None leaves them without one)."""
    for r in rows:
        if scale is not None:
            r["scale"] = scale
    return rows
