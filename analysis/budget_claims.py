"""C4 at two δ budgets: the δ-budget sensitivity's rows of the claims report (docs/uncertainty.md "δ's training
budget").

With ``uncertainty.sensitivity`` the experiment holds a second δ per member of a subset, fitted longer and recorded
apart (``records/uncertainty_budget``). C4 (δ's uncertain area against OOD performance) is then read twice on that
subset, by ``analysis.claim_stats.indicator_rows`` unchanged: with the default δ's area and with the longer δ's,
so the two differ only in δ's budget. The rows are ``kind = "sensitivity"`` (never a verdict row: C4's verdict is
its overall row on every label-free member), scoped ``δ budget <E> epochs (subset of <N>)``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.claim_stats import indicator_rows
from analysis.correlate import N_RESAMPLES, SEED
from analysis.tables import markdown_table
from analysis.uncertainty_indicators import uncertainty_indicator_frame

KIND = "sensitivity"


def _epochs(fits: pd.DataFrame) -> str:
    """The fits' epochs as the scope names them ("9"; "3-9" when they differ; "?" without a record)."""
    e = sorted({int(v) for v in pd.to_numeric(fits.get("epochs", pd.Series(dtype=float)), errors="coerce").dropna()})
    return "?" if not e else str(e[0]) if len(e) == 1 else f"{e[0]}-{e[-1]}"


def budget_rows(table: pd.DataFrame | None, unc_budget: pd.DataFrame | None, default_epochs: str, budget_epochs: str,
                n_resamples: int = N_RESAMPLES, seed: int = SEED) -> list[dict]:
    """C4's sensitivity rows: the default δ's and the longer δ's uncertain area on the same members.

    Args:
        table: the label-free members' ``indicator_table`` (its ``uncertain_area``: the default δ's).
        unc_budget: the longer δ's slice records (``records.load_uncertainty_budget``); None or no 'ggd' rows:
            no rows (the experiment has no sensitivity).
        default_epochs, budget_epochs: the two budgets, as the scopes name them.
        n_resamples, seed: the run-level bootstrap's (``indicator_rows``').

    Returns:
        Two rows (``CLAIM_COLUMNS``), or none: C4 overall on the subset, at the default budget then the longer one;
        the subset is the label-free members the longer δ was fitted on.
    """
    if table is None or table.empty or unc_budget is None or not (unc_budget["method"] == "ggd").any():
        return []
    longer = uncertainty_indicator_frame(unc_budget, method="ggd")["uncertain_area"]
    subset = set(longer.index.get_level_values("member_id").astype(str))
    base = table[table["member_id"].astype(str).isin(subset)].reset_index(drop=True)
    again = base.copy()
    keys = pd.MultiIndex.from_arrays([again["member_id"].astype(str), again["target"].astype(str)])
    again["uncertain_area"] = longer.reindex(keys).to_numpy(dtype=float)
    n = int(base["member_id"].nunique())
    rows = []
    for epochs, tb in ((default_epochs, base), (budget_epochs, again)):
        row = indicator_rows(tb, "uncertain_area", "C4", "claim", "strong_negative", n_resamples, seed,
                             per_target=False)[0]
        row.update(kind=KIND, scope=f"δ budget {epochs} epochs (subset of {n})")
        rows.append(row)
    return rows


def experiment_budget_rows(experiment_dir: str | Path, table: pd.DataFrame | None, n_resamples: int = N_RESAMPLES,
                           seed: int = SEED) -> list[dict]:
    """``budget_rows`` from an experiment's records (none when it holds no δ-budget records)."""
    from trainables.records import load_uncertainty_budget, load_uncertainty_budget_fits, load_uncertainty_fits

    unc_budget = load_uncertainty_budget(experiment_dir)
    if unc_budget is None:
        return []
    return budget_rows(table, unc_budget, _epochs(load_uncertainty_fits(experiment_dir)),
                       _epochs(load_uncertainty_budget_fits(experiment_dir)), n_resamples, seed)


def with_budget_rows(claims: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """``claims`` with the sensitivity rows appended (after every other row: each claim's first row stays its
    verdict row)."""
    if not rows:
        return claims
    return pd.concat([claims, pd.DataFrame(rows, columns=claims.columns)],
                     ignore_index=True).fillna({"scale": "", "verdict_nondegenerate": ""})


def budget_markdown(claims: pd.DataFrame, shown) -> list[str]:
    """``claims.md``'s section on δ's budget (empty without sensitivity rows); ``shown``: the report's row format."""
    sens = claims[claims["kind"] == KIND]
    if sens.empty:
        return []
    c4 = claims[(claims["claim"] == "C4") & (claims["kind"] == "claim") & claims["scope"].str.startswith("overall")]
    return ["## δ's training budget (sensitivity, not a verdict)", "",
            "C4 read with δ refitted longer (`uncertainty.sensitivity`) on a subset of the members, beside the default "
            "δ on the same subset (the same rule; only δ's budget differs). The first row is C4's verdict row, on "
            "every label-free member.", "", markdown_table(shown(pd.concat([c4.iloc[:1], sens]))), ""]
