"""Paper-style tables (DESIGN §7): Table 1 (same- vs cross-domain) and the correlation table.

Table 1 has a "Same-Dom." row per source and a "Cross-Dom." row ``S → T`` per target, one
column per architecture. A cell is the mean ± std over seeds, in percent, of one
configuration per architecture: the (lr, epochs) with the best mean ID score on the source
test split (selection uses source labels only). Cross-domain cells add the change against
the same architecture's Same-Dom. mean in percentage points: ``56.11 ± 4.93 (↓ 20.7)``.
The std is the population std (``ddof=0``), so a single seed gives ``± 0.00``.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

SAME, CROSS = "Same-Dom.", "Cross-Dom."


def format_cell(mean_pct: float, std_pct: float, change_pct: float | None = None) -> str:
    """``"mean ± std"`` with two decimals, plus ``" (↓ d)"`` / ``" (↑ d)"`` when a change is given.

    Args:
        mean_pct: mean in percent (NaN gives ``"–"``).
        std_pct: std in percent.
        change_pct: cross-domain minus same-domain mean, percentage points; ``None``/NaN for none.
            It is shown with one decimal; a change that rounds to zero shows ``(= 0.0)``.
    """
    if not math.isfinite(mean_pct):
        return "–"
    cell = f"{mean_pct:.2f} ± {std_pct:.2f}"
    if change_pct is not None and math.isfinite(change_pct):
        mag = f"{abs(change_pct):.1f}"
        arrow = "=" if float(mag) == 0.0 else ("↓" if change_pct < 0 else "↑")
        cell += f" ({arrow} {mag})"
    return cell


def _members(perf: pd.DataFrame) -> pd.DataFrame:
    """One row per member with its ID score (``perf`` repeats it once per target)."""
    return perf.drop_duplicates("member_id")[["member_id", "arch", "lr", "epochs", "seed", "source", "id_score"]]


def select_best_configs(perf: pd.DataFrame) -> pd.DataFrame:
    """Per (source, arch): the (lr, epochs) with the best mean ID score over seeds.

    Ties go to the smaller lr, then the fewer epochs; configurations whose ID score is NaN
    for every seed are chosen only when nothing else is left.

    Args:
        perf: a ``performance_table``.

    Returns:
        Columns ``source, arch, lr, epochs, id_mean, n_seeds``, one row per (source, arch).
    """
    m = _members(perf)
    cfg = (m.groupby(["source", "arch", "lr", "epochs"], sort=True)
           .agg(id_mean=("id_score", "mean"), n_seeds=("member_id", "size")).reset_index())
    cfg = cfg.sort_values(["source", "arch", "id_mean", "lr", "epochs"],
                          ascending=[True, True, False, True, True], na_position="last", kind="stable")
    return cfg.groupby(["source", "arch"], sort=False).head(1).reset_index(drop=True)


def _mean_std_pct(values: pd.Series) -> tuple[float, float, int]:
    v = values.astype(float).to_numpy()
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan, 0
    return 100.0 * float(v.mean()), 100.0 * float(v.std(ddof=0)), int(v.size)


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
    rows = []
    for b in best.itertuples(index=False):
        sel_ids = m.loc[(m["source"] == b.source) & (m["arch"] == b.arch) & (m["lr"] == b.lr)
                        & (m["epochs"] == b.epochs), "member_id"]
        same_mean, same_std, n = _mean_std_pct(m.loc[m["member_id"].isin(sel_ids), "id_score"])
        base = {"source": str(b.source), "arch": str(b.arch), "lr": float(b.lr), "epochs": int(b.epochs)}
        rows.append({"domain": SAME, "setting": str(b.source), "target": "", **base, "n_seeds": n,
                     "mean_pct": same_mean, "std_pct": same_std, "change_pct": math.nan,
                     "cell": format_cell(same_mean, same_std)})
        for t in targets:
            sub = perf[(perf["target"].astype(str) == t) & perf["member_id"].isin(sel_ids)]
            if sub.empty:
                continue
            mean, std, n_t = _mean_std_pct(sub["ood_score"])
            change = mean - same_mean
            rows.append({"domain": CROSS, "setting": f"{b.source} → {t}", "target": t, **base, "n_seeds": n_t,
                         "mean_pct": mean, "std_pct": std, "change_pct": change,
                         "cell": format_cell(mean, std, change)})
    return pd.DataFrame(rows, columns=["domain", "setting", "source", "target", "arch", "lr", "epochs", "n_seeds",
                                       "mean_pct", "std_pct", "change_pct", "cell"])


def table1(perf: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as printed: columns ``domain, setting`` then one column of cells per architecture.

    Rows: the Same-Dom. row of each source, then its Cross-Dom. rows in target order. A
    missing cell is ``"–"``.
    """
    long = table1_long(perf)
    archs = sorted(long["arch"].unique())
    settings = list(dict.fromkeys(zip(long["domain"], long["setting"], long["source"])))
    settings.sort(key=lambda s: (s[2], s[0] != SAME))  # per source: Same-Dom. first, order kept
    wide = long.pivot(index=["domain", "setting"], columns="arch", values="cell")
    wide = wide.reindex(pd.MultiIndex.from_tuples([s[:2] for s in settings], names=["domain", "setting"]),
                        columns=archs).fillna("–")
    wide.columns.name = None
    return wide.reset_index()


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``df`` (cells as ``str``; ``|`` escaped)."""
    def esc(v: object) -> str:
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def table1_markdown(perf: pd.DataFrame) -> str:
    """Table 1 in markdown with a caption naming the metric and the configuration selection."""
    metric = str(perf["metric"].iloc[0]) if len(perf) else "score"
    best = select_best_configs(perf)
    chosen = "; ".join(f"{b.arch}: lr {b.lr:g}, {b.epochs} epochs ({b.n_seeds} seeds)"
                       for b in best.itertuples(index=False))
    caption = (f"**Table 1.** {metric} (%) on the source test split (Same-Dom.) and on each target site "
               f"(Cross-Dom.), mean ± std over seeds (population std). Per architecture, the (lr, epochs) "
               f"configuration with the best mean ID {metric} on the source test split is reported "
               f"(selection uses source labels only). (↓ d) / (↑ d): change against the Same-Dom. "
               f"mean in percentage points. Selected: {chosen}.")
    return caption + "\n\n" + markdown_table(table1(perf))


def _f(v: float, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def correlation_markdown(corr: pd.DataFrame) -> str:
    """The ``correlations`` table in markdown: one row per (indicator, source → target)."""
    rows = []
    for r in corr.itertuples(index=False):
        rows.append({
            "indicator": r.indicator, "setting": f"{r.source} → {r.target}", "n": r.n,
            "Pearson r [95% CI]": (f"{_f(r.pearson_r, '.3f')} [{_f(r.pearson_ci_low, '.3f')}, "
                                   f"{_f(r.pearson_ci_high, '.3f')}]"),
            "p": _f(r.pearson_p, '.2g'), "Spearman ρ": _f(r.spearman_rho, '.3f'), "ρ p": _f(r.spearman_p, '.2g'),
            "probit slope": _f(r.probit_slope, '.3f'), "probit intercept": _f(r.probit_intercept, '.3f'),
            "probit R²": _f(r.probit_r2, '.3f'),
        })
    metric = str(corr["metric"].iloc[0]) if len(corr) else "score"
    caption = (f"**Correlation with OOD {metric}** across the pool (one point per member). Pearson r with "
               f"its 95% confidence interval (Fisher z) and Spearman ρ on raw scores; probit fit: least "
               f"squares of probit(OOD) on probit(indicator).")
    cols = ["indicator", "setting", "n", "Pearson r [95% CI]", "p", "Spearman ρ", "ρ p", "probit slope",
            "probit intercept", "probit R²"]
    return caption + "\n\n" + markdown_table(pd.DataFrame(rows, columns=cols))
