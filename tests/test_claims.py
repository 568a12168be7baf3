"""The claims report (analysis.claims) on hand-built pools whose verdicts are known."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.claim_rule import CLAIM_COLUMNS, INCONCLUSIVE, NOT_TESTABLE, REFUTED, REPRODUCED, decide
from analysis.claim_arms import c1_rows, c5_rows
from analysis.claim_stats import agreement_rows, aline_rows, indicator_rows, regret_rows
from analysis.claims import claims_table
from analysis.indicators import indicator_table
from analysis.selection import select_models
from trainables.records import write_member_part

TARGETS = ("B", "C")


def _pool(id_ood: dict[str, list[tuple[float, float]]], arch_of=None, oracle=(), snapshots: int = 1) -> pd.DataFrame:
    """A label-free indicator table: ``id_ood[run] = [(id, ood on B), (id, ood on C)]`` per snapshot member.

    Each run gives ``snapshots`` members (epochs 1..snapshots) with the same scores, as snapshot members
    that did not move: the run-level bootstrap must treat them as one unit."""
    rows = []
    for k, (run, scores) in enumerate(id_ood.items()):
        arch = arch_of(run) if arch_of else "unet_r18"
        for ep in range(1, snapshots + 1):
            for t, (i, o) in zip(TARGETS, scores):
                rows.append({"member_id": f"{run}-ep{ep}", "arch": arch, "lr": 1e-3, "epochs": ep, "seed": k,
                             "source": "A", "target": t, "metric": "iou_3d", "id_score": i, "ood_score": o,
                             "run_id": run, "oracle_prompt": arch in oracle, "val_score": i})
    return indicator_table(pd.DataFrame(rows))


def _overall(rows: list[dict]) -> dict:
    return next(r for r in rows if r["scope"] == "overall")


# --- the rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lo, hi, side, verdict", [
    (-0.2, 0.3, "weak", REPRODUCED), (0.6, 0.99, "weak", REFUTED), (-0.99, -0.5, "weak", REFUTED),
    (0.2, 0.7, "weak", INCONCLUSIVE), (-0.9, -0.5, "strong_negative", REPRODUCED),
    (-0.49, 0.1, "strong_negative", REFUTED), (-0.8, -0.3, "strong_negative", INCONCLUSIVE),
    (-3.0, -0.1, "negative", REPRODUCED), (0.1, 2.0, "negative", REFUTED), (-1.0, 1.0, "negative", INCONCLUSIVE),
    (math.nan, math.nan, "negative", INCONCLUSIVE)])
def test_decision_rule(lo, hi, side, verdict):
    assert decide(lo, hi, side) == verdict


# --- C2: accuracy on the line --------------------------------------------------------------------

def test_c2_reproduced_when_id_and_ood_are_unrelated():
    rng = np.random.default_rng(0)
    n = 60
    ids = rng.uniform(0.5, 0.9, (n, 2))
    ood = rng.uniform(0.2, 0.8, (n, 2))          # independent of the ID score: r ≈ 0
    tb = _pool({f"r{k}": [(ids[k, 0], ood[k, 0]), (ids[k, 0], ood[k, 1])] for k in range(n)}, snapshots=2)
    rows = indicator_rows(tb, "id_performance", "C2", "claim", "weak", n_resamples=999)
    ov = _overall(rows)
    assert abs(ov["value"]) < 0.2 and -0.5 < ov["ci_low"] < ov["ci_high"] < 0.5
    assert ov["verdict"] == REPRODUCED and ov["n_units"] == n and ov["n_members"] == 2 * n and ov["unit"] == "run"
    # the overall value is the mean of the per-target Pearson r's (point values, as in correlations.csv)
    per = [r for r in rows if r["scope"] in TARGETS]
    assert [r["scope"] for r in per] == list(TARGETS)
    assert ov["value"] == pytest.approx(np.mean([r["value"] for r in per]), abs=1e-12)
    assert per[0]["value"] == pytest.approx(np.corrcoef(ids[:, 0], ood[:, 0])[0, 1], abs=1e-12)


def test_c2_refuted_when_ood_follows_id():
    rng = np.random.default_rng(1)
    n = 40
    ids = rng.uniform(0.4, 0.9, n)
    tb = _pool({f"r{k}": [(ids[k], ids[k] - 0.1 + rng.normal(0, 0.005)), (ids[k], ids[k] - 0.2 + rng.normal(0, 0.005))]
                for k in range(n)})
    ov = _overall(indicator_rows(tb, "id_performance", "C2", "claim", "weak", n_resamples=999))
    assert ov["value"] > 0.98 and ov["ci_low"] > 0.5 and ov["verdict"] == REFUTED


def test_c2_inconclusive_when_the_interval_straddles():
    rng = np.random.default_rng(2)
    n = 10                                        # few runs, r = 0.5 exactly: on the threshold, a wide interval
    x = rng.normal(size=n)
    x = (x - x.mean()) / x.std()
    z = rng.normal(size=n)
    z -= z.mean() + (z @ x) / n * x               # orthogonal to x, centred
    z /= z.std()
    ids, ood = 0.6 + 0.1 * x, 0.5 + 0.1 * (0.5 * x + math.sqrt(0.75) * z)
    tb = _pool({f"r{k}": [(ids[k], ood[k]), (ids[k], ood[k])] for k in range(n)})
    ov = _overall(indicator_rows(tb, "id_performance", "C2", "claim", "weak", n_resamples=999))
    assert ov["value"] == pytest.approx(0.5, abs=1e-9)
    assert ov["ci_low"] < 0.5 < ov["ci_high"] and ov["verdict"] == INCONCLUSIVE


def test_c4_strong_negative_uncertain_area_is_reproduced_and_needs_the_area():
    rng = np.random.default_rng(3)
    n = 30
    ood = rng.uniform(0.2, 0.9, (n, 2))
    tb = _pool({f"r{k}": [(0.8, ood[k, 0]), (0.8, ood[k, 1])] for k in range(n)})
    c4 = claims_table(tb, tb, n_resamples=0)
    assert c4.loc[c4["claim"] == "C4", "verdict"].tolist() == [NOT_TESTABLE]
    assert "no uncertain-area values" in c4.loc[c4["claim"] == "C4", "note"].iloc[0]
    tb["uncertain_area"] = 0.3 - 0.3 * tb["ood_score"] + rng.normal(0, 0.005, len(tb))
    ov = _overall(indicator_rows(tb, "uncertain_area", "C4", "claim", "strong_negative", n_resamples=999))
    assert ov["value"] < -0.95 and ov["ci_high"] < -0.5 and ov["verdict"] == REPRODUCED


# --- C1: the foundation model's drop ----------------------------------------------------------

def _c1_perf(sam_drop: float, cnn_drops: dict[str, float], seeds: int = 3) -> pd.DataFrame:
    rows = []
    for arch, drop in {"medsam_lite": sam_drop, **cnn_drops}.items():
        for s in range(seeds):
            wobble = 0.01 * (s - 1)                   # seeds differ a little; the drop is the same
            for t in TARGETS:
                rows.append({"member_id": f"{arch}-s{s}", "arch": arch, "lr": 1e-3, "epochs": 5, "seed": s,
                             "source": "A", "target": t, "metric": "iou_3d", "id_score": 0.8 + wobble,
                             "ood_score": 0.8 + wobble - drop + (0.02 if t == "B" else -0.02),
                             "run_id": f"{arch}-s{s}", "oracle_prompt": arch.startswith("medsam"),
                             "val_score": 0.8 + wobble})
    return pd.DataFrame(rows)


def test_c1_sam_dropping_less_than_both_cnns_is_reproduced():
    rows = c1_rows(_c1_perf(0.05, {"unet_r50": 0.20, "unetpp_effb0": 0.15}), n_resamples=999)
    ov = _overall(rows)
    # hand value: max(5 - 20, 5 - 15) pp = -10
    assert ov["value"] == pytest.approx(-10.0) and ov["ci_high"] < 0 and ov["verdict"] == REPRODUCED
    assert "oracle-prompted" in ov["members"] and "oracle-prompted" in ov["note"] and "validation split" in ov["note"]
    per = {r["scope"]: r for r in rows if r["scope"] != "overall"}
    assert per["medsam_lite vs unet_r50"]["value"] == pytest.approx(-15.0)
    assert per["medsam_lite vs unetpp_effb0"]["value"] == pytest.approx(-10.0)
    assert all(r["verdict"] == REPRODUCED for r in per.values())


def test_c1_refuted_when_sam_drops_more_and_inconclusive_with_one_seed():
    assert _overall(c1_rows(_c1_perf(0.25, {"unet_r50": 0.10}), n_resamples=999))["verdict"] == REFUTED
    one = _overall(c1_rows(_c1_perf(0.05, {"unet_r50": 0.20}, seeds=1), n_resamples=999))
    assert one["value"] == pytest.approx(-15.0) and math.isnan(one["ci_low"]) and one["verdict"] == INCONCLUSIVE


def test_c1_not_testable_without_a_sam_member_or_a_cnn():
    perf = _c1_perf(0.05, {"unet_r50": 0.2})
    no_sam = c1_rows(perf[perf["arch"] != "medsam_lite"], n_resamples=0)
    only_sam = c1_rows(perf[perf["arch"] == "medsam_lite"], n_resamples=0)
    for rows in (no_sam, only_sam):
        assert len(rows) == 1 and rows[0]["verdict"] == NOT_TESTABLE and "SAM" in rows[0]["note"]


# --- C5: δ against the baselines ----------------------------------------------------------------

def _unc(errors: dict[str, float], members: list[str]) -> pd.DataFrame:
    """Uncertainty records: each method's uncertain area is off the error area by ``errors[method]`` px / 100."""
    rows = []
    for k, m in enumerate(members):
        for method, off in errors.items():
            for t in TARGETS:
                e = 10 + k
                rows.append({"member_id": m, "method": method, "site": t, "role": "ood", "case_id": "c0",
                             "slice_idx": 0, "uncertain_px": e + off, "error_px": e, "area_px": 100,
                             "mean_uncertainty": 0.1, "uncertain_error_px": e, "fixed_px": e, "map_ptp": 0.5})
    return pd.DataFrame(rows)


