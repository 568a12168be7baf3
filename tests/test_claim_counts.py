"""The "computed on" cell of the claims report gives the members each target's statistic actually used."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.agreement import Agreement
from analysis.claim_rule import count_text, members_label, pair_counts, target_counts
from analysis.claim_stats import agreement_rows, indicator_rows, regret_rows
from analysis.indicators import indicator_table


def _table(n_runs: int = 6, missing_on_c: int = 1) -> pd.DataFrame:
    """Two snapshot members per run on targets B and C; the last ``missing_on_c`` members have no OOD score on C."""
    rng = np.random.default_rng(3)
    rows = []
    for r in range(n_runs):
        for ep in (1, 2):
            for t in ("B", "C"):
                rows.append({"member_id": f"r{r}-ep{ep}", "arch": "unet_r18", "lr": 1e-3, "epochs": ep, "seed": r,
                             "source": "A", "target": t, "metric": "iou_3d", "id_score": rng.uniform(0.5, 0.9),
                             "ood_score": rng.uniform(0.2, 0.8), "run_id": f"r{r}", "oracle_prompt": False,
                             "val_score": 0.8})
    perf = pd.DataFrame(rows)
    last = sorted(perf["member_id"].unique())[-missing_on_c:] if missing_on_c else []
    perf.loc[perf["member_id"].isin(last) & (perf["target"] == "C"), "ood_score"] = np.nan
    return indicator_table(perf)


def test_members_label_gives_a_range_where_targets_differ():
    assert members_label(48, 12, "run") == "label-free: 48 members, 12 runs"
    assert members_label([45, 44, 45], [12, 12, 12], "run") == "label-free: 44–45 members per target, 12 runs"
    assert members_label([5, 5], [3, 2], "run", who="x") == "x: 5 members, 2–3 runs per target"
    assert count_text([1128, 1125], "pairs") == "1125–1128 pairs per target"


def test_target_counts_count_the_rows_each_target_uses():
    tb = _table()
    used = tb[np.isfinite(tb["ood_score"])]
    assert target_counts(used, ["B", "C"]) == ([12, 11], [6, 6])
    # a whole run missing on C: one run fewer there
    tb2 = _table(missing_on_c=2)
    assert target_counts(tb2[np.isfinite(tb2["ood_score"])], ["B", "C"]) == ([12, 10], [6, 5])


def test_the_overall_rows_say_the_per_target_counts():
    tb = _table()
    rows = indicator_rows(tb, "id_performance", "C2", "claim", "weak", n_resamples=99)
    by = {r["scope"]: r for r in rows}
    assert by["overall"]["members"] == "label-free: 11–12 members per target, 6 runs"
    assert by["B"]["members"].startswith("label-free: 12 members") and by["C"]["members"].startswith("label-free: 11 ")
    reg = regret_rows(tb, ["id_performance"], n_resamples=99)[0]
    assert reg["members"] == "label-free: 11–12 members per target, 6 runs"


def test_c3_counts_members_and_pairs_with_agreement_on_each_target():
    n = 8
    rng = np.random.default_rng(4)
    a = rng.uniform(0.4, 0.95, (n, n))
    a = (a + a.T) / 2
    c = a.copy()
    c[0, 1] = c[1, 0] = np.nan                       # one pair undefined on C
    c[7, :] = c[:, 7] = np.nan                       # member 7 has no prediction on C
    ids = [f"r{k // 2}-ep{k % 2}" for k in range(n)]  # 4 runs of 2 members
    groups = [m.split("-")[0] for m in ids]
    assert pair_counts(a, c, groups) == (7, 4, 21 - 1)
    ag = Agreement(member_ids=ids, matrices={"A": a, "B": a.copy(), "C": c}, roles={"A": "id", "B": "ood", "C": "ood"})
    rows = agreement_rows(ag, dict(zip(ids, groups)), n_resamples=99)
    by = {r["scope"]: r for r in rows}
    assert by["overall"]["members"] == "label-free: 7–8 members per target, 4 runs, 20–28 pairs per target"
    assert by["C"]["members"] == "label-free: 7 members, 4 runs, 20 pairs"
    assert by["B"]["members"] == "label-free: 8 members, 4 runs, 28 pairs"


def test_the_fisher_z_interval_is_labelled_as_assuming_independent_members():
    from analysis.correlate import ID_COLUMNS, STAT_KEYS
    from analysis.tables import FISHER_COLUMN, correlation_markdown

    row = {k: float("nan") for k in STAT_KEYS} | {k: "" for k in ID_COLUMNS}
    row |= {"indicator": "id_performance", "metric": "iou_3d", "members": "label-free", "source": "A", "target": "B",
            "unit": "member", "resample": "run", "n_degenerate": 0, "n": 48, "n_units": 12, "pearson_r": 0.5,
            "pearson_ci_low": 0.25, "pearson_ci_high": 0.68, "pearson_boot_low": 0.1, "pearson_boot_high": 0.8}
    md = correlation_markdown(pd.DataFrame([row]))
    header = next(line for line in md.splitlines() if line.startswith("| indicator"))
    assert "assumes independent members" in FISHER_COLUMN and FISHER_COLUMN in header
    assert header.rstrip(" |").endswith(FISHER_COLUMN)                 # last: for comparison only
    assert "0.500 [0.100, 0.800]" in md and "[0.250, 0.680]" in md       # r with the run bootstrap; Fisher apart
    assert "treats every member as independent" in md
