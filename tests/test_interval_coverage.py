"""Coverage of the small-sample intervals C1 and C5 decide with (``analysis.run_intervals``).

Generator: each run's value (C1: a run's drop, pp; C5: a run's δ − baseline difference) is normal around
its arm's true mean with a between-run SD; 2,000 simulated data sets per setting, a fixed seed. The
nominal-95% interval must cover the true difference in 92–98% of them. The functions tested are the ones
``c1_rows`` and ``c5_rows`` call (``arms_worst_case``, ``welch_interval``, ``paired_worst_case``), on
batches of data sets; the last tests tie the rows to them.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.claim_rule import INCONCLUSIVE, REPRODUCED
from analysis.claim_arms import c1_rows, c5_rows
from analysis.run_intervals import MIN_RUNS, arms_worst_case, paired_worst_case, welch_interval

N_SETS = 2000


def _covers(lo, hi, truth) -> float:
    return float(np.mean((lo <= truth) & (truth <= hi)))


@pytest.mark.parametrize("n_sam, n_cnn, sd_sam, sd_cnn", [(3, 3, 1.0, 1.0), (3, 6, 1.0, 1.0), (6, 6, 2.0, 1.0),
                                                          (3, 6, 3.0, 1.0), (6, 3, 1.0, 3.0)])
def test_welch_interval_of_c1_covers_the_true_difference(n_sam, n_cnn, sd_sam, sd_cnn):
    rng = np.random.default_rng(11)
    true_diff = -5.0                                   # SAM drops 5 pp less than the CNN
    sam = rng.normal(10.0 + true_diff, sd_sam, (N_SETS, n_sam))
    cnn = rng.normal(10.0, sd_cnn, (N_SETS, n_cnn))
    value, lo, hi = arms_worst_case(sam, [cnn])       # one CNN: C1's per-architecture interval
    plain_lo, plain_hi = welch_interval(sam, cnn)
    np.testing.assert_allclose(lo, plain_lo)
    np.testing.assert_allclose(hi, plain_hi)
    assert 0.92 <= _covers(lo, hi, true_diff) <= 0.98


def test_the_worst_case_over_three_cnns_covers_at_least_as_often():
    """C1's overall row: max over 3 CNNs, [max lo, max hi] at the Bonferroni level. Equal true differences
    are the hardest case for it (the max of three noisy estimates is biased up); it must still cover."""
    rng = np.random.default_rng(12)
    sam = rng.normal(5.0, 1.0, (N_SETS, 3))
    cnns = [rng.normal(10.0, 1.0, (N_SETS, n)) for n in (3, 6, 3)]
    value, lo, hi = arms_worst_case(sam, cnns)
    assert value.shape == (N_SETS,)
    assert 0.93 <= _covers(lo, hi, -5.0) <= 1.0


@pytest.mark.parametrize("n_runs", [3, 6])
def test_paired_interval_of_c5_covers_the_true_difference(n_runs):
    rng = np.random.default_rng(13)
    # one baseline: δ − baseline per run, true mean +0.02, between-run SD 0.03
    diffs = rng.normal(0.02, 0.03, (N_SETS, 1, n_runs))
    value, lo, hi = paired_worst_case(diffs)
    assert 0.92 <= _covers(lo, hi, 0.02) <= 0.98


def test_two_runs_give_no_interval():
    assert MIN_RUNS == 3
    lo, hi = welch_interval([1.0, 2.0], [3.0, 4.0, 5.0])
    assert math.isnan(lo) and math.isnan(hi)
    value, lo, hi = paired_worst_case([[0.1, 0.2]])
    assert value == pytest.approx(0.15) and math.isnan(lo)


# --- the rows use these intervals ----------------------------------------------------------------

def _perf(drops: dict[str, list[float]]) -> pd.DataFrame:
    """One member per run; a run's drop (in score units) is its ID score minus its OOD score on each target."""
    rows = []
    for arch, ds in drops.items():
        for s, d in enumerate(ds):
            for t in ("B", "C"):
                rows.append({"member_id": f"{arch}-s{s}", "arch": arch, "lr": 1e-3, "epochs": 5, "seed": s,
                             "source": "A", "target": t, "metric": "iou_3d", "id_score": 0.9, "ood_score": 0.9 - d,
                             "run_id": f"{arch}-s{s}", "oracle_prompt": arch.startswith("medsam"), "val_score": 0.9})
    return pd.DataFrame(rows)