def test_c5_delta_with_the_lowest_error_is_reproduced():
    perf = _c1_perf(0.05, {"unet_r50": 0.2}, seeds=6)
    sam = sorted(perf.loc[perf["oracle_prompt"], "member_id"].unique())
    unc = _unc({"ggd": 1, "bayescap": 5, "tta_noise": 3, "mc_dropout": 4}, sam)
    rows = c5_rows(unc, perf, n_resamples=999)
    area, pixel = rows
    # area reading: (off / 100)^2 per image; δ 1e-4, best baseline (tta_noise) 9e-4
    assert area["value"] == pytest.approx(1e-4 - 9e-4) and area["verdict"] == REPRODUCED
    assert pixel["value"] == pytest.approx(0.01 - 0.03) and pixel["verdict"] == REPRODUCED
    assert "SAM family" in area["members"] and area["n_members"] == 6 and "tta_noise" in area["note"]
    worse = c5_rows(_unc({"ggd": 6, "bayescap": 5, "tta_noise": 3}, sam), perf, n_resamples=999)[0]
    assert worse["value"] > 0 and worse["verdict"] == REFUTED


def test_c5_not_testable_paths():
    perf = _c1_perf(0.05, {"unet_r50": 0.2})
    ids = sorted(perf["member_id"].unique())
    assert "no uncertainty records" in c5_rows(None, perf)[0]["note"]
    assert "no baseline" in c5_rows(_unc({"ggd": 1}, ids), perf)[0]["note"]
    assert "no δ" in c5_rows(_unc({"tta_noise": 1}, ids), perf)[0]["note"]
    assert all(r["verdict"] == NOT_TESTABLE for r in (c5_rows(None, perf)[0], c5_rows(_unc({"ggd": 1}, ids), perf)[0]))
    # no SAM-family member scored by every method: the pooled members, and the row says so
    pooled = c5_rows(_unc({"ggd": 1, "tta_noise": 3}, [i for i in ids if i.startswith("unet")]), perf, n_resamples=0)
    assert "unlike the paper" in pooled[0]["members"]
    # the site records say no member is box-prompted (Table 4's reading): pooled too, whatever oracle_prompt says
    both = _unc({"ggd": 1, "tta_noise": 3}, ids)
    assert "unlike the paper" in c5_rows(both, perf, n_resamples=0, sam_members=set())[0]["members"]
    assert c5_rows(both, perf, n_resamples=0)[0]["members"].startswith("SAM family")


