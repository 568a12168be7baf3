"""The paper's real dataset layouts, on tiny fake datasets written here in each release's layout.

Prostate (six sites, BMC's ``_Segmentation``, HK from Case38, labels 1 and 2), IDRiD (own split, a
missing lesion mask file), FGADR (``Hemohedge_Masks``), LiTS (labels 1 and 2), FLARE21 and FLARE22
naming: the right cases and slices per site, masks binarised as stated, slices merged back equal to
the originals at native size; and every kind of bad input, each reported naming its file, all in one
pass by ``oodsweep data check``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from trainables.data.cache import DEFAULT_CT_WINDOW, build_slice_cache, open_slice_cache
from trainables.data.check import check_dataset, format_report
from trainables.data.fundus import LESIONS
from trainables.data.layouts import DataError, get_layout

from helpers import write_nifti

VOL = (32, 32, 6)
PROSTATE = {  # site -> (folder, first case number, mask spelling, extension, labels, cases)
    "BMC": ("ISBI_1.5", 0, "_Segmentation", ".nii.gz", (1,), 3),
    "RUNMC": ("ISBI", 0, "_segmentation", ".nii.gz", (1,), 2),
    "BIDMC": ("BIDMC", 0, "_segmentation", ".nii.gz", (1, 2), 2),
    "HK": ("HK", 38, "_segmentation", ".nii", (1, 2), 3),
    "I2CVB": ("I2CVB", 0, "_segmentation", ".nii.gz", (1,), 2),
    "UCL": ("UCL", 1, "_segmentation", ".nii.gz", (1, 2), 2),
}


def volume(seed: int, lo: float = 0, hi: float = 800, shape=VOL, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, size=shape).astype(dtype)


def labels(shape=VOL, values=(1,), seed=0) -> np.ndarray:
    """A blob of values[0] with a smaller blob of each further value inside, in most slices."""
    m = np.zeros(shape, np.uint8)
    m[8:24, 6:22, 1:-1] = values[0]
    for k, v in enumerate(values[1:]):
        m[10 + 4 * k:13 + 4 * k, 9:14, 2:4] = v
    return m


def write_prostate(root: Path) -> dict[str, list[str]]:
    cases = {}
    for i, (site, (folder, first, seg, ext, labs, n)) in enumerate(PROSTATE.items()):
        cases[site] = []
        for num in range(first, first + n):
            write_nifti(root / folder / f"Case{num:02d}{ext}", volume(100 * i + num))
            write_nifti(root / folder / f"Case{num:02d}{seg}{ext}", labels(values=labs))
            cases[site].append(f"Case{num:02d}")
    return cases


def fundus_image(seed: int, size=(40, 30)) -> Image.Image:
    """A W x H RGB photograph: a reddish disc with noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 2.2) ** 2
    arr = np.zeros((h, w, 3), np.uint8)
    arr[disc] = (180, 80, 40)
    arr = np.clip(arr + rng.integers(0, 30, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def lesion(size, k: int, seed: int) -> np.ndarray:
    w, h = size
    m = np.zeros((h, w), bool)
    r = np.random.default_rng(seed + 7 * k)
    y, x = int(r.integers(2, h - 6)), int(r.integers(2, w - 6))
    m[y:y + 2 + k, x:x + 3] = True
    return m


IDRID_FOLDERS = ("1. Microaneurysms", "2. Haemorrhages", "3. Hard Exudates", "4. Soft Exudates")


def write_idrid(root: Path, size=(40, 30)) -> dict:
    """IDRiD_01..03 training, IDRiD_04..05 testing; IDRiD_02 has no SE file, IDRiD_04 no HE file."""
    seg = root / "A. Segmentation"
    truth = {}
    for num in range(1, 6):
        split = "a. Training Set" if num <= 3 else "b. Testing Set"
        case = f"IDRiD_{num:02d}"
        img_dir = seg / "1. Original Images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        fundus_image(num, size).save(img_dir / f"{case}.jpg", quality=95)
        truth[case] = np.zeros((size[1], size[0], 4), np.uint8)
        for k, (les, folder) in enumerate(zip(LESIONS, IDRID_FOLDERS)):
            if (case, les) in (("IDRiD_02", "SE"), ("IDRiD_04", "HE")):
                continue  # the release leaves out the files of absent lesions
            m = lesion(size, k, num)
            d = seg / "2. All Segmentation Groundtruths" / split / folder
            d.mkdir(parents=True, exist_ok=True)
            rgb = np.zeros(m.shape + (3,), np.uint8)
            rgb[m, 0] = 255  # IDRiD's masks are red on black
            Image.fromarray(rgb, "RGB").save(d / f"{case}_{les}.tif")
            truth[case][..., k] = m
    od = seg / "2. All Segmentation Groundtruths" / "a. Training Set" / "5. Optic Disc"
    od.mkdir(parents=True)
    Image.fromarray(np.zeros((size[1], size[0]), np.uint8)).save(od / "IDRiD_01_OD.tif")  # ignored
    return truth


FGADR_FOLDERS = ("Microaneurysms_Masks", "Hemohedge_Masks", "HardExudate_Masks", "SoftExudate_Masks")


def write_fgadr(root: Path, n: int = 5, size=(32, 32)) -> dict:
    seg = root / "Seg-set"
    truth = {}
    for i in range(1, n + 1):
        case = f"{i:04d}_{i % 3 + 1}"
        (seg / "Original_Images").mkdir(parents=True, exist_ok=True)
        fundus_image(50 + i, size).save(seg / "Original_Images" / f"{case}.png")
        truth[case] = np.zeros((size[1], size[0], 4), np.uint8)
        for k, folder in enumerate(FGADR_FOLDERS):
            m = lesion(size, k, 50 + i) if (i + k) % 4 else np.zeros((size[1], size[0]), bool)  # some all-black
            (seg / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255, "L").save(seg / folder / f"{case}.png")
            truth[case][..., k] = m
    (seg / "IRMA_Masks").mkdir()  # ignored
    return truth


def ct(seed: int, shape=VOL) -> np.ndarray:
    return volume(seed, -1024, 1500, shape).astype(np.int16)


def write_lits(root: Path, n: int = 5) -> None:
    for i in range(n):
        batch = root / ("Training Batch 1" if i < 3 else "Training Batch 2")
        write_nifti(batch / f"volume-{i}.nii", ct(200 + i), spacing=(0.7, 0.7, 2.5))
        write_nifti(batch / f"segmentation-{i}.nii", labels(values=(1, 2)), spacing=(0.7, 0.7, 2.5))
    write_nifti(root / "Test" / "test-volume-0.nii", ct(299))  # unlabelled: ignored


def write_flare22(root: Path, n: int = 5) -> None:
    for i in range(1, n + 1):
        write_nifti(root / "images" / f"FLARE22_Tr_{i:04d}_0000.nii.gz", ct(300 + i))
        write_nifti(root / "labels" / f"FLARE22_Tr_{i:04d}.nii.gz", labels(values=(1, 2, 5, 13)))
    write_nifti(root / "unlabeled" / "Case_00001_0000.nii.gz", ct(399))  # ignored


def write_flare21(root: Path, n: int = 5) -> None:
    for i in range(n):
        write_nifti(root / "TrainingImg" / f"train_{i:03d}_0000.nii.gz", ct(400 + i))
        write_nifti(root / "TrainingMask" / f"train_{i:03d}.nii.gz", labels(values=(1, 2, 3, 4)))
    write_nifti(root / "ValidationImg" / "validation_001_0000.nii.gz", ct(499))  # ignored


def _cache(root, layout, sites, tmp_path, **kw):
    return open_slice_cache(build_slice_cache(layout, root, sites, 32, tmp_path / "cache", progress=False, **kw))


# --------------------------------------------------------------------------------------------- loading


def test_prostate_six_sites(tmp_path):
    root = tmp_path / "prostate"
    cases = write_prostate(root)
    lay = get_layout("prostate_multisite")
    assert lay.sites(root) == sorted(PROSTATE)
    assert [c.case_id for c in lay.list_cases(root, "HK")] == ["Case38", "Case39", "Case40"]
    bmc = lay.list_cases(root, "BMC")
    assert bmc[0].mask.name == "Case00_Segmentation.nii.gz" and bmc[0].image.parent.name == "ISBI_1.5"
    hk = lay.load_case(lay.list_cases(root, "HK")[0])
    assert hk.label_values == (0, 1, 2) and set(np.unique(hk.mask)) == {0, 1}
    np.testing.assert_array_equal(hk.mask, labels(values=(1, 2)) > 0)  # prostate = label > 0
    cache = _cache(root, "prostate_multisite", list(PROSTATE), tmp_path, test_fraction=0.34)
    for site, ids in cases.items():
        g = cache.index[cache.index["site"] == site]
        assert sorted(g["case_id"].unique()) == sorted(ids) and len(g) == len(ids) * VOL[2]
        assert set(g["split"]) == {"train", "test"}
    assert cache.images.shape == (sum(map(len, cases.values())) * VOL[2], 1, 32, 32)
    assert cache.manifest["split_source"]["HK"].startswith("random")
    # merged back at native size: the mask exactly, the image as clipped to its 0.5/99.5 percentiles
    folder, *_ = PROSTATE["UCL"]
    img, msk = cache.case_volume("UCL", "Case02")
    orig = np.asarray(nib.load(root / folder / "Case02.nii.gz").dataobj, dtype=np.float32)
    lo, hi = np.percentile(orig, [0.5, 99.5])
    np.testing.assert_allclose(img, np.clip((orig - lo) / (hi - lo), 0, 1), atol=1e-3)
    np.testing.assert_array_equal(msk, labels(values=(1, 2)) > 0)


def test_idrid_own_split_missing_mask_and_lesion_choice(tmp_path):
    truth = write_idrid(tmp_path / "IDRiD")
    lay = get_layout("idrid")
    assert lay.sites(tmp_path / "IDRiD") == ["IDRiD"]
    cases = lay.list_cases(tmp_path / "IDRiD", "IDRiD")
    assert [c.case_id for c in cases] == [f"IDRiD_{i:02d}" for i in range(1, 6)]
    assert [c.split for c in cases] == ["train"] * 3 + ["test"] * 2
    c2 = lay.load_case(cases[1])
    assert c2.image.shape == (30, 40, 1, 3) and c2.mask.shape == (30, 40, 1, 4) and c2.labels == LESIONS
    assert dict(cases[1].lesion_masks)["SE"] is None and not c2.mask[..., 3].any()  # missing file = absent
    np.testing.assert_array_equal(c2.mask[:, :, 0], truth["IDRiD_02"])
    assert lay.list_cases(tmp_path / "IDRiD" / "A. Segmentation", "IDRiD")[0].image == cases[0].image  # or at it
    cache = _cache(tmp_path / "IDRiD", "idrid", ["IDRiD"], tmp_path)
    assert cache.images.shape == (5, 3, 32, 32) and cache.masks.shape == (5, 4, 32, 32)
    assert cache.labels == list(LESIONS) and cache.manifest["split_source"] == {"IDRiD": "dataset"}
    assert cache.index["split"].tolist() == ["train"] * 3 + ["test"] * 2
    two = _cache(tmp_path / "IDRiD", "idrid", ["IDRiD"], tmp_path, labels=["EX", "HE"])
    assert two.masks.shape == (5, 2, 32, 32) and two.labels == ["EX", "HE"]
    np.testing.assert_array_equal(two.masks[:, 0], cache.masks[:, 2])
    one = _cache(tmp_path / "IDRiD", "idrid", ["IDRiD"], tmp_path, labels=["SE"])
    assert one.masks.shape == (5, 32, 32)  # one label: N x S x S, as the binary tasks
    rnd = _cache(tmp_path / "IDRiD", "idrid", ["IDRiD"], tmp_path, split="random")
    assert rnd.manifest["split_source"]["IDRiD"].startswith("random")


def test_fgadr_hemohedge_and_merge_back(tmp_path):
    truth = write_fgadr(tmp_path / "FGADR")
    lay = get_layout("fgadr")
    cases = lay.list_cases(tmp_path / "FGADR", "FGADR")
    assert len(cases) == 5 and all(c.split is None for c in cases)
    assert dict(cases[0].lesion_masks)["HE"].parent.name == "Hemohedge_Masks"
    cache = _cache(tmp_path / "FGADR" / "Seg-set", "fgadr", ["FGADR"], tmp_path)
    assert cache.masks.shape == (5, 4, 32, 32) and set(cache.index["split"]) == {"train", "test"}
    for case, m in truth.items():
        img, msk = cache.case_volume("FGADR", case)
        assert img.shape == (32, 32, 1, 3) and msk.shape == (32, 32, 1, 4)
        np.testing.assert_array_equal(msk[:, :, 0], m)
        orig = np.asarray(Image.open(tmp_path / "FGADR" / "Seg-set" / "Original_Images" / f"{case}.png"), np.float32)
        np.testing.assert_allclose(img[:, :, 0], orig / 255.0, atol=1e-3)


def test_lits_liver_is_label_above_zero(tmp_path):
    write_lits(tmp_path / "LiTS")
    lay = get_layout("lits")
    cases = lay.list_cases(tmp_path / "LiTS", "LiTS")
    assert [c.case_id for c in cases] == ["0", "1", "2", "3", "4"]
    case = lay.load_case(cases[0])
    assert case.label_values == (0, 1, 2) and case.spacing == pytest.approx((0.7, 0.7, 2.5))
    np.testing.assert_array_equal(case.mask, labels(values=(1, 2)) > 0)  # tumour counts as liver
    cache = _cache(tmp_path / "LiTS", "lits", ["LiTS"], tmp_path)
    assert len(cache.index) == 5 * VOL[2] and cache.manifest["window"] == list(DEFAULT_CT_WINDOW)
    img, msk = cache.case_volume("LiTS", "3")
    orig = np.asarray(nib.load(tmp_path / "LiTS" / "Training Batch 2" / "volume-3.nii").dataobj, np.float32)
    np.testing.assert_allclose(img, np.clip((orig + 160) / 400, 0, 1), atol=1e-3)
    np.testing.assert_array_equal(msk, labels(values=(1, 2)) > 0)
    wide = _cache(tmp_path / "LiTS", "lits", ["LiTS"], tmp_path, window=(-1000, 1000))
    img2, _ = wide.case_volume("LiTS", "3")
    np.testing.assert_allclose(img2, np.clip((orig + 1000) / 2000, 0, 1), atol=1e-3)


@pytest.mark.parametrize("writer,first,values", [(write_flare22, "FLARE22_Tr_0001", (1, 2, 5, 13)),
                                                 (write_flare21, "train_000", (1, 2, 3, 4))])
def test_flare_liver_is_label_one(tmp_path, writer, first, values):
    writer(tmp_path / "FLARE")
    lay = get_layout("flare")
    cases = lay.list_cases(tmp_path / "FLARE", "FLARE")
    assert len(cases) == 5 and cases[0].case_id == first
    case = lay.load_case(cases[0])
    assert case.label_values == (0, *values)
    np.testing.assert_array_equal(case.mask, labels(values=values) == 1)  # the other organs are not liver
    cache = _cache(tmp_path / "FLARE", "flare", ["FLARE"], tmp_path)
    _, msk = cache.case_volume("FLARE", first)
    np.testing.assert_array_equal(msk, case.mask)


def test_cross_dataset_cache_and_mixed_modalities(tmp_path):
    write_idrid(tmp_path / "IDRiD")
    write_fgadr(tmp_path / "FGADR")
    write_lits(tmp_path / "LiTS")
    srcs = {"IDRiD": ("idrid", tmp_path / "IDRiD"), "FGADR": ("fgadr", tmp_path / "FGADR")}
    cache = _cache(None, "idrid", ["IDRiD", "FGADR"], tmp_path, site_sources=srcs)
    assert sorted(cache.index["site"].unique()) == ["FGADR", "IDRiD"] and cache.masks.shape[1] == 4
    assert cache.manifest["split_source"]["IDRiD"] == "dataset"
    with pytest.raises(DataError, match="modality"):
        build_slice_cache("idrid", None, ["IDRiD", "LiTS"], 32, tmp_path / "c",
                          site_sources={**srcs, "LiTS": ("lits", tmp_path / "LiTS")}, progress=False)


# --------------------------------------------------------------------------------------------- bad input


def _break_prostate(root: Path) -> dict[str, str]:
    """One problem per case; returns file name -> what the message must say about it."""
    s = root / "UCL"
    for n in range(1, 12):
        write_nifti(s / f"Case{n:02d}.nii.gz", volume(n))
        write_nifti(s / f"Case{n:02d}_segmentation.nii.gz", labels())
    raw = (s / "Case01.nii.gz").read_bytes()
    (s / "Case01.nii.gz").write_bytes(raw[: len(raw) // 2])                         # truncated
    (s / "Case02_segmentation.nii.gz").write_bytes(b"not a nifti file" * 50)         # not NIfTI
    (s / "Case03_segmentation.nii.gz").unlink()                                       # image without mask
    (s / "Case04.nii.gz").unlink()                                                    # mask without image
    write_nifti(s / "Case05_segmentation.nii.gz", labels(shape=(32, 32, 7)))          # shape mismatch
    flip = np.diag([-0.6, 0.6, 3.0, 1.0])
    write_nifti(s / "Case06_segmentation.nii.gz", labels(), affine=flip)              # orientation mismatch
    write_nifti(s / "Case07_segmentation.nii.gz", labels(values=(1, 7)))              # unexpected label 7
    write_nifti(s / "Case08.nii.gz", volume(8, shape=VOL + (2,)))                     # 4D
    nan = volume(9)
    nan[3, 3, 3] = np.nan
    write_nifti(s / "Case09.nii.gz", nan)                                             # NaN
    write_nifti(s / "Case10.nii.gz", np.full(VOL, 5.0, np.float32))                   # constant
    (root / "BIDMC").mkdir()                                                          # empty site folder
    return {"Case01.nii.gz": "NIfTI", "Case02_segmentation.nii.gz": "NIfTI", "Case03.nii.gz": "without a mask",
            "Case04_segmentation.nii.gz": "without an image", "Case05_segmentation.nii.gz": "(32, 32, 7)",
            "Case06_segmentation.nii.gz": "orientation", "Case07_segmentation.nii.gz": "unexpected label values [7]",
            "Case08.nii.gz": "(32, 32, 6, 2)", "Case09.nii.gz": "1 NaN", "Case10.nii.gz": "constant"}


def test_each_bad_volume_names_its_file(tmp_path):
    expect = _break_prostate(tmp_path)
    lay = get_layout("prostate_multisite")
    cases, problems = lay.scan_cases(tmp_path, "UCL")
    msgs = problems[:]
    for cf in cases:
        try:
            lay.load_case(cf)
        except DataError as e:
            msgs.append(str(e))
    for name, what in expect.items():
        hit = [m for m in msgs if name in m]
        assert hit and what in hit[0], (name, what, msgs)
    assert len(msgs) == 10  # Case11 is fine
    with pytest.raises(DataError, match="BIDMC.*no cases"):
        lay.list_cases(tmp_path, "BIDMC")
    with pytest.raises(DataError, match=r"Case03\.nii\.gz.*without a mask"):
        lay.list_cases(tmp_path, "UCL")


def test_data_check_reports_everything_in_one_pass(tmp_path, capsys):
    from sweeps.cli import main

    write_prostate(tmp_path / "prostate")  # good sites beside the broken one
    shutil.rmtree(tmp_path / "prostate" / "BIDMC")
    expect = _break_prostate(tmp_path / "prostate")
    rep = check_dataset(tmp_path / "prostate", "prostate_multisite")
    assert len(rep.errors) == 10 and not rep.ok
    assert any("BIDMC" in w and "no cases" in w for w in rep.warnings)
    text = format_report(rep)
    for name in expect:
        assert name in text
    assert "site HK: 3 cases, 18 slices" in text and "label values: [0, 1, 2]" in text and "0.6 x 0.6 x 3" in text
    assert main(["data", "check", str(tmp_path / "prostate"), "--layout", "prostate_multisite"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 11 good cases, 10 error(s)" in out and all(name in out for name in expect)
    # nothing else lost: skipping the bad cases keeps every good one
    cache = _cache(tmp_path / "prostate", "prostate_multisite", ["UCL", "BMC"], tmp_path, skip_bad_cases=True)
    assert sorted(cache.index[cache.index["site"] == "UCL"]["case_id"].unique()) == ["Case11"]
    assert len(cache.manifest["skipped"]) == 10


def test_bad_fundus_and_ct(tmp_path, capsys):
    from sweeps.cli import main

    write_idrid(tmp_path / "IDRiD")
    seg = tmp_path / "IDRiD" / "A. Segmentation"
    gt = seg / "2. All Segmentation Groundtruths" / "a. Training Set"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(gt / "1. Microaneurysms" / "IDRiD_01_MA.tif")  # size
    raw = (seg / "1. Original Images" / "a. Training Set" / "IDRiD_02.jpg").read_bytes()
    (seg / "1. Original Images" / "a. Training Set" / "IDRiD_02.jpg").write_bytes(raw[:200])  # truncated JPEG
    grey = np.arange(30 * 40).reshape(30, 40) % 7 * 30
    Image.fromarray(grey.astype(np.uint8)).save(gt / "3. Hard Exudates" / "IDRiD_03_EX.tif")  # not binary
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(gt / "4. Soft Exudates" / "IDRiD_09_SE.tif")  # no image
    rep = check_dataset(tmp_path / "IDRiD", "idrid")
    text = format_report(rep)
    assert len(rep.errors) == 4, text
    assert "IDRiD_01_MA.tif: mask size 20x20" in text and "40x30" in text
    assert "IDRiD_02.jpg: cannot read it as an image" in text
    assert "IDRiD_03_EX.tif: unexpected label values" in text
    assert "IDRiD_09_SE.tif: mask without an image" in text
    assert "own split {'test': 2}" in text and "absent (lesion taken as absent): HE 1" in text
    # CT: an unexpected label, and a constant volume
    write_lits(tmp_path / "LiTS")
    write_nifti(tmp_path / "LiTS" / "Training Batch 1" / "segmentation-1.nii", labels(values=(1, 3)))
    write_nifti(tmp_path / "LiTS" / "Training Batch 1" / "volume-2.nii", np.zeros(VOL, np.int16))
    assert main(["data", "check", str(tmp_path / "LiTS"), "--layout", "lits"]) == 1
    out = capsys.readouterr().out
    assert "segmentation-1.nii: unexpected label values [3]" in out and "volume-2.nii: constant" in out
    assert "site LiTS: 3 cases, 18 slices" in out
    # FLARE: an image without labels
    write_flare22(tmp_path / "FLARE")
    (tmp_path / "FLARE" / "labels" / "FLARE22_Tr_0002.nii.gz").unlink()
    rep = check_dataset(tmp_path / "FLARE", "flare")
    assert len(rep.errors) == 1 and "FLARE22_Tr_0002_0000.nii.gz: image without a mask" in rep.errors[0]


@pytest.mark.parametrize("layout", ["prostate_multisite", "idrid", "fgadr", "lits", "flare"])
def test_missing_and_empty_roots(tmp_path, layout, capsys):
    from sweeps.cli import main

    rep = check_dataset(tmp_path / "nowhere", layout)
    assert not rep.ok and "nowhere does not exist" in rep.errors[0]
    (tmp_path / "empty").mkdir()
    rep = check_dataset(tmp_path / "empty", layout)
    assert not rep.ok and "empty" in rep.errors[0]
    assert main(["data", "check", str(tmp_path / "nowhere"), "--layout", layout]) == 1
    assert "does not exist" in capsys.readouterr().out
    with pytest.raises(DataError, match="nowhere"):
        build_slice_cache(layout, tmp_path / "nowhere", ["X"], 32, tmp_path / "c", progress=False)


def test_fgadr_masks_without_folders_and_duplicates(tmp_path):
    write_fgadr(tmp_path / "FGADR", n=2)
    for folder in FGADR_FOLDERS:
        shutil.rmtree(tmp_path / "FGADR" / "Seg-set" / folder)
    with pytest.raises(DataError, match="no lesion mask folders"):
        get_layout("fgadr").list_cases(tmp_path / "FGADR", "FGADR")
    write_lits(tmp_path / "LiTS", n=2)
    write_nifti(tmp_path / "LiTS" / "copy" / "volume-0.nii.gz", ct(1))
    with pytest.raises(DataError, match="a second image file for 0"):
        get_layout("lits").list_cases(tmp_path / "LiTS", "LiTS")
