"""The slice cache: built once, reused, consistent with the NIfTI files; bad cases reported together."""
from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from trainables.data.cache import build_slice_cache, open_slice_cache, split_cases
from trainables.data.layouts import DataError, get_layout

from helpers import write_nifti as _write

SITES = ["SiteA", "SiteB", "SiteC"]


def test_cache_contents_match_nifti(tiny_data, tiny_cache):
    cache = open_slice_cache(tiny_cache)
    cache.verify()
    lay = get_layout("prostate_multisite")
    n = sum(lay.load_case(cf).image.shape[2] for s in SITES for cf in lay.list_cases(tiny_data, s))
    assert cache.images.shape == (n, 1, 32, 32) and cache.images.dtype == np.float16
    assert cache.masks.shape == (n, 32, 32) and set(np.unique(cache.masks)) <= {0, 1}
    assert 0.0 <= float(cache.images.min()) and float(cache.images.max()) <= 1.0
    # a case's slices are in order and its mask (resized) keeps the foreground slices of the original
    cf = lay.list_cases(tiny_data, "SiteB")[1]
    case = lay.load_case(cf)
    rows = np.flatnonzero((cache.index["site"] == "SiteB") & (cache.index["case_id"] == cf.case_id))
    assert cache.index["slice_idx"].to_numpy()[rows].tolist() == list(range(case.image.shape[2]))
    fg_orig = case.mask.reshape(-1, case.mask.shape[2]).sum(0) > 0
    fg_cache = cache.masks[rows].reshape(len(rows), -1).sum(1) > 0
    assert (fg_orig == fg_cache).all()
    # every site has train and test cases, split by case
    for site in SITES:
        g = cache.index[cache.index["site"] == site]
        assert set(g["split"]) == {"train", "test"}
        assert g.groupby("case_id")["split"].nunique().max() == 1


def test_cache_is_reused_and_keyed_by_content(tiny_data, tiny_cache, tmp_path):
    before = (tiny_cache / "manifest.json").stat().st_mtime_ns
    again = build_slice_cache("prostate_multisite", tiny_data, SITES, 32, tiny_cache.parent, test_fraction=0.25,
                              progress=False)
    assert again == tiny_cache and (again / "manifest.json").stat().st_mtime_ns == before
    # a changed file gives another cache
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    a = build_slice_cache("prostate_multisite", data, SITES, 32, tmp_path / "c", progress=False)
    f = next((data / "SiteC").glob("Case00.nii.gz"))
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 2.0 + 1.0, img.affine), f)
    b = build_slice_cache("prostate_multisite", data, SITES, 32, tmp_path / "c", progress=False)
    assert a != b and a.exists() and b.exists()


def test_split_is_fixed_and_by_case():
    ids = [f"Case{i:02d}" for i in range(10)]
    s1, s2 = split_cases(ids, "X", seed=0), split_cases(ids, "X", seed=0)
    assert s1 == s2 and sum(v == "test" for v in s1.values()) == 2
    assert split_cases(ids, "X", seed=1) != s1
    assert sorted(split_cases(["a", "b"], "X").values()) == ["test", "train"]


def test_bad_cases_reported_together_and_nothing_cached(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    site = data / "SiteB"
    # truncated NIfTI
    raw = (site / "Case00.nii.gz").read_bytes()
    (site / "Case00.nii.gz").write_bytes(raw[: len(raw) // 2])
    # image and mask of different shapes
    img = np.asarray(nib.load(site / "Case01.nii.gz").dataobj)
    _write(site / "Case01_segmentation.nii.gz", np.zeros(img.shape[:2] + (img.shape[2] + 1,), np.uint8))
    # a mask with no foreground in any slice
    _write(site / "Case02_segmentation.nii.gz", np.zeros(img.shape, np.uint8))
    # NaN intensities
    nan_img = np.asarray(nib.load(site / "Case03.nii.gz").dataobj).astype(np.float32)
    nan_img[0, 0, 0] = np.nan
    _write(site / "Case03.nii.gz", nan_img)
    with pytest.raises(DataError) as e:
        build_slice_cache("prostate_multisite", data, SITES, 32, tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "4 bad case(s)" in msg and "skip_bad_cases" in msg
    for name in ("Case00.nii.gz", "Case01", "Case02_segmentation.nii.gz", "Case03.nii.gz"):
        assert name in msg, (name, msg)
    assert "NaN" in msg or "nan" in msg.lower()
    assert not any(p.name.endswith("manifest.json") for p in (tmp_path / "cache").rglob("*"))
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary build folder is gone too
    # skipping them instead keeps the good sites and lists the skipped cases
    path = build_slice_cache("prostate_multisite", data, SITES, 32, tmp_path / "cache", skip_bad_cases=True,
                             progress=False)
    cache = open_slice_cache(path)
    assert len(cache.manifest["skipped"]) == 4
    assert "SiteB" not in set(cache.index["site"])


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_slice_cache("prostate_multisite", tmp_path / "nope", SITES, 32, tmp_path / "c", progress=False)
