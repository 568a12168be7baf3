"""The analysis stage: experiment records -> indicators, correlations, tables, figures
(docs/architecture.md "Rooms", "Analysis").

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

from analysis.aline import aline_table, pair_correlations
from analysis.case_bootstrap import prepared_case_scores
from analysis.budget_claims import experiment_budget_rows, with_budget_rows
from analysis.claims import claims_table, sam_members_of, write_claims
from analysis.correlate import DEGENERATE_FLOOR, ID_COLUMNS, N_RESAMPLES, SEED, STAT_KEYS, correlations
from analysis.examples import example_members, examples_dir, fig6_inputs
from analysis.health import pool_health
from analysis.indicators import INDICATORS, resolve_indicators
from analysis.performance import check_metric, is_bounded, surface_notes
from analysis.plots import figure_fig3, figure_fig4, figure_fig6, safe_name, save_figure
from analysis.prepare import ALL, LABEL_FREE, prepare
from analysis.probit_clip import AUTO, Clips, check_probit_clip, site_cases
from trainables.records import SURFACE_METRICS
from analysis.report import tables_markdown
from analysis.selection import loto_estimates, select_models
from analysis.tables import correlations_long, table1, table1_long, table1_markdown, table1_per_label
from analysis.uncertainty_indicators import uncertainty_sections

#: Outputs a run may or may not write: removed first so that a rerun leaves no stale ones.
_OPTIONAL = ("table1_per_label.csv", "agreement_pairs.csv", "table4.csv", "table4_readings.csv", "error_ranking.csv", "uncertainty_fits.csv",
             "loto.csv", "loto_summary.csv", "lines.csv", "aline.csv")
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
                 seed: int = SEED, fig6_member: str | None = None, fig6_index: int | None = None,
                 degenerate_floor: float | None = DEGENERATE_FLOOR, missing: list[str] | None = None,
                 target_order: list[str] | None = None, severity_chain: list[str] | None = None,
                 label: str | None = None, memory_gib: float | None = None, map_blocks=None,
                 probit_clip: str | float | None = AUTO) -> dict:
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
    * ``lines.csv`` (Baek et al.'s test per target: accuracy and agreement lines, intervals, whether
      they agree) and ``aline.csv`` (ALine-S / ALine-D estimate per member and target, truth, error);

    Every result table has a ``members`` column: ``label-free`` (members whose evaluation used no
    labels; the default reading) and, when the pool has oracle-prompted members, ``all`` beside it.
    * ``plots/fig4_<target>.png``, ``plots/fig3_uncertainty_vs_ood.png``, ``plots/fig6_<member>.png``;
    * ``claims.csv`` / ``claims.md`` (``analysis.claims``: each claim of the paper with its statistic,
      run-level interval and verdict; the verdicts are also the first section of ``tables.md``);
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
        degenerate_floor: a member scoring below it on an axis (ID/OOD score, agreement) is flagged
            (``performance.csv``'s ``degenerate``) and the member correlations are repeated without
            the flagged points (rows ``members = "... (non-degenerate)"``); None: no flagging.
        missing: records the experiment's spec calls for that are missing or unreadable (the driver
            checks; ``oodsweep analyze --allow-incomplete``): listed at the top of ``tables.md``.
        target_order: the targets in the spec's order (tables and the pool-health line follow it).
        severity_chain: the targets of growing shift severity, in order, along which the pool's mean
            OOD score should fall (``analysis.health``); None: all of ``target_order``.
        label: one label of multi-label records: the whole analysis of that label alone (performance and
            agreement; the uncertainty indicators stay the labels' union), default written under
            ``<experiment_dir>/analysis/per_label/<label>``. None: the mean over the labels, plus
            ``table1_per_label.csv`` (Tables 1–3 per label) when the records hold several.
        memory_gib: bound the agreement's packed masks held at once (``analysis.agreement.agreement_matrices``:
            blocks of cases) and read only the uncertainty records' needed columns; None: no bound.
        map_blocks: how the agreement's blocks run (``analysis.agreement.BlockMap``; default in-process).
        probit_clip: the probit scale's clip (``analysis.probit_clip``): ``"auto"`` (half a case of each site)
            or a number in (0, 0.5); stated in every probit-scale table and figure.

    Returns:
        ``{"out_dir": str, "files": [str, ...], "correlations": [dict, ...], "selection":
        [dict, ...], "notes": [str, ...], "claims": [dict, ...]}``: one correlation dict per
        (indicator, target) with the keys ``ID_COLUMNS`` + ``STAT_KEYS`` (NaN as None); one selection dict per (target,
        indicator) with ``SELECTION_COLUMNS``; notes say what was skipped; one claims dict per row of
        ``claims.csv`` (``analysis.claims.CLAIM_COLUMNS``).

    Raises:
        ValueError: unknown metric or indicator (the message lists the valid ones), or records
            without any OOD evaluation.
        FileNotFoundError: no records under ``experiment_dir``.
    """
    check_metric(metric)
    check_probit_clip(probit_clip)
    wanted = resolve_indicators(indicators)
    experiment_dir = Path(experiment_dir)
    t0 = time.perf_counter()
    # records, member sets, agreement, uncertainty, indicator tables (one label's: analysis.prepare)
    prep = prepare(experiment_dir, metric, wanted, label=label, memory_gib=memory_gib, map_blocks=map_blocks)
    timings: dict[str, float] = dict(prep.timings)
    members, perf, roles, notes = prep.members, prep.perf, prep.roles, prep.notes
    member_sets, oracle_ids, run_of = prep.member_sets, prep.oracle_ids, prep.run_of
    bounded, lines_ok = is_bounded(metric), metric not in SURFACE_METRICS
    notes += surface_notes(metric, degenerate_floor)
    degenerate_floor = degenerate_floor if bounded else None  # −HD95 is not in [0, 1]: no floor to flag against
    agreement, agreements, unc, tables = prep.agreement, prep.agreements, prep.unc, prep.tables
    clips = Clips(probit_clip, site_cases(prep.slices))  # stated wherever the probit scale is used
    clip_text = clips.text(list(dict.fromkeys([*perf["source"].astype(str), *perf["target"].astype(str)])))
    clip_text = clip_text if bounded else ""
    out = Path(out_dir) if out_dir is not None else experiment_dir / "analysis"
    if out_dir is None and label is not None:
        out = out / "per_label" / safe_name(label)
    out.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)
    files: list[Path] = []
    t = time.perf_counter()
    main_set = next(iter(member_sets))
    table = tables[main_set]
    table_all = tables.get(ALL, table)
    available = [n for n in wanted if any(np.isfinite(tb[INDICATORS[n].column].astype(float)).any()
                                          for tb in tables.values())]
    for n in wanted:
        if n not in available and INDICATORS[n].needs == "slices":
            notes.append(f"indicator {n}: no values (does the records hold the source test split, role 'id'?)")
    timings["uncertainty"] += time.perf_counter() - t
    if degenerate_floor is not None:
        perf = perf.assign(degenerate=(perf["id_score"] < degenerate_floor) | (perf["ood_score"] < degenerate_floor))
        n_deg = int(perf.loc[perf["degenerate"], "member_id"].nunique())
        if n_deg:
            notes.append(f"{n_deg} member(s) score below the degenerate floor {degenerate_floor:g} on the source "
                         f"or a target (`degenerate` in performance.csv): each member correlation is also given "
                         f"without them (`... (non-degenerate)` rows)")
    _write_csv(perf, out / "performance.csv", files)
    _write_csv(pd.concat([tb.assign(members=k) for k, tb in tables.items()], ignore_index=True),
               out / "indicators.csv", files)
    if agreement is not None:
        pairs = agreement.pairs()
        arch = dict(zip(members["member_id"].astype(str), members["arch"].astype(str)))
        pairs.insert(2, "arch_a", pairs["member_a"].map(arch))
        pairs.insert(3, "arch_b", pairs["member_b"].map(arch))
        _write_csv(pairs, out / "agreement_pairs.csv", files)

    # --- correlations, Baek's test, ALine -------------------------------------------------------
    t = time.perf_counter()
    parts, line_rows, aline_parts, aline_fits = [], [], [], []
    for k, tb in tables.items():
        parts += [correlations(tb, n, INDICATORS[n].column, "ood_score", n_resamples=n_resamples, seed=seed,
                               members=k, floor=degenerate_floor, floor_x=INDICATORS[n].higher_is_better,
                               clips=clips)
                  for n in available]
        if agreements[k] is not None and lines_ok:  # the lines compare the metric with agreement on its scale
            pc, lines = pair_correlations(agreements[k], tb, n_resamples, seed, k, run_of, clips)
            parts.append(pc)
            line_rows += lines
            per, fits = aline_table(tb, agreements[k], members=k, clips=clips)
            aline_parts.append(per)
            aline_fits += fits
    corr = pd.concat([p for p in parts if not p.empty], ignore_index=True) if any(len(p) for p in parts) \
        else pd.DataFrame(columns=[*ID_COLUMNS, *STAT_KEYS])
    if not bounded:  # a probit of −HD95 (mm) means nothing
        corr[[c for c in STAT_KEYS if c.startswith("probit_")]] = np.nan
    _write_csv(corr, out / "correlations.csv", files)
    _write_csv(correlations_long(corr), out / "correlations_long.csv", files)
    lines_df = pd.DataFrame(line_rows)
    aline_df = pd.concat(aline_parts, ignore_index=True) if aline_parts else None
    if line_rows:
        _write_csv(lines_df, out / "lines.csv", files)
    if aline_df is not None and len(aline_df):
        _write_csv(aline_df, out / "aline.csv", files)
    timings["correlations"] = time.perf_counter() - t

    # --- tables and selection -----------------------------------------------------------------
    t = time.perf_counter()
    _write_csv(table1(perf), out / "table1.csv", files)
    _write_csv(table1_long(perf), out / "table1_long.csv", files)
    per_label = table1_per_label(members, prep.slices, metric) if label is None else pd.DataFrame()
    if len(per_label):  # multi-label records: each label's Tables 1-3 beside their mean
        _write_csv(per_label, out / "table1_per_label.csv", files)
    source = ", ".join(sorted(perf["source"].astype(str).unique()))
    t4 = None
    unc_md: list[str] = []
    if unc is not None:
        # Table 4 (both readings, SAM family and pooled), the maps' AUROC/AP, δ's fits: their own module
        t4, unc_md = uncertainty_sections(experiment_dir, unc, roles, source, out, files, notes, members=members)
    sel = pd.concat([select_models(tb, available).assign(members=k) for k, tb in tables.items()], ignore_index=True)
    _write_csv(sel, out / "selection.csv", files)
    lotos = [loto_estimates(tb, available, clips=clips) for tb in tables.values()]
    loto = pd.concat([lt[0].assign(members=k) for k, lt in zip(tables, lotos)], ignore_index=True)
    loto_summary = pd.concat([lt[1].assign(members=k) for k, lt in zip(tables, lotos)], ignore_index=True)
    n_targets = perf["target"].nunique()
    if n_targets < 2:
        notes.append(f"leave-one-target-out estimates need at least two targets; this experiment has {n_targets}")
    else:
        _write_csv(loto, out / "loto.csv", files)
        _write_csv(loto_summary, out / "loto_summary.csv", files)
    timings["tables"] = time.perf_counter() - t

    # --- the claims report (analysis.claims): C2-C4 and the project's rows on the label-free members -----
    t = time.perf_counter()
    claims = claims_table(perf, tables.get(LABEL_FREE), agreements.get(LABEL_FREE), unc,
                          [f for f in aline_fits if f.get("members") == LABEL_FREE], available,
                          n_resamples=n_resamples, seed=seed, floor=degenerate_floor,
                          sam_members=sam_members_of(experiment_dir) if unc is not None else None,
                          clips=clips if bounded else None,
                          cases=prepared_case_scores(experiment_dir, prep.slices, tables.get(LABEL_FREE), metric, unc,
                                                     label))
    claims = with_budget_rows(claims, experiment_budget_rows(experiment_dir, tables.get(LABEL_FREE), n_resamples,
                                                             seed))  # C4 at δ's longer budget (a sensitivity)
    files += write_claims(claims, out, experiment_dir.name, metric, n_resamples, degenerate_floor,
                          clip_text)
    timings["claims"] = time.perf_counter() - t

    # --- figures ------------------------------------------------------------------------------
    t = time.perf_counter()
    plots = out / "plots"
    fig_files: dict[str, list[Path]] = {"fig4": [], "fig3": [], "fig6": []}
    corr_main = corr[corr["members"] == main_set] if len(corr) else corr
    oracle_rows = table_all[table_all["oracle_prompt"].astype(bool)] if "oracle_prompt" in table_all else None
    for target in dict.fromkeys(table["target"].astype(str)) if bounded else ():  # probit axes: scores in [0, 1]
        fig = figure_fig4(table, target, agreements[main_set], metric, corr_main, oracle=oracle_rows, clips=clips)
        fig_files["fig4"].append(save_figure(fig, plots / f"fig4_{safe_name(target)}.png"))
    if "uncertain_area" in available and bounded:
        fig_files["fig3"].append(save_figure(figure_fig3(table, metric, corr_main, oracle=oracle_rows),
                                             plots / "fig3_uncertainty_vs_ood.png"))
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
    # the pool's health (analysis.health), along the targets in the spec's order (growing severity)
    bars = {} if bounded else {"id_bar": -math.inf, "collapse_floor": -math.inf}  # −HD95: no [0, 1] bars
    health = pool_health(perf, [t for t in (target_order or []) if t in targets]
                         + [t for t in targets if t not in (target_order or [])], chain=severity_chain, **bars)
    (out / "tables.md").write_text(tables_markdown(
        experiment=experiment_dir.name + (f" (label {label})" if label is not None else ""), metric=metric, n_members=n_members, source=source, targets=targets,
        available=available, has_agreement=agreement is not None, missing=missing, notes=notes, health=health,
        member_sets=member_sets, claims=claims, perf=perf, n_resamples=n_resamples, corr=corr,
        lines_df=lines_df if line_rows else None, fig_files=fig_files, out=out,
        unc_md=unc_md if t4 is not None else None, sel=sel, aline_fits=aline_fits, loto_summary=loto_summary,
        n_targets=n_targets, probit_clip=clip_text),
        encoding="utf-8")
    files.append(out / "tables.md")

    corr_records = _json_clean(corr.to_dict(orient="records"))
    sel_records = _json_clean(sel.to_dict(orient="records"))
    timings["total"] = time.perf_counter() - t0
    summary = {"metric": metric, "n_members": n_members,
               "sources": sorted(perf["source"].astype(str).unique()), "targets": targets,
               "indicators": available, "notes": notes, "missing": list(missing or []), "correlations": corr_records, "selection": sel_records,
               "loto_mae": _json_clean(loto_summary.to_dict(orient="records")),
               "aline_mae": _json_clean(aline_fits), "lines": _json_clean(line_rows),
               "oracle_members": oracle_ids, "member_sets": list(member_sets), "pool_health": health,
               "claims": _json_clean(claims.to_dict(orient="records")),
               "probit_clip": {"setting": clips.setting, "by_site": clips.by_site},
               "seconds": {k: round(v, 3) for k, v in timings.items()}}
    if label is not None:
        summary["label"] = label
    (out / "summary.json").write_text(json.dumps(_json_clean(summary), indent=1, allow_nan=False) + "\n",
                                      encoding="utf-8")
    files.append(out / "summary.json")
    return {"out_dir": str(out), "files": [str(f) for f in files], "correlations": corr_records,
            "selection": sel_records, "notes": notes, "claims": summary["claims"], "pool_health": health}


