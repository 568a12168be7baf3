"""Paper-style tables (docs/architecture.md "Analysis"): Tables 1–3, correlations and model selection (Table 4:
``analysis.table4``).

Tables 1–3 (same- vs cross-domain performance) differ in the paper only by dataset, metric and
orientation: Table 1 has a "Same-Dom." row per source and a "Cross-Dom." row ``S → T`` per target, one
column per architecture. A cell is the mean ± std over seeds, in percent, of one
configuration per architecture: the (lr, epochs) with the best mean score on the validation split
(source training cases held out; the source test split only for records without one). Cross-domain
cells add the change against the same architecture's Same-Dom. mean in percentage points:
``56.11 ± 4.93 (↓ 20.7)``. The std is the sample std (``ddof=1``); a single seed gives ``± –``. Tables 2–3 put
the architectures in rows and the settings in columns (``table1(perf, orient="archs")``). A
performance table that concatenates experiments with different sources gives one Same-Dom. row
per source, as the paper's Table 1 does for BMC and BIDMC.

The correlation table lists every indicator × target with its statistics; the selection tables
report what ``analysis.selection`` found.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.performance import score_scale, score_unit
from analysis.seeds import table_spread

SAME, CROSS = "Same-Dom.", "Cross-Dom."
#: Table 1's last column: the range and SD across seeds of the configurations with >= 2 seeds (``analysis.seeds``).
SEED_SPREAD = "seed spread"


def format_cell(mean_pct: float, std_pct: float, change_pct: float | None = None) -> str:
    """``"mean ± std"`` with two decimals, plus ``" (↓ d)"`` / ``" (↑ d)"`` when a change is given.

    Args:
        mean_pct: mean in percent (NaN gives ``"–"``).
        std_pct: std in percent (NaN, e.g. one seed: shown as ``–``).
        change_pct: cross-domain minus same-domain mean, percentage points; ``None``/NaN for none.
            It is shown with one decimal; a change that rounds to zero shows ``(= 0.0)``.
    """
    if not math.isfinite(mean_pct):
        return "–"
    cell = f"{mean_pct:.2f} ± {std_pct:.2f}" if math.isfinite(std_pct) else f"{mean_pct:.2f} ± –"
    if change_pct is not None and math.isfinite(change_pct):
        mag = f"{abs(change_pct):.1f}"
        arrow = "=" if float(mag) == 0.0 else ("↓" if change_pct < 0 else "↑")
        cell += f" ({arrow} {mag})"
    return cell


def _members(perf: pd.DataFrame) -> pd.DataFrame:
    """One row per member with its ID (and validation) score (``perf`` repeats them once per target)."""
    cols = ["member_id", "arch", "lr", "epochs", "seed", "source", "id_score"]
    return perf.drop_duplicates("member_id")[cols + (["val_score"] if "val_score" in perf.columns else [])]


def selection_split(perf: pd.DataFrame) -> str:
    """``"val_score"`` when the records hold a validation split (role "val"), else ``"id_score"``."""
    return "val_score" if "val_score" in perf.columns and np.isfinite(perf["val_score"].astype(float)).any() \
        else "id_score"


def select_best_configs(perf: pd.DataFrame) -> pd.DataFrame:
    """Per (source, arch): the (lr, epochs) with the best mean validation score over seeds.

    The validation split (source training cases held out, never reported) chooses, so the reported
    test split is not also the one the configuration was picked on (the paper selects "depending on
    validation performance"). Records without one (older experiments, ``data.val_fraction: 0``)
    fall back to the source test split's ID score, and ``table1_markdown`` says so.
    Ties go to the smaller lr, then the fewer epochs; configurations whose score is NaN for every
    seed are chosen only when nothing else is left.

    Args:
        perf: a ``performance_table``.

    Returns:
        Columns ``source, arch, lr, epochs, id_mean, n_seeds, selected_on``, one row per (source, arch);
        ``id_mean`` is the mean of the score it was chosen on (``selected_on``: ``val_score`` or
        ``id_score``).
    """
    m = _members(perf)
    on = selection_split(perf)
    cfg = (m.groupby(["source", "arch", "lr", "epochs"], sort=True)
           .agg(id_mean=(on, "mean"), n_seeds=("member_id", "size")).reset_index())
    cfg["selected_on"] = on
    cfg = cfg.sort_values(["source", "arch", "id_mean", "lr", "epochs"],
                          ascending=[True, True, False, True, True], na_position="last", kind="stable")
    return cfg.groupby(["source", "arch"], sort=False).head(1).reset_index(drop=True)


def _mean_std_pct(values: pd.Series, scale: float = 100.0) -> tuple[float, float, int]:
    v = values.astype(float).to_numpy()
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan, 0
    # sample std (ddof=1) over seeds; undefined (NaN, shown "–") for a single seed
    return scale * float(v.mean()), scale * float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def table1_long(perf: pd.DataFrame) -> pd.DataFrame:
    """Table 1 in tidy form: one row per (setting, architecture) with its numbers.

    Args:
        perf: a ``performance_table``.

    Returns:
        Columns ``domain, setting, source, target, arch, lr, epochs, n_seeds, mean_pct,
        std_pct, change_pct, cell``; ``target`` is empty and ``change_pct`` NaN on Same-Dom. rows.
    """
    best = select_best_configs(perf)
    m = _members(perf)
    targets = list(dict.fromkeys(perf["target"].astype(str)))
    scale = score_scale(str(perf["metric"].iloc[0])) if "metric" in perf and len(perf) else 100.0
    rows = []
    for b in best.itertuples(index=False):
        sel_ids = m.loc[(m["source"] == b.source) & (m["arch"] == b.arch) & (m["lr"] == b.lr)
                        & (m["epochs"] == b.epochs), "member_id"]
        same_mean, same_std, n = _mean_std_pct(m.loc[m["member_id"].isin(sel_ids), "id_score"], scale)
        base = {"source": str(b.source), "arch": str(b.arch), "lr": float(b.lr), "epochs": int(b.epochs)}
        rows.append({"domain": SAME, "setting": str(b.source), "target": "", **base, "n_seeds": n,
                     "mean_pct": same_mean, "std_pct": same_std, "change_pct": math.nan,
                     "cell": format_cell(same_mean, same_std)})
        for t in targets:
            sub = perf[(perf["target"].astype(str) == t) & perf["member_id"].isin(sel_ids)]
            if sub.empty:
                continue
            mean, std, n_t = _mean_std_pct(sub["ood_score"], scale)
            change = mean - same_mean
            rows.append({"domain": CROSS, "setting": f"{b.source} → {t}", "target": t, **base, "n_seeds": n_t,
                         "mean_pct": mean, "std_pct": std, "change_pct": change,
                         "cell": format_cell(mean, std, change)})
    return pd.DataFrame(rows, columns=["domain", "setting", "source", "target", "arch", "lr", "epochs", "n_seeds",
                                       "mean_pct", "std_pct", "change_pct", "cell"])


def table1_per_label(members: pd.DataFrame, slices: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Tables 1–3 of each label of multi-label records (``table1`` on that label's rows alone), one block per
    label with a ``label`` column first; empty for records with one label. ``table1.csv`` beside it is the
    mean over the labels (``trainables.records.metric_by``)."""
    from analysis.performance import performance_table
    from trainables.records import label_names, select_label

    names = label_names(slices)
    if len(names) < 2:
        return pd.DataFrame()
    return pd.concat([table1(performance_table(members, select_label(slices, n), metric)).assign(label=n)
                      .pipe(lambda t: t[["label", *t.columns[:-1]]]) for n in names], ignore_index=True)


def table1(perf: pd.DataFrame, orient: str = "settings") -> pd.DataFrame:
    """Tables 1–3 as printed.

    Args:
        perf: a ``performance_table`` (one or several sources).
        orient: ``"settings"`` (Table 1): columns ``domain, setting``, one column of cells per
            architecture, then ``seed spread`` (:data:`SEED_SPREAD`: the row's score across the seeds of
            every configuration with >= 2 seeds, selected or not); rows the Same-Dom. row of each source, then its Cross-Dom. rows in
            target order. ``"archs"`` (Tables 2–3): column ``arch`` then one column per setting
            (Same-Dom. settings first), one row per architecture.

    Returns:
        The table with ``"–"`` for a missing cell.

    Raises:
        ValueError: unknown ``orient``.
    """
    if orient not in ("settings", "archs"):
        raise ValueError(f"orient must be 'settings' (Table 1) or 'archs' (Tables 2-3), got {orient!r}")
    long = table1_long(perf)
    archs = sorted(long["arch"].unique())
    settings = list(dict.fromkeys(zip(long["domain"], long["setting"], long["source"])))
    settings.sort(key=lambda s: (s[0] != SAME, s[2]) if orient == "archs" else (s[2], s[0] != SAME))
    wide = long.pivot(index=["domain", "setting"], columns="arch", values="cell")
    wide = wide.reindex(pd.MultiIndex.from_tuples([s[:2] for s in settings], names=["domain", "setting"]),
                        columns=archs).fillna("–")
    wide.columns.name = None
    if orient == "settings":  # the last column: how far a configuration moves across seeds (analysis.seeds)
        scale = score_scale(str(perf["metric"].iloc[0])) if "metric" in perf and len(perf) else 100.0
        where = {(r.domain, r.setting): (r.source, "id" if r.domain == SAME else r.target)
                 for r in long.itertuples(index=False)}
        wide[SEED_SPREAD] = [table_spread(perf, *where[k], scale=scale) for k in wide.index]
        return wide.reset_index()
    out = wide.T
    out.columns = [f"{d}: {s}" for d, s in out.columns]
    out.index.name = "arch"
    return out.reset_index()


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``df`` (cells as ``str``; ``|`` escaped)."""
    def esc(v: object) -> str:
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def table1_markdown(perf: pd.DataFrame, orient: str = "settings") -> str:
    """Table 1 (or Tables 2–3 with ``orient="archs"``) in markdown with a caption naming the metric
    and the configuration selection."""
    metric = str(perf["metric"].iloc[0]) if len(perf) else "score"
    best = select_best_configs(perf)
    oracle = oracle_archs(perf)
    chosen = "; ".join(f"{b.arch}{DAGGER if b.arch in oracle else ''}: lr {b.lr:g}, {b.epochs} epochs "
                       f"({b.n_seeds} seeds)" for b in best.itertuples(index=False))
    on_val = selection_split(perf) == "val_score"
    chosen_on = (f"the validation split (source training cases held out from training, never reported here)"
                 if on_val else f"the source test split, the same split as the Same-Dom. row (no validation split "
                                f"in the records: optimistic; set data.val_fraction and rerun the pool)")
    caption = (f"**Table 1.** {metric} ({score_unit(metric)}) on the source test split (Same-Dom.) and on each target site "
               f"(Cross-Dom.), mean ± sample std (ddof = 1) over seeds (– with one seed). Per architecture, the "
               f"(lr, epochs) configuration with the best mean {metric} on {chosen_on} is reported "
               f"(selection uses source labels only). (↓ d) / (↑ d): change against the Same-Dom. "
               f"mean in percentage points. Selected: {chosen}."
               + (f" {SEED_SPREAD}: the row's {metric} across the seeds of each configuration trained with ≥ 2 "
                  f"seeds (selected or not), min–max (SD), in the cells' unit: the seed noise to read the "
                  f"differences against." if orient == "settings" else "")
               + (f" {DAGGER} oracle-prompted: evaluated with each slice's ground-truth box as the prompt (as "
                  f"MedSAM in the paper), so its scores are not comparable with the unprompted models' and it "
                  f"is left out of every label-free result." if oracle else ""))
    shown = table1(perf, orient)
    if orient == "settings":
        shown = shown.rename(columns={a: f"{a} {DAGGER}" for a in oracle})
    else:
        shown["arch"] = [f"{a} {DAGGER}" if a in oracle else a for a in shown["arch"]]
    return caption + "\n\n" + markdown_table(shown)


#: The mark of an oracle-prompted member or architecture in every table.
DAGGER = "†"


def oracle_archs(perf: pd.DataFrame) -> set[str]:
    """Architectures whose members were evaluated with ground-truth box prompts (``oracle_prompt``)."""
    if "oracle_prompt" not in perf.columns:
        return set()
    return set(perf.loc[perf["oracle_prompt"].fillna(False).astype(bool), "arch"].astype(str))


def fmt(v: object, spec: str) -> str:
    """``v`` formatted with ``spec``, or ``n/a`` where it is not a finite number."""
    return format(float(v), spec) if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)) else "n/a"


# --- correlations -------------------------------------------------------------------------------

#: What each correlation row plots, for the captions.
CORRELATION_LABELS = {
    "id_performance": "OOD score vs ID score (per member)",
    "id_agreement": "OOD score vs mean ID agreement with the pool (per member)",
    "ood_agreement": "OOD score vs mean OOD agreement with the pool (per member)",
    "uncertain_area": "OOD score vs uncertain area on the target (per member)",
    "mean_uncertainty": "OOD score vs mean δ variance on the target (per member)",
    "fixed_threshold_area": "OOD score vs area above the member's source threshold on the target (per member)",
    "guarded_area": "OOD score vs uncertain area with the flatness guard on the target (per member)",
    "agreement_on_the_line": "OOD agreement vs ID agreement (per pair of members)",
}


def correlations_long(corr: pd.DataFrame) -> pd.DataFrame:
    """The correlation table as indicator × target × statistic: one row per value."""
    from analysis.correlate import STAT_KEYS

    keys = [k for k in STAT_KEYS if k in corr.columns]
    ids = [c for c in ("indicator", "metric", "members", "source", "target", "unit", "resample") if c in corr.columns]
    long = corr.melt(id_vars=ids, value_vars=keys,
                     var_name="statistic", value_name="value")
    return long.sort_values(["indicator", "target"], kind="stable").reset_index(drop=True)


#: The member-level Fisher-z interval's column: it assumes independent members (last, for comparison only).
FISHER_COLUMN = "Fisher-z CI (assumes independent members)"
#: The sentence that goes with it wherever it is printed.
FISHER_NOTE = ("The Fisher-z interval (last column) treats every member as independent, which the snapshot members "
               "of one training run are not: it is too narrow and shown for comparison only (not given for pairs).")


def correlation_markdown(corr: pd.DataFrame) -> str:
    """The ``correlations`` table in markdown: one row per (indicator, source → target)."""
    rows = []
    for r in corr.itertuples(index=False):
        nondeg = str(getattr(r, "members", "")).endswith("(non-degenerate)")
        n_deg = getattr(r, "n_degenerate", 0)
        rows.append({
            "indicator": r.indicator + (" (without degenerate members)" if nondeg else ""),
            "setting": f"{r.source} → {r.target}",
            "degenerate": "left out" if nondeg else (f"{int(n_deg)} in" if isinstance(n_deg, (int, np.integer, float))
                                                      and math.isfinite(float(n_deg)) and n_deg else "0"),
            "n": f"{r.n} pairs / {r.n_units}" if r.unit == "pair" else f"{r.n}",
            "units": f"{r.n_units} {getattr(r, 'resample', 'member')}s",
            "Pearson r [95% bootstrap CI]": (f"{fmt(r.pearson_r, '.3f')} [{fmt(r.pearson_boot_low, '.3f')}, "
                                         f"{fmt(r.pearson_boot_high, '.3f')}]"),
            FISHER_COLUMN: f"[{fmt(r.pearson_ci_low, '.3f')}, {fmt(r.pearson_ci_high, '.3f')}]",
            "Spearman ρ [95% bootstrap CI]": (f"{fmt(r.spearman_rho, '.3f')} [{fmt(r.spearman_ci_low, '.3f')}, "
                                f"{fmt(r.spearman_ci_high, '.3f')}]"),
            "Kendall τ": fmt(r.kendall_tau, '.3f'),
            "probit slope": fmt(r.probit_slope, '.3f'), "probit intercept": fmt(r.probit_intercept, '.3f'),
            "probit R²": fmt(r.probit_r2, '.3f'),
        })
    metric = str(corr["metric"].iloc[0]) if len(corr) else "score"
    present = list(dict.fromkeys(corr["indicator"])) if len(corr) else []
    what = "; ".join(f"`{i}`: {CORRELATION_LABELS.get(i, i)}" for i in present)
    unit = _unit_phrase(corr)
    caption = (f"**Correlation with OOD {metric}** across the pool. {what}. Pearson r with its 95% bootstrap "
               f"interval, and Spearman ρ with its own: they resample {unit} (BCa where defined; pairs: r only, "
               f"percentile); read these. {FISHER_NOTE} "
               f"Kendall τ (τ-b) without an interval; probit fit: least squares of probit(y) on probit(x). "
               f"n: members, or pairs / resampled units. Degenerate: members below the degenerate floor on "
               f"an axis (they sit at the probit floor and can set a slope alone); where there are any, the "
               f"row is repeated without them.")
    cols = ["indicator", "setting", "n", "units", "degenerate", "Pearson r [95% bootstrap CI]",
            "Spearman ρ [95% bootstrap CI]",
            "Kendall τ", "probit slope", "probit intercept", "probit R²", FISHER_COLUMN]
    return caption + "\n\n" + markdown_table(pd.DataFrame(rows, columns=cols))


def _indicator_by_target(df: pd.DataFrame, first: str, column, cell, extra=None) -> tuple[list[dict], list[str]]:
    """Pivot rows (indicator, target, ...) into one row per indicator and a cell per target ("–" if none).

    ``column(target)`` names a target's column, ``cell(rows)`` formats its rows, ``extra(group)`` adds
    columns at the end of an indicator's row. Returns the rows and the targets in first-seen order.
    """
    targets = list(dict.fromkeys(df["target"].astype(str)))
    rows = []
    for ind, g in df.groupby("indicator", sort=False):
        row = {first: ind}
        for t in targets:
            h = g[g["target"].astype(str) == t]
            row[column(t)] = "–" if h.empty else cell(h)
        row.update(extra(g) if extra else {})
        rows.append(row)
    return rows, targets


def _unit_phrase(df: pd.DataFrame | None) -> str:
    """What the bootstrap resampled, from a table's ``resample`` column: runs, or members (fallback)."""
    units = set(df["resample"].dropna().astype(str)) if df is not None and "resample" in df.columns else set()
    if units == {"run"}:
        return "training runs (`run_id`: a run's snapshot members move together)"
    if "member" in units:
        return "pool members (no run ids in the records, or one member per run)"
    return "training runs (`run_id`)"


def boot_caption(n_resamples: int, corr: pd.DataFrame | None = None) -> str:
    """One line naming the bootstrap: resamples, unit, method."""
    if n_resamples <= 0:
        return "No bootstrap intervals (n_resamples = 0)."
    return (f"Every interval below: {n_resamples} bootstrap resamples of {_unit_phrase(corr)}, BCa where it "
            f"is defined (percentile otherwise); 95% level.")


def lines_markdown(lines: pd.DataFrame) -> str:
    """Baek et al.'s test per target: the accuracy line and the agreement line, and whether they agree."""
    if lines is None or lines.empty:
        return "(no targets with agreement)"
    def iv(r, k):
        return f"{fmt(r[k], '.3f')} [{fmt(r[k + '_low'], '.3f')}, {fmt(r[k + '_high'], '.3f')}]"
    rows = [{"setting": f"{r['source']} → {r['target']}", "accuracy line slope": iv(r, "acc_slope"),
             "accuracy line intercept": iv(r, "acc_intercept"), "agreement line slope": iv(r, "agr_slope"),
             "agreement line intercept": iv(r, "agr_intercept"),
             "slope diff. CI": f"[{fmt(r['slope_diff_low'], '.3f')}, {fmt(r['slope_diff_high'], '.3f')}]",
             "intercept diff. CI": f"[{fmt(r['intercept_diff_low'], '.3f')}, {fmt(r['intercept_diff_high'], '.3f')}]",
             "lines agree": {True: "yes", False: "no"}.get(r["lines_agree"], "n/a"),
             "members / pairs / units": f"{r['n_members']} / {r['n_pairs']} / {r['n_units']} {r.get('resample', '')}s"}
            for r in lines.to_dict(orient="records")]
    metric = str(lines["metric"].iloc[0])
    caption = (f"**Agreement on the line** (Baek et al. 2022): accuracy line = least squares of probit(OOD "
               f"{metric}) on probit(ID {metric}) over members; agreement line = the same over pairs, agreement "
               f"being one member scored against the other's masks with {metric}. [95% percentile-bootstrap "
               f"intervals; the unit of resampling is the training run (`run_id`) unless the last column says "
               f"members]. The lines agree when the intervals of both differences (accuracy − agreement) "
               f"contain 0: then the agreement line, which needs no target labels, stands in for the accuracy "
               f"line (ALine).")
    return caption + "\n\n" + markdown_table(pd.DataFrame(rows))


def aline_markdown(fits: pd.DataFrame, metric: str) -> str:
    """MAE of the ALine-S / ALine-D estimates, method × target."""
    if fits is None or fits.empty:
        return "(no ALine estimates)"
    rows, _ = _indicator_by_target(fits.rename(columns={"method": "indicator"}), "estimator", lambda t: f"→ {t}",
                                   lambda h: fmt(100 * h["mae"].iloc[0], ".2f"),
                                   extra=lambda g: {"mean": fmt(100 * g["mae"].mean(), ".2f")})
    caption = (f"**ALine-S / ALine-D estimates of each member's OOD {metric}** (Baek et al. 2022) from the "
               f"source labels (ID {metric}) and the unlabelled target predictions (agreement) only. Cells: "
               f"mean absolute error against the true OOD {metric} over members (percentage points); per "
               f"member in `aline.csv`. The leave-one-target-out table below uses other targets' labels.")
    return caption + "\n\n" + markdown_table(pd.DataFrame(rows))


def correlation_matrix_markdown(corr: pd.DataFrame) -> str:
    """Indicator × target at a glance: ``r / ρ / τ`` per cell."""
    if corr.empty:
        return "(no correlations)"
    rows, targets = _indicator_by_target(
        corr, "indicator", str,
        lambda h: f"{fmt(h['pearson_r'].iloc[0], '.2f')} / {fmt(h['spearman_rho'].iloc[0], '.2f')} / "
                  f"{fmt(h['kendall_tau'].iloc[0], '.2f')}")
    return ("Pearson r / Spearman ρ / Kendall τ per indicator and target:\n\n"
            + markdown_table(pd.DataFrame(rows, columns=["indicator", *targets])))


# --- model selection ----------------------------------------------------------------------------

def selection_markdown(sel: pd.DataFrame, metric: str) -> str:
    """Model selection per target and indicator: the chosen member, its true OOD score, the regret."""
    if sel.empty:
        return "(no indicator had values on any target)"
    k = score_scale(metric)
    rows = [{"setting": f"{r.source} → {r.target}", "indicator": f"{r.indicator} ({r.direction} is better)",
             "chosen member": f"{r.chosen_member}" + (f" {DAGGER}" if getattr(r, "chosen_oracle_prompt", False)
                                                       is True else ""),
             f"its OOD {metric}": fmt(k * r.chosen_ood, ".2f"),
             "true rank": f"{r.chosen_rank} / {r.n}", f"best OOD {metric}": fmt(k * r.best_ood, ".2f"),
             "regret": fmt(k * r.regret, ".2f"), "random pick regret": fmt(k * r.random_regret, ".2f")}
            for r in sel.itertuples(index=False)]
    caption = (f"**Model selection for a new site.** Each target is treated as the new site: the pool is ranked "
               f"by a label-free indicator, the top member is deployed, and its true OOD {metric} ({score_unit(metric)}) is compared "
               f"with the best member's. Regret = best − chosen (percentage points; 0: the indicator found the "
               f"best member). Random pick regret: best − pool mean, what choosing blindly costs on average. "
               f"{DAGGER}: an oracle-prompted member (its target predictions used the target labels).")
    return caption + "\n\n" + markdown_table(pd.DataFrame(rows))


def loto_markdown(summary: pd.DataFrame, metric: str) -> str:
    """Mean absolute error of the leave-one-target-out OOD estimates, indicator × held-out target."""
    if summary.empty:
        return "(needs at least two targets)"
    rows, _ = _indicator_by_target(summary, "estimate from", lambda t: f"→ {t}",
                                   lambda h: fmt(100 * h["mae"].iloc[0], ".2f"),
                                   extra=lambda g: {"mean": fmt(100 * g["mae"].mean(), ".2f")})
    caption = (f"**OOD {metric} estimate per member, leave one target out.** For each held-out target, "
               f"probit(OOD) = a · probit(indicator) + b is fitted by least squares on the other targets' "
               f"(member, target) points and applied to the member's indicator value on the held-out target. "
               f"Cells: mean absolute error over members (percentage points). `mean_ood_other_targets` (a "
               f"reference, not label-free): the member's mean OOD {metric} on the other targets.")
    return caption + "\n\n" + markdown_table(pd.DataFrame(rows))
