"""Agreement, uncertainty, model selection and the paper's figures, on synthetic records with known answers."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import run_analysis
from analysis.agreement import agreement_matrices, pairwise_agreement, pairwise_dice, read_packed
from analysis.aline import aline_estimates, lines_test
from analysis.correlate import correlate, correlate_pairs, probit, resampling_units
from analysis.examples import Example, fig6_inputs
from analysis.indicators import INDICATORS, indicator_table, resolve_indicators
from analysis.plots import figure_fig3, figure_fig4, figure_fig6, save_figure
from analysis.selection import BASELINE, loto_estimates, select_models
from analysis.performance import PERFORMANCE_COLUMNS
from trainables import records


# --- helpers ------------------------------------------------------------------------------------

def _dice_reference(masks: np.ndarray) -> np.ndarray:
    """Per-pair mean Dice by explicit loops (the documented convention, written out)."""
    m = len(masks)
    out = np.ones((m, m))
    for i in range(m):
        for j in range(m):
            vals = []
            for a, b in zip(masks[i], masks[j]):
                den = a.sum() + b.sum()
                if den:
                    vals.append(2 * (a & b).sum() / den)
            out[i, j] = np.mean(vals) if vals else np.nan
    return out


def _packed(masks: np.ndarray) -> np.ndarray:
    m, n = masks.shape[:2]
    return np.packbits(masks.reshape(m, n, -1), axis=2)


def _points(fig) -> list[int]:
    """Scatter points per axes of a figure (colorbar axes excluded)."""
    return [sum(len(c.get_offsets()) for c in ax.collections) for ax in fig.axes if ax.collections]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _table(ood: dict[str, np.ndarray], id_score: np.ndarray, **cols: dict[str, np.ndarray]) -> pd.DataFrame:
    """An indicator table: members m0..m{n-1}, one row per (member, target)."""
    n = len(id_score)
    rows = []
    for t, y in ood.items():
        for i in range(n):
            rows.append({"member_id": f"m{i:02d}", "arch": ("unet", "medsam")[i % 2], "lr": 1e-3, "epochs": 5,
                         "seed": i, "source": "A", "target": t, "metric": "iou_3d", "id_score": id_score[i],
                         "ood_score": y[i], **{k: v[t][i] for k, v in cols.items()}})
    df = pd.DataFrame(rows)
    for c in ("id_agreement", "ood_agreement", "uncertain_area"):
        if c not in df.columns:
            df[c] = np.nan
    return df[PERFORMANCE_COLUMNS + ["id_agreement", "ood_agreement", "uncertain_area"]]


# --- agreement ----------------------------------------------------------------------------------

def test_pairwise_dice_matches_the_reference_and_is_symmetric_with_unit_diagonal():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 9, 5, 7)) < 0.3          # 6 members x 9 slices of 5 x 7 (35 px: padded bytes)
    masks[:, 3] = False                              # a slice every member leaves empty: counts for no pair
    masks[0, 5] = False                              # member 0 empty where others are not: Dice 0 there
    masks[4] = False                                 # a member that predicts nothing anywhere ...
    masks[5] = False                                 # ... and another one: undefined (NaN), like dice_2d
    masks[2] = masks[1]                              # identical members: 1
    got = pairwise_dice(_packed(masks), 35)
    np.testing.assert_allclose(got, _dice_reference(masks), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_array_equal(np.diag(got)[:4], 1.0)
    assert got[1, 2] == 1.0 and got[0, 4] == 0.0
    assert np.isnan(got[4, 5]) and np.isnan(got[4, 4])


def test_pairwise_dice_speckle_only_pixels_still_count_in_the_sizes():
    # Pixels marked by one member alone are left out of the product but not out of the mask sizes.
    a = np.zeros((1, 4, 4), bool)
    b = np.zeros((1, 4, 4), bool)
    a[0, 0, :2] = True          # 2 px, one shared with b
    b[0, 0, 1:4] = True         # 3 px
    got = pairwise_dice(_packed(np.stack([a, b])), 16)
    assert got[0, 1] == pytest.approx(2 * 1 / 5)


def test_agreement_from_stored_predictions(tmp_path):
    rng = np.random.default_rng(1)
    masks = rng.random((4, 6, 8, 8)) < 0.25
    cases, idx = [f"c{i // 3}" for i in range(6)], np.arange(6) % 3
    for i in range(4):
        for site in ("A", "B"):
            if (i, site) == (3, "B"):
                continue                                            # member 3 has no file on B
            m = masks[i] if site == "A" else ~masks[i]
            records.save_predictions(tmp_path, f"m{i}", site, m, cases, idx)
    p = read_packed(records.records_dir(tmp_path) / "predictions" / "m0" / "A.npz")
    assert p.shape == (6, 8, 8) and list(p.case_id) == cases
    ag = agreement_matrices(tmp_path, ["m0", "m1", "m2", "m3"], {"A": "id", "B": "ood"}, metric="mask_dice")
    assert ag.id_site == "A" and ag.roles == {"A": "id", "B": "ood"} and ag.n_slices == {"A": 6, "B": 6}
    np.testing.assert_allclose(ag.matrices["A"], _dice_reference(masks), atol=1e-12)
    assert np.isnan(ag.matrices["B"][3]).all() and np.isnan(ag.matrices["B"][:, 3]).all()
    np.testing.assert_allclose(ag.matrices["B"][:3, :3], _dice_reference(~masks[:3]), atol=1e-12)
    assert any("no predictions file for 1 member" in n for n in ag.notes)
    mean = ag.member_mean("A")
    ref = _dice_reference(masks)
    assert mean["m0"] == pytest.approx((ref[0, 1] + ref[0, 2] + ref[0, 3]) / 3)
    pairs = ag.pairs()
    assert len(pairs) == 6 and list(pairs.columns) == ["member_a", "member_b", "A", "B"]


def test_agreement_leaves_out_members_with_other_slices(tmp_path):
    masks = np.ones((3, 4, 4), bool)
    records.save_predictions(tmp_path, "m0", "A", masks, ["c"] * 3, [0, 1, 2])
    records.save_predictions(tmp_path, "m1", "A", masks, ["c"] * 3, [0, 1, 2])
    records.save_predictions(tmp_path, "m2", "A", masks, ["c"] * 3, [0, 1, 5])
    ag = agreement_matrices(tmp_path, ["m0", "m1", "m2"], {"A": "id"})
    assert ag.matrices["A"][0, 1] == 1.0 and np.isnan(ag.matrices["A"][2]).all()
    assert any("m2" in n and "same slices in the same order" in n for n in ag.notes)
    assert agreement_matrices(tmp_path / "none", ["m0"], {"A": "id"}).notes[0].startswith("no predicted masks")


def test_agreement_on_the_line_over_pairs():
    rng = np.random.default_rng(2)
    a = rng.uniform(0.2, 0.9, (10, 10))
    a = np.triu(a, 1) + np.triu(a, 1).T + np.eye(10)
    b = stats.norm.cdf(0.7 * probit(a) - 0.3)            # every pair exactly on a probit line
    st = correlate_pairs(a, b, n_resamples=49)
    assert st["n"] == 45 and st["n_units"] == 10 and st["resample"] == "member"
    assert st["probit_slope"] == pytest.approx(0.7) and st["probit_intercept"] == pytest.approx(-0.3)
    assert st["spearman_rho"] == pytest.approx(1.0) and st["kendall_tau"] == pytest.approx(1.0)
    assert st["pearson_boot_low"] <= st["pearson_r"] <= st["pearson_boot_high"] <= 1.0
    # pairs share members: no interval or p-value that treats them as independent points
    assert all(math.isnan(st[k]) for k in ("pearson_p", "pearson_ci_low", "pearson_ci_high", "spearman_p"))


# --- indicators and selection -------------------------------------------------------------------

def test_resolve_indicators_expands_groups():
    assert resolve_indicators(None) == tuple(INDICATORS)
    assert resolve_indicators(["id_performance", "agreement", "uncertainty"]) == (
        "id_performance", "id_agreement", "ood_agreement", "uncertain_area", "mean_uncertainty",
        "fixed_threshold_area", "guarded_area")


def test_regret_is_zero_when_the_indicator_orders_the_pool_like_the_truth():
    rng = np.random.default_rng(4)
    ood = {"B": rng.uniform(0.1, 0.9, 12), "C": rng.uniform(0.1, 0.9, 12)}
    id_score = rng.uniform(0.5, 0.9, 12)
    table = _table(ood, id_score,
                   ood_agreement={t: y ** 2 for t, y in ood.items()},           # same order, higher better
                   uncertain_area={t: 1 - y for t, y in ood.items()},           # same order, lower better
                   id_agreement={t: -y for t, y in ood.items()})                # reversed: the worst member
    sel = select_models(table, ["ood_agreement", "uncertain_area", "id_agreement"]).set_index(["target", "indicator"])
    for t, y in ood.items():
        for ind in ("ood_agreement", "uncertain_area"):
            r = sel.loc[(t, ind)]
            assert r["regret"] == 0.0 and r["chosen_rank"] == 1 and r["chosen_member"] == r["best_member"]
            assert r["best_ood"] == y.max()
        worst = sel.loc[(t, "id_agreement")]
        assert worst["regret"] == pytest.approx(y.max() - y.min()) and worst["chosen_rank"] == 12
        assert worst["random_regret"] == pytest.approx(y.max() - y.mean())
    assert set(sel.reset_index()["direction"]) == {"higher", "lower"}


def test_loto_estimates_are_exact_on_a_shared_line():
    x = np.linspace(0.2, 0.9, 10)
    line = stats.norm.cdf(0.6 * probit(x) + 0.1)
    ood = {"B": line, "C": line, "D": line}
    table = _table(ood, x, uncertain_area={t: 1 - x for t in ood})
    per_member, summary = loto_estimates(table, ["id_performance", "uncertain_area"])
    idp = summary[summary["indicator"] == "id_performance"]
    assert list(idp["target"]) == ["B", "C", "D"]
    assert idp["mae"].max() < 1e-12 and idp["slope"].to_numpy() == pytest.approx([0.6] * 3)
    assert summary.loc[summary["indicator"] == BASELINE, "mae"].max() < 1e-12
    assert len(per_member[per_member["indicator"] == "id_performance"]) == 30
    one = _table({"B": line}, x)
    assert loto_estimates(one, ["id_performance"])[1].empty


def test_indicator_table_joins_agreement_and_uncertainty():
    perf = _table({"B": np.array([0.5, 0.6]), "C": np.array([0.4, 0.3])}, np.array([0.8, 0.9]))[PERFORMANCE_COLUMNS]
    from analysis.agreement import Agreement
    ag = Agreement(member_ids=["m00", "m01"], matrices={"A": np.array([[1, 0.7], [0.7, 1]]),
                                                        "B": np.array([[1, 0.4], [0.4, 1]])},
                   roles={"A": "id", "B": "ood"})
    ua = pd.Series([0.1, 0.2, 0.3], index=pd.MultiIndex.from_tuples([("m00", "B"), ("m01", "B"), ("m00", "C")]))
    t = indicator_table(perf, ag, ua).set_index(["member_id", "target"])
    assert t.loc[("m00", "B"), "id_agreement"] == 0.7 and t.loc[("m01", "C"), "id_agreement"] == 0.7
    assert t.loc[("m01", "B"), "ood_agreement"] == 0.4 and math.isnan(t.loc[("m00", "C"), "ood_agreement"])
    assert t.loc[("m01", "B"), "uncertain_area"] == 0.2 and math.isnan(t.loc[("m01", "C"), "uncertain_area"])


# --- figures ------------------------------------------------------------------------------------

def test_fig4_one_point_per_member_and_pair_axes_span_the_data(tmp_path):
    from analysis.agreement import Agreement
    rng = np.random.default_rng(5)
    n = 9
    x = rng.uniform(0.3, 0.95, n)
    a_id = rng.uniform(0.4, 0.95, (n, n))
    a_id = np.triu(a_id, 1) + np.triu(a_id, 1).T + np.eye(n)
    a_b = np.clip(a_id - 0.2, 0.01, 1)
    ag = Agreement(member_ids=[f"m{i:02d}" for i in range(n)], matrices={"A": a_id, "B": a_b},
                   roles={"A": "id", "B": "ood"})
    table = _table({"B": x * 0.7}, x, id_agreement={"B": ag.member_mean("A").to_numpy()})
    fig = figure_fig4(table, "B", ag)
    assert len(fig.axes) == 3 and _points(fig) == [n, n, n * (n - 1) // 2]
    for ax, (xs, ys) in zip(fig.axes, [(x, x * 0.7), (table["id_agreement"], x * 0.7),
                                       (a_id[np.triu_indices(n, 1)], a_b[np.triu_indices(n, 1)])]):
        px, py = probit(np.asarray(xs)), probit(np.asarray(ys))
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert x0 < px.min() and px.max() < x1 and y0 < py.min() and py.max() < y1
        assert (x1 - x0) < 3 * (max(px.max(), py.max()) - min(px.min(), py.min())) + 1  # not absurdly wide
    path = save_figure(fig, tmp_path / "fig4.png")
    assert _png_size(path) == (1800, 636) and path.stat().st_size > 20_000
    with pytest.raises(ValueError, match="no rows for target 'Z'"):
        figure_fig4(table, "Z")


def test_fig3_one_panel_per_target_one_point_per_member():
    rng = np.random.default_rng(6)
    ood = {t: rng.uniform(0.2, 0.8, 7) for t in ("B", "C", "D", "E")}
    table = _table(ood, rng.uniform(0.5, 0.9, 7), uncertain_area={t: 0.3 - 0.3 * y for t, y in ood.items()})
    fig = figure_fig3(table)
    assert _points(fig) == [7, 7, 7, 7]
    assert all("r = -1.00" in ax.get_title() for ax in fig.axes)
    ax = fig.axes[0]
    u = 100 * table.loc[table["target"] == "B", "uncertain_area"]
    assert ax.get_xlim()[0] <= u.min() and u.max() <= ax.get_xlim()[1]
    with pytest.raises(ValueError, match="uncertainty stage"):
        figure_fig3(_table(ood, rng.uniform(0.5, 0.9, 7)))


def test_fig6_panels():
    rng = np.random.default_rng(7)
    truth = np.zeros((16, 16), bool)
    truth[4:10, 5:12] = True
    pred = np.roll(truth, 1, axis=0)
    ex = Example("m00", "B", "c0", 3, rng.random((16, 16)), truth, pred, truth ^ pred, pred * 0.9,
                 rng.random((16, 16)))
    fig = figure_fig6(ex, [("m01", rng.random((16, 16)), 0.2), ("m00 (shown)", ex.uncertainty, 0.1)])
    titles = [ax.get_title() for ax in fig.axes]
    for want in ("image", "truth", "prediction", "μ (δ net)", "error map", "uncertainty"):
        assert want in titles
    assert sum(1 for t in titles if "uncertain " in t) == 2


# --- the whole stage with uncertainty records ---------------------------------------------------

def _write_full_experiment(exp: Path, n_members: int = 8, n_slices: int = 12, size: int = 16) -> None:
    """Members whose predictions, counts, uncertainty and examples are mutually consistent."""
    rng = np.random.default_rng(8)
    sites = {"A": ("id", 0), "B": ("ood", 1), "C": ("ood", 2)}
    yy, xx = np.mgrid[:size, :size]
    truth = {s: np.stack([(yy - 8) ** 2 / 16 + (xx - 7 - (i % 3)) ** 2 / 20 < 1 for i in range(n_slices)])
             for s in sites}
    cases, idx = [f"c{i // 4}" for i in range(n_slices)], np.arange(n_slices) % 4
    for m in range(n_members):
        mid = f"{('unet', 'medsam')[m % 2]}-m{m}"
        rows, unc = [], []
        for site, (role, sev) in sites.items():
            t = truth[site]
            pred = np.roll(t, (m * (1 + sev)) // 3, axis=2)           # weaker members, farther targets: more shift
            records.save_predictions(exp, mid, site, pred, cases, idx)
            tp, fp, fn = (t & pred).sum((1, 2)), (~t & pred).sum((1, 2)), (t & ~pred).sum((1, 2))
            rows.append(pd.DataFrame({"member_id": mid, "site": site, "role": role, "case_id": cases, "slice_idx": idx,
                                      "tp": tp, "fp": fp, "fn": fn, "tn": size * size - tp - fp - fn,
                                      "area_px": size * size}))
            for method, k in (("ggd", 1.0), ("bayescap", 1.3), ("tta_noise", 3.0)):
                unc.append(pd.DataFrame({"member_id": mid, "method": method, "site": site, "role": role,
                                         "case_id": cases, "slice_idx": idx,
                                         "uncertain_px": np.round(k * (fp + fn)).astype(int) + 2,
                                         "error_px": fp + fn, "area_px": size * size,
                                         "mean_uncertainty": 0.01 * k * (fp + fn) / size ** 2,
                                         "uncertain_error_px": fp + fn, "fixed_px": np.round(k * (fp + fn)),
                                         "map_ptp": 0.2}))
        records.write_member_part(exp, {"member_id": mid, "run_id": mid, "arch": mid.split("-")[0], "lr": 1e-3,
                                        "epochs": 4, "seed": m, "batch_size": 4, "source": "A",
                                        "checkpoint": "/nowhere"}, pd.concat(rows, ignore_index=True))
        records.write_uncertainty_part(exp, mid, pd.concat(unc, ignore_index=True))
        if m < 3:
            t = truth["C"][:2]
            pred = np.roll(t, m, axis=2)
            path = records.records_dir(exp) / "uncertainty" / "examples" / f"{mid}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, image=rng.random(t.shape), truth=t, pred=pred, error=t ^ pred, mu=pred * 1.0,
                     uncertainty=(t ^ pred) + 0.1 * rng.random(t.shape), site=np.array("C"),
                     case_id=np.array(cases[:2]), slice_idx=idx[:2])


def test_run_analysis_with_agreement_and_uncertainty(tmp_path):
    exp = tmp_path / "exp"
    _write_full_experiment(exp)
    res = run_analysis(exp, n_resamples=29)
    out = Path(res["out_dir"])
    names = {str(Path(f).relative_to(out)) for f in res["files"]}
    assert {"agreement_pairs.csv", "table4.csv", "plots/fig3_uncertainty_vs_ood.png", "plots/fig4_B.png",
            "plots/fig4_C.png"} <= names
    assert any(n.startswith("plots/fig6_") for n in names) and {"aline.csv", "lines.csv"} <= names
    # the medsam members (records without oracle_prompt: derived from the arch) are left out of label-free rows
    assert len(res["notes"]) == 1 and "4 of 8 members (medsam)" in res["notes"][0]
    corr = pd.DataFrame(res["correlations"])
    assert set(corr["indicator"]) == {"id_performance", "id_agreement", "ood_agreement", "uncertain_area",
                                      "mean_uncertainty", "fixed_threshold_area", "guarded_area",
                                      "agreement_on_the_line"}
    assert list(dict.fromkeys(corr["members"])) == ["label-free", "all"] and set(corr["resample"]) == {"member"}
    ua = corr[corr["indicator"] == "uncertain_area"]
    assert (ua["pearson_r"] < -0.9).all() and list(ua["n"]) == [4, 4, 8, 8]
    pairs = corr[corr["indicator"] == "agreement_on_the_line"]
    assert list(pairs["n"]) == [6, 6, 28, 28] and list(pairs["n_units"]) == [4, 4, 8, 8]
    assert (pairs["unit"] == "pair").all() and (pairs["metric"] == "iou_3d").all()
    assert pairs["pearson_p"].isna().all() and pairs["pearson_ci_low"].isna().all()  # no Fisher z on pairs
    sel = pd.DataFrame(res["selection"])
    assert (sel.loc[sel["indicator"] == "uncertain_area", "regret"] == 0).all()
    assert not sel.loc[sel["members"] == "label-free", "chosen_member"].str.startswith("medsam").any()
    aline = pd.read_csv(out / "aline.csv")
    assert list(aline.columns) == ["members", "source", "target", "member_id", "arch", "oracle_prompt", "method",
                                   "estimate", "truth", "error", "probit_clip_id", "probit_clip_ood"]
    assert len(aline) == 2 * 2 * (4 + 8) and set(aline["method"]) == {"aline_s", "aline_d"}
    assert not aline.loc[aline["members"] == "label-free", "oracle_prompt"].any()
    np.testing.assert_allclose(aline["error"], (aline["estimate"] - aline["truth"]).abs())
    lines = pd.read_csv(out / "lines.csv")
    assert len(lines) == 4 and {"acc_slope", "agr_slope", "slope_diff_low", "lines_agree"} <= set(lines.columns)
    t4 = pd.read_csv(out / "table4.csv")
    assert list(t4["method"]) == ["ggd", "bayescap", "tta_noise"]
    assert list(t4.columns[2:]) == ["A → B", "A → C", "A (same)"]
    assert (t4.iloc[0, 2:] < t4.iloc[2, 2:]).all()                     # the δ net's area tracks the error best
    md = (out / "tables.md").read_text()
    assert "**Table 4 (area reading" in md and "![Fig. 3]" in md and "![Fig. 6]" in md and "Model selection" in md
    assert "ALine-S / ALine-D" in md and "Baek et al.'s test" in md and md.count("**Label-free members** (4") >= 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["indicators"] == ["id_performance", "id_agreement", "ood_agreement", "uncertain_area",
                                     "mean_uncertainty", "fixed_threshold_area", "guarded_area"]
    # Table 4's pixel reading beside the area reading (here every error pixel is uncertain: pixel MSE =
    # the surplus uncertain fraction), pooled (the records say nothing of SAM-family members)
    t4r = pd.read_csv(out / "table4_readings.csv")
    assert set(zip(t4r["reading"], t4r["members"])) == {("area", "pooled"), ("pixel", "pooled")}
    assert "Table 4 (pixel reading, every pool member)" in md and "`guarded_area`" in md
    ex, others = fig6_inputs(exp, pd.read_csv(out / "indicators.csv"), records.load_uncertainty(exp))
    assert ex.site == "C" and len(others) == 3 and others[0][2] >= others[-1][2]
    # the claims report on the same records: every claim computed (none "not testable"), each per-target
    # value the label-free correlation row's; C5 on the medsam members (no site records here to say which
    # are box-prompted: their oracle_prompt, derived from the arch, does)
    claims = pd.read_csv(out / "claims.csv")
    assert "not testable" not in set(claims.loc[claims["claim"].isin(["C2", "C3", "C4", "C5"]), "verdict"])
    lf = corr[corr["members"] == "label-free"].set_index(["indicator", "target"])
    for claim, ind in (("C2", "id_performance"), ("C3", "agreement_on_the_line"), ("C4", "uncertain_area")):
        raw = claims[(claims["claim"] == claim) & claims["scope"].isin(
            ["B", "C"] if claim == "C4" else ["B (raw scale)", "C (raw scale)"])]
        assert list(raw["value"]) == pytest.approx([lf.loc[(ind, t[0]), "pearson_r"] for t in raw["scope"]]), claim
        if claim != "C4":  # C2, C3: the deciding probit rows are the correlation rows' probit r (the same clips)
            per = claims[(claims["claim"] == claim) & claims["scope"].isin(["B", "C"])]
            assert list(per["scale"]) == ["probit", "probit"]
            assert list(per["value"]) == pytest.approx([lf.loc[(ind, t), "probit_r"] for t in per["scope"]]), claim
    c5 = claims[claims["claim"] == "C5"]
    assert len(c5) == 2 and (c5["value"] < 0).all() and (c5["n_members"] == 4).all()
    assert c5["members"].str.startswith("SAM family").all()
    assert {c["claim"] for c in summary["claims"]} >= {"C1", "C2", "C3", "C4", "C5", "ALine error"}
    assert "## Claims" in md
    # a rerun without the uncertainty records removes the files that no longer apply
    for p in (records.records_dir(exp) / "uncertainty").rglob("*"):
        if p.is_file():
            p.unlink()
    (records.records_dir(exp) / "uncertainty.parquet").unlink()
    res2 = run_analysis(exp, n_resamples=0, indicators=["id_performance", "uncertainty"])
    assert not (out / "table4.csv").exists() and not list((out / "plots").glob("fig[36]_*"))
    assert {c["indicator"] for c in res2["correlations"]} == {"id_performance"}


# --- agreement on the performance scale, ALine, run-level intervals, oracle members -------------

def _confusion_rows(masks: np.ndarray, i: int, j: int, cases: list[str]) -> pd.DataFrame:
    """Member i's masks scored against member j's as truth: slice rows for records.metric_by."""
    a, b = masks[i], masks[j]
    tp, fp, fn = (a & b).sum((1, 2)), (a & ~b).sum((1, 2)), (~a & b).sum((1, 2))
    return pd.DataFrame({"member_id": "x", "site": "s", "case_id": cases, "tp": tp, "fp": fp, "fn": fn})


@pytest.mark.parametrize("metric", records.METRICS)
def test_agreement_is_records_metric_by_of_one_member_against_the_other(metric):
    rng = np.random.default_rng(11)
    masks = rng.random((5, 10, 6, 7)) < 0.2
    masks[:, 2] = False                               # a slice empty for everyone
    masks[1, :5] = False                              # member 1 empty on the first case
    masks[4] = False                                  # member 4 predicts nothing: 0 against the others
    cases = [f"c{k // 5}" for k in range(10)]
    ag = pairwise_agreement(_packed(masks), 42, cases, metric)
    for i in range(4):
        for j in range(4):
            ij = records.metric_by(_confusion_rows(masks, i, j, cases), metric).iloc[0]
            ji = records.metric_by(_confusion_rows(masks, j, i, cases), metric).iloc[0]
            assert ag[i, j] == pytest.approx((ij + ji) / 2, abs=1e-12), (i, j)
    assert ag[0, 4] == 0.0 and np.isnan(ag[4, 4]) and np.allclose(ag, ag.T, equal_nan=True)


def test_agreement_hand_example_two_blobs_on_empty_slices():
    # two members perfect on the shared foreground F, each with one false-positive blob (A, B) on a
    # different empty slice: iou_3d agreement is |F| / (|F| + |A| + |B|), not the old mask Dice
    f = np.zeros((4, 8, 8), bool)
    f[0, 2:6, 2:6] = f[1, 1:7, 1:7] = True            # |F| = 16 + 36
    a, b = f.copy(), f.copy()
    a[2, 0:2, 0:2] = True                             # |A| = 4
    b[3, 5:8, 5:8] = True                             # |B| = 9
    bits = _packed(np.stack([a, b]))
    hand = 52 / (52 + 4 + 9)
    assert pairwise_agreement(bits, 64, ["c"] * 4, "iou_3d")[0, 1] == pytest.approx(hand)
    assert pairwise_agreement(bits, 64, ["c"] * 4, "dice_global")[0, 1] == pytest.approx(104 / (104 + 13))
    assert pairwise_agreement(bits, 64, ["c"] * 4, "dice_2d")[0, 1] == pytest.approx(2 / 3)   # 1, 1, 0 per side
    assert pairwise_dice(bits, 64)[0, 1] == pytest.approx(0.5)                               # the old convention
    with pytest.raises(ValueError, match="valid metrics: iou_3d, dice_2d, dice_global, mask_dice"):
        pairwise_agreement(bits, 64, None, "auc")


def _aline_pool(shift: float, m: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(-0.5, 1.5, m)                      # probit ID scores
    g = rng.uniform(0.0, 2.0, (m, m))
    g = np.triu(g, 1) + np.triu(g, 1).T + 3 * np.eye(m)  # probit ID agreements
    a, b = 0.8, -0.3
    return (stats.norm.cdf(p), stats.norm.cdf(a * p + b), stats.norm.cdf(g), stats.norm.cdf(a * g + b + shift))


def test_aline_recovers_ood_scores_when_the_lines_coincide_and_not_otherwise():
    acc_id, acc_ood, agr_id, agr_ood = _aline_pool(0.0)
    est = aline_estimates(acc_id, agr_id, agr_ood)
    assert est["slope"] == pytest.approx(0.8) and est["intercept"] == pytest.approx(-0.3)
    assert np.abs(est["aline_s"] - acc_ood).max() < 0.01 and np.abs(est["aline_d"] - acc_ood).max() < 0.01
    lt = lines_test(acc_id, acc_ood, agr_id, agr_ood, n_resamples=200)
    assert lt["lines_agree"] is True
    acc_id, acc_ood, agr_id, agr_ood = _aline_pool(0.5)   # agreement line shifted up by 0.5 probit
    est = aline_estimates(acc_id, agr_id, agr_ood)
    assert np.abs(est["aline_s"] - acc_ood).mean() > 0.05 and np.abs(est["aline_d"] - acc_ood).mean() > 0.05
    lt = lines_test(acc_id, acc_ood, agr_id, agr_ood, n_resamples=200)
    assert lt["lines_agree"] is False and lt["intercept_diff_high"] < 0


def test_run_level_bootstrap_is_wider_than_member_level_with_snapshot_members():
    rng = np.random.default_rng(5)
    x = rng.uniform(0.3, 0.9, 10)
    y = np.clip(0.6 * x + rng.normal(0, 0.12, 10), 0.01, 0.99)
    # each run gives three snapshot members with (nearly) the same scores
    xs = np.repeat(x, 3) + rng.normal(0, 1e-3, 30)
    ys = np.repeat(y, 3) + rng.normal(0, 1e-3, 30)
    runs = np.repeat([f"run{k}" for k in range(10)], 3)
    by_member = correlate(xs, ys, n_resamples=2000, seed=1)
    by_run = correlate(xs, ys, n_resamples=2000, seed=1, groups=runs)
    assert by_member["resample"] == "member" and by_run["resample"] == "run" and by_run["n_units"] == 10
    width = {k: st["pearson_boot_high"] - st["pearson_boot_low"] for k, st in (("m", by_member), ("r", by_run))}
    assert width["r"] > 1.3 * width["m"]
    assert by_run["pearson_boot_low"] < by_run["pearson_r"] < by_run["pearson_boot_high"]
    units, name = resampling_units(runs, 30)
    assert name == "run" and units.shape == (10, 3) and sorted(units.ravel()) == list(range(30))
    assert resampling_units(np.array(["a", None, "b"], dtype=object), 3)[1] == "member"


def test_members_without_run_id_or_oracle_prompt_fall_back_with_warnings(tmp_path):
    exp = tmp_path / "exp"
    _write_full_experiment(exp)
    rdir = records.records_dir(exp)
    mem, _ = records.merge_parts(exp)
    assert mem["oracle_prompt"].tolist() == [a == "medsam" for a in mem["arch"]]  # derived from the arch
    mem.drop(columns=["run_id", "oracle_prompt"]).to_parquet(rdir / "members.parquet")  # older records
    with pytest.warns(UserWarning) as rec:
        res = run_analysis(exp, n_resamples=0, indicators=["id_performance"])
    msgs = [str(w.message) for w in rec]
    assert any("no 'oracle_prompt' column" in m and "medsam" in m for m in msgs)
    assert any("8 of 8 members have no run_id" in m and "falls back to resampling members" in m for m in msgs)
    assert any("falls back to resampling members" in n for n in res["notes"])