def joint_tables(experiment_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Tables 1–3 across experiments on the same data (e.g. BMC → … and BIDMC → …), as in the paper.

    Joins each experiment's ``analysis/performance.csv`` (written by ``run_analysis``) and writes
    ``table1_joint.csv`` and ``table1_joint.md`` under ``out_dir``: one Same-Dom. row per source,
    then its Cross-Dom. rows (``analysis.tables.table1`` on the concatenated table).

    Raises:
        FileNotFoundError: an experiment has no ``analysis/performance.csv`` (run its analysis first).
        ValueError: the experiments' metrics differ, or two experiments share a source (the message
            names the files).
    """
    paths = [Path(e) / "analysis" / "performance.csv" for e in experiment_dirs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no performance table at {missing[0]}: run `oodsweep analyze` on that experiment "
                                f"first (or pass the experiments together, which runs each one)")
    perfs = [pd.read_csv(p, dtype={"member_id": str, "run_id": object, "source": str, "target": str}) for p in paths]
    metrics = {str(p): sorted(set(f["metric"].astype(str))) for p, f in zip(paths, perfs)}
    if len({tuple(v) for v in metrics.values()}) > 1:
        raise ValueError(f"the experiments were analysed with different metrics ({metrics}); rerun them with the "
                         f"same --metric")
    seen: dict[str, Path] = {}
    for p, f in zip(paths, perfs):
        for s in sorted(set(f["source"].astype(str))):
            if s in seen:
                raise ValueError(f"source {s!r} is in both {seen[s]} and {p}: a joint Table 1 has one Same-Dom. "
                                 f"row per source; pass one experiment per source")
            seen[s] = p
    perf = pd.concat(perfs, ignore_index=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table1(perf).to_csv(out / "table1_joint.csv", index=False)
    md = [f"# Tables 1–3 across {len(paths)} experiments", "",
          "Experiments: " + ", ".join(f"`{Path(e).name}`" for e in experiment_dirs) + ".", "",
          table1_markdown(perf), "", "Tables 2–3 layout (architectures in rows):", "",
          table1_markdown(perf, orient="archs"), ""]
    (out / "table1_joint.md").write_text("\n".join(md), encoding="utf-8")
    return [out / "table1_joint.csv", out / "table1_joint.md"]