# --- the project's rows -------------------------------------------------------------------------

def test_regret_point_value_matches_select_models():
    rng = np.random.default_rng(4)
    n = 12
    tb = _pool({f"r{k}": [(rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.8)), (rng.uniform(0.4, 0.9),
                                                                          rng.uniform(0.2, 0.8))] for k in range(n)})
    tb["id_score"] = tb.groupby("member_id")["id_score"].transform("first")
    row = regret_rows(tb, ["id_performance"], n_resamples=199)[0]
    sel = select_models(tb, ["id_performance"])
    assert row["value"] == pytest.approx(100 * (sel["regret"] - sel["random_regret"]).mean(), abs=1e-9)
    assert row["ci_low"] <= row["value"] <= row["ci_high"]


def test_not_testable_rows_never_crash():
    one = _pool({"r0": [(0.8, 0.6), (0.8, 0.5)]})
    out = claims_table(one, one, n_resamples=0)
    assert list(out.columns) == CLAIM_COLUMNS
    by = out.groupby("claim")["verdict"].first()
    for c in ("C1", "C2", "C3", "C4", "C5"):
        assert by[c] == NOT_TESTABLE, c
    assert aline_rows(one, None, None)[0]["verdict"] == NOT_TESTABLE
    # every member oracle-prompted: nothing label-free to test C2-C4 on
    allsam = claims_table(_c1_perf(0.05, {}), None, n_resamples=0)
    lf = allsam[allsam["claim"].isin(["C2", "C3", "C4"])]
    assert sorted(lf["claim"]) == ["C2", "C3", "C4"] and set(lf["verdict"]) == {NOT_TESTABLE}
    assert "no label-free member" in allsam.loc[allsam["claim"] == "C2", "note"].iloc[0]


