"""The analysis's shared preparation: records -> performance, member sets, agreement, uncertainty, indicators.

``analysis.run.run_analysis`` and ``analysis.claims.build_claims`` both start from :func:`prepare`, so
the claims report rebuilt alone (``oodsweep report``) reads the same label-free members, the same
agreement and the same uncertainty indicators as the whole analysis.

The member sets (docs/architecture.md "Records"): ``label-free`` holds the members whose evaluation used no labels (the
default reading of every result); when the pool has oracle-prompted members (``oracle_prompt``: box
prompts from the ground truth), ``all`` stands beside it. The agreement indicators of a set average
over that set's members only: a label-free member's agreement with an oracle member would carry the
target labels.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.agreement import Agreement, agreement_matrices
from analysis.indicators import INDICATORS, indicator_table
from analysis.performance import performance_table
from analysis.uncertainty_indicators import uncertainty_indicator_frame
from analysis.uncertainty_cases import read_case_sums
from trainables.records import (SURFACE_METRICS, label_names, load_records, load_surface, uncertainty_file,
                                member_part_ids, records_dir, select_label)

#: The agreement metric of a performance metric without a pairwise form (the surface metrics): per-case overlap.
AGREEMENT_OF = {m: "iou_3d" for m in SURFACE_METRICS}

#: The ``members`` column's values: results without the oracle-prompted members, and with them.
LABEL_FREE, ALL = "label-free", "all"


def check_records(experiment_dir: str | os.PathLike) -> None:
    """FileNotFoundError naming the records folder and the fix when it holds no pool records."""
    rdir = records_dir(experiment_dir)
    merged = (rdir / "members.parquet").exists() and (rdir / "slices.parquet").exists()
    if not merged and not member_part_ids(experiment_dir):
        raise FileNotFoundError(
            f"no pool records in {rdir} (expected members.parquet + slices.parquet or parts/*.member.json); "
            f"run the pool stage first, e.g. `oodsweep run <spec.yaml>`, or point at the experiment directory "
            f"that holds records/")


def site_roles(slices: pd.DataFrame) -> dict[str, str]:
    """Site -> role from the slice records: the ID site first, then the targets in order of appearance.

    The validation split (role "val", the source's held-out training cases) is left out: it chooses
    configurations and is not an evaluated site of the analysis."""
    pairs = slices.loc[slices["role"] != "val", ["site", "role"]].drop_duplicates()
    roles = {str(s): str(r) for s, r in zip(pairs["site"], pairs["role"])}
    return {**{s: r for s, r in roles.items() if r == "id"}, **{s: r for s, r in roles.items() if r != "id"}}


def compact_keys(slices: pd.DataFrame) -> pd.DataFrame:
    """The slice records with their string keys as categoricals (the same values; a few bytes a row instead of a
    Python string each: 0.6 GiB at 2,000 members x 5 sites x 500 slices) and their integer columns as int32 where
    every value is below 2**28 (a per-slice sum of up to eight of them still fits; pandas sums a column or a group
    in int64, and the metrics convert to float64 first)."""
    out = {}
    for c in slices.columns:
        col = slices[c]
        if isinstance(col.dtype, pd.StringDtype) or col.dtype == object:
            out[c] = col.astype("category")
        elif col.dtype == "int64" and len(col) and col.min() >= 0 and col.max() < 2 ** 28:
            out[c] = col.astype("int32")
        else:
            out[c] = col
    return pd.DataFrame(out, index=slices.index)


@dataclass
class Prepared:
    """What every reading of an experiment starts from (see :func:`prepare`).

    Attributes:
        members, slices: the records (``trainables.records.load_records``).
        perf: ``performance_table`` of every member (oracle-prompted included).
        roles: site -> role (``site_roles``).
        all_ids, oracle_ids: every member, and the oracle-prompted ones (sorted).
        member_sets: ``LABEL_FREE`` (when there is a label-free member) and ``ALL`` (when there is an
            oracle-prompted one) -> their member ids, label-free first.
        run_of: member -> its training run (``run_id``; the bootstrap's unit).
        agreement: the pool's agreement over every member (None: not asked for, or no predictions).
        agreements: per member set, the agreement of its members only.
        unc: the uncertainty records summed per case (``analysis.uncertainty_cases``; None: not asked for, or the
            stage never ran).
        ua: the δ ('ggd') indicators per member and site (``uncertainty_indicator_frame``), or None.
        tables: per member set, its ``indicator_table``.
        notes: what was skipped or is partial, in the order ``tables.md`` lists it.
        timings: seconds spent on the records, the agreement and the uncertainty records.
    """

    members: pd.DataFrame
    slices: pd.DataFrame
    perf: pd.DataFrame
    roles: dict[str, str]
    all_ids: list[str]
    oracle_ids: list[str]
    member_sets: dict[str, list[str]]
    run_of: dict[str, object]
    agreement: Agreement | None = None
    agreements: dict[str, Agreement | None] = field(default_factory=dict)
    unc: pd.DataFrame | None = None
    ua: pd.DataFrame | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _member_sets(perf: pd.DataFrame, rdir: Path, notes: list[str], warn: bool
                 ) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(every member, the oracle-prompted ones, the member sets), with the notes they call for."""
    all_ids = sorted(perf["member_id"].astype(str).unique())
    oracle_ids = sorted(perf.loc[perf["oracle_prompt"].astype(bool), "member_id"].astype(str).unique())
    free_ids = [m for m in all_ids if m not in set(oracle_ids)]
    member_sets: dict[str, list[str]] = {}
    if free_ids:
        member_sets[LABEL_FREE] = free_ids
    if oracle_ids:
        member_sets[ALL] = all_ids
        archs = sorted(perf.loc[perf["oracle_prompt"].astype(bool), "arch"].astype(str).unique())
        notes.append(f"{len(oracle_ids)} of {len(all_ids)} members ({', '.join(archs)}) were evaluated with "
                     f"ground-truth box prompts (oracle_prompt, marked †): every label-free result is computed "
                     f"without them (`label-free`), and again with them (`all`) beside it")
    no_run = perf.drop_duplicates("member_id")["run_id"].isna()
    if no_run.any():
        msg = (f"{int(no_run.sum())} of {len(all_ids)} members have no run_id in {rdir} "
               f"(records written before it existed): the bootstrap falls back to resampling members, whose "
               f"intervals are too narrow when a run gives several snapshot members; rerun the pool stage to "
               f"record run_id")
        if warn:
            warnings.warn(msg, UserWarning, stacklevel=4)  # at the caller of run_analysis
        notes.append(msg)
    return all_ids, oracle_ids, member_sets


def _uncertainty(experiment_dir: Path, n_pool: int, notes: list[str]
                 ) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The uncertainty records and δ's indicators (None where missing), with the notes they call for."""
    rdir = records_dir(experiment_dir)
    # summed per case while read (analysis.uncertainty_cases: every reading is a mean over images; bounded memory)
    path = uncertainty_file(experiment_dir)
    unc = read_case_sums(path) if path is not None else None
    ua = None
    if unc is None:
        notes.append(f"no uncertainty records ({rdir / 'uncertainty.parquet'} or {rdir / 'uncertainty' / 'parts'}/): "
                     f"the uncertain-area indicator, Fig. 3, Fig. 6 and Table 4 are skipped; run the uncertainty "
                     f"stage to get them")
    elif not (unc["method"] == "ggd").any():
        notes.append(f"the uncertainty records hold no 'ggd' rows (methods: "
                     f"{sorted(unc['method'].astype(str).unique())}): the uncertain-area indicator and Fig. 3 "
                     f"are skipped")
    else:
        ua = uncertainty_indicator_frame(unc, method="ggd")  # the paper's area and the other readings
    if unc is not None:
        n_unc = unc["member_id"].nunique()
        if n_unc < n_pool:
            notes.append(f"uncertainty records cover {n_unc} of {n_pool} pool members: the uncertain-area "
                         f"correlations, Fig. 3 and Table 4 use those only")
    return unc, ua


def prepare(experiment_dir: str | os.PathLike, metric: str, wanted: tuple[str, ...] | list[str],
            warn: bool = True, label: str | None = None, memory_gib: float | None = None, map_blocks=None) -> Prepared:
    """Read an experiment's records into what every result is computed from.

    Args:
        experiment_dir: the experiment folder (holding ``records/``).
        metric: a checked metric name (``analysis.performance.check_metric``).
        wanted: indicator names (``analysis.indicators.resolve_indicators``): the agreement is computed
            when one of them is an agreement indicator, the uncertainty records read when one needs them.
        warn: also issue the missing-``run_id`` note as a ``UserWarning``.
        label: one label of multi-label records: the performance and the agreement are that label's alone
            (``trainables.records.select_label``, its channel of the stored masks); None: the mean over labels.
        memory_gib, map_blocks: the agreement's blocks (``agreement_matrices``); ``run_analysis`` says more.

    Raises:
        FileNotFoundError: no records under ``experiment_dir`` (the message names the folder and the fix).
        ValueError: records without any OOD evaluation (the message names the folder, the roles found and the fix).
    """
    experiment_dir = Path(experiment_dir)
    check_records(experiment_dir)
    t0 = time.perf_counter()
    members, slices = load_records(experiment_dir)
    slices = compact_keys(slices)
    surface = load_surface(experiment_dir) if metric in SURFACE_METRICS else None
    channel = None
    if label is not None:
        channel = label_names(slices).index(label) if label in label_names(slices) else None
        slices = select_label(slices, label, f"the slice records of {records_dir(experiment_dir)}")
        if surface is not None:  # one label's rows (surface_by keeps its label column: it averages per label)
            surface = surface[surface["label"].astype(str) == label].reset_index(drop=True)
    perf = performance_table(members, slices, metric, surface)
    if perf.empty:
        raise ValueError(f"records in {records_dir(experiment_dir)} hold no OOD (target-site) evaluations: "
                         f"{len(members)} members, roles {sorted(slices['role'].astype(str).unique())}; run the "
                         f"pool stage with data.targets set")
    p = Prepared(members=members, slices=slices, perf=perf, roles=site_roles(slices), all_ids=[], oracle_ids=[],
                 member_sets={}, run_of={})
    p.timings["records"] = time.perf_counter() - t0
    if label is not None:
        p.notes.append(f"label {label}: the performance and the agreement are this label's alone (label channel "
                       f"{channel}); the uncertainty indicators and Table 4 are the labels' union, as the uncertainty "
                       f"stage scores them")
    p.all_ids, p.oracle_ids, p.member_sets = _member_sets(perf, records_dir(experiment_dir), p.notes, warn)
    p.run_of = dict(zip(perf["member_id"].astype(str), perf["run_id"]))

    t = time.perf_counter()
    if {"id_agreement", "ood_agreement"} & set(wanted):
        # the stored masks pool the label channels, so a micro metric's agreement is the base metric's
        # a surface metric has no pairwise form here: its agreement indicators are the members' 3D IoU agreement
        agreement = agreement_matrices(experiment_dir, p.all_ids, p.roles,
                                       metric=AGREEMENT_OF.get(metric, metric.removesuffix("_micro")),
                                       memory_gib=memory_gib, map_blocks=map_blocks, channel=channel)
        p.notes += agreement.notes
        p.agreement = agreement if agreement.matrices else None
    p.timings["agreement"] = time.perf_counter() - t
    t = time.perf_counter()
    if any(INDICATORS[n].needs == "uncertainty" for n in wanted):
        p.unc, p.ua = _uncertainty(experiment_dir, perf["member_id"].nunique(), p.notes)
    p.agreements = {k: (p.agreement.subset(ids) if p.agreement is not None else None)
                    for k, ids in p.member_sets.items()}
    p.tables = {k: indicator_table(perf[perf["member_id"].astype(str).isin(ids)], p.agreements[k], p.ua)
                for k, ids in p.member_sets.items()}
    p.timings["uncertainty"] = time.perf_counter() - t
    return p