def test_c1_rows_use_welch_per_cnn_and_the_bonferroni_worst_case_overall():
    sam, r50, r18 = [0.05, 0.07, 0.06], [0.20, 0.24, 0.19, 0.22], [0.12, 0.13, 0.14]
    rows = c1_rows(_perf({"medsam_lite": sam, "unet_r50": r50, "unet_r18": r18}))
    by = {r["scope"]: r for r in rows}
    ci = stats.ttest_ind(100 * np.array(sam), 100 * np.array(r18), equal_var=False).confidence_interval(0.95)
    assert by["medsam_lite vs unet_r18"]["ci_low"] == pytest.approx(ci.low)
    assert by["medsam_lite vs unet_r18"]["ci_high"] == pytest.approx(ci.high)
    ov = by["overall"]
    # hand value: max(6 − 21.25, 6 − 13) pp = −7; interval ends from the 97.5% Welch intervals
    assert ov["value"] == pytest.approx(-7.0)
    his = [stats.ttest_ind(100 * np.array(sam), 100 * np.array(c), equal_var=False).confidence_interval(0.975).high
           for c in (r50, r18)]
    assert ov["ci_high"] == pytest.approx(max(his)) and ov["verdict"] == REPRODUCED
    assert "Bonferroni" in ov["note"] and "by construction" in ov["note"]


def test_c1_with_two_runs_is_inconclusive_and_says_how_many_more():
    rows = c1_rows(_perf({"medsam_lite": [0.05, 0.06], "unet_r50": [0.20, 0.24, 0.19]}))
    ov = next(r for r in rows if r["scope"] == "overall")
    assert math.isnan(ov["ci_low"]) and ov["verdict"] == INCONCLUSIVE
    assert "medsam_lite has 2 (1 more run would give one)" in ov["note"]


def test_c5_interval_is_over_runs_not_members():
    """Two members per run: the t interval has runs − 1 degrees of freedom, not members − 1."""
    members = [f"medsam_lite-s{s}-{k}" for s in range(3) for k in range(2)]
    perf = pd.DataFrame({"member_id": members, "run_id": [m[:14] for m in members], "oracle_prompt": True,
                         "arch": "medsam_lite"})
    off = {"medsam_lite-s0": 1.0, "medsam_lite-s1": 2.0, "medsam_lite-s2": 4.0}   # δ's offset per run (px)
    rows = []
    for m in members:
        for method, o in (("ggd", off[m[:14]]), ("tta_noise", 3.0)):
            rows.append({"member_id": m, "method": method, "site": "B", "role": "ood", "case_id": "c0",
                         "slice_idx": 0, "uncertain_px": 10 + o, "error_px": 10, "area_px": 100,
                         "uncertain_error_px": 10})
    area = c5_rows(pd.DataFrame(rows), perf)[0]
    d = (np.array([1.0, 2.0, 4.0]) / 100) ** 2 - (3.0 / 100) ** 2          # per run: δ − tta_noise
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert area["value"] == pytest.approx(d.mean())
    assert (area["ci_low"], area["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert area["n_units"] == 3 and "6 members, 3 runs" in area["members"]
    two = c5_rows(pd.DataFrame([r for r in rows if not r["member_id"].startswith("medsam_lite-s2")]), perf)[0]
    assert math.isnan(two["ci_low"]) and two["verdict"] == INCONCLUSIVE and "1 more run would give one" in two["note"]
