"""Label-free indicators of OOD performance, one value per (pool member, target site) (docs/architecture.md "Analysis").

The registry ``INDICATORS`` names every indicator the analysis knows: which column of the
indicator table holds it, whether a higher value promises a better OOD score, and which records
it needs. ``indicator_table`` joins them to the performance table (one row per member and target).

=================  ============================================================  ==========  =============
indicator          value for member m on target t                                better      needs
=================  ============================================================  ==========  =============
id_performance     m's score on the source test split (the records' metric)      higher      slice counts
id_agreement       m's mean agreement with the other members on the source       higher      predictions
                   test split (agreement: m scored against each other member's
                   masks with the performance metric, ``analysis.agreement``)
ood_agreement      m's mean agreement with the other members on t's images       higher      predictions
uncertain_area     m's uncertain area on t (``records.uncertain_area``, "ggd")   lower       uncertainty
mean_uncertainty,  the other readings of the same δ maps: their mean level, the     lower       uncertainty
fixed_threshold_   area above a threshold fixed on the source, the Otsu area with
area, guarded_area a flatness guard (``analysis.uncertainty_indicators``)
=================  ============================================================  ==========  =============

None of them uses labels of the target site: agreement compares predictions, the uncertain area
thresholds the δ net's variance map; unless the members themselves used labels at evaluation
(``oracle_prompt``: box-prompted members see each target slice's ground-truth box). The analysis
computes every label-free result on the label-free members (the pool the agreement is averaged over
included), and the all-member version beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.agreement import Agreement
from analysis.performance import MEMBER_EXTRAS, PERFORMANCE_COLUMNS


@dataclass(frozen=True)
class IndicatorInfo:
    """One registered indicator.

    Attributes:
        column: its column in ``indicator_table``'s result.
        higher_is_better: True if a higher value promises a higher OOD score.
        label: axis / table label (``{metric}`` is filled in).
        needs: the records it is computed from: ``"slices"``, ``"predictions"`` or ``"uncertainty"``.
    """

    column: str
    higher_is_better: bool
    label: str
    needs: str


#: The registry of indicators (docs/architecture.md "Rooms": one registry dict per kind of plug-in).
INDICATORS: dict[str, IndicatorInfo] = {
    "id_performance": IndicatorInfo("id_score", True, "ID {metric}", "slices"),
    "id_agreement": IndicatorInfo("id_agreement", True, "ID agreement (mean with the pool)", "predictions"),
    "ood_agreement": IndicatorInfo("ood_agreement", True, "OOD agreement (mean with the pool)", "predictions"),
    "uncertain_area": IndicatorInfo("uncertain_area", False, "uncertain area (fraction of the image)", "uncertainty"),
    "mean_uncertainty": IndicatorInfo("mean_uncertainty", False, "mean uncertainty (δ's variance)", "uncertainty"),
    "fixed_threshold_area": IndicatorInfo("fixed_threshold_area", False,
                                          "uncertain area above the source threshold (fraction)", "uncertainty"),
    "guarded_area": IndicatorInfo("guarded_area", False, "uncertain area, flat maps certain (fraction)",
                                  "uncertainty"),
}

#: Names a spec may use for several indicators at once (the spec's ``analysis.indicators`` list, docs/architecture.md "Specs").
INDICATOR_GROUPS: dict[str, tuple[str, ...]] = {
    "agreement": ("id_agreement", "ood_agreement"),
    "uncertainty": ("uncertain_area", "mean_uncertainty", "fixed_threshold_area", "guarded_area"),
}

#: Columns ``indicator_table`` adds to ``PERFORMANCE_COLUMNS`` (``id_score`` is already there).
INDICATOR_COLUMNS = ["id_agreement", "ood_agreement", "uncertain_area", "mean_uncertainty", "fixed_threshold_area",
                     "guarded_area"]


def resolve_indicators(names: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Expand group names and check every name; ``None`` means every registered indicator.

    Raises:
        ValueError: an unknown name (the message lists the valid names).
    """
    if names is None:
        return tuple(INDICATORS)
    out: list[str] = []
    for i, name in enumerate(names):
        if name in INDICATOR_GROUPS:
            out += INDICATOR_GROUPS[name]
        elif name in INDICATORS:
            out.append(name)
        else:
            raise ValueError(f"indicators[{i}]: unknown indicator {name!r}; valid names: "
                             f"{', '.join([*INDICATORS, *INDICATOR_GROUPS])}")
    return tuple(dict.fromkeys(out))


def indicator_table(perf: pd.DataFrame, agreement: Agreement | None = None,
                    uncertain: pd.Series | pd.DataFrame | None = None) -> pd.DataFrame:
    """The performance table with every available indicator as a column.

    Args:
        perf: a ``performance_table`` (one row per member and target).
        agreement: the pool's pairwise agreement (``agreement_matrices``); None leaves the
            agreement columns NaN.
        uncertain: uncertain area per (member_id, site) (``records.uncertain_area``), or a frame so
            indexed whose columns are uncertainty indicators (``analysis.uncertainty_indicators``);
            None leaves them NaN.

    Returns:
        ``PERFORMANCE_COLUMNS`` (+ the ``MEMBER_EXTRAS`` ``perf`` has) + ``INDICATOR_COLUMNS``, rows as
        in ``perf``.
    """
    out = perf[PERFORMANCE_COLUMNS + [c for c in MEMBER_EXTRAS if c in perf.columns]].copy()
    for c in INDICATOR_COLUMNS:
        out[c] = np.nan
    if agreement is not None and agreement.matrices:
        id_site = agreement.id_site
        if id_site is not None:
            out["id_agreement"] = out["member_id"].map(agreement.member_mean(id_site)).astype(float)
        ood = {t: agreement.member_mean(t) for t in agreement.matrices if agreement.roles.get(t) == "ood"}
        if ood:
            long = pd.concat(ood, names=["target"]).rename("ood_agreement")
            keys = pd.MultiIndex.from_arrays([out["target"].astype(str), out["member_id"].astype(str)])
            out["ood_agreement"] = long.reindex(keys).to_numpy(dtype=float)
    if uncertain is not None and len(uncertain):
        u = uncertain.to_frame("uncertain_area") if isinstance(uncertain, pd.Series) else uncertain.copy()
        u.index = pd.MultiIndex.from_arrays([u.index.get_level_values(0).astype(str),
                                             u.index.get_level_values(1).astype(str)])
        keys = pd.MultiIndex.from_arrays([out["member_id"].astype(str), out["target"].astype(str)])
        for c in u.columns:
            if c in INDICATOR_COLUMNS:
                out[c] = u[c].reindex(keys).to_numpy(dtype=float)
    return out
