"""Tests of the analysis stage on synthetic records with hand-checkable answers."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import joint_tables, run_analysis
from analysis.correlate import MIN_POINTS, STAT_KEYS, correlate, correlations, probit
from analysis.plots import plot_on_the_line, probit_ticks
from analysis.performance import MEMBER_EXTRAS, PERFORMANCE_COLUMNS, performance_table, scores_long
from analysis.tables import format_cell, select_best_configs, table1, table1_long, table1_markdown
from trainables.records import write_member_part

REPO = Path(__file__).resolve().parents[1]


# --- synthetic records ------------------------------------------------------------------

def _member(mid: str, arch: str, lr: float, epochs: int, seed: int, source: str = "A") -> dict:
    return {"member_id": mid, "run_id": mid, "arch": arch, "lr": lr, "epochs": epochs, "seed": seed,
            "batch_size": 4, "source": source, "checkpoint": f"/nowhere/{mid}.pt"}


def _slices(mid: str, scores: dict[tuple[str, str], float]) -> pd.DataFrame:
    """Slices whose iou_3d on each (site, role) is exactly ``score`` (a multiple of 0.01).

    Each (site, role) gets one case of two slices: slice 0 with tp = 100 s, fp = 100 (1 - s);
    slice 1 with true negatives only (empty truth, empty prediction), which must not change
    the case IoU tp / (tp + fp) = s.
    """
    rows = []
    for (site, role), s in scores.items():
        tp = int(round(100 * s))
        rows.append(dict(member_id=mid, site=site, role=role, case_id="c0", slice_idx=0,
                         tp=tp, fp=100 - tp, fn=0, tn=0, area_px=100))
        rows.append(dict(member_id=mid, site=site, role=role, case_id="c0", slice_idx=1,
                         tp=0, fp=0, fn=0, tn=100, area_px=100))
    return pd.DataFrame(rows)


def _perf(rows: list[tuple]) -> pd.DataFrame:
    """A performance table from (member_id, arch, lr, epochs, seed, target, id, ood) tuples."""
    df = pd.DataFrame(rows, columns=["member_id", "arch", "lr", "epochs", "seed", "target", "id_score", "ood_score"])
    df["source"] = "A"
    df["metric"] = "iou_3d"
    return df[PERFORMANCE_COLUMNS]


# --- performance table ------------------------------------------------------------------

def test_performance_table_known_scores():
    members = pd.DataFrame([_member("m1", "unet", 1e-3, 5, 0), _member("m2", "medsam", 1e-4, 10, 1)])
    slices = pd.concat([
        _slices("m1", {("A", "id"): 0.80, ("B", "ood"): 0.50, ("C", "ood"): 0.25}),
        _slices("m2", {("A", "id"): 0.90, ("B", "ood"): 0.70, ("C", "ood"): 0.60}),
    ], ignore_index=True)
    perf = performance_table(members, slices, "iou_3d")
    assert list(perf.columns) == PERFORMANCE_COLUMNS + MEMBER_EXTRAS + ["val_score"]
    assert len(perf) == 4
    got = {(r.member_id, r.target): (r.id_score, r.ood_score) for r in perf.itertuples()}
    # tp / 100 with integer tp is the double nearest the decimal literal: exact comparison.
    assert got == {("m1", "B"): (0.80, 0.50), ("m1", "C"): (0.80, 0.25),
                   ("m2", "B"): (0.90, 0.70), ("m2", "C"): (0.90, 0.60)}
    m2 = perf[perf["member_id"] == "m2"].iloc[0]
    assert (m2["arch"], m2["lr"], m2["epochs"], m2["seed"], m2["source"]) == ("medsam", 1e-4, 10, 1, "A")
    assert list(perf["target"]) == ["B", "B", "C", "C"]

    long = scores_long(slices, "iou_3d")
    assert len(long) == 6 and set(long["role"]) == {"id", "ood"}


def test_performance_table_aggregates_counts_per_case():
    # One case, two slices: IoU 30/40 and 30/60 per slice, but the case IoU is 60/100 = 0.6.
    members = pd.DataFrame([_member("m", "unet", 1e-3, 5, 0)])
    slices = pd.DataFrame([
        dict(member_id="m", site="A", role="id", case_id="c", slice_idx=0, tp=30, fp=10, fn=0, tn=60, area_px=100),
        dict(member_id="m", site="A", role="id", case_id="c", slice_idx=1, tp=30, fp=30, fn=0, tn=40, area_px=100),
        dict(member_id="m", site="B", role="ood", case_id="d", slice_idx=0, tp=1, fp=1, fn=2, tn=96, area_px=100),
    ])
    perf = performance_table(members, slices, "iou_3d")
    assert perf["id_score"].iloc[0] == pytest.approx(0.6)
    assert perf["ood_score"].iloc[0] == pytest.approx(0.25)


def test_unknown_metric_lists_valid_ones():
    with pytest.raises(ValueError, match="iou_3d, dice_2d, dice_global"):
        performance_table(pd.DataFrame(), pd.DataFrame(), "accuracy")


# --- correlation ------------------------------------------------------------------------

def test_points_on_a_probit_line():
    x = np.linspace(0.2, 0.95, 12)
    y = stats.norm.cdf(0.5 * probit(x) + 0.2)
    assert y.min() > 0.01 and y.max() < 0.99  # away from the clipping eps
    st = correlate(x, y)
    assert st["n"] == 12
    assert st["probit_slope"] == pytest.approx(0.5, abs=1e-9)
    assert st["probit_intercept"] == pytest.approx(0.2, abs=1e-9)
    assert st["probit_r2"] == pytest.approx(1.0, abs=1e-9)
    assert st["probit_r"] == pytest.approx(1.0, abs=1e-9)
    assert stats.pearsonr(probit(x), probit(y)).statistic == pytest.approx(1.0, abs=1e-9)
    assert st["spearman_rho"] == pytest.approx(1.0)
    assert st["kendall_tau"] == pytest.approx(1.0)
    assert st["pearson_r"] > 0.99  # raw values: monotone, nearly linear


def test_independent_points_are_uncorrelated():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.05, 0.95, 200), rng.uniform(0.05, 0.95, 200)
    st = correlate(x, y)
    assert st["n"] == 200
    assert abs(st["pearson_r"]) < 0.2
    assert abs(st["spearman_rho"]) < 0.2
    assert abs(st["probit_r"]) < 0.2


def test_pearson_ci_contains_r():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.3, 0.9, 30)
    y = np.clip(0.8 * x + rng.normal(0, 0.08, 30), 0, 1)
    st = correlate(x, y)
    assert st["pearson_ci_low"] < st["pearson_r"] < st["pearson_ci_high"]
    assert -1 <= st["pearson_ci_low"] and st["pearson_ci_high"] <= 1


@pytest.mark.parametrize("x, y", [
    ([0.5, 0.6, 0.7], [0.4, 0.5, 0.7]),              # n = 3 < MIN_POINTS
    ([], []),
    ([0.5, 0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]),  # constant x
    ([0.5, 0.6, np.nan, 0.8, 0.9], [0.1, 0.2, 0.3, np.nan, 0.5]),  # NaN pairs dropped -> n = 3
])
def test_degenerate_input_gives_nan_without_warnings(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = correlate(np.array(x, dtype=float), np.array(y, dtype=float))
    assert list(st) == [*STAT_KEYS, "resample"] and st["resample"] == "member"
    for k in ("pearson_r", "pearson_p", "pearson_ci_low", "pearson_ci_high", "spearman_rho", "spearman_ci_low",
              "kendall_tau", "kendall_ci_high", "pearson_boot_low", "probit_r2"):
        assert math.isnan(st[k]), k
    assert st["n"] < MIN_POINTS or len(set(x)) == 1


def test_correlations_one_row_per_target():
    x = np.linspace(0.3, 0.9, 6)
    rows = [(f"m{i}", "unet", 1e-3, 5, i, t, xi, yi)
            for t, ys in (("B", stats.norm.cdf(0.5 * probit(x) + 0.2)), ("C", x[::-1]))
            for i, (xi, yi) in enumerate(zip(x, ys))]
    corr = correlations(_perf(rows))
    assert list(corr["target"]) == ["B", "C"]
    assert set(corr["indicator"]) == {"id_performance"} and set(corr["metric"]) == {"iou_3d"}
    b, c = corr.iloc[0], corr.iloc[1]
    assert b["probit_slope"] == pytest.approx(0.5) and b["probit_r2"] == pytest.approx(1.0)
    assert c["pearson_r"] == pytest.approx(-1.0) and c["spearman_rho"] == pytest.approx(-1.0)


# --- Table 1 ----------------------------------------------------------------------------

def test_format_cell_paper_form():
    assert format_cell(56.111, 4.934, -20.7) == "56.11 ± 4.93 (↓ 20.7)"
    assert format_cell(80.0, 1.0, 3.04) == "80.00 ± 1.00 (↑ 3.0)"
    assert format_cell(80.0, 0.0) == "80.00 ± 0.00"
    assert format_cell(80.0, 0.0, 0.01) == "80.00 ± 0.00 (= 0.0)"
    assert format_cell(float("nan"), float("nan"), 1.0) == "–"


def _table_pool() -> pd.DataFrame:
    rows = []
    # unet, lr 1e-3: ID 0.80 / 0.70 (mean 75.00, sample std 7.07); OOD B 0.50 / 0.60, OOD C 0.80 / 0.76.
    for s, (i, b, c) in enumerate([(0.80, 0.50, 0.80), (0.70, 0.60, 0.76)]):
        rows += [(f"u3-{s}", "unet", 1e-3, 5, s, "B", i, b), (f"u3-{s}", "unet", 1e-3, 5, s, "C", i, c)]
    # unet, lr 1e-4: worse on ID (mean 0.61) but better on B: must not be selected.
    for s, (i, b, c) in enumerate([(0.60, 0.58, 0.59), (0.62, 0.60, 0.61)]):
        rows += [(f"u4-{s}", "unet", 1e-4, 5, s, "B", i, b), (f"u4-{s}", "unet", 1e-4, 5, s, "C", i, c)]
    # medsam: a single seed -> no std.
    rows += [("ms-0", "medsam", 1e-4, 10, 0, "B", 0.90, 0.45), ("ms-0", "medsam", 1e-4, 10, 0, "C", 0.90, 0.90)]
    return _perf(rows)


def test_best_config_selection_uses_id_score():
    best = select_best_configs(_table_pool()).set_index("arch")
    assert best.loc["unet", "lr"] == 1e-3
    assert best.loc["unet", "id_mean"] == pytest.approx(0.75)
    assert best.loc["unet", "n_seeds"] == 2
    assert best.loc["medsam", "lr"] == 1e-4 and best.loc["medsam", "epochs"] == 10


def test_best_config_selection_uses_the_validation_split_when_there_is_one():
    perf = _table_pool()
    perf["val_score"] = np.where(perf["member_id"].str.startswith("u4"), 0.9, 0.5)  # validation prefers lr 1e-4
    best = select_best_configs(perf).set_index("arch")
    assert best.loc["unet", "lr"] == 1e-4 and best.loc["unet", "selected_on"] == "val_score"
    md = table1_markdown(perf)
    assert "on the validation split (source training cases held out" in md and "ddof = 1" in md
    assert "60.00 ± 1.41" in md                                  # the Same-Dom. row reports the test split
    assert "no validation split in the records" in table1_markdown(_table_pool())


def test_table1_cells():
    wide = table1(_table_pool()).set_index("setting")
    assert list(wide.columns) == ["domain", "medsam", "unet", "seed spread"]  # tests/test_seeds.py: the last
    assert list(wide.index) == ["A", "A → B", "A → C"]
    assert wide.loc["A", "domain"] == "Same-Dom." and wide.loc["A → B", "domain"] == "Cross-Dom."
    assert wide.loc["A", "unet"] == "75.00 ± 7.07"               # sample std (ddof=1) over two seeds
    assert wide.loc["A → B", "unet"] == "55.00 ± 7.07 (↓ 20.0)"
    assert wide.loc["A → C", "unet"] == "78.00 ± 2.83 (↑ 3.0)"
    assert wide.loc["A", "medsam"] == "90.00 ± –"
    assert wide.loc["A → B", "medsam"] == "45.00 ± – (↓ 45.0)"
    assert wide.loc["A → C", "medsam"] == "90.00 ± – (= 0.0)"

    by_arch = table1(_table_pool(), orient="archs").set_index("arch")  # the layout of the paper's Tables 2-3
    assert list(by_arch.columns) == ["Same-Dom.: A", "Cross-Dom.: A → B", "Cross-Dom.: A → C"]
    assert by_arch.loc["unet", "Cross-Dom.: A → B"] == "55.00 ± 7.07 (↓ 20.0)"
    with pytest.raises(ValueError, match="orient must be 'settings'"):
        table1(_table_pool(), orient="sideways")

    long = table1_long(_table_pool())
    row = long[(long["arch"] == "unet") & (long["target"] == "B")].iloc[0]
    assert row["change_pct"] == pytest.approx(-20.0) and row["n_seeds"] == 2


# --- plots and the stage ----------------------------------------------------------------

def test_probit_ticks_inside_range():
    lo, hi = float(probit(0.25)), float(probit(0.97))
    ticks = probit_ticks(lo, hi)
    assert ticks == [0.3, 0.5, 0.7, 0.9, 0.95]
    assert len(probit_ticks(float(probit(0.82)), float(probit(0.93)))) >= 2  # narrow range -> finer ticks


def test_plot_on_the_line_writes_png(tmp_path):
    path = plot_on_the_line(_table_pool(), "B", tmp_path / "p" / "b.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows for target 'Z'"):
        plot_on_the_line(_table_pool(), "Z", tmp_path / "z.png")


def _write_experiment(exp: Path) -> None:
    archs, lrs, seeds = ("unet_r18", "medsam_tiny"), (1e-3, 1e-4), (0, 1, 2)
    k = 0
    for a, arch in enumerate(archs):
        for l, lr in enumerate(lrs):
            for seed in seeds:
                id_s = round(0.55 + 0.1 * a + 0.08 * l + 0.03 * seed, 2)
                b = round(float(stats.norm.cdf(0.8 * probit(id_s) - 0.3)), 2)
                c = round(0.2 + 0.05 * ((k * 7) % 5), 2)
                mid = f"{arch}-lr{lr:g}-s{seed}-ep3"
                write_member_part(exp, _member(mid, arch, lr, 3, seed, source="A"),
                                  _slices(mid, {("A", "id"): id_s, ("B", "ood"): b, ("C site", "ood"): c}))
                k += 1


def test_run_analysis_writes_every_file(tmp_path):
    exp = tmp_path / "exp"
    _write_experiment(exp)
    res = run_analysis(exp, n_resamples=29)
    out = exp / "analysis"
    assert res["out_dir"] == str(out)
    names = {str(Path(f).relative_to(out)) for f in res["files"]}
    assert names == {"performance.csv", "indicators.csv", "correlations.csv", "correlations_long.csv", "table1.csv",
                     "table1_long.csv", "selection.csv", "loto.csv", "loto_summary.csv", "tables.md", "summary.json",
                     "plots/fig4_B.png", "plots/fig4_C_site.png", "claims.csv", "claims.md"}
    for f in res["files"]:
        assert Path(f).stat().st_size > 0, f
    assert len(pd.read_csv(out / "performance.csv")) == 24
    # no predictions and no uncertainty records: only ID performance, and the notes say why; the
    # medsam_tiny members are oracle-prompted: every row once without them (label-free), once with them
    assert len(res["correlations"]) == 4
    assert {c["indicator"] for c in res["correlations"]} == {"id_performance"}
    assert [c["members"] for c in res["correlations"]] == ["label-free"] * 2 + ["all"] * 2
    assert [c["n"] for c in res["correlations"]] == [6, 6, 12, 12]
    assert any("6 of 12 members (medsam_tiny)" in n and "oracle_prompt" in n for n in res["notes"])
    assert any("no predicted masks" in n for n in res["notes"])
    assert any("no uncertainty records" in n and "Table 4" in n for n in res["notes"])
    b = next(c for c in res["correlations"] if c["target"] == "B" and c["members"] == "all")
    assert b["pearson_r"] > 0.95 and b["n"] == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "iou_3d" and summary["n_members"] == 12
    assert [c["target"] for c in summary["correlations"]] == ["B", "C site"] * 2
    assert summary["oracle_members"] == sorted(f"medsam_tiny-lr{lr:g}-s{s}-ep3"
                                               for lr in (1e-3, 1e-4) for s in (0, 1, 2))
    md = (out / "tables.md").read_text()
    assert "iou_3d" in md and "12 pool members" in md and "A → B" in md
    assert "Fig. 3: skipped" in md and "Table 4: uncertainty methods" in md and "Skipped: no uncertainty" in md
    t1 = pd.read_csv(out / "table1.csv")
    assert list(t1.columns) == ["domain", "setting", "medsam_tiny", "unet_r18", "seed spread"]
    assert "over 3 seeds" in md.split("## Pool health")[1].split("##")[0]  # 3 seeds a configuration: the spread
    assert "| medsam_tiny † |" in md and "† oracle-prompted" in md and "Label-free members** (6" in md
    assert "29 bootstrap resamples of pool members (no run ids in the records, or one member per run)" in md
    sel = pd.read_csv(out / "selection.csv")
    assert set(sel["indicator"]) == {"id_performance"} and len(sel) == 4
    assert not sel.loc[sel["members"] == "label-free", "chosen_arch"].str.startswith("medsam").any()

    other = run_analysis(exp, metric="dice_global", out_dir=tmp_path / "other", n_resamples=0)
    assert Path(other["out_dir"]) == tmp_path / "other" and (tmp_path / "other" / "tables.md").exists()


def test_correlations_match_scipy_on_the_written_columns(tmp_path):
    exp = tmp_path / "exp"
    _write_experiment(exp)
    res = run_analysis(exp, n_resamples=0)
    table = pd.read_csv(Path(res["out_dir"]) / "indicators.csv")
    for c in res["correlations"]:
        g = table[(table["target"] == c["target"]) & (table["members"] == c["members"])]
        x, y = g["id_score"].to_numpy(), g["ood_score"].to_numpy()
        assert c["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
        assert c["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert c["kendall_tau"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        ci = stats.pearsonr(x, y).confidence_interval(0.95)
        assert (c["pearson_ci_low"], c["pearson_ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
        assert c["probit_clip_x"] == c["probit_clip_y"] == 1e-3  # one case per site: too few for half a case
        fit = stats.linregress(probit(x), probit(y))
        assert c["probit_slope"] == pytest.approx(fit.slope, abs=1e-12)
        assert c["probit_r2"] == pytest.approx(fit.rvalue ** 2, abs=1e-12)


def test_bootstrap_intervals_are_reproducible_and_cover_the_estimate():
    rng = np.random.default_rng(3)
    x = rng.uniform(0.3, 0.9, 40)
    y = np.clip(0.7 * x + rng.normal(0, 0.1, 40), 0.01, 0.99)
    a, b = correlate(x, y, n_resamples=99, seed=5), correlate(x, y, n_resamples=99, seed=5)
    assert a == b
    for est, lo, hi in (("spearman_rho", "spearman_ci_low", "spearman_ci_high"),
                        ("pearson_r", "pearson_boot_low", "pearson_boot_high")):
        assert -1 <= a[lo] < a[est] < a[hi] <= 1, est
    assert math.isnan(a["kendall_ci_low"])  # no vectorised τ: no interval (correlate.weighted_rank_stats)
    assert math.isnan(correlate(x, y, n_resamples=0)["spearman_ci_low"])


def test_run_analysis_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no pool records in .*records.*oodsweep run"):
        run_analysis(tmp_path / "empty")
    with pytest.raises(ValueError, match="valid metrics: iou_3d, dice_2d, dice_global"):
        run_analysis(tmp_path / "empty", metric="auc")
    with pytest.raises(ValueError, match=r"indicators\[1\]: unknown indicator 'luck'; valid names: id_performance"):
        run_analysis(tmp_path / "empty", indicators=["agreement", "luck"])


def test_analysis_imports_no_ray_torch_sweeps_or_pyplot():
    code = ("import sys, analysis, analysis.plots, analysis.tables, analysis.selection, analysis.examples; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'torch', 'sweeps', 'mlflow'} "
            "or m == 'matplotlib.pyplot'); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_degenerate_members_are_flagged_and_left_out_of_a_second_row():
    rng = np.random.default_rng(9)
    x = rng.uniform(0.4, 0.9, 12)
    y = np.clip(stats.norm.cdf(0.9 * probit(x) - 0.2) + rng.normal(0, 0.02, 12), 0.02, 0.98)
    x[0], y[0] = 0.005, 0.001                         # a member that predicts (almost) nothing
    perf = _perf([(f"m{i}", "unet", 1e-3, 5, i, "B", x[i], y[i]) for i in range(12)])
    out = correlations(perf, n_resamples=0, members="label-free", floor=0.01)
    assert list(out["members"]) == ["label-free", "label-free (non-degenerate)"]
    assert list(out["n_degenerate"]) == [1, 0] and list(out["n"]) == [12, 11]
    fit = stats.linregress(probit(x[1:]), probit(y[1:]))
    assert out["probit_slope"].iloc[1] == pytest.approx(fit.slope)
    assert abs(out["probit_slope"].iloc[0] - fit.slope) > 0.05  # the floor point pulls the slope alone
    assert len(correlations(perf, n_resamples=0, floor=None)) == 1


def test_joint_table1_across_experiments_has_every_source_same_domain_row(tmp_path):
    _write_experiment(tmp_path / "bmc")
    for i, mid in enumerate(("u-s0", "u-s1", "u-s2", "u-s3")):                # a second source, D
        write_member_part(tmp_path / "bidmc", _member(mid, "unet_r18", 1e-3, 3, i, source="D"),
                          _slices(mid, {("D", "id"): 0.6 + 0.05 * i, ("B", "ood"): 0.4 + 0.02 * i}))
    for name in ("bmc", "bidmc"):
        run_analysis(tmp_path / name, n_resamples=0)
    files = joint_tables([tmp_path / "bmc", tmp_path / "bidmc"], tmp_path / "report")
    t1 = pd.read_csv(files[0])
    assert list(t1["setting"]) == ["A", "A → B", "A → C site", "D", "D → B"]
    assert list(t1["domain"]) == ["Same-Dom.", "Cross-Dom.", "Cross-Dom.", "Same-Dom.", "Cross-Dom."]
    assert "medsam_tiny †" in files[1].read_text()
    with pytest.raises(ValueError, match="source 'A' is in both"):
        joint_tables([tmp_path / "bmc", tmp_path / "bmc"], tmp_path / "report")
    with pytest.raises(FileNotFoundError, match="run `oodsweep analyze`"):
        joint_tables([tmp_path / "nowhere"], tmp_path / "report")


def test_cli_unknown_metric_lists_the_choices(capsys):
    from sweeps.cli import main

    with pytest.raises(SystemExit):
        main(["analyze", "some/experiment", "--metric", "auc"])
    err = capsys.readouterr().err
    assert "invalid choice: 'auc'" in err and "iou_3d, dice_2d" not in err and "'dice_global_micro'" in err
