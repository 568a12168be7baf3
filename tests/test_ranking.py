"""The binned error ranking (trainables/ranking.py) against sklearn's exact AUROC / AP: within its stated AUROC
bound and within 0.005 for AP, on random, structured and tiny demo-like score maps."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from trainables import ranking
from trainables.uncertainty.scoring import error_ranking


def _exact(maps, error):
    y, s = np.asarray(error).ravel(), np.asarray(maps, dtype=np.float64).ravel()
    return roc_auc_score(y, s), average_precision_score(y, s)


def _structured(rng, n=24, size=64):
    """Variance-like maps: a near-zero background, a heavy-tailed ring at the prediction's edge; errors along
    that edge (mostly) and scattered."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    maps, errors = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(20, 44, 2).tolist() + [rng.uniform(6, 16)]
        d = np.abs(np.hypot(yy - cy, xx - cx) - r)
        maps.append((np.exp(-d) * rng.lognormal(0, 1.0) + rng.exponential(1e-4, d.shape)).astype(np.float32))
        errors.append((d < rng.uniform(0.5, 2.0)) & (rng.random(d.shape) < 0.7) | (rng.random(d.shape) < 0.003))
    return np.stack(maps), np.stack(errors)


@pytest.mark.parametrize("case", ["random", "structured", "tiny", "point_mass"])
def test_binned_ranking_is_within_its_bound_of_sklearn(case):
    rng = np.random.default_rng(1)
    if case == "random":      # scores weakly informative, continuous
        error = rng.random((16, 64, 64)) < 0.1
        maps = (rng.normal(0, 1, error.shape) + 0.8 * error).astype(np.float32)
    elif case == "structured":
        maps, error = _structured(rng)
    elif case == "tiny":      # the demo's size: a few 32x32 slices, few error pixels
        maps, error = _structured(rng, n=3, size=32)
    else:                     # 80% of the map exactly 0 (ties in both), the rest ranked
        error = rng.random((8, 48, 48)) < 0.05
        maps = np.where(rng.random(error.shape) < 0.8, 0.0, rng.gamma(2.0, 1.0, error.shape) + 2 * error)
        maps = maps.astype(np.float32)
    auroc, ap = _exact(maps, error)
    # coarse bins (tens of pixels each, as a large split's bins hold thousands), several batches; the tiny
    # maps with the default bins (finer than its pixels: exact)
    r = ranking.binned_error_ranking(maps, error, bins=ranking.BINS if case == "tiny" else 1024, batch_pixels=5000)
    assert abs(r.auroc - auroc) <= r.auroc_bound + 1e-12, (r, auroc)
    assert r.auroc_bound <= 0.005 and abs(r.auroc - auroc) <= 0.005 and abs(r.ap - ap) <= 0.005, (r, auroc, ap)


def test_bins_that_separate_every_value_give_sklearns_numbers():
    """Fewer distinct scores than bins: nothing shares a bin but ties, so binned == exact (bound 0)."""
    rng = np.random.default_rng(2)
    maps = rng.integers(0, 50, (5, 16, 16)).astype(np.float32)
    error = rng.random(maps.shape) < 0.2 + maps / 100
    auroc, ap = _exact(maps, error)
    r = ranking.binned_error_ranking(maps, error, bins=4096)
    ties = 0.5 * sum((error & (maps == v)).sum() * (~error & (maps == v)).sum() for v in range(50))
    assert 0 <= r.auroc_bound <= ties / error.sum() / (~error).sum()  # at most the ties' share, hand-computed
    assert r.auroc == pytest.approx(auroc, abs=1e-12) and r.ap == pytest.approx(ap, abs=1e-12)


def test_hand_checked_histogram_and_the_modes():
    # scores 1 < 2 < 3; errors at 3 and 2, correct at 1 and 2: pairs (3,1) (3,2) (2,1) right, (2,2) tie
    maps, error = np.array([[1.0, 2.0, 2.0, 3.0]]), np.array([[False, True, False, True]])
    r = ranking.binned_error_ranking(maps, error)
    assert r.auroc == pytest.approx(3.5 / 4) and r.ap == pytest.approx(_exact(maps, error)[1])
    assert math.isnan(ranking.binned_error_ranking(maps, np.zeros_like(error)).auroc)
    assert ranking.scoring_mode("auto", ranking.EXACT_MAX_PIXELS) == "exact"
    assert ranking.scoring_mode("auto", ranking.EXACT_MAX_PIXELS + 1) == "binned"
    with pytest.raises(ValueError, match="'fast' is not one of auto, exact, binned"):
        ranking.scoring_mode("fast", 10)
    # error_ranking's default is the exact path; "binned" the histogram's
    assert error_ranking(maps, error) == _exact(maps, error)
    assert error_ranking(maps, error, "binned") == (r.auroc, r.ap)
    with pytest.raises(ValueError, match="non-finite"):
        ranking.binned_error_ranking(np.array([[np.nan, 1.0]]), np.array([[True, False]]))


def test_the_spec_key_reaches_the_trials_config_only_when_set(tmp_path, monkeypatch):
    from sweeps import cluster, uncertainty
    from sweeps.spec import SpecError, parse_spec

    monkeypatch.setattr(cluster, "capacity", lambda: {"CPU": 2.0, "GPU": 0.0})
    raw = {"name": "x", "storage": str(tmp_path), "data": {"layout": "prostate_multisite", "root": str(tmp_path),
                                                           "source": "A", "targets": ["B"]},
           "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]}},
           "uncertainty": {"scoring": "binned"}}
    space = uncertainty.param_space(parse_spec(raw), tmp_path, ["m1"], {"m1": "m1.pt"}, set())
    assert space["scoring"] == "binned"
    del raw["uncertainty"]["scoring"]  # the default (auto): the trial configs as before
    assert "scoring" not in uncertainty.param_space(parse_spec(raw), tmp_path, ["m1"], {"m1": "m1.pt"}, set())
    raw["uncertainty"]["scoring"] = "binnd"
    with pytest.raises(SpecError, match="uncertainty.scoring: unknown value 'binnd'.*valid choices: auto, exact, binned"):
        parse_spec(raw)
