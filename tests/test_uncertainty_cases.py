"""The uncertainty records summed per case (analysis.uncertainty_cases): the same means as the slice records."""
import numpy as np
import pandas as pd
import pytest

from analysis.case_bootstrap import case_scores
from analysis.claim_arms import c5_rows
from analysis.table4 import table4
from analysis.uncertainty_cases import case_sums, mean_over_images, read_case_sums
from analysis.uncertainty_indicators import uncertainty_indicator_frame
from trainables.records import UNCERTAINTY_COLUMNS


def _slices(seed: int = 0) -> pd.DataFrame:
    """3 members x 2 methods x 2 sites x 3 cases x 4 slices; a NaN map spread, a missing fixed_px, one member
    without uncertain_error_px on one slice."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in ("m0", "m1", "m2"):
        for method in ("ggd", "bayescap"):
            for site, role in (("A", "id"), ("B", "ood")):
                for c in range(3):
                    for s in range(4):
                        rows.append({"member_id": m, "method": method, "site": site, "role": role,
                                     "case_id": f"c{c}", "slice_idx": s, "uncertain_px": int(rng.integers(0, 60)),
                                     "error_px": int(rng.integers(0, 60)), "area_px": 64,
                                     "mean_uncertainty": float(rng.random()),
                                     "uncertain_error_px": int(rng.integers(0, 20)),
                                     "fixed_px": int(rng.integers(0, 60)), "map_ptp": float(rng.random() * 0.03)})
    df = pd.DataFrame(rows).astype({c: t for c, t in UNCERTAINTY_COLUMNS.items()})
    df.loc[5, "map_ptp"] = np.nan                                        # m0 ggd A: no guarded value
    df.loc[(df["member_id"] == "m1") & (df["site"] == "B") & (df["slice_idx"] == 0), "fixed_px"] = pd.NA
    return df


def test_case_sums_by_hand():
    u = pd.DataFrame({"member_id": ["a", "a", "a"], "method": "ggd", "site": "S", "role": "ood",
                      "case_id": ["c0", "c0", "c1"], "slice_idx": [0, 1, 0], "uncertain_px": [10, 30, 5],
                      "error_px": [20, 10, 5], "area_px": [100, 100, 100], "mean_uncertainty": [0.1, np.nan, 0.3],
                      "uncertain_error_px": [5, 5, pd.NA], "fixed_px": [1, 2, 3],
                      "map_ptp": [0.5, 0.001, 0.5]}).astype({"uncertain_error_px": "Int64", "fixed_px": "Int64"})
    cs = case_sums(u).set_index("case_id")
    assert cs.loc["c0", "n_images"] == 2 and cs.loc["c1", "n_images"] == 1
    assert cs.loc["c0", "uncertain_area"] == pytest.approx(0.1 + 0.3)
    assert cs.loc["c0", "guarded_area"] == pytest.approx(0.1)             # the flat map (0.001 < 0.01) counts 0
    assert cs.loc["c0", "sq_area"] == pytest.approx(0.1 ** 2 + 0.2 ** 2)
    assert cs.loc["c0", "sq_pixel"] == pytest.approx((10 + 20 - 10) / 100 + (30 + 10 - 10) / 100)
    # NaN: left out of the sum and the count, and counted as bad
    assert (cs.loc["c0", "mean_uncertainty"], cs.loc["c0", "mean_uncertainty_n"],
            cs.loc["c0", "mean_uncertainty_bad"]) == (pytest.approx(0.1), 1, 1)
    assert cs.loc["c1", "pixel_na"] == 1 and cs.loc["c1", "sq_pixel_n"] == 0
    # means over the images of several cases: sums over counts; skipna=False: NaN when any image has none
    both = case_sums(u)
    assert mean_over_images(both, "sq_area", [both["member_id"]]).loc["a"] == pytest.approx(
        (0.01 + 0.04 + 0.0) / 3)
    assert mean_over_images(both, "mean_uncertainty", [both["member_id"]]).loc["a"] == pytest.approx(0.2)
    assert np.isnan(mean_over_images(both, "mean_uncertainty", [both["member_id"]], skipna=False).loc["a"])
    assert case_sums(both) is both  # a case-sum table is returned as it is


def test_every_reading_is_the_same_from_case_sums():
    u = _slices()
    cs = case_sums(u)
    # the indicators per member x site
    a, b = uncertainty_indicator_frame(u), uncertainty_indicator_frame(cs)
    pd.testing.assert_frame_equal(a, b, rtol=1e-12)
    assert np.isnan(a.loc[("m0", "A"), "guarded_area"]) and np.isnan(a.loc[("m1", "B"), "fixed_threshold_area"])
    direct = (u[u["method"] == "ggd"].assign(f=lambda d: d["uncertain_px"] / d["area_px"])
              .groupby(["member_id", "site"])["f"].mean())
    np.testing.assert_allclose(a["uncertain_area"].to_numpy(), direct.to_numpy(), rtol=1e-12)
    # Table 4, both readings
    for reading in ("area", "pixel"):
        pd.testing.assert_series_equal(table4(u, reading=reading), table4(cs, reading=reading), rtol=1e-12)
    sq = ((u["uncertain_px"] - u["error_px"]) / u["area_px"]) ** 2
    np.testing.assert_allclose(table4(u).to_numpy(), sq.groupby([u["method"], u["site"]]).mean().to_numpy(),
                               rtol=1e-12)
    # the case bootstrap's readings: every case drawn once gives the indicator
    slices = u[u["method"] == "ggd"][["member_id", "site", "role", "case_id", "slice_idx"]].assign(
        tp=5, fp=1, fn=1, tn=57, area_px=64)
    one, two = (case_scores(slices, "iou_3d", ["m0", "m1", "m2"], unc=x) for x in (u, cs))
    for col in one.unc:
        np.testing.assert_allclose(one.unc[col]["B"].scores(np.ones(3)), two.unc[col]["B"].scores(np.ones(3)),
                                   rtol=1e-12)
    np.testing.assert_allclose(one.unc["uncertain_area"]["B"].scores(np.ones(3)),
                               a.xs("B", level="site")["uncertain_area"].to_numpy(), rtol=1e-12)
    assert np.isnan(one.unc["fixed_threshold_area"]["B"].scores(np.ones(3))[1])  # m1's NaN image


def test_c5_reads_case_sums_as_slices():
    u = _slices(1)
    perf = pd.DataFrame({"member_id": ["m0", "m1", "m2"], "run_id": ["r0", "r1", "r2"],
                         "oracle_prompt": [False, False, False]})
    a, b = c5_rows(u, perf), c5_rows(case_sums(u), perf)
    assert len(a) == len(b) == 2  # both readings
    for x, y in zip(a, b):
        for k in ("value", "ci_low", "ci_high"):
            assert x[k] == pytest.approx(y[k], rel=1e-12)
    # a slice without uncertain_error_px: the pixel reading is left out, from either form
    u.loc[u.index[-1], "uncertain_error_px"] = pd.NA
    assert len(c5_rows(u, perf)) == len(c5_rows(case_sums(u), perf)) == 1


def test_read_case_sums_in_batches(tmp_path):
    u = _slices(2)
    path = tmp_path / "uncertainty.parquet"
    u.to_parquet(path, index=False)
    whole = case_sums(u)
    for batch in (7, 50, 10_000):  # cases split across batches are summed again
        got = read_case_sums(path, batch_rows=batch)
        assert len(got) == len(whole)
        keys = ["member_id", "method", "site", "role", "case_id"]
        g = got.astype({k: str for k in keys}).sort_values(keys).reset_index(drop=True)
        w = whole.astype({k: str for k in keys}).sort_values(keys).reset_index(drop=True)
        pd.testing.assert_frame_equal(g, w, check_dtype=False, rtol=1e-12)


def test_fig6_reads_its_slice_from_the_records_with_case_sums(tmp_path):
    from analysis.examples import _slice_area
    from trainables.records import records_dir

    u = _slices(3)
    rdir = records_dir(tmp_path)
    rdir.mkdir(parents=True)
    u.to_parquet(rdir / "uncertainty.parquet", index=False)
    key = ("B", "c1", 2)
    want = _slice_area(u, key)
    assert set(want) == {"m0", "m1", "m2"}
    assert _slice_area(case_sums(u), key, experiment_dir=tmp_path) == pytest.approx(want)
    assert _slice_area(case_sums(u), ("B", "c9", 0), experiment_dir=tmp_path) == {}
