"""Experiment records -> tidy performance tables (docs/architecture.md "Analysis").

Every score here is aggregated from the per-slice confusion counts by
``trainables.records.metric_by``, or, for the surface metrics (``hd95``, ``nsd``), from the per-case
surface records by ``trainables.records.surface_by``; this module only reshapes and joins.

Orientation: every score of the analysis is higher-is-better, so that correlations, model selection,
the claims and the pool's health read the same way for every metric. ``hd95`` (mm, lower is better)
is therefore scored as **−HD95**: ``id_score``/``ood_score`` are the negated mean HD95 in mm (docs/statistics.md).
"""
from __future__ import annotations

import pandas as pd

from trainables.records import ALL_METRICS, LOWER_IS_BETTER, SURFACE_METRICS, metric_by, surface_by

#: Pool-member columns carried into the performance table.
MEMBER_KEYS = ["member_id", "arch", "lr", "epochs", "seed", "source"]

#: Columns of ``performance_table``'s result, in order.
PERFORMANCE_COLUMNS = MEMBER_KEYS + ["target", "metric", "id_score", "ood_score"]

#: Member columns ``performance_table`` appends after ``PERFORMANCE_COLUMNS`` (and ``indicator_table``
#: carries along when present): the training run (the bootstrap's unit; NaN in records without it)
#: and whether the member's evaluation used labels (box prompts from the ground truth).
MEMBER_EXTRAS = ["run_id", "oracle_prompt"]

#: The member's score on the validation split (role "val": source training cases held out, docs/architecture.md
#: "Records"),
#: which chooses configurations; NaN in records without one. Appended after ``MEMBER_EXTRAS``.
VAL_COLUMN = "val_score"


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is a known metric, else raise naming the valid ones.

    Raises:
        ValueError: ``metric`` is not in ``trainables.records.ALL_METRICS`` (per lesion, or ``*_micro``) nor in
            ``SURFACE_METRICS``.
    """
    if metric not in ALL_METRICS + SURFACE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(ALL_METRICS + SURFACE_METRICS)}")
    return metric


def is_bounded(metric: str) -> bool:
    """Whether ``metric``'s scores lie in [0, 1] (the probit-space results need that; −HD95 does not)."""
    return metric not in LOWER_IS_BETTER


def score_scale(metric: str) -> float:
    """The factor the tables show ``metric``'s scores at: 100 (%) in [0, 1], 1 for −HD95 (mm)."""
    return 100.0 if is_bounded(metric) else 1.0


def score_unit(metric: str) -> str:
    """The tables' unit of ``metric``'s scores (``score_scale``)."""
    return "%" if is_bounded(metric) else "−mm: negated HD95, higher is better"


def _order_of_appearance(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(values.astype(str)))


def scores_long(slices: pd.DataFrame, metric: str, surface: pd.DataFrame | None = None) -> pd.DataFrame:
    """One score per (member, site, role), aggregated from the confusion counts (the surface records for
    a surface metric, negated for ``hd95``: see the module docstring).

    Args:
        slices: the slice records (``SLICE_COLUMNS``).
        metric: one of ``trainables.records.METRICS`` or ``SURFACE_METRICS``.
        surface: the surface records (``SURFACE_COLUMNS``); needed for a surface metric.

    Returns:
        Columns ``member_id, site, role, score`` (score in [0, 1], NaN where undefined,
        e.g. a split whose ground truth is empty everywhere).
    """
    check_metric(metric)
    if metric in SURFACE_METRICS:
        if surface is None:
            raise ValueError(f"metric {metric!r} reads the surface records (records/surface.parquet), and there are "
                             f"none; rerun the pool stage with data.surface_tolerance_mm set (default 2.0) to get them")
        s = surface_by(surface, metric, by=("member_id", "site", "role"))
        s = -s if metric in LOWER_IS_BETTER else s
    else:
        s = metric_by(slices, metric, by=("member_id", "site", "role"))
    out = s.rename("score").reset_index()
    for c in ("member_id", "site", "role"):
        out[c] = out[c].astype(str)
    return out[["member_id", "site", "role", "score"]]


def performance_table(members: pd.DataFrame, slices: pd.DataFrame, metric: str,
                      surface: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (pool member, target site): its ID score and its OOD score there.

    ``id_score`` is ``metric`` on the member's ``role == "id"`` rows (the source site's test
    split); ``ood_score`` is ``metric`` on the ``role == "ood"`` rows of ``target``.

    Args:
        members: the member records (``MEMBER_COLUMNS``).
        slices: the slice records (``SLICE_COLUMNS``).
        metric: one of ``trainables.records.METRICS`` or ``SURFACE_METRICS`` (then ``surface`` is needed;
            ``hd95`` is scored as −HD95 in mm).
        surface: the surface records (``trainables.records.load_surface``), or None.

    Returns:
        Columns ``PERFORMANCE_COLUMNS`` + ``MEMBER_EXTRAS`` + ``[VAL_COLUMN]``, sorted by target (in
        order of first appearance in
        ``slices``) then member_id. A member with no ID rows gets a NaN ``id_score``; a
        (member, target) pair without OOD rows gets no row.

    Raises:
        ValueError: unknown metric, or a member with ID rows on more than one site.
    """
    long = scores_long(slices, metric, surface)
    ids = long[long["role"] == "id"]
    dup = ids["member_id"][ids["member_id"].duplicated()]
    if len(dup):
        raise ValueError(f"members with ID rows on more than one site: {sorted(set(dup))[:5]}")
    ood = long[long["role"] == "ood"].rename(columns={"site": "target", "score": "ood_score"})
    val = long[long["role"] == "val"].groupby("member_id")["score"].first().rename(VAL_COLUMN)
    mem = members[MEMBER_KEYS].copy()
    mem["member_id"] = mem["member_id"].astype(str)
    mem["run_id"] = members["run_id"].astype(object) if "run_id" in members.columns else None
    mem["oracle_prompt"] = (members["oracle_prompt"].fillna(False).astype(bool)
                            if "oracle_prompt" in members.columns else False)
    out = (ood[["member_id", "target", "ood_score"]]
           .merge(mem, on="member_id", how="inner")
           .merge(ids[["member_id", "score"]].rename(columns={"score": "id_score"}), on="member_id", how="left"))
    out["metric"] = metric
    out[VAL_COLUMN] = out["member_id"].map(val).astype(float)
    order = {t: i for i, t in enumerate(_order_of_appearance(slices.loc[slices["role"] == "ood", "site"]))}
    out = out.assign(_t=out["target"].map(order)).sort_values(["_t", "member_id"], kind="stable")
    return out[PERFORMANCE_COLUMNS + MEMBER_EXTRAS + [VAL_COLUMN]].reset_index(drop=True)


def surface_notes(metric: str, floor: float | None) -> list[str]:
    """What the analysis reads differently for a surface metric (the notes of ``tables.md``)."""
    from trainables.records import SURFACE_METRICS

    if metric not in SURFACE_METRICS:
        return []
    out = [f"{metric} is a surface metric (records/surface.parquet, mean over cases): the agreement indicators are "
           f"the members' 3D IoU agreement, so Baek et al.'s lines and the ALine estimates (which need agreement on "
           f"the metric's own scale) are skipped"]
    if not is_bounded(metric):
        out.append(f"{metric} is scored as −HD95 in mm (higher is better, as every score here): correlations, selection "
                   f"and claims read as for the other metrics; its values are not in [0, 1], so the probit columns, "
                   f"Fig. 3, Fig. 4" + (f" and the degenerate floor ({floor:g})" if floor is not None else "")
                   + " are left out")
    return out
