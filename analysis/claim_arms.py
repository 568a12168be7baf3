"""The claims that compare arms of a few training runs (``analysis.claims``): C1 (the foundation model's
drop against each CNN's) and C5 (δ against the Table-4 baselines), each with Student's t interval over the
runs' means (``analysis.run_intervals``), returning the claim's rows (``analysis.claim_rule.claim_row``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.claim_rule import NOT_BASELINES, ORACLE_CAVEAT, claim_row, untestable_row
from analysis.correlate import N_RESAMPLES, SEED
from analysis.performance import score_scale
from analysis.run_intervals import arms_worst_case, bonferroni_level, paired_worst_case, runs_short, welch_interval
from analysis.tables import select_best_configs
from analysis.uncertainty_cases import case_sums, mean_over_images


def metric_scale(df: pd.DataFrame) -> float:
    """Percentage points (x 100) for a score in [0, 1]; mm (x 1) for −HD95 (``analysis.performance.score_scale``)."""
    return score_scale(str(df["metric"].iloc[0])) if "metric" in df.columns and len(df) else 100.0


# --- C1: the foundation model's drop against each CNN's ----------------------------------------

def sam_archs(perf: pd.DataFrame) -> list[str]:
    """The SAM-family architectures of a performance table: those of its box-prompted members.

    ``oracle_prompt`` (members.parquet; derived for records older than the column) says which members were
    prompted, so the architecture's name is not read."""
    m = perf.drop_duplicates("member_id")
    return sorted(set(m.loc[m["oracle_prompt"].fillna(False).astype(bool), "arch"].astype(str)))


