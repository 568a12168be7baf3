"""Tests of trainables.data.layouts (the prostate_multisite loader and its errors)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainables.data.layouts import LAYOUTS, Case, CaseFiles, DataError, get_layout

import helpers

SHAPE = (12, 10, 5)
SPACING = (0.5, 0.5, 3.0)


def write_nifti(path: Path, array: np.ndarray, spacing=SPACING) -> Path:
    return helpers.write_nifti(path, array, spacing)


def make_image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 800, size=shape).astype(np.float32)


def make_mask(shape=SHAPE, labels=(1,)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:8, 2:7, 1:4] = labels[0]
    if len(labels) > 1:
        mask[5:7, 3:5, 2] = labels[1]
    return mask


def write_case(folder: Path, num: int, seg="_segmentation", ext=".nii.gz", image=None, mask=None) -> None:
    write_nifti(folder / f"Case{num:02d}{ext}", make_image(num) if image is None else image)
    write_nifti(folder / f"Case{num:02d}{seg}{ext}", make_mask() if mask is None else mask)


@pytest.fixture
def layout():
    return get_layout("prostate_multisite")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """BMC (ISBI_1.5, _Segmentation), RUNMC (ISBI), HK (from Case38, .nii, labels 1/2)."""
    root = tmp_path / "prostate"
    for n in range(3):
        write_case(root / "ISBI_1.5", n, seg="_Segmentation")
    for n in range(2):
        write_case(root / "ISBI", n)
    for n in (38, 39, 40, 41):
        write_case(root / "HK", n, ext=".nii", mask=make_mask(labels=(1, 2)))
    (root / "HK" / "notes.txt").write_text("ignored")
    (root / "empty_dir").mkdir()
    return root


def test_registry(layout):
    assert LAYOUTS["prostate_multisite"] is layout
    assert layout.name == "prostate_multisite" and layout.modality == "mr"
    with pytest.raises(ValueError, match="prostate_multisite"):
        get_layout("prostate")


def test_sites_use_site_names(layout, root):
    assert layout.sites(root) == ["BMC", "HK", "RUNMC"]


def test_bmc_folder_and_capital_segmentation(layout, root):
    cases = layout.list_cases(root, "BMC")
    assert [c.case_id for c in cases] == ["Case00", "Case01", "Case02"]
    assert all(c.site == "BMC" and c.image.parent.name == "ISBI_1.5" for c in cases)
    assert cases[0].mask.name == "Case00_Segmentation.nii.gz"
    case = layout.load_case(cases[1])
    assert isinstance(case, Case)
    assert case.image.shape == SHAPE and case.image.dtype == np.float32
    assert case.mask.shape == SHAPE and case.mask.dtype == np.uint8
    assert case.image.shape[-1] == 5  # slices along the last axis
    np.testing.assert_allclose(case.image, make_image(1), rtol=1e-6)
    assert case.spacing == pytest.approx(SPACING)
    assert case.image_path == cases[1].image and case.mask_path == cases[1].mask


def test_runmc_folder(layout, root):
    cases = layout.list_cases(root, "RUNMC")
    assert len(cases) == 2 and all(c.image.parent.name == "ISBI" for c in cases)
    assert sum(layout.load_case(c).image.shape[-1] for c in cases) == 2 * SHAPE[2]


def test_labels_binarised_and_numeric_case_order(layout, root):
    write_case(root / "HK", 100, ext=".nii", mask=make_mask(labels=(1, 2)))
    cases = layout.list_cases(root, "HK")
    assert [c.case_id for c in cases] == ["Case38", "Case39", "Case40", "Case41", "Case100"]
    case = layout.load_case(cases[0])
    assert set(np.unique(case.mask)) == {0, 1}
    assert case.mask.sum() == (make_mask(labels=(1, 2)) > 0).sum()


def test_trailing_singleton_axis_is_dropped(layout, tmp_path):
    write_case(tmp_path / "UCL", 1, image=make_image(1)[..., None], mask=make_mask()[..., None])
    case = layout.load_case(layout.list_cases(tmp_path, "UCL")[0])
    assert case.image.shape == SHAPE and case.mask.shape == SHAPE


# --------------------------------------------------------------------------------------
# errors: each names the file (or folder)


def test_missing_root(layout, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        layout.list_cases(missing, "BMC")
    with pytest.raises(DataError, match="nowhere"):
        layout.sites(missing)


def test_missing_site_folder_lists_existing(layout, root):
    with pytest.raises(DataError) as err:
        layout.list_cases(root, "BIDMC")
    msg = str(err.value)
    assert "BIDMC" in msg and "ISBI_1.5" in msg and "HK" in msg and "ISBI'" in msg


def test_site_folder_without_cases(layout, root):
    with pytest.raises(DataError, match="empty_dir.*no cases"):
        layout.list_cases(root, "empty_dir")


def test_image_without_mask(layout, root):
    (root / "ISBI" / "Case01_segmentation.nii.gz").unlink()
    with pytest.raises(DataError, match=r"Case01\.nii\.gz.*image without a mask"):
        layout.list_cases(root, "RUNMC")


def test_mask_without_image(layout, root):
    (root / "ISBI" / "Case00.nii.gz").unlink()
    with pytest.raises(DataError, match=r"Case00_segmentation\.nii\.gz.*mask without an image"):
        layout.list_cases(root, "RUNMC")


def test_duplicate_image_files(layout, root):
    write_nifti(root / "ISBI" / "Case00.nii", make_image())
    with pytest.raises(DataError, match="Case00"):
        layout.list_cases(root, "RUNMC")


def test_truncated_gzip(layout, root):
    path = root / "ISBI" / "Case01.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    files = layout.list_cases(root, "RUNMC")[1]
    with pytest.raises(DataError, match=r"Case01\.nii\.gz.*NIfTI"):
        layout.load_case(files)


def test_truncated_uncompressed(layout, root):
    path = root / "HK" / "Case39_segmentation.nii"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"Case39_segmentation\.nii"):
        layout.load_case(layout.list_cases(root, "HK")[1])


def test_not_nifti(layout, root):
    (root / "ISBI" / "Case00.nii.gz").write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(DataError, match=r"Case00\.nii\.gz"):
        layout.load_case(layout.list_cases(root, "RUNMC")[0])


def test_shape_mismatch(layout, tmp_path):
    write_case(tmp_path / "UCL", 1, mask=make_mask(shape=(12, 10, 6)))
    with pytest.raises(DataError) as err:
        layout.load_case(layout.list_cases(tmp_path, "UCL")[0])
    msg = str(err.value)
    assert "Case01.nii.gz" in msg and "(12, 10, 5)" in msg and "(12, 10, 6)" in msg


def test_empty_mask(layout, tmp_path):
    write_case(tmp_path / "UCL", 1, mask=np.zeros(SHAPE, np.uint8))
    with pytest.raises(DataError, match=r"Case01_segmentation\.nii\.gz.*no foreground"):
        layout.load_case(layout.list_cases(tmp_path, "UCL")[0])


def test_nan_and_inf_intensities(layout, tmp_path):
    image = make_image(1)
    image[0, 0, :3] = np.nan
    image[1, 1, 0] = np.inf
    write_case(tmp_path / "UCL", 1, image=image)
    with pytest.raises(DataError, match=r"Case01\.nii\.gz: 3 NaN and 1 inf"):
        layout.load_case(layout.list_cases(tmp_path, "UCL")[0])


def test_4d_volume(layout, tmp_path):
    write_case(tmp_path / "UCL", 1, image=np.ones((*SHAPE, 2), np.float32))
    with pytest.raises(DataError, match=r"Case01\.nii\.gz.*\(12, 10, 5, 2\)"):
        layout.load_case(layout.list_cases(tmp_path, "UCL")[0])


def test_missing_file_at_load(layout, root):
    files = layout.list_cases(root, "RUNMC")[0]
    files.mask.unlink()
    with pytest.raises(DataError, match="Case00_segmentation"):
        layout.load_case(CaseFiles(files.site, files.case_id, files.image, files.mask))
