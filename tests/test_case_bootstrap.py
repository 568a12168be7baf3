"""The two-level bootstrap (analysis.case_bootstrap): runs, then each site's test cases, on hand-built records."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.case_bootstrap import (ID_KEY, RUNS, RUNS_X_CASES, case_scores, two_level_interval,
                                     weighted_pearson)
from analysis.claim_rule import decide, rule_text
from analysis.claim_stats import indicator_rows
from analysis.claims import claims_markdown, claims_table
from analysis.correlate import unit_of_points
from analysis.indicators import indicator_table
from analysis.performance import performance_table
from analysis.uncertainty_indicators import uncertainty_indicator_frame


def _members(n: int, per_run: int) -> pd.DataFrame:
    return pd.DataFrame({"member_id": [f"m{i}" for i in range(n)], "run_id": [f"r{i // per_run}" for i in range(n)],
                         "arch": "unet_r18", "lr": 1e-3, "epochs": [1 + i % per_run for i in range(n)],
                         "seed": [i // per_run for i in range(n)], "source": "A", "oracle_prompt": False})


def _slices(k: np.ndarray, sites=(("A", "id"), ("B", "ood"))) -> pd.DataFrame:
    """One slice per case: member m on case c has tp = k[m, c], fn = 10 - k[m, c], fp = 0 (IoU k / 10);
    every site gets the same counts (so the ID score equals the OOD score)."""
    rows = []
    for site, role in sites:
        for m in range(k.shape[0]):
            for c in range(k.shape[1]):
                rows.append({"member_id": f"m{m}", "site": site, "role": role, "case_id": f"{site}{c}", "slice_idx": 0,
                             "tp": int(k[m, c]), "fp": 0, "fn": int(10 - k[m, c]), "tn": 90, "area_px": 100})
    return pd.DataFrame(rows)


def _random_slices(rng, n_members=3, n_cases=4, labels=None) -> pd.DataFrame:
    """Random counts, two slices per case, some slices (and one case) without ground truth."""
    rows = []
    for site, role in (("A", "id"), ("B", "ood"), ("C", "ood")):
        for m in range(n_members):
            for c in range(n_cases):
                for s in range(2):
                    for lab in labels or [None]:
                        tp, fp, fn = (int(v) for v in rng.integers(0, 20, 3))
                        if c == 0 or (s == 1 and lab == "b"):
                            tp, fn = 0, 0  # no ground truth here
                        row = {"member_id": f"m{m}", "site": site, "role": role, "case_id": f"{site}{c}",
                               "slice_idx": s, "tp": tp, "fp": fp, "fn": fn, "tn": 100 - tp - fp - fn, "area_px": 100}
                        if lab is not None:
                            row["label"] = lab
                        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("metric, labels", [
    ("iou_3d", None), ("dice_2d", None), ("dice_global", None),
    ("iou_3d", ["a", "b"]), ("dice_2d", ["a", "b"]), ("dice_global", ["a", "b"]), ("iou_3d_micro", ["a", "b"])])
def test_every_case_drawn_once_gives_the_recorded_scores(metric, labels):
    rng = np.random.default_rng(1)
    slices = _random_slices(rng, labels=labels)
    members = _members(3, 1)
    perf = performance_table(members, slices, metric)
    cs = case_scores(slices, metric, ["m0", "m1", "m2"])
    assert cs.id is not None and sorted(cs.ood) == ["B", "C"]
    for site, sc in [("A", cs.id), ("B", cs.ood["B"]), ("C", cs.ood["C"])]:
        got = sc.scores(np.ones(len(sc.case_ids)))
        col = "id_score" if site == "A" else "ood_score"
        want = perf[perf["target"] == ("B" if site == "A" else site)].set_index("member_id")[col]
        np.testing.assert_allclose(got, want.reindex(["m0", "m1", "m2"]).to_numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", ["hd95", "nsd"])
def test_surface_metrics_drawn_once_give_the_recorded_scores(metric):
    rng = np.random.default_rng(2)
    slices = _random_slices(rng)
    rows = []
    for site, role in (("A", "id"), ("B", "ood")):
        for m in range(3):
            for c in range(4):
                for lab in ("x", "y"):
                    v = np.nan if (c == 1 and lab == "y") else float(rng.uniform(0, 9))
                    rows.append({"member_id": f"m{m}", "site": site, "role": role, "case_id": f"{site}{c}",
                                 "label": lab, "hd95_mm": v, "nsd": v / 9})
    surface = pd.DataFrame(rows)
    perf = performance_table(_members(3, 1), slices, metric, surface)
    cs = case_scores(slices, metric, ["m0", "m1", "m2"], surface=surface)
    p = perf[perf["target"] == "B"].set_index("member_id").reindex(["m0", "m1", "m2"])
    np.testing.assert_allclose(cs.id.scores(np.ones(4)), p["id_score"], atol=1e-12, rtol=0)
    np.testing.assert_allclose(cs.ood["B"].scores(np.ones(4)), p["ood_score"], atol=1e-12, rtol=0)


def test_case_weights_by_hand():
    # m0's case IoUs 0.2, 0.5, 0.9: drawing case 0 twice and case 1 once gives (2 * 0.2 + 0.5) / 3
    k = np.array([[2, 5, 9], [4, 4, 4]])
    cs = case_scores(_slices(k), "iou_3d", ["m0", "m1"])
    assert cs.ood["B"].case_ids == ["B0", "B1", "B2"]
    got = cs.ood["B"].scores(np.array([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(got, [[0.3, 0.4], [1.6 / 3, 0.4]], atol=1e-12)


def test_uncertainty_readings_drawn_once_give_the_indicators():
    rng = np.random.default_rng(3)
    k = rng.integers(1, 10, (3, 4))
    slices = _slices(k)
    rows = []
    for m in range(3):
        for c in range(4):
            for s in range(1 + c % 2):  # cases with one and with two images
                rows.append({"member_id": f"m{m}", "method": "ggd", "site": "B", "role": "ood", "case_id": f"B{c}",
                             "slice_idx": s, "uncertain_px": int(rng.integers(0, 50)), "error_px": 3, "area_px": 100,
                             "mean_uncertainty": float(rng.uniform()), "fixed_px": int(rng.integers(0, 50)),
                             "map_ptp": float(rng.choice([1e-9, 1.0])), "uncertain_error_px": 1})
    unc = pd.DataFrame(rows)
    cs = case_scores(slices, "iou_3d", ["m0", "m1", "m2"], unc=unc)
    frame = uncertainty_indicator_frame(unc).xs("B", level="site").reindex(["m0", "m1", "m2"])
    assert set(cs.unc) == set(frame.columns)
    for col in frame.columns:
        np.testing.assert_allclose(cs.unc[col]["B"].scores(np.ones(4)), frame[col], atol=1e-12, rtol=0)
    # a member with a NaN image on the site has no value there (as the indicator frame)
    unc.loc[0, "mean_uncertainty"] = np.nan
    cs = case_scores(slices, "iou_3d", ["m0", "m1", "m2"], unc=unc)
    assert np.isnan(cs.unc["mean_uncertainty"]["B"].scores(np.ones(4))[0])


def test_weighted_pearson_counts_a_point_drawn_twice_twice():
    x, y = np.array([0.1, 0.4, 0.35, 0.9]), np.array([0.2, 0.1, 0.5, 0.7])
    w = np.array([2.0, 0.0, 1.0, 3.0])
    rep = np.repeat(np.arange(4), w.astype(int))
    assert weighted_pearson(x, y, w) == pytest.approx(np.corrcoef(x[rep], y[rep])[0, 1], abs=1e-12)


def _pool(k: np.ndarray, per_run: int = 2):
    slices = _slices(k)
    perf = performance_table(_members(k.shape[0], per_run), slices, "iou_3d")
    return indicator_table(perf), case_scores(slices, "iou_3d", sorted(perf["member_id"].unique()))


def test_cases_that_vary_widen_an_interval_the_runs_leave_degenerate():
    # the ID and the target cases hold the same counts: ID score == OOD score for every member, so every
    # run resample gives r = 1 exactly (a degenerate run-level interval); drawing the ID and the target
    # cases independently breaks the equality, and only the two-level interval shows it
    k = np.random.default_rng(4).integers(1, 10, (8, 5))
    table, cs = _pool(k)
    plain = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=499)
    both = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=499, cases=cs)
    p, b = plain[0], both[0]
    assert p["interval"] == RUNS and b["interval"] == RUNS_X_CASES
    assert b["value"] == p["value"] == pytest.approx(1.0, abs=1e-12)
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((1.0, 1.0), abs=1e-9)
    assert (b["ci_runs_low"], b["ci_runs_high"]) == (p["ci_low"], p["ci_high"])  # the run-level one kept beside it
    assert b["ci_low"] < 0.97 and b["ci_high"] <= 1.0 and b["ci_high"] - b["ci_low"] > 0.03
    assert b["verdict"] == decide(b["ci_low"], b["ci_high"], "weak")  # the verdict reads the two-level interval
    assert "× cases (5 ID, 5 on the target)" in b["members"]
    # the per-target row too
    assert both[1]["scope"] == "B" and both[1]["interval"] == RUNS_X_CASES and both[1]["ci_low"] < 0.97


def test_cases_that_do_not_vary_leave_the_interval_as_the_runs_make_it():
    # every case of a member scores the same: drawing cases changes no score, so the two-level interval is
    # the percentile interval of the run draws alone (the same runs drawn: the same generator)
    rng = np.random.default_rng(6)
    k = np.repeat(rng.integers(1, 10, (8, 1)), 4, axis=1)
    k_ood = np.repeat(rng.integers(1, 10, (8, 1)), 4, axis=1)
    slices = pd.concat([_slices(k, (("A", "id"),)), _slices(k_ood, (("B", "ood"),))], ignore_index=True)
    perf = performance_table(_members(8, 2), slices, "iou_3d")
    table, cs = indicator_table(perf), case_scores(slices, "iou_3d", [f"m{i}" for i in range(8)])
    row = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=300, seed=3, cases=cs)[0]
    x, y = k[:, 0] / 10, k_ood[:, 0] / 10
    unit_of = np.arange(8) // 2
    runs = np.random.default_rng(3).integers(0, 4, (300, 4))  # one batch: its run draws come first
    dist = np.array([weighted_pearson(x, y, np.bincount(r, minlength=4)[unit_of].astype(float)) for r in runs])
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.quantile(dist[np.isfinite(dist)],
                                                                              [0.025, 0.975])), abs=1e-12)


def test_two_level_interval_is_deterministic_in_its_seed():
    k = np.random.default_rng(7).integers(1, 10, (8, 5))
    table, cs = _pool(k)
    a = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=199, seed=5, cases=cs)[0]
    b = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=199, seed=5, cases=cs)[0]
    c = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=199, seed=6, cases=cs)[0]
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])


def test_too_few_runs_or_resamples_give_no_interval():
    unit_of = unit_of_points(np.arange(3)[:, None], 3)
    stat = lambda c, w: c.sum(-1)  # noqa: E731
    assert all(math.isnan(v) for v in two_level_interval(stat, unit_of, 3, {"B": 4}, 99, 0))
    assert all(math.isnan(v) for v in two_level_interval(stat, np.arange(4), 4, {ID_KEY: 2}, 0, 0))


def test_records_that_do_not_reproduce_the_table_keep_the_run_interval():
    k = np.random.default_rng(8).integers(1, 10, (8, 5))
    table, cs = _pool(k)
    other = case_scores(_slices(np.clip(k + 1, 1, 9)), "iou_3d", cs.members)  # another pool's counts
    row = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=99, cases=other)[0]
    assert row["interval"] == RUNS and (row["ci_runs_low"], row["ci_runs_high"]) == (row["ci_low"], row["ci_high"])


def test_report_names_both_intervals():
    k = np.random.default_rng(9).integers(1, 10, (8, 5))
    table, cs = _pool(k)
    claims = claims_table(table, table, n_resamples=99, cases=cs)
    c2 = claims[(claims["claim"] == "C2") & (claims["scope"] == "overall")].iloc[0]
    assert c2["interval"] == RUNS_X_CASES and math.isfinite(c2["ci_runs_low"])
    md = claims_markdown(claims, "x", "iou_3d", 99)
    assert "| 95% CI (runs × cases) | 95% CI (runs) |" in md and "– (runs only)" in md  # C1's rows: runs only
    assert "two-level bootstrap" in md and "percentile interval" in md and "C3 has the run-level interval only" in md
    plain = claims_markdown(claims_table(table, table, n_resamples=0), "x", "iou_3d", 0)
    assert "No per-case records were read" in plain
    assert "runs × cases" in rule_text() and "No per-case records" in rule_text(two_level=False)


def test_aline_error_gets_the_two_level_interval_and_keeps_its_value():
    from analysis.agreement import Agreement
    from analysis.claim_stats import aline_rows

    k = np.random.default_rng(10).integers(1, 10, (8, 5))
    table, cs = _pool(k)
    rng = np.random.default_rng(11)
    a = rng.uniform(0.4, 0.95, (8, 8))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    ag = Agreement(member_ids=cs.members, matrices={"A": a, "B": np.clip(a - 0.1, 0, 1)}, roles={"A": "id", "B": "ood"})
    plain = aline_rows(table, ag, None, n_resamples=199)[0]
    both = aline_rows(table, ag, None, n_resamples=199, cases=cs)[0]
    assert plain["interval"] == RUNS and both["interval"] == RUNS_X_CASES
    assert both["value"] == plain["value"] and (both["ci_runs_low"], both["ci_runs_high"]) == (plain["ci_low"],
                                                                                               plain["ci_high"])
    assert both["ci_low"] < both["ci_high"] and "agreement line: runs only" in both["note"]


def test_c4_draws_the_area_with_the_scores_and_agreement_rows_say_they_do_not():
    rng = np.random.default_rng(12)
    k = rng.integers(1, 10, (8, 5))
    slices = _slices(k)
    unc = pd.DataFrame([{"member_id": f"m{m}", "method": "ggd", "site": "B", "role": "ood", "case_id": f"B{c}",
                         "slice_idx": 0, "uncertain_px": int(100 - 10 * k[m, c] + rng.integers(0, 3)), "error_px": 3,
                         "area_px": 100, "mean_uncertainty": 0.5, "fixed_px": 1, "map_ptp": 1.0,
                         "uncertain_error_px": 1} for m in range(8) for c in range(5)])
    perf = performance_table(_members(8, 2), slices, "iou_3d")
    table = indicator_table(perf)
    frame = uncertainty_indicator_frame(unc).xs("B", level="site")
    table["uncertain_area"] = table["member_id"].map(frame["uncertain_area"])
    table["id_agreement"] = np.linspace(0.2, 0.9, len(table))
    cs = case_scores(slices, "iou_3d", [f"m{i}" for i in range(8)], unc=unc)
    c4 = indicator_rows(table, "uncertain_area", "C4", "claim", "strong_negative", n_resamples=199, cases=cs)[0]
    assert c4["interval"] == RUNS_X_CASES and c4["note"] == "" and c4["value"] < -0.9
    assert "× cases (5 on the target)" in c4["members"]  # C4 draws no ID case
    extra = indicator_rows(table, "id_agreement", "extra", "extra", "weak", n_resamples=99, per_target=False,
                           cases=cs)[0]
    assert extra["interval"] == RUNS_X_CASES and "OOD scores only (`id_agreement`" in extra["note"]


def test_probit_rows_get_the_two_level_interval_on_the_probit_scale():
    # the probit row's scores are probits (each axis with its site's clip): the case draws must be put on the
    # same scale, so the identity draw reproduces the row's value and the row gets the two-level interval;
    # with different clips on the two axes the interval differs from the raw row's
    from analysis.probit_clip import Clips

    k = np.random.default_rng(11).integers(0, 10, (8, 5))
    k[0] = 0  # a member with nothing right: its score sits at the clip on the probit scale
    slices = pd.concat([_slices(k, (("A", "id"),)),
                        _slices(np.random.default_rng(12).integers(0, 10, (8, 5)), (("B", "ood"),))],
                       ignore_index=True)
    perf = performance_table(_members(8, 2), slices, "iou_3d")
    table, cs = indicator_table(perf), case_scores(slices, "iou_3d", [f"m{i}" for i in range(8)])
    clips = Clips("auto", {"A": 5, "B": 5})
    assert clips.clip("A") == pytest.approx(0.1)  # half a case of 5
    pro = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=199, seed=2,
                         scale="probit", clips=clips, cases=cs)
    raw = indicator_rows(table, "id_performance", "C2", "claim", "weak", n_resamples=199, seed=2,
                         scale="raw", clips=clips, cases=cs)
    for rows in (pro, raw):
        assert [r["interval"] for r in rows] == [RUNS_X_CASES, RUNS_X_CASES]
    assert pro[0]["scale"] == "probit" and pro[0]["value"] != pytest.approx(raw[0]["value"], abs=1e-6)
    assert (pro[0]["ci_low"], pro[0]["ci_high"]) != pytest.approx((raw[0]["ci_low"], raw[0]["ci_high"]), abs=1e-6)
    assert pro[0]["ci_low"] <= pro[0]["value"] + 0.2 and pro[0]["ci_high"] >= pro[0]["value"] - 0.2
