"""Tests of trainables.data.synthetic (synthetic multi-site data in the prostate layout)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainables.data.layouts import get_layout
from trainables.data.synthetic import MIXED_SITES, SYNTHETIC_SITES, write_synthetic_sites

SITES = list(MIXED_SITES)  # the default sites: the source and three mixed shifts of growing severity
N_CASES = 3
SHAPE = (48, 48, 10)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _norm(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / (hi - lo), 0, 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic_sites(tmp_path_factory.mktemp("syn"), cases_per_site=N_CASES, shape=SHAPE, seed=3)


@pytest.fixture(scope="module")
def cases(root):
    layout = get_layout("prostate_multisite")
    return {site: [layout.load_case(f) for f in layout.list_cases(root, site)] for site in SITES}


def test_site_table_is_ordered_by_severity():
    assert SITES == ["SiteA", "SiteB", "SiteC", "SiteD"]
    shifts = [SYNTHETIC_SITES[s] for s in SITES]
    for a, b in zip(shifts, shifts[1:]):
        assert a.severity < b.severity
        assert a.gamma <= b.gamma and a.bias_coeff <= b.bias_coeff and a.noise_std <= b.noise_std
        assert a.gibbs_alpha <= b.gibbs_alpha and a.lowres >= b.lowres


def test_files_in_layout(root):
    assert isinstance(root, Path)
    for site in SITES:
        for i in range(N_CASES):
            assert (root / site / f"Case{i:02d}.nii.gz").is_file()
            assert (root / site / f"Case{i:02d}_segmentation.nii.gz").is_file()
    manifest = json.loads((root / "synthetic.json").read_text())
    assert manifest["cases_per_site"] == N_CASES and list(manifest["sites"]) == SITES


def test_loadable_with_layout(root, cases):
    assert get_layout("prostate_multisite").sites(root) == SITES
    for site in SITES:
        assert [c.case_id for c in cases[site]] == [f"Case{i:02d}" for i in range(N_CASES)]
        for case in cases[site]:
            assert case.image.shape == SHAPE and case.mask.shape == SHAPE
            assert case.spacing == pytest.approx((0.6, 0.6, 3.0))
            assert np.isfinite(case.image).all() and case.image.min() >= 0
            assert 100 < case.image.max() < 5000  # MR-like raw intensities
            assert set(np.unique(case.mask)) == {0, 1}
            per_slice = case.mask.sum(axis=(0, 1))
            assert per_slice[0] == 0 and per_slice[-1] == 0  # organ absent at the ends
            assert (per_slice > 0).sum() >= 3


def test_same_anatomy_across_sites_different_per_case(cases):
    for i in range(N_CASES):
        for site in SITES[1:]:
            np.testing.assert_array_equal(cases[site][i].mask, cases["SiteA"][i].mask)
    assert not np.array_equal(cases["SiteA"][0].mask, cases["SiteA"][1].mask)


def test_organ_not_a_single_threshold(cases):
    """The best intensity band still mislabels a good part of the organ's pixels."""
    for case in cases["SiteA"]:
        img, m = _norm(case.image), case.mask.astype(bool)
        best = 0.0
        edges = np.linspace(0, 1, 21)
        for lo in edges:
            for hi in edges[edges > lo]:
                p = (img > lo) & (img <= hi)
                best = max(best, 2 * (p & m).sum() / (p.sum() + m.sum()))
        assert best < 0.95


def test_severity_increases_distance_to_source(cases):
    for i in range(N_CASES):
        ref = _norm(cases["SiteA"][i].image)
        dist = [float(np.abs(_norm(cases[s][i].image) - ref).mean()) for s in SITES]
        assert dist[0] == 0.0
        assert dist[1] < dist[2] < dist[3], dist


def test_deterministic(root, tmp_path):
    again = write_synthetic_sites(tmp_path / "again", cases_per_site=N_CASES, shape=SHAPE, seed=3)
    assert _files(again) == _files(root)
    other = write_synthetic_sites(tmp_path / "other", sites=["SiteA"], cases_per_site=1, shape=SHAPE, seed=4)
    assert (other / "SiteA" / "Case00.nii.gz").read_bytes() != (root / "SiteA" / "Case00.nii.gz").read_bytes()


def test_idempotent_and_rewrites_on_new_params(tmp_path):
    root = write_synthetic_sites(tmp_path, sites=["SiteA", "SiteC"], cases_per_site=3, shape=(32, 32, 8))
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    assert write_synthetic_sites(tmp_path, sites=["SiteA", "SiteC"], cases_per_site=3, shape=(32, 32, 8)) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")} == stamp

    write_synthetic_sites(tmp_path, sites=["SiteA"], cases_per_site=2, shape=(32, 32, 8))
    layout = get_layout("prostate_multisite")
    assert layout.sites(root) == ["SiteA"]
    assert len(layout.list_cases(root, "SiteA")) == 2
    assert json.loads((root / "synthetic.json").read_text())["cases_per_site"] == 2


def test_single_kind_sites(tmp_path):
    """SiteE-H each apply one kind of shift; only the geometry site moves the mask (by its zoom²)."""
    kinds = {s: SYNTHETIC_SITES[s].kind for s in ("SiteE", "SiteF", "SiteG", "SiteH")}
    assert kinds == {"SiteE": "intensity", "SiteF": "resolution", "SiteG": "noise", "SiteH": "geometry"}
    names = ["SiteA", *kinds]
    root = write_synthetic_sites(tmp_path, sites=names, cases_per_site=2, shape=(48, 48, 8), seed=1)
    layout = get_layout("prostate_multisite")
    case = {s: [layout.load_case(f) for f in layout.list_cases(root, s)] for s in names}
    for i in range(2):
        a = case["SiteA"][i]
        for s in ("SiteE", "SiteF", "SiteG"):
            np.testing.assert_array_equal(case[s][i].mask, a.mask)
            assert np.abs(_norm(case[s][i].image) - _norm(a.image)).mean() > 0.01
        moved = case["SiteH"][i].mask
        assert set(np.unique(moved)) <= {0, 1} and not np.array_equal(moved, a.mask)
        zoom = SYNTHETIC_SITES["SiteH"].zoom
        assert moved.sum() / a.mask.sum() == pytest.approx(zoom ** 2, rel=0.15)


def test_unknown_site(tmp_path):
    with pytest.raises(ValueError, match="SiteA"):
        write_synthetic_sites(tmp_path, sites=["SiteZ"])
