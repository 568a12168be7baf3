"""The error band (trainables.uncertainty.scoring.error_band / error_rankings): the maps' AUROC/AP within a
band around the predicted ∪ true mask, hand-checked on a 9x9 slice; exact against binned within the binning's
stated bound; the records' band columns, and records written before them read with a warning."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from trainables import ranking, records
from trainables.uncertainty.scoring import error_band, error_ranking, error_rankings


def _slice():
    """truth: rows 3-5 x cols 3-5; pred: rows 3-5 x cols 4-6. fn: col 3, fp: col 6 (3 px each), tp: cols 4-5."""
    truth = np.zeros((1, 9, 9), bool)
    pred = np.zeros((1, 9, 9), bool)
    truth[0, 3:6, 3:6] = True
    pred[0, 3:6, 4:7] = True
    return pred, truth, pred != truth


def test_band_by_hand():
    pred, truth, error = _slice()
    assert error.sum() == 6
    # width 0: the union, rows 3-5 x cols 3-6 (12 px); width 1 (disk(1) is the 4-neighbour cross): the 3x4
    # union plus a row of 4 above and below and a column of 3 left and right = 26 px, no corners
    assert error_band(pred, truth, 0).sum() == 12
    band = error_band(pred, truth, 1)
    assert band.sum() == 12 + 4 + 4 + 3 + 3
    assert band[0, 2, 3:7].all() and band[0, 6, 3:7].all() and band[0, 3:6, 2].all() and band[0, 3:6, 7].all()
    assert not band[0, 2, 2] and not band[0, 6, 7]  # the corners are at √2 > 1
    assert (band | ~error).all()  # every error pixel is in the band
    # per slice: a second, empty slice gets no band from its neighbour
    two = error_band(np.concatenate([pred, 0 * pred]), np.concatenate([truth, 0 * truth]), 3)
    assert two[0].sum() > 26 and not two[1].any()
    with pytest.raises(ValueError, match="uncertainty.band_px"):
        error_band(pred, truth, -1)


def test_a_structure_map_scores_high_on_the_image_and_lower_in_the_band():
    pred, truth, error = _slice()
    band = error_band(pred, truth, 1)
    # "structure": 1 on the prediction and its 1-px rim (rows 2-6 x cols 4-6 and cols 3, 7 x rows 3-5: 21 px),
    # 0 elsewhere. All 6 errors score 1; of the 75 correct pixels 15 score 1 (ties, 1/2) and 60 score 0:
    # whole-image AUROC (60 + 15/2) / 75 = 0.9. In the band (20 correct pixels, the 15 lit ones among them):
    # (5 + 15/2) / 20 = 0.625. AP: all six errors at the top threshold with 15 correct pixels: 6/21 in both.
    structure = error_band(pred, np.zeros_like(truth), 1).astype(np.float32)
    assert structure.sum() == 21
    (auroc, ap), inband = error_rankings(structure, error, band, "exact")
    assert auroc == pytest.approx(0.9) and inband.auroc == pytest.approx(0.625)
    assert ap == pytest.approx(6 / 21) and inband.ap == pytest.approx(6 / 21)
    assert (inband.px, inband.error_px) == (26, 6) and inband.error_frac == pytest.approx(6 / 26)
    # a map that ranks the errors perfectly inside the band and puts the far background above them: whole-image
    # AUROC 20/75 (each error beats only the band's 20 correct pixels), band AUROC and AP 1
    inside = error.astype(np.float32) + 3 * ~band
    (auroc, _), inband = error_rankings(inside, error, band, "exact")
    assert auroc == pytest.approx(20 / 75) and inband.auroc == 1.0 and inband.ap == 1.0
    # the whole-image numbers are error_ranking's, unchanged; the binned path gives the same here (few values)
    for m in (structure, inside):
        for mode in ("exact", "binned"):
            whole, b = error_rankings(m, error, lambda i, j: band[i:j], mode)
            assert whole == error_ranking(m, error, mode)
            ex = error_rankings(m, error, band, "exact")[1]
            assert b.auroc == pytest.approx(ex.auroc, abs=1e-12) and b.ap == pytest.approx(ex.ap, abs=1e-12)
            assert (b.px, b.error_px) == (26, 6)
    # no correct pixel in the band (width 0 on a prediction that misses everything): NaN, counts kept
    (_, _), empty = error_rankings(structure, truth, error_band(0 * pred, truth, 0), "exact")
    assert math.isnan(empty.auroc) and (empty.px, empty.error_px) == (9, 9)


def _blobs(rng, n=24, size=64):
    """Slices with a disc as truth, a shifted disc as prediction, and a variance-like map at the prediction's
    edge plus noise (as test_ranking's structured maps)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    maps, preds, truths = [], [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(20, 44, 2).tolist() + [rng.uniform(6, 14)]
        dy, dx = rng.normal(0, 2, 2)
        truths.append(np.hypot(yy - cy, xx - cx) < r)
        d = np.hypot(yy - cy - dy, xx - cx - dx) - r
        preds.append(d < 0)
        maps.append((np.exp(-np.abs(d)) * rng.lognormal(0, 1) + rng.exponential(1e-3, d.shape)).astype(np.float32))
    return np.stack(maps), np.stack(preds), np.stack(truths)


def test_binned_band_within_its_bound_of_exact():
    maps, pred, truth = _blobs(np.random.default_rng(3), n=12)
    error = pred != truth
    band = error_band(pred, truth, 3)
    y, s = error[band], maps[band].astype(np.float64)
    auroc, ap = roc_auc_score(y, s), average_precision_score(y, s)
    # coarse bins, several batches; the band asked a batch at a time
    whole, sub = ranking.binned_error_rankings(maps, error, lambda i, j: error_band(pred[i:j], truth[i:j], 3),
                                               bins=1024, batch_pixels=5000)
    assert abs(sub.auroc - auroc) <= sub.auroc_bound + 1e-12, (sub, auroc)
    assert sub.auroc_bound <= 0.01 and abs(sub.ap - ap) <= 0.005, (sub, auroc, ap)
    assert (sub.positives, sub.negatives) == (int(error.sum()), int(band.sum() - error.sum()))
    # the whole-image ranking is bit-identical with and without the band's histograms
    assert whole == ranking.binned_error_ranking(maps, error, bins=1024, batch_pixels=5000)
    # the default bins, through error_rankings (three slices: the default's 65,536 quantiles cost seconds on more)
    maps, error, band = maps[:3], error[:3], band[:3]
    (wa, wp), b = error_rankings(maps, error, band, "binned")
    (ea, ep), e = error_rankings(maps, error, band, "exact")
    assert abs(b.auroc - e.auroc) <= 1e-4 and abs(b.ap - e.ap) <= 0.005 and (b.px, b.error_px) == (e.px, e.error_px)
    assert (wa, wp) == error_ranking(maps, error, "binned") and (ea, ep) == error_ranking(maps, error, "exact")
    assert e.auroc < ea  # this edge map lights up the boundary: the band, without the easy background, is harder


def _old_site_rows():
    return pd.DataFrame({"member_id": ["m1", "m1"], "method": ["ggd", "bayescap"], "site": ["B", "B"],
                         "role": ["ood", "ood"], "prompted": [False, False], "auroc": [0.9, 0.7], "ap": [0.3, 0.2],
                         "error_px": [10, 10], "area_px": [100, 100], "source_threshold": [0.1, 0.2]})


def test_records_before_the_band_read_with_a_warning(tmp_path):
    from analysis.uncertainty_indicators import error_ranking_markdown, error_ranking_table

    part = records.records_dir(tmp_path) / "uncertainty" / "sites" / "m1.parquet"
    part.parent.mkdir(parents=True)
    _old_site_rows().to_parquet(part, index=False)  # as written before the band columns existed
    with pytest.warns(UserWarning, match="2 of 2 rows have no error band .scored before it existed.: auroc_band"):
        sites = records.load_uncertainty_sites(tmp_path)
    with pytest.warns(UserWarning, match="no error band"):  # again from the merged table, which holds <NA> now
        assert records.load_uncertainty_sites(tmp_path)["auroc_band"].isna().all()
    assert sites["auroc_band"].isna().all() and sites["band_px"].isna().all()
    assert list(sites.columns[:len(records.UNCERTAINTY_SITE_COLUMNS)]) == list(records.UNCERTAINTY_SITE_COLUMNS)
    assert (sites["auroc"] == [0.9, 0.7]).all()  # the whole-image numbers as stored
    t = error_ranking_table(sites, {"B": "ood"}, "A")
    assert t.loc[t.statistic == "median AUROC", "A → B"].tolist() == [0.9, 0.7]
    assert t.loc[t.statistic == "median AUROC (band)", "A → B"].isna().all()
    md = error_ranking_markdown(t, {})
    assert "band rows are empty" in md and "| ggd | median AUROC (band) | – |" in md
    # current records: the band columns written, no warning, shown beside the whole-image rows
    new = _old_site_rows().assign(auroc_band=[0.6, 0.55], ap_band=[0.4, 0.3], band_px=[40, 40],
                                  band_error_frac=[0.25, 0.25], band_width_px=[3, 3])
    records.write_uncertainty_sites(tmp_path, "m1", new)
    (records.records_dir(tmp_path) / "uncertainty_sites.parquet").unlink()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sites = records.load_uncertainty_sites(tmp_path)
    t = error_ranking_table(sites, {"B": "ood"}, "A")
    got = t.set_index(["method", "statistic"])["A → B"]
    assert got[("ggd", "median AUROC (band)")] == 0.6 and got[("bayescap", "band error fraction")] == 0.25
    md = error_ranking_markdown(t, {})
    assert "band rows are empty" not in md and "| ggd | band width (px) | 3 |" in md


def test_the_band_width_key(tmp_path, monkeypatch):
    from sweeps import cluster, uncertainty
    from sweeps.spec import SpecError, parse_spec
    from trainables.uncertainty.config import DeltaConfig

    assert DeltaConfig.default("band_px") == 3
    monkeypatch.setattr(cluster, "capacity", lambda: {"CPU": 2.0, "GPU": 0.0})
    raw = {"name": "x", "storage": str(tmp_path), "data": {"layout": "prostate_multisite", "root": str(tmp_path),
                                                           "source": "A", "targets": ["B"]},
           "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]}},
           "uncertainty": {"band_px": 5}}
    assert uncertainty.param_space(parse_spec(raw), tmp_path, ["m1"], {"m1": "m1.pt"}, set())["band_px"] == 5
    del raw["uncertainty"]["band_px"]  # the default: the trial configs as before
    assert "band_px" not in uncertainty.param_space(parse_spec(raw), tmp_path, ["m1"], {"m1": "m1.pt"}, set())
    raw["uncertainty"]["band_px"] = -1
    with pytest.raises(SpecError, match="uncertainty.band_px: must be >= 0, got -1"):
        parse_spec(raw)
