"""The uncertainty stage's equations, the δ net, the baselines and fit_uncertainty (no Ray)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from analysis.table4 import table4
from trainables import records
from trainables.uncertainty import (DeltaNet, delta_loss, fit_uncertainty, ggd_nll, ggd_variance, otsu_area)

from helpers import copy_experiment, delta_config


def test_ggd_with_beta_2_is_gaussian_nll_up_to_a_constant():
    g = torch.Generator().manual_seed(0)
    f64 = {"generator": g, "dtype": torch.float64}
    y, mu = torch.rand(4, 1, 8, 8, **f64), torch.randn(4, 1, 8, 8, **f64)
    alpha = torch.rand(4, 1, 8, 8, **f64) + 0.05
    ggd = ggd_nll(y, mu, alpha, torch.full_like(alpha, 2.0))
    gauss = torch.nn.GaussianNLLLoss(full=True, reduction="none")(mu, y, alpha ** 2 / 2)  # σ² = α²/2
    diff = (ggd - gauss).flatten()
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-9)
    # the constant: log Γ(1/2) − log 2 (ours) against ½ log(2π) − ½ log 2 (Gaussian with σ² = α²/2) = −log 2
    assert diff[0].item() == pytest.approx(math.lgamma(0.5) - 0.5 * math.log(2 * math.pi) - 0.5 * math.log(2), abs=1e-9)
    assert diff[0].item() == pytest.approx(-math.log(2), abs=1e-9)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 3.7])
def test_eq8_against_scipy_gamma(beta):
    alpha = torch.tensor([0.01, 0.3, 1.0, 4.0], dtype=torch.float64)
    got = ggd_variance(alpha, torch.full_like(alpha, beta)).numpy()
    want = alpha.numpy() ** 2 * scipy.special.gamma(3 / beta) / scipy.special.gamma(1 / beta)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_otsu_area_against_skimage():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, size=(5, 16, 16))
    maps[2, :4] += 10
    want = [int((m > threshold_otsu(m)).sum()) for m in maps]
    assert otsu_area(maps).tolist() == want
    assert otsu_area(np.ones((2, 8, 8))).tolist() == [0, 0]  # a constant map has no uncertain area
    with pytest.raises(ValueError, match="non-finite"):
        otsu_area(np.full((1, 4, 4), np.nan))


@pytest.mark.parametrize("learn_beta", [False, True])
def test_alpha_beta_positive_and_finite_under_extreme_inputs(learn_beta):
    torch.manual_seed(0)
    net = DeltaNet(width=8, learn_beta=learn_beta)
    x = torch.cat([torch.zeros(2, 1, 32, 32), torch.full((2, 1, 32, 32), 1e3)])  # black and saturated images
    yh = torch.cat([torch.zeros(2, 1, 32, 32), torch.ones(2, 1, 32, 32)])      # empty and full masks
    for mode in ("train", "eval"):
        getattr(net, mode)()
        mu, a, b = net(x, yh)
        for t in (mu, a, b):
            assert torch.isfinite(t).all()
        assert (a > 0).all() and (b > 0).all()
        assert torch.isfinite(ggd_variance(a, b)).all()
        assert torch.isfinite(delta_loss(yh, yh, mu, a, b, lam=1.0))


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    u = scipy.stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
    return float(u / (positive.sum() * (~positive).sum()))


@pytest.mark.slow
def test_delta_ranks_known_errors_above_correct_pixels():
    """Frozen 'predictions' are wrong exactly where the image carries a texture patch; δ must learn it."""
    rng = np.random.default_rng(0)
    n, s = 48, 32
    yy, xx = np.mgrid[:s, :s]
    x = np.zeros((n, 1, s, s), np.float32)
    y = np.zeros((n, 1, s, s), np.float32)
    err = np.zeros((n, 1, s, s), bool)
    for i in range(n):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 9)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        y[i, 0] = disk
        x[i, 0] = 0.2 + 0.5 * disk + rng.normal(0, 0.02, (s, s))
        py, px = rng.integers(0, s - 8, 2)
        patch = np.zeros((s, s), bool)
        patch[py:py + 8, px:px + 8] = True
        x[i, 0][patch] += 0.3 * ((yy + xx) % 2)[patch]  # checkerboard texture where the model errs
        err[i, 0] = patch
    y_hat = np.where(err, 1 - y, y).astype(np.float32)
    torch.manual_seed(0)
    net = DeltaNet(width=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    X, Y, YH = map(torch.from_numpy, (x, y, y_hat))
    # 100 steps: AUROC 0.927 (300 steps, 3x the time: 0.863; the bar is 0.75)
    for step in range(100):
        b = torch.from_numpy(rng.choice(n, 8, replace=False))
        loss = delta_loss(Y[b], YH[b], *net(X[b], YH[b]), lam=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        _, a, b = net(X, YH)
    unc = ggd_variance(a, b).numpy().ravel()
    auroc = _auroc(unc, err.ravel())
    print(f"AUROC of the uncertainty map for error pixels: {auroc:.3f}")
    assert auroc >= 0.75


def _member(tmp_path, tiny_member):
    """The session's tiny unet_r18 member at epoch 1 (trained as with ``epochs: 1``: the same weights),
    alone in a copy of its experiment at ``tmp_path``."""
    return copy_experiment(tiny_member["exp"], tmp_path, tiny_member["members"][:1])[1][0]


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_fit_uncertainty_writes_every_method(tmp_path, tiny_cache, tiny_member):
    m = _member(tmp_path, tiny_member)
    reports = []

    def report(r, c):  # like the Ray reporter: the folder is consumed, then removed
        reports.append((r, c))
        if c is not None:
            assert (Path(c) / "delta.pt").is_file()
            shutil.rmtree(c)

    summary = fit_uncertainty(delta_config(m, tiny_cache, tmp_path, epochs=2, lr=1e-3, passes=3, checkpoint_every=1,
                                           baselines=list(records.UNCERTAINTY_METHODS[1:]), bayescap_width=4,
                                           bayescap_blocks=1, lam=[1.0, 100.0]), report=report)
    assert [r["epoch"] for r, _ in reports] == [1, 2, 2] and reports[-1][0]["scored"] == 1
    assert all(c is not None for _, c in reports[:2])  # resumable state at every checkpoint_every epoch
    unc = records.load_uncertainty(tmp_path)
    assert set(unc["method"]) == set(records.UNCERTAINTY_METHODS) | {"ggd_lam100"}  # λ swept: one δ per value
    # δ methods score every site; the test-time baselines score the targets (Table 4 is per target)
    assert set(unc.loc[unc.method == "ggd", "site"]) == {"SiteA", "SiteB", "SiteC"}
    assert set(unc.loc[unc.method == "tta_noise", "site"]) == {"SiteB", "SiteC"}
    assert (unc["uncertain_px"] <= unc["area_px"]).all() and (unc["uncertain_px"] >= 0).all()
    # error_px agrees with the pool stage's confusion counts of the same slices
    _, slices = records.load_records(tmp_path)
    s = slices.assign(err=slices.fp + slices.fn).set_index(["site", "case_id", "slice_idx"])["err"]
    g = unc[unc.method == "ggd"].set_index(["site", "case_id", "slice_idx"])["error_px"]
    assert (g == s.loc[g.index]).all()
    area = records.uncertain_area(unc)
    assert summary["ua_ggd_SiteB"] == pytest.approx(area[(m["member_id"], "SiteB")])
    t4 = table4(unc[unc.role == "ood"]).unstack("site")
    assert set(t4.index) == set(records.UNCERTAINTY_METHODS) | {"ggd_lam100"} and np.isfinite(t4.to_numpy()).all()
    # the intersection and the source-fixed area per slice; the maps' AUROC/AP per site; δ's fit record
    assert (unc["uncertain_error_px"] <= unc[["uncertain_px", "error_px"]].min(axis=1)).all()
    assert unc.loc[unc.method == "ggd", "fixed_px"].notna().all() and unc.loc[unc.method == "tta_noise", "fixed_px"].isna().all()
    sites = records.load_uncertainty_sites(tmp_path)
    assert len(sites) == len(unc.groupby(["method", "site"])) and not sites["prompted"].any()
    ok = sites["auroc"].dropna()
    assert len(ok) and ((ok >= 0) & (ok <= 1)).all() and (sites["error_px"] > 0).all() == sites["auroc"].notna().all()
    # the error band (width 3 on the 32² grid): every error pixel in it, within the site; ranked where it has both
    assert (sites["band_width_px"] == 3).all() and (sites["band_px"] >= sites["error_px"]).all()
    assert (sites["band_px"] <= sites["area_px"]).all()
    assert np.allclose(sites["band_error_frac"], sites["error_px"] / sites["band_px"], equal_nan=True)
    inb = sites["auroc_band"].dropna()
    assert len(inb) and ((inb >= 0) & (inb <= 1)).all() and sites["ap_band"].notna().sum() == len(inb)
    band_b = sites.set_index(["method", "site"]).loc[("ggd", "SiteB"), "auroc_band"]
    assert summary["auroc_band_ggd_SiteB"] == pytest.approx(band_b, nan_ok=True)  # the trial's metric (MLflow)
    fit = records.load_uncertainty_fits(tmp_path).iloc[0]
    assert fit["fit_split"] == "train" and fit["epochs"] == 2 and fit["heldout_slices"] > 0
    assert fit["lam"] == 1.0 and fit["lams"] == {"ggd": 1.0, "ggd_lam100": 100.0}
    assert len(fit["curve"]["loss_ggd"]) == len(fit["curve"]["heldout_dice_mu_yhat"]) == 2
    assert 0 <= summary["final_heldout_dice_mu_yhat"] <= 1
    assert "heldout_dice_mu_yhat" in reports[0][0]          # reported each epoch (the driver logs it to MLflow)
    ex = np.load(tmp_path / "records" / "uncertainty" / "examples" / f"{m['member_id']}.npz")
    assert ex["image"].shape == ex["uncertainty"].shape == ex["mu"].shape and ex["error"].dtype == bool


def test_bad_checkpoints_fail_clearly(tmp_path, tiny_cache, tiny_member):
    base = {"member_id": "m", "cache": str(tiny_cache), "source": "SiteA", "targets": ["SiteB"],
            "experiment_dir": str(tmp_path), "epochs": 1}
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        fit_uncertainty({**base, "checkpoint": str(tmp_path / "nope.pt")})
    m = _member(tmp_path, tiny_member)
    state = torch.load(m["checkpoint"], weights_only=True)
    state["arch"] = "unet_effb0"  # weights of one architecture labelled as another
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="cannot load checkpoint .*mismatch.pt"):
        fit_uncertainty({**base, "checkpoint": str(tmp_path / "mismatch.pt")})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint .*junk.pt: it is damaged .*oodsweep resume") as e:
        fit_uncertainty({**base, "checkpoint": str(tmp_path / "junk.pt")})
    assert "weights_only" not in str(e.value)