# --- files, run_analysis, the CLI ---------------------------------------------------------------

def _write_tiny(exp) -> None:
    """Records of 8 members (unet_r18 and medsam_tiny, 2 seeds x 2 lrs) without predictions or δ."""
    for arch in ("unet_r18", "medsam_tiny"):
        for lr in (1e-3, 1e-4):
            for seed in (0, 1):
                mid = f"{arch}-lr{lr:g}-s{seed}"
                s = 0.5 + 0.1 * seed + (0.1 if lr == 1e-3 else 0) + (0.05 if arch == "unet_r18" else 0)
                rows = []
                for site, role, score in (("A", "id", s), ("B", "ood", s - 0.2), ("C", "ood", s - 0.3)):
                    tp = int(round(100 * score))
                    rows.append(dict(member_id=mid, site=site, role=role, case_id="c0", slice_idx=0, tp=tp,
                                     fp=100 - tp, fn=0, tn=0, area_px=100))
                write_member_part(exp, {"member_id": mid, "run_id": mid, "arch": arch, "lr": lr, "epochs": 3,
                                        "seed": seed, "batch_size": 4, "source": "A", "checkpoint": "x.pt",
                                        "oracle_prompt": arch.startswith("medsam")},
                                  pd.DataFrame(rows))


def test_report_cli_on_a_tiny_folder(tmp_path, capsys):
    from sweeps.cli import main

    exp = tmp_path / "exp"
    _write_tiny(exp)
    assert main(["report", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "| C1 |" in out and "| C2 |" in out and "claims report written to" in out
    claims = pd.read_csv(exp / "analysis" / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    verdicts = claims.groupby("claim")["verdict"].first()
    assert verdicts["C3"] == NOT_TESTABLE and verdicts["C4"] == NOT_TESTABLE and verdicts["C5"] == NOT_TESTABLE
    md = (exp / "analysis" / "claims.md").read_text()
    assert "Decision rule" in md and "|r| < 0.5" in md and "oracle-prompted" in md
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "oodsweep run" in err


def test_run_analysis_writes_the_claims_and_lists_them(tmp_path):
    from analysis import run_analysis

    exp = tmp_path / "exp"
    _write_tiny(exp)
    res = run_analysis(exp, n_resamples=49)
    out = exp / "analysis"
    assert {str(out / "claims.csv"), str(out / "claims.md")} <= set(res["files"])
    summary = json.loads((out / "summary.json").read_text())
    assert {c["claim"] for c in summary["claims"]} >= {"C1", "C2", "C3", "C4", "C5"}
    assert "## Claims" in (out / "tables.md").read_text() and "(claims.md)" in (out / "tables.md").read_text()


def test_a_verdict_carried_by_degenerate_members_is_inconclusive():
    rng = np.random.default_rng(5)
    runs = {f"w{k}": [(a, b), (a, c)] for k, (a, b, c) in enumerate(rng.uniform(0.5, 0.9, (30, 3)))}  # r ≈ 0
    runs |= {f"d{k}": [(0.002, 0.001), (0.002, 0.001)] for k in range(10)}       # predict nothing
    tb = _pool(runs)
    out = claims_table(tb, tb, n_resamples=499, floor=0.01)
    c2 = out[out["claim"] == "C2"].set_index("scope")
    assert "overall (non-degenerate)" not in c2.index                        # beside the overall row, not a row
    assert c2.loc["overall", "verdict_nondegenerate"] == REPRODUCED          # without them: weak, as the paper says
    assert c2.loc["overall", "n_members_nondegenerate"] == 30 and c2.loc["overall", "value_nondegenerate"] < 0.5
    assert c2.loc["overall", "ci_low"] > 0.5                                  # with them: the interval says strong
    assert c2.loc["overall", "verdict"] == INCONCLUSIVE and "carried by" in c2.loc["overall", "note"]
    assert c2.loc["B", "verdict"] == REFUTED                                  # per-target rows keep the raw rule


def _agreement(n: int, ood_of_id, seed: int = 6):
    """An Agreement of ``n`` label-free members on A (id) and B, C (ood): OOD agreement = ood_of_id(ID)."""
    from analysis.agreement import Agreement

    rng = np.random.default_rng(seed)
    a = rng.uniform(0.4, 0.95, (n, n))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    sym = [ood_of_id(a, rng) for _ in TARGETS]
    mats = {"A": a, **{t: (b + b.T) / 2 for t, b in zip(TARGETS, sym)}}  # agreement is symmetric
    return Agreement(member_ids=[f"r{k}-ep1" for k in range(n)], matrices=mats,
                     roles={"A": "id", "B": "ood", "C": "ood"})


def test_c3_agreement_on_the_line_refuted_when_ood_agreement_follows_id_agreement():
    n = 20
    ag = _agreement(n, lambda a, rng: np.clip(a - 0.1, 0, 1))
    run_of = {m: m.split("-")[0] for m in ag.member_ids}
    rows = agreement_rows(ag, run_of, n_resamples=499)
    assert rows[0]["scope"] == "overall" and rows[0]["value"] == pytest.approx(1.0) and rows[0]["verdict"] == REFUTED
    noise = _agreement(n, lambda a, rng: rng.uniform(0.3, 0.9, a.shape))
    r0 = agreement_rows(noise, run_of, n_resamples=499)[0]
    assert abs(r0["value"]) < 0.2 and r0["verdict"] == REPRODUCED


def test_aline_error_matches_aline_table():
    from analysis.aline import aline_table

    n = 12
    ag = _agreement(n, lambda a, rng: np.clip(a - 0.15 + rng.normal(0, 0.02, a.shape), 0.01, 0.99))
    rng = np.random.default_rng(7)
    tb = _pool({f"r{k}": [(i, o), (i, o - 0.05)] for k, (i, o) in enumerate(rng.uniform(0.4, 0.9, (n, 2)))})
    _, fits = aline_table(tb, ag)
    rows = aline_rows(tb, ag, fits, n_resamples=199)
    s = np.mean([f["mae"] for f in fits if f["method"] == "aline_s"])
    d = np.mean([f["mae"] for f in fits if f["method"] == "aline_d"])
    assert rows[0]["value"] == pytest.approx(100 * s, abs=1e-9)
    assert rows[0]["ci_low"] <= rows[0]["value"] <= rows[0]["ci_high"]
    assert rows[1]["value"] == pytest.approx(100 * d, abs=1e-9) and math.isnan(rows[1]["ci_low"])
