"""The analysis stage: experiment records -> indicators, correlations, tables, figures (DESIGN §2, §7).

Reads ``<experiment>/records`` only (no Ray, no MLflow: the driver logs the files this writes), so
it can be rerun on any finished experiment. What the uncertainty stage has not produced (its
records, its examples) is skipped with a note in ``tables.md``, never an error.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.agreement import Agreement, agreement_matrices
from analysis.correlate import ID_COLUMNS, N_RESAMPLES, SEED, STAT_KEYS, correlate_pairs, correlations
from analysis.examples import example_members, examples_dir, fig6_inputs
from analysis.indicators import INDICATORS, indicator_table, resolve_indicators
from analysis.plots import figure_fig3, figure_fig4, figure_fig6, safe_name, save_figure
from analysis.selection import loto_estimates, select_models
from analysis.table import check_metric, performance_table
from analysis.tables import (correlation_markdown, correlation_matrix_markdown, correlations_long, loto_markdown,
                             selection_markdown, table1, table1_long, table1_markdown)
from analysis.uncertainty_indicators import uncertainty_indicator_frame, uncertainty_sections
from trainables.records import load_records, load_uncertainty, member_part_ids, records_dir

#: The pair-level agreement-on-the-line test's name in the correlation table.
PAIRS = "agreement_on_the_line"
#: Outputs a run may or may not write: removed first so that a rerun leaves no stale ones.
_OPTIONAL = ("agreement_pairs.csv", "table4.csv", "table4_readings.csv", "error_ranking.csv", "uncertainty_fits.csv",
             "loto.csv", "loto_summary.csv")
_OPTIONAL_PLOTS = ("fig3_*.png", "fig4_*.png", "fig6_*.png", "accuracy_on_the_line_*.png")


def _json_clean(v: object) -> object:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict."""
    if isinstance(v, dict):
        return {str(k): _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _check_records(experiment_dir: Path) -> None:
    rdir = records_dir(experiment_dir)
    merged = (rdir / "members.parquet").exists() and (rdir / "slices.parquet").exists()
    if not merged and not member_part_ids(experiment_dir):
        raise FileNotFoundError(
            f"no pool records in {rdir} (expected members.parquet + slices.parquet or parts/*.member.json); "
            f"run the pool stage first, e.g. `oodsweep run <spec.yaml>`, or point at the experiment directory "
            f"that holds records/")


def site_roles(slices: pd.DataFrame) -> dict[str, str]:
    """Site -> role from the slice records: the ID site first, then the targets in order of appearance."""
    pairs = slices[["site", "role"]].drop_duplicates()
    roles = {str(s): str(r) for s, r in zip(pairs["site"], pairs["role"])}
    return {**{s: r for s, r in roles.items() if r == "id"}, **{s: r for s, r in roles.items() if r != "id"}}


def _pair_correlations(agreement: Agreement, table: pd.DataFrame, n_resamples: int, seed: int) -> pd.DataFrame:
    """The agreement-on-the-line test per target: OOD against ID agreement over pairs of members."""
    rows = []
    id_site = agreement.id_site
    if id_site is None:
        return pd.DataFrame(columns=[*ID_COLUMNS, *STAT_KEYS])
    source = ", ".join(sorted(table["source"].astype(str).unique()))
    for t in dict.fromkeys(table["target"].astype(str)):
        if t not in agreement.matrices:
            continue
        st = correlate_pairs(agreement.matrices[id_site], agreement.matrices[t], n_resamples=n_resamples, seed=seed)
        rows.append({"indicator": PAIRS, "metric": "dice_agreement", "source": source, "target": t, "unit": "pair",
                     "x": f"agreement on {id_site}", "y": f"agreement on {t}", **st})
    return pd.DataFrame(rows, columns=[*ID_COLUMNS, *STAT_KEYS])


def _clear_stale(out: Path) -> None:
    for name in _OPTIONAL:
        (out / name).unlink(missing_ok=True)
    for pattern in _OPTIONAL_PLOTS:
        for p in (out / "plots").glob(pattern):
            p.unlink()


def _write_csv(df: pd.DataFrame, path: Path, files: list[Path]) -> None:
    df.to_csv(path, index=False)
    files.append(path)


def run_analysis(experiment_dir: str | os.PathLike, metric: str = "iou_3d", out_dir: str | os.PathLike | None = None,
                 *, indicators: list[str] | tuple[str, ...] | None = None, n_resamples: int = N_RESAMPLES,
                 seed: int = SEED, fig6_member: str | None = None, fig6_index: int | None = None) -> dict:
    """Run the whole analysis of one experiment and write its files.

    Writes under ``out_dir`` (default ``<experiment_dir>/analysis``):

    * ``performance.csv`` (ID and OOD score per member and target), ``indicators.csv`` (the same
      with every indicator), ``agreement_pairs.csv`` (agreement of every pair on every site);
    * ``correlations.csv`` (indicator × target, one column per statistic) and
      ``correlations_long.csv`` (indicator × target × statistic, one value per row);
    * ``table1.csv`` / ``table1_long.csv`` (Tables 1–3), ``table4.csv`` (uncertainty methods by MSE, the
      area reading on the default members), ``table4_readings.csv`` (both readings, SAM family and pooled),
      ``error_ranking.csv`` (the maps' pixel AUROC/AP per site), ``uncertainty_fits.csv`` (δ's convergence);
    * ``selection.csv`` (model selection per target and indicator), ``loto.csv`` and
      ``loto_summary.csv`` (leave-one-target-out OOD estimates and their MAE);
    * ``plots/fig4_<target>.png``, ``plots/fig3_uncertainty_vs_ood.png``, ``plots/fig6_<member>.png``;
    * ``tables.md`` (every table, the figures, and what was skipped and why) and ``summary.json``.

    Args:
        experiment_dir: the experiment directory (holding ``records/``).
        metric: one of ``trainables.records.METRICS``.
        out_dir: where to write; default ``<experiment_dir>/analysis``.
        indicators: names in ``analysis.indicators.INDICATORS`` or its groups (``agreement``,
            ``uncertainty``); default all. Indicators whose records are missing are skipped.
        n_resamples: bootstrap resamples for the intervals of r, ρ and τ (0: none).
        seed: the bootstrap's seed.
        fig6_member: the member Fig. 6 shows (default: the best mean OOD score among members
            with examples).
        fig6_index: which of its example slices (default: the largest error).

    Returns:
        ``{"out_dir": str, "files": [str, ...], "correlations": [dict, ...], "selection":
        [dict, ...], "notes": [str, ...]}``: one correlation dict per (indicator, target) with the
        keys ``ID_COLUMNS`` + ``STAT_KEYS`` (NaN as None); one selection dict per (target,
        indicator) with ``SELECTION_COLUMNS``; notes say what was skipped.

    Raises:
        ValueError: unknown metric or indicator (the message lists the valid ones), or records
            without any OOD evaluation.
        FileNotFoundError: no records under ``experiment_dir``.
    """
    check_metric(metric)
    wanted = resolve_indicators(indicators)
    experiment_dir = Path(experiment_dir)
    _check_records(experiment_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    members, slices = load_records(experiment_dir)
    perf = performance_table(members, slices, metric)
    if perf.empty:
        raise ValueError(f"records in {records_dir(experiment_dir)} hold no OOD (target-site) evaluations: "
                         f"{len(members)} members, roles {sorted(slices['role'].astype(str).unique())}")
    roles = site_roles(slices)
    timings["records"] = time.perf_counter() - t0
    out = Path(out_dir) if out_dir is not None else experiment_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)
    files: list[Path] = []
    notes: list[str] = []

    # --- indicators ---------------------------------------------------------------------------
    t = time.perf_counter()
    agreement: Agreement | None = None
    if {"id_agreement", "ood_agreement"} & set(wanted):
        member_ids = sorted(perf["member_id"].astype(str).unique())
        agreement = agreement_matrices(experiment_dir, member_ids, roles)
        notes += agreement.notes
        if not agreement.matrices:
            agreement = None
    timings["agreement"] = time.perf_counter() - t
    t = time.perf_counter()
    unc = None
    ua = None
    if any(INDICATORS[n].needs == "uncertainty" for n in wanted):
        unc = load_uncertainty(experiment_dir)
        if unc is None:
            notes.append(f"no uncertainty records ({records_dir(experiment_dir) / 'uncertainty.parquet'} or "
                         f"{records_dir(experiment_dir) / 'uncertainty' / 'parts'}/): the uncertain-area indicator, "
                         f"Fig. 3, Fig. 6 and Table 4 are skipped; run the uncertainty stage to get them")
        elif not (unc["method"] == "ggd").any():
            notes.append(f"the uncertainty records hold no 'ggd' rows (methods: "
                         f"{sorted(unc['method'].astype(str).unique())}): the uncertain-area indicator and Fig. 3 "
                         f"are skipped")
        else:
            ua = uncertainty_indicator_frame(unc, method="ggd")  # the paper's area and the other readings
        if unc is not None:
            n_unc, n_pool = unc["member_id"].nunique(), perf["member_id"].nunique()
            if n_unc < n_pool:
                notes.append(f"uncertainty records cover {n_unc} of {n_pool} pool members: the uncertain-area "
                             f"correlations, Fig. 3 and Table 4 use those only")
    table = indicator_table(perf, agreement, ua)
    available = [n for n in wanted if np.isfinite(table[INDICATORS[n].column].astype(float)).any()]
    for n in wanted:
        if n not in available and INDICATORS[n].needs == "slices":
            notes.append(f"indicator {n}: no values (does the records hold the source test split, role 'id'?)")
    timings["uncertainty"] = time.perf_counter() - t
    _write_csv(perf, out / "performance.csv", files)
    _write_csv(table, out / "indicators.csv", files)
    if agreement is not None:
        pairs = agreement.pairs()
        arch = dict(zip(members["member_id"].astype(str), members["arch"].astype(str)))
        pairs.insert(2, "arch_a", pairs["member_a"].map(arch))
        pairs.insert(3, "arch_b", pairs["member_b"].map(arch))
        _write_csv(pairs, out / "agreement_pairs.csv", files)

    # --- correlations -------------------------------------------------------------------------
    t = time.perf_counter()
    parts = [correlations(table, n, INDICATORS[n].column, "ood_score", n_resamples=n_resamples, seed=seed)
             for n in available]
    if agreement is not None:
        parts.append(_pair_correlations(agreement, table, n_resamples, seed))
    corr = pd.concat([p for p in parts if not p.empty], ignore_index=True) if any(len(p) for p in parts) \
        else pd.DataFrame(columns=[*ID_COLUMNS, *STAT_KEYS])
    _write_csv(corr, out / "correlations.csv", files)
    _write_csv(correlations_long(corr), out / "correlations_long.csv", files)
    timings["correlations"] = time.perf_counter() - t

    # --- tables and selection -----------------------------------------------------------------
    t = time.perf_counter()
    _write_csv(table1(perf), out / "table1.csv", files)
    _write_csv(table1_long(perf), out / "table1_long.csv", files)
    source = ", ".join(sorted(perf["source"].astype(str).unique()))
    t4 = None
    unc_md: list[str] = []
    if unc is not None:
        # Table 4 (both readings, SAM family and pooled), the maps' AUROC/AP, δ's fits: their own module
        t4, unc_md = uncertainty_sections(experiment_dir, unc, roles, source, out, files, notes)
    sel = select_models(table, available)
    _write_csv(sel, out / "selection.csv", files)
    loto, loto_summary = loto_estimates(table, available)
    n_targets = perf["target"].nunique()
    if n_targets < 2:
        notes.append(f"leave-one-target-out estimates need at least two targets; this experiment has {n_targets}")
    else:
        _write_csv(loto, out / "loto.csv", files)
        _write_csv(loto_summary, out / "loto_summary.csv", files)
    timings["tables"] = time.perf_counter() - t

    # --- figures ------------------------------------------------------------------------------
    t = time.perf_counter()
    plots = out / "plots"
    fig_files: dict[str, list[Path]] = {"fig4": [], "fig3": [], "fig6": []}
    for target in dict.fromkeys(table["target"].astype(str)):
        fig = figure_fig4(table, target, agreement, metric, corr)
        fig_files["fig4"].append(save_figure(fig, plots / f"fig4_{safe_name(target)}.png"))
    if "uncertain_area" in available:
        fig_files["fig3"].append(save_figure(figure_fig3(table, metric, corr), plots / "fig3_uncertainty_vs_ood.png"))
    if unc is not None:
        if example_members(experiment_dir):
            try:
                example, others = fig6_inputs(experiment_dir, table, unc, fig6_member, fig6_index)
            except (FileNotFoundError, IndexError, ValueError) as e:
                notes.append(f"Fig. 6 skipped: {e}")
            else:
                fig_files["fig6"].append(save_figure(figure_fig6(example, others),
                                                     plots / f"fig6_{safe_name(example.member_id)}.png"))
        else:
            notes.append(f"no uncertainty examples under {examples_dir(experiment_dir)}: Fig. 6 skipped")
    for v in fig_files.values():
        files += v
    timings["figures"] = time.perf_counter() - t

    # --- tables.md and summary.json -------------------------------------------------------------
    n_members = int(members["member_id"].nunique())
    targets = list(dict.fromkeys(perf["target"].astype(str)))
    md = [f"# Analysis: {experiment_dir.name}", "",
          f"Metric: `{metric}`; {n_members} pool members; source {source}; targets {', '.join(targets)}. "
          f"Indicators: {', '.join(f'`{n}`' for n in available) or 'none'}"
          + (f" (also the pair-level `{PAIRS}` test)" if agreement is not None else "") + ".", ""]
    if notes:
        md += ["**Skipped or partial:**", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Tables 1–3: same-domain and cross-domain performance", "", table1_markdown(perf), "",
           "## Correlation of each indicator with OOD performance", "", correlation_matrix_markdown(corr), "",
           correlation_markdown(corr), ""]
    md += ["## Figures", ""]
    for target, f in zip(targets, fig_files["fig4"]):
        md += [f"Fig. 4, {source} → {target}: OOD vs ID performance, OOD vs ID agreement (per member and per "
               f"pair), probit axes.", "", f"![Fig. 4 {target}]({f.relative_to(out).as_posix()})", ""]
    for f in fig_files["fig3"]:
        md += ["Fig. 3: uncertain area against OOD performance.", "", f"![Fig. 3]({f.relative_to(out).as_posix()})", ""]
    for f in fig_files["fig6"]:
        md += ["Fig. 6: a member's slice: image, truth, prediction, μ, error, uncertainty.", "",
               f"![Fig. 6]({f.relative_to(out).as_posix()})", ""]
    if not fig_files["fig3"]:
        md += ["Fig. 3: skipped (no uncertain-area values; see above).", ""]
    if not fig_files["fig6"]:
        md += ["Fig. 6: skipped (no uncertainty examples; see above).", ""]
    md += ["## Table 4: uncertainty methods", ""]
    md += unc_md if t4 is not None else ["Skipped: no uncertainty records (see above).", ""]
    md += ["## Model selection for a new site", "", selection_markdown(sel, metric), "",
           loto_markdown(loto_summary, metric) if n_targets >= 2
           else f"Leave-one-target-out estimates: skipped (needs at least two targets; this experiment has "
                f"{n_targets}).", ""]
    (out / "tables.md").write_text("\n".join(md), encoding="utf-8")
    files.append(out / "tables.md")

    corr_records = _json_clean(corr.to_dict(orient="records"))
    sel_records = _json_clean(sel.to_dict(orient="records"))
    timings["total"] = time.perf_counter() - t0
    summary = {"metric": metric, "n_members": n_members,
               "sources": sorted(perf["source"].astype(str).unique()), "targets": targets,
               "indicators": available, "notes": notes, "correlations": corr_records, "selection": sel_records,
               "loto_mae": _json_clean(loto_summary.to_dict(orient="records")),
               "seconds": {k: round(v, 3) for k, v in timings.items()}}
    (out / "summary.json").write_text(json.dumps(_json_clean(summary), indent=1, allow_nan=False) + "\n",
                                      encoding="utf-8")
    files.append(out / "summary.json")
    return {"out_dir": str(out), "files": [str(f) for f in files], "correlations": corr_records,
            "selection": sel_records, "notes": notes}
