"""The uncertainty records' new columns and the indicators beside the paper's Otsu area, on hand-made maps."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.indicators import resolve_indicators
from analysis.table4 import table4
from analysis.uncertainty_indicators import FLAT_TOL, guarded_area, uncertainty_indicator_frame
from trainables.uncertainty import (DeltaNet, error_ranking, ggd_variance, otsu_area, slice_columns,
                                    source_threshold, uncertain_masks)


def test_slice_columns_in_chunks_equal_the_whole_site_at_once(monkeypatch):
    """The columns are computed COLUMN_CHUNK slices at a time (bounded float64 copies): every value equals the
    one-pass result, bit for bit, with and without a source threshold, and a chunk that is not full."""
    import trainables.uncertainty.scoring as scoring

    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 1.0, (7, 9, 9)).astype(np.float32)
    maps[2] = 0.5  # a flat map: no uncertain pixels
    err = rng.random((7, 9, 9)) < 0.2
    for thr in (1.5, None):
        whole = slice_columns(maps, err, thr)
        monkeypatch.setattr(scoring, "COLUMN_CHUNK", 3)  # chunks of 3, 3 and 1 slices
        chunked = slice_columns(maps, err, thr)
        monkeypatch.setattr(scoring, "COLUMN_CHUNK", 256)
        for k, v in whole.items():
            assert pd.Series(chunked[k]).equals(pd.Series(v)), k
    assert whole["uncertain_px"][2] == 0 and whole["fixed_px"].isna().all()


def test_intersection_of_uncertain_and_error_masks_on_a_hand_made_slice():
    m = np.zeros((1, 8, 8))
    m[0, 2:4, 2:6] = 1.0               # 8 uncertain pixels (above Otsu's threshold of a two-level map)
    err = np.zeros((1, 8, 8), bool)
    err[0, 3:5, 4:7] = True            # 6 wrong pixels; 2 of them, (3, 4) and (3, 5), are uncertain
    c = slice_columns(m, err, threshold=0.5)
    assert c["uncertain_px"].tolist() == [8] and c["error_px"].tolist() == [6]
    assert c["uncertain_error_px"].tolist() == [2]
    assert list(c["fixed_px"]) == [8] and c["map_ptp"].tolist() == [1.0]
    # Table 4's pixel reading: (8 + 6 - 2*2) / 64 wrong in the mask comparison; the area reading (8 - 6)² / 64²
    unc = pd.DataFrame({"method": "ggd", "site": "B", "member_id": "m", **{k: v for k, v in c.items()},
                        "area_px": 64})
    assert table4(unc, reading="pixel").iloc[0] == pytest.approx(10 / 64)
    assert table4(unc, reading="area").iloc[0] == pytest.approx((2 / 64) ** 2)
    with pytest.raises(ValueError, match="unknown Table 4 reading 'both'; valid: area, pixel"):
        table4(unc, reading="both")


def test_auroc_of_a_map_equal_to_the_error_mask_is_one():
    rng = np.random.default_rng(0)
    err = rng.random((3, 16, 16)) < 0.1
    assert error_ranking(err.astype(float), err) == (1.0, 1.0)
    assert error_ranking(1.0 - err, err)[0] == 0.0           # the reverse ranks them last
    auroc, ap = error_ranking(np.ones((1, 4, 4)), np.zeros((1, 4, 4), bool))  # no error pixel: undefined
    assert np.isnan(auroc) and np.isnan(ap)


def test_flat_map_plus_noise_has_otsu_area_but_no_guarded_area():
    rng = np.random.default_rng(1)
    flat = 0.05 + rng.uniform(0, 1e-3, (4, 16, 16))   # a member that predicts nothing: a flat map
    c = slice_columns(flat, np.zeros(flat.shape, bool), threshold=None)
    assert (c["uncertain_px"] > 0.2 * 256).all()      # Otsu splits any histogram in two: the blind spot
    assert (c["map_ptp"] < FLAT_TOL).all()
    assert guarded_area(c["uncertain_px"], c["map_ptp"], 256).tolist() == [0.0] * 4
    assert pd.isna(c["fixed_px"]).all()                # no source maps: no fixed threshold
    real = flat.copy()
    real[:, 4:8, 4:8] = 0.2                            # a real uncertain patch passes the guard
    c2 = slice_columns(real, np.zeros(real.shape, bool), threshold=None)
    assert (c2["uncertain_px"] >= 16).all()
    assert guarded_area(c2["uncertain_px"], c2["map_ptp"], 256).tolist() == (c2["uncertain_px"] / 256).tolist()


def test_doubled_map_shows_in_the_fixed_threshold_area_not_in_otsus():
    yy, xx = np.mgrid[:16, :16]
    source = np.stack([np.exp(-((yy - 8) ** 2 + (xx - c) ** 2) / 8.0) * 0.1 for c in (6, 8, 10)])
    thr = source_threshold(source)
    target = 2 * source                                 # the same maps at twice the level
    s, t = slice_columns(source, source > 1, thr), slice_columns(target, target > 1, thr)
    assert t["uncertain_px"].tolist() == s["uncertain_px"].tolist()          # Otsu's area ignores the level
    assert (np.asarray(t["fixed_px"]) > np.asarray(s["fixed_px"])).all()       # the fixed threshold sees it
    assert source_threshold(np.ones((2, 4, 4))) == np.inf                      # constant source: nothing above


def test_indicator_frame_from_records_and_names():
    rows = []
    for site, (up, ptp, fixed, mean) in {"A": (10, 0.5, 5, 0.01), "B": (20, 0.001, 40, 0.03)}.items():
        rows.append({"member_id": "m", "method": "ggd", "site": site, "role": "ood", "case_id": "c", "slice_idx": 0,
                     "uncertain_px": up, "error_px": 3, "area_px": 100, "mean_uncertainty": mean,
                     "uncertain_error_px": 1, "fixed_px": fixed, "map_ptp": ptp})
    unc = pd.DataFrame(rows)
    f = uncertainty_indicator_frame(unc.astype({"fixed_px": "Int64"}))
    assert f.loc[("m", "A")].tolist() == pytest.approx([0.10, 0.01, 0.05, 0.10])
    assert f.loc[("m", "B")].tolist() == pytest.approx([0.20, 0.03, 0.40, 0.0])  # B's map is flat: guarded to 0
    assert resolve_indicators(["uncertainty"]) == ("uncertain_area", "mean_uncertainty", "fixed_threshold_area",
                                                   "guarded_area")
    with pytest.raises(ValueError, match="unknown indicator 'entropy'; valid names: .*guarded_area"):
        resolve_indicators(["entropy"])


@pytest.mark.parametrize("seed", [0, 1])
def test_no_uncertain_pixels_on_the_frame_of_an_image_without_structure_there(seed):
    """The cause of δ's bright frame: zero padding makes every convolution see a step at the image edge.

    On an image and a prediction with no structure (a uniform background, nothing predicted), δ's
    map must be flat, so no pixel of the frame is uncertain; with zero padding (the old δ) the same
    net's map steps at the frame, which Otsu then splits off. Untrained nets: the step is in the
    architecture, training only learns to read it (at 5 epochs on a demo member the zero-padded δ
    marked 3-10% of the 3-px frame uncertain, with no error there; replicate padding 0-1.6%).
    """
    x, yh = torch.full((2, 1, 32, 32), 0.3), torch.zeros(2, 1, 32, 32)
    frame = np.ones((32, 32), bool)
    frame[2:-2, 2:-2] = False
    maps = {}
    for pad in ("replicate", "zeros"):
        torch.manual_seed(seed)
        net = DeltaNet(width=8, padding=pad).eval()
        with torch.no_grad():
            _, a, b = net(x, yh)
        maps[pad] = ggd_variance(a, b)[:, 0].numpy()
    assert uncertain_masks(maps["replicate"])[:, frame].sum() == 0
    assert np.ptp(maps["replicate"]) == 0.0
    z = maps["zeros"]
    assert z[:, frame].mean() != pytest.approx(z[:, ~frame].mean(), rel=1e-4)  # the frame steps
    assert otsu_area(z).sum() > 0


def test_delta_refuses_lam_zero_and_a_missing_fit_split(tmp_path, tiny_cache):
    from trainables.uncertainty import fit_uncertainty

    ck = tmp_path / "m.pt"
    ck.write_bytes(b"x")
    base = {"member_id": "m", "checkpoint": str(ck), "cache": str(tiny_cache), "source": "SiteA",
            "targets": ["SiteB"], "experiment_dir": str(tmp_path), "epochs": 1}
    with pytest.raises(ValueError, match=r"lam \(λ of Eq. 5\) must be > 0 \(or a non-empty list of such\), got 0"):
        fit_uncertainty({**base, "lam": 0})
    with pytest.raises(ValueError, match="fit_split must be one of"):
        fit_uncertainty({**base, "fit_split": "test"})


def test_compact_optimizer_state_halves_the_moments_and_loads_back_as_fp32():
    import io

    from trainables.uncertainty import compact_optimizer_state

    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.Adam([w], lr=1e-3)
    (w ** 2).sum().backward()
    opt.step()
    full, small = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), full)
    torch.save(compact_optimizer_state(opt.state_dict()), small)
    assert small.tell() < 0.6 * full.tell()
    fresh = torch.optim.Adam([w], lr=1e-3)
    fresh.load_state_dict(torch.load(io.BytesIO(small.getvalue()), weights_only=True))
    st = fresh.state_dict()["state"][0]
    assert st["exp_avg"].dtype == torch.float32 and float(st["step"]) == 1.0
    torch.testing.assert_close(st["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"], rtol=1e-2, atol=0)


def test_fit_split_uses_the_pools_train_and_validation_cases(tiny_cache):
    from trainables.data.cache import open_slice_cache
    from trainables.member import train_val_rows
    from trainables.uncertainty import DeltaConfig, fit_rows

    cache = open_slice_cache(tiny_cache)
    cfg = {"member_id": "m", "checkpoint": "m.pt", "cache": str(tiny_cache), "source": "SiteA", "targets": [],
           "experiment_dir": "exp", "val_fraction": 0.34, "split_seed": 0, "holdout": 0.0, "seed": 0}
    train, val = train_val_rows(cache, "SiteA", 0.34, 0)
    assert len(train) and len(val) and not set(train) & set(val)

    def rows(**kw):
        return fit_rows(cache, DeltaConfig.from_dict({**cfg, **kw}))
    assert np.array_equal(rows(fit_split="train")[0], train)  # the member's own data
    assert np.array_equal(rows(fit_split="val")[0], val)
    with pytest.raises(ValueError, match=r"fit_split: 'val'.*data.val_fraction"):
        rows(val_fraction=0.0, fit_split="val")