def c1_rows(perf: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> list[dict]:
    """C1: per (SAM arch, other arch), the difference of their mean drops (Same-Dom. − mean over targets,
    pp) on the configuration Table 1 reports (chosen on the validation split), with Welch's t interval
    over the two architectures' run drops (``analysis.run_intervals``; at least ``MIN_RUNS`` runs each);
    overall: the largest difference over the other architectures (< 0: SAM drops less than every one of
    them), its interval ``[max lo, max hi]`` of the per-architecture intervals at the Bonferroni level.
    ``n_resamples`` and ``seed`` are not used (no bootstrap here: too few runs); kept for a uniform call."""
    sams = sam_archs(perf)
    others = sorted(set(perf["arch"].astype(str)) - set(sams))
    if not sams or not others:
        return [untestable_row("C1", f"needs a SAM-family member and another architecture; the pool has SAM: "
                                  f"{', '.join(sams) or 'none'}, others: {', '.join(others) or 'none'}",
                               statistic="SAM drop − CNN drop (pp)")]
    best = select_best_configs(perf)
    k = metric_scale(perf)
    drops: dict[str, np.ndarray] = {}
    chosen: dict[str, str] = {}
    for b in best.itertuples(index=False):
        sel = perf[(perf["arch"] == b.arch) & (perf["lr"] == b.lr) & (perf["epochs"] == b.epochs)
                   & (perf["source"] == b.source)]
        # per run: its Same-Dom. score minus its mean over the targets (the configuration's seeds are its runs)
        per = sel.groupby(sel["run_id"].astype(str) if sel["run_id"].notna().all() else sel["member_id"].astype(str))
        d = k * (per["id_score"].first() - per["ood_score"].mean()).to_numpy(dtype=float)
        drops[str(b.arch)] = d[np.isfinite(d)]
        n = int(np.isfinite(d).sum())
        chosen[str(b.arch)] = f"lr {b.lr:g}, {b.epochs} epochs, {n} run{'s' if n != 1 else ''}"
    sel_on = str(best["selected_on"].iloc[0]) if len(best) else "val_score"
    note_sel = ("configurations chosen on the validation split as Table 1" if sel_on == "val_score" else
                "configurations chosen on the source test split (no validation split in the records: optimistic)")
    unit = "run (per architecture)"
    rows = []
    for s in sams:
        if not len(drops.get(s, [])):
            rows.append(untestable_row("C1", f"{s}: no finite drop (no ID or OOD score)"))
            continue
        cnns = [c for c in others if len(drops.get(c, []))]
        if not cnns:
            continue
        ds = drops[s]
        for c in cnns:
            dc = drops[c]
            lo, hi = welch_interval(ds, dc)
            short = runs_short({s: len(ds), c: len(dc)})
            rows.append(claim_row("C1", "claim", f"{s} vs {c}", f"drop({s}) − drop({c}), pp",
                                  float(ds.mean() - dc.mean()), float(lo), float(hi), "negative",
                                  f"{s} ({chosen[s]}; oracle-prompted) vs {c} ({chosen[c]})",
                                  len(ds) + len(dc), len(ds) + len(dc), unit,
                                  note=(f"{short}; " if short else f"Welch's t interval over the runs' drops; ")
                                  + f"{s}: drop {ds.mean():.2f} pp; {c}: drop {dc.mean():.2f} pp; {note_sel}"))
        value, lo, hi = arms_worst_case(ds, [drops[c] for c in cnns])
        sizes = [len(ds)] + [len(drops[c]) for c in cnns]
        short = runs_short(dict(zip([s, *cnns], sizes)))
        how = (short if short else
               f"interval: the largest of the {len(cnns)} Welch intervals' ends, each at the Bonferroni level "
               f"{100 * bonferroni_level(len(cnns)):.4g}%")
        rows.insert(len(rows) - len(cnns), claim_row(
            "C1", "claim", "overall" if len(sams) == 1 else f"overall ({s})",
            f"max over {len(cnns)} architectures of drop({s}) − drop(other), pp", value, lo, hi, "negative",
            f"{s} (oracle-prompted: ground-truth box per slice, partly an advantage by construction) vs "
            f"{', '.join(cnns)}", sum(sizes), sum(sizes), unit,
            note=f"{ORACLE_CAVEAT.format(arch=s)}; {how}; {note_sel}; "
                 f"runs per architecture: {', '.join(f'{a} {n}' for a, n in zip([s, *cnns], sizes))}"))
    return rows or [untestable_row("C1", "no architecture has a finite drop")]


# --- C5: δ against the Table-4 baselines --------------------------------------------------------

def c5_rows(unc: pd.DataFrame | None, perf: pd.DataFrame, n_resamples: int = N_RESAMPLES,
            seed: int = SEED, sam_members: set[str] | None = None) -> list[dict]:
    """C5: δ's Table-4 error minus the best baseline's, on the target sites' images, per reading.

    Members: those scored by δ and every baseline; the SAM family (box-prompted) by default, as the
    paper's Table 4, else every such member (the row says which). Each method's error is a member's mean
    over its target images, then a run's mean over its members; δ and the baselines score the same runs,
    so per run and baseline there is one paired difference δ − baseline. The statistic is the largest
    mean difference over the baselines (δ − the best baseline); its interval is the largest of the
    baselines' one-sample t intervals' ends at the Bonferroni level (``analysis.run_intervals``), none
    with fewer than ``MIN_RUNS`` runs. ``sam_members``: the box-prompted members as Table 4 reads them
    (the uncertainty site records' ``prompted``); None: the members' ``oracle_prompt``. ``n_resamples``,
    ``seed``: not used (no bootstrap here); kept for a uniform call.
    """
    stat_name = "δ MSE − best baseline MSE"
    if unc is None or unc.empty:
        return [untestable_row("C5", "no uncertainty records (run the uncertainty stage; the analysis reads them when "
                                  "analysis.indicators names an uncertainty indicator)", statistic=stat_name)]
    if not (unc["method"] == "ggd").any():
        return [untestable_row("C5", "the uncertainty records hold no δ ('ggd') rows", statistic=stat_name)]
    baselines = sorted({str(m) for m in unc["method"].unique()} - set(NOT_BASELINES))
    if not baselines:
        return [untestable_row("C5", "no baseline method in the uncertainty records (uncertainty.baselines is empty)",
                               statistic=stat_name)]
    methods = ["ggd", *baselines]
    # each member x method's mean per reading over the target sites' images, from the per-case sums
    # (analysis.uncertainty_cases: the records may be per slice); the means' order does not matter (read by name)
    cs = case_sums(unc)
    ood = (cs["role"] == "ood").to_numpy(dtype=bool, na_value=False)
    cs = cs[ood & cs["method"].isin(methods).to_numpy(dtype=bool)]
    readings = ["area"] + (["pixel"] if not cs["pixel_na"].any() else [])
    keys = [cs["member_id"], cs["method"]]
    means = pd.DataFrame({r: mean_over_images(cs, f"sq_{r}", keys) for r in readings}).dropna(how="all")
    means.index.names = ["member_id", "method"]
    by_member = means.reset_index().groupby("member_id")["method"].nunique()
    complete = sorted(str(m) for m in by_member[by_member == len(methods)].index)
    means.index = pd.MultiIndex.from_arrays([means.index.get_level_values(0).astype(str),
                                             means.index.get_level_values(1).astype(str)], names=means.index.names)
    if not complete:
        return [untestable_row("C5", f"no member was scored on a target by δ and every baseline "
                                     f"({', '.join(baselines)})", statistic=stat_name)]
    oracle = (set(perf.loc[perf["oracle_prompt"].fillna(False).astype(bool), "member_id"].astype(str))
              if sam_members is None else set(sam_members))
    sam = [m for m in complete if m in oracle]
    who = ("SAM family (box-prompted), as the paper's Table 4" if sam else
           "every member scored by all methods (no SAM-family member was: unlike the paper's Table 4)")
    members = sam or complete
    run_of = dict(zip(perf["member_id"].astype(str), perf["run_id"]))
    # one unit per training run (a member without a run id is its own): δ and every baseline score the
    # same members, so each run gives one paired difference per baseline (its members' mean)
    run_key = pd.Series([str(run_of[m]) if pd.notna(run_of.get(m)) else f"member:{m}" for m in members],
                        index=members)
    n_runs = int(run_key.nunique())
    unit = "run" if perf["run_id"].notna().any() else "member"
    rows = []
    for reading in readings:
        e = means[reading].unstack("method").reindex(index=members, columns=methods)
        by_run = e.groupby(run_key.to_numpy()).mean()          # runs x methods
        diffs = (by_run["ggd"].to_numpy()[None, :] - by_run[baselines].to_numpy().T)  # baselines x runs
        value, lo, hi = paired_worst_case(diffs)
        full = by_run.mean().to_numpy(dtype=float)
        best = baselines[int(np.argmin(full[1:]))]
        short = runs_short({"δ's arm (the baselines score the same runs)": n_runs})
        how = (short if short else
               f"interval: one-sample t over the runs' δ − baseline differences, the largest of the "
               f"{len(baselines)} intervals' ends, each at the Bonferroni level "
               f"{100 * bonferroni_level(len(baselines)):.4g}%")
        rows.append(claim_row("C5", "claim", "overall" if reading == "area" else "overall (pixel reading)",
                              f"{stat_name} ({reading} reading, target sites)", value, lo, hi,
                              "negative", f"{who}: {len(members)} members, {n_runs} {unit}s", len(members),
                              n_runs, unit,
                              note=f"{how}; means over runs: δ {full[0]:.4g}; best baseline {best} "
                                   f"{full[1:].min():.4g}; baselines: "
                                   + ", ".join(f"{b} {v:.4g}" for b, v in zip(baselines, full[1:]))))
    return rows
