"""The own-data layouts (nnunet, decathlon, folder2d), site maps, channels and labels, on datasets written
here in the real formats (nibabel NIfTI, Pillow PNG): scan, load, cache, and every bad input named."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from trainables.data.base import DataError
from trainables.data.cache import build_slice_cache, open_slice_cache
from trainables.data.check import check_dataset
from trainables.data.layouts import get_layout

SHAPE = (12, 10, 3)  # H x W x D, tiny


def _nii(path: Path, arr: np.ndarray, spacing=(0.5, 0.6, 3.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))


def _label(k: int) -> np.ndarray:
    """0 background, 1 = PZ (a band), 2 = TZ (a block); every case has both."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 2:8, :] = 1
    lab[6:10, 3:7 + k % 2, :] = 2
    return lab


def _channel(k: int, c: int) -> np.ndarray:
    rng = np.random.default_rng(10 * k + c)
    return (rng.random(SHAPE) * (100 if c == 0 else 3000) + 1000 * c).astype(np.float32)


def write_nnunet(root: Path, n: int = 6, regions: bool = False) -> Path:
    """An nnU-Net v2 raw dataset: 2 channels (T2, ADC), labels PZ=1, TZ=2; a site map over two sites."""
    ds = root / "Dataset042_Prostate"
    labels = {"background": 0, "PZ": 1, "TZ": 2}
    if regions:
        labels["whole"] = [1, 2]
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}, "labels": labels,
                                                 "numTraining": n, "file_ending": ".nii.gz"}))
    for k in range(n):
        for c in range(2):
            _nii(ds / "imagesTr" / f"pros_{k:03d}_{c:04d}.nii.gz", _channel(k, c))
        _nii(ds / "labelsTr" / f"pros_{k:03d}.nii.gz", _label(k))
    rows = ["case_id,site,split"] + [f"pros_{k:03d},{'A' if k < n // 2 else 'B'}," for k in range(n)]
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    return ds


def write_decathlon(root: Path, n: int = 4) -> Path:
    ds = root / "Task05_Prostate"
    training = []
    for k in range(n):
        img = np.stack([_channel(k, 0), _channel(k, 1)], axis=-1)  # 4D, channels last
        _nii(ds / "imagesTr" / f"prostate_{k:02d}.nii.gz", img)
        _nii(ds / "labelsTr" / f"prostate_{k:02d}.nii.gz", _label(k))
        training.append({"image": f"./imagesTr/prostate_{k:02d}.nii.gz", "label": f"./labelsTr/prostate_{k:02d}.nii.gz"})
    (ds / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"\x00junk")  # the release's resource forks
    (ds / "dataset.json").write_text(json.dumps({"modality": {"0": "T2", "1": "ADC"},
                                                 "labels": {"0": "background", "1": "PZ", "2": "TZ"},
                                                 "numTraining": n, "training": training}))
    return ds


def write_folder2d(root: Path, sites=("S1", "S2"), n: int = 3, rgb: bool = False) -> Path:
    for s in sites:
        for k in range(n):
            rng = np.random.default_rng(k)
            arr = (rng.random((16, 20, 3) if rgb else (16, 20)) * 255).astype(np.uint8)
            m = np.zeros((16, 20), np.uint8)
            m[4:10, 5:12] = 255
            (root / s / "images").mkdir(parents=True, exist_ok=True)
            (root / s / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / s / "images" / f"img{k}.png")
            Image.fromarray(m).save(root / s / "masks" / f"img{k}.png")
    return root


OPTS = lambda root: {"sites_from": str(root / "cases.csv")}  # noqa: E731


# ------------------------------------------------------------------------------------------------ nnunet

def test_nnunet_scan_load(tmp_path):
    ds = write_nnunet(tmp_path)
    lay = get_layout("nnunet", ds, OPTS(tmp_path))
    assert lay.sites(ds) == ["A", "B"] and lay.labels == ("PZ", "TZ") and lay.label_kind == "exclusive"
    cases = lay.list_cases(ds, "A")
    assert [c.case_id for c in cases] == ["pros_000", "pros_001", "pros_002"] and cases[0].split == "train"
    case = lay.load_case(cases[1])
    assert case.image.shape == SHAPE + (2,) and case.mask.shape == SHAPE + (2,)
    assert case.spacing == pytest.approx((0.5, 0.6, 3.0)) and case.channel_norms == ("percentile", "percentile")
    np.testing.assert_array_equal(case.mask[..., 0], _label(1) == 1)
    np.testing.assert_array_equal(case.mask[..., 1], _label(1) == 2)
    np.testing.assert_array_equal(case.image[..., 1], _channel(1, 1))


def test_nnunet_without_site_map_is_one_site(tmp_path):
    ds = write_nnunet(tmp_path)
    lay = get_layout("nnunet", ds)
    assert lay.sites(ds) == ["Prostate"] and len(lay.list_cases(ds, "Prostate")) == 6


def test_nnunet_channels_and_unions(tmp_path):
    ds = write_nnunet(tmp_path, regions=True)
    lay = get_layout("nnunet", ds, {"channels": ["ADC"], "labels": [{"whole_prostate": ["PZ", "TZ"]}]})
    case = lay.load_case(lay.list_cases(ds, "X")[0])
    assert lay.labels == ("whole_prostate",) and case.image.shape == SHAPE and case.mask.shape == SHAPE
    np.testing.assert_array_equal(case.mask, _label(0) > 0)
    both = get_layout("nnunet", ds, {"labels": ["PZ", {"all": ["PZ", "TZ"]}]})
    assert both.label_kind == "overlapping" and both.labels == ("PZ", "all")
    default = get_layout("nnunet", ds)  # region labels by default: overlapping
    assert default.labels == ("PZ", "TZ", "whole") and default.label_kind == "overlapping"
    with pytest.raises(DataError, match=r"data.labels: unknown label 'CZ'.*\['PZ', 'TZ', 'whole'\]"):
        get_layout("nnunet", ds, {"labels": ["CZ"]})
    with pytest.raises(DataError, match=r"data.channels.*\['DWI'\].*\['T2', 'ADC'\]"):
        get_layout("nnunet", ds, {"channels": ["DWI"]})


def test_cache_channels_labels_kind(tmp_path):
    ds = write_nnunet(tmp_path)
    path = build_slice_cache("nnunet", ds, ["A", "B"], 8, tmp_path / "cache", progress=False,
                             layout_options=OPTS(tmp_path))
    cache = open_slice_cache(path)
    assert cache.images.shape == (6 * SHAPE[2], 2, 8, 8) and cache.masks.shape == (6 * SHAPE[2], 2, 8, 8)
    assert cache.manifest["labels"] == ["PZ", "TZ"] and cache.manifest["label_kind"] == "exclusive"
    assert sorted(cache.index["site"].unique()) == ["A", "B"]
    # each channel scaled on its own: T2 (0..100) and ADC (1000..4000) both centred in [0, 1] (one range for
    # both would put T2 near 0)
    for c in range(2):
        assert 0.35 < float(np.asarray(cache.images[:, c], np.float32).mean()) < 0.65
    union = build_slice_cache("nnunet", ds, ["A", "B"], 8, tmp_path / "cache", progress=False,
                              layout_options={**OPTS(tmp_path), "labels": {"whole": ["PZ", "TZ"]}})
    u = open_slice_cache(union)
    assert u.masks.shape == (18, 8, 8) and u.manifest["label_kind"] == "exclusive" and u.manifest["labels"] == ["whole"]


def test_fixed_layouts_label_kind(tmp_path):
    from trainables.data.synthetic import write_synthetic_sites

    write_synthetic_sites(tmp_path / "d", sites=["SiteA", "SiteB"], cases_per_site=2, shape=(16, 16, 6), seed=0)
    path = build_slice_cache("prostate_multisite", tmp_path / "d", ["SiteA", "SiteB"], 8, tmp_path / "c",
                             progress=False)
    m = open_slice_cache(path).manifest
    assert m["label_kind"] == "exclusive" and "layout_options" not in m


# ------------------------------------------------------------------------------------------------ bad input

def test_dataset_json_missing_key(tmp_path):
    ds = write_nnunet(tmp_path)
    meta = json.loads((ds / "dataset.json").read_text())
    del meta["file_ending"]
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset.json: no key 'file_ending'.*add it"):
        get_layout("nnunet", ds)


def test_unsupported_file_ending(tmp_path):
    ds = write_nnunet(tmp_path)
    meta = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".png"}))
    with pytest.raises(DataError, match=r"file_ending '.png' is not supported.*Convert.*folder2d"):
        get_layout("nnunet", ds)


def test_missing_channel_file(tmp_path):
    ds = write_nnunet(tmp_path)
    (ds / "imagesTr" / "pros_004_0001.nii.gz").unlink()
    lay = get_layout("nnunet", ds, OPTS(tmp_path))
    cases, problems = lay.scan_cases(ds, "B")
    assert [c.case_id for c in cases] == ["pros_003", "pros_005"]
    assert any("pros_004_0001.nii.gz: missing" in p and "2 channels ['T2', 'ADC']" in p for p in problems)
    report = check_dataset(ds, "nnunet", options=OPTS(tmp_path))
    assert not report.ok and any("pros_004_0001.nii.gz: missing" in e for e in report.errors)


def test_label_value_not_declared(tmp_path):
    ds = write_nnunet(tmp_path)
    lab = _label(2)
    lab[0, 0, 0] = 7
    _nii(ds / "labelsTr" / "pros_002.nii.gz", lab)
    lay = get_layout("nnunet", ds, OPTS(tmp_path))
    with pytest.raises(DataError, match=r"pros_002.nii.gz: label value\(s\) \[7\] not in the labels \[0, 1, 2\] "
                                        r"declared in .*dataset.json.*Add the label"):
        lay.load_case(lay.list_cases(ds, "A")[2])


def test_site_map_errors(tmp_path):
    ds = write_nnunet(tmp_path)
    csv = tmp_path / "cases.csv"
    csv.write_text("case_id,site\npros_000,A\npros_001,A\npros_002,B\npros_003,B\npros_004,B\npros_999,B\n")
    with pytest.raises(DataError) as e:
        get_layout("nnunet", ds, {"sites_from": str(csv)}).sites(ds)
    msg = str(e.value)
    assert "pros_005_0000.nii.gz: case 'pros_005' is in no row of the site map" in msg and "add a row `pros_005,SITE`" in msg
    assert "cases.csv row 7: case_id 'pros_999' names no case" in msg
    csv.write_text("case_id,site,split\n" + "".join(f"pros_{k:03d},{'A' if k else 'B'},\n" for k in range(6)))
    with pytest.raises(DataError, match=r"cases.csv: site 'B' has 1 case\(s\).*at least 2"):
        get_layout("nnunet", ds, {"sites_from": str(csv)}).sites(ds)
    csv.write_text("case_id,site,split\npros_000,A,validation\n")
    with pytest.raises(DataError, match=r"cases.csv row 2: unknown split 'validation'; use one of \['train', 'test'\]"):
        get_layout("nnunet", ds, {"sites_from": str(csv)})
    csv.write_text("case,site\n")
    with pytest.raises(DataError, match=r"cases.csv: no column \['case_id'\]"):
        get_layout("nnunet", ds, {"sites_from": str(csv)})


def test_datalist_site_map(tmp_path):
    ds = write_decathlon(tmp_path)
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [
        {"image": [f"imagesTr/prostate_{k:02d}.nii.gz"], "label": f"labelsTr/prostate_{k:02d}.nii.gz",
         "site": "X" if k < 2 else "Y", "split": "test" if k % 2 else "train"} for k in range(4)]}))
    lay = get_layout("decathlon", ds, {"sites_from": str(dl)})
    assert lay.sites(ds) == ["X", "Y"]
    assert [(c.case_id, c.split) for c in lay.list_cases(ds, "Y")] == [("prostate_02", "train"), ("prostate_03", "test")]


# ------------------------------------------------------------------------------------------------ decathlon

def test_decathlon_4d(tmp_path):
    ds = write_decathlon(tmp_path)
    lay = get_layout("decathlon", ds, {"channels": ["ADC", "T2"], "labels": ["TZ"]})
    assert lay.sites(ds) == ["Prostate"] and lay.labels == ("TZ",)
    case = lay.load_case(lay.list_cases(ds, "P")[1])
    assert case.image.shape == SHAPE + (2,) and case.mask.shape == SHAPE
    np.testing.assert_array_equal(case.image[..., 0], _channel(1, 1))  # ADC first, as asked
    np.testing.assert_array_equal(case.mask, _label(1) == 2)
    path = build_slice_cache("decathlon", ds, ["P"], 8, tmp_path / "c", progress=False,
                             layout_options={"labels": ["PZ", "TZ"]})
    c = open_slice_cache(path)
    assert c.images.shape == (12, 2, 8, 8) and c.masks.shape == (12, 2, 8, 8) and c.manifest["label_kind"] == "exclusive"


def test_decathlon_channel_count_and_missing_key(tmp_path):
    ds = write_decathlon(tmp_path)
    _nii(ds / "imagesTr" / "prostate_01.nii.gz", _channel(1, 0))  # 3D where 2 channels are declared
    lay = get_layout("decathlon", ds)
    with pytest.raises(DataError, match=r"prostate_01.nii.gz: 1 channel\(s\) on its 4th axis but dataset.json "
                                        r"modality declares 2"):
        lay.load_case(lay.list_cases(ds, "P")[1])
    meta = json.loads((ds / "dataset.json").read_text())
    del meta["modality"]
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"no key 'modality'"):
        get_layout("decathlon", ds)


def test_scale_channels_by_hand():
    from trainables.data.channels import scale_channels

    rng = np.random.default_rng(0)
    img = np.stack([rng.random((8, 8, 2)) * 100, rng.random((8, 8, 2)) * 3000 + 1000, rng.random((8, 8, 2)) * 900 - 500],
                   axis=-1).astype(np.float32)
    out = scale_channels(img, ("percentile", "percentile", "window"), 8, (-160.0, 240.0), anti_aliasing=False)
    assert out.shape == (2, 3, 8, 8) and out.dtype == np.float16
    for c in range(2):
        lo, hi = np.percentile(img[..., c], [0.5, 99.5])
        want = np.clip((img[..., c] - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(out[:, c], np.moveaxis(want, -1, 0), atol=2e-3)
    np.testing.assert_allclose(out[:, 2], np.moveaxis(np.clip((img[..., 2] + 160) / 400, 0, 1), -1, 0), atol=2e-3)


def test_read_nifti_4d_only_when_asked(tmp_path):
    from trainables.data.nifti import read_nifti

    _nii(tmp_path / "x.nii.gz", np.ones(SHAPE + (2,), np.float32))
    with pytest.raises(DataError, match="expected a 3D volume"):
        read_nifti(tmp_path / "x.nii.gz")
    assert read_nifti(tmp_path / "x.nii.gz", channels_last=True)[0].shape == SHAPE + (2,)


# ------------------------------------------------------------------------------------------------ folder2d

def test_folder2d(tmp_path):
    root = write_folder2d(tmp_path / "f", rgb=True)
    lay = get_layout("folder2d", root, {"label_values": {"lesion": 255}, "pixel_spacing": 0.25})
    assert lay.sites(root) == ["S1", "S2"]
    case = lay.load_case(lay.list_cases(root, "S1")[0])
    assert case.image.shape == (16, 20, 1, 3) and case.mask.shape == (16, 20, 1) and case.mask.sum() == 42
    assert case.spacing == (0.25, 0.25, 1.0) and case.channel_norms == ("range255",) * 3
    path = build_slice_cache("folder2d", root, ["S1", "S2"], 8, tmp_path / "c", progress=False)
    c = open_slice_cache(path)
    assert c.images.shape == (6, 3, 8, 8) and c.masks.shape == (6, 8, 8) and c.manifest["labels"] == ["foreground"]


def test_folder2d_bad_inputs(tmp_path):
    root = write_folder2d(tmp_path / "f")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "S1" / "masks" / "img1.png")
    lay = get_layout("folder2d", root)
    with pytest.raises(DataError, match=r"img1.png: mask size 8x8 \(W x H\) differs from its image .*img1.png \(20x16\)"):
        lay.load_case(lay.list_cases(root, "S1")[1])
    m = np.zeros((16, 20), np.uint8)
    m[1, 1], m[2, 2] = 255, 128
    Image.fromarray(m).save(root / "S1" / "masks" / "img2.png")
    lay = get_layout("folder2d", root, {"label_values": {"lesion": 255}})
    with pytest.raises(DataError, match=r"img2.png: label value\(s\) \[128\] not in .*data.label_values"):
        lay.load_case(lay.list_cases(root, "S1")[2])
    (root / "S2" / "masks" / "img0.png").unlink()
    _, problems = lay.scan_cases(root, "S2")
    assert any("img0.png: image without a mask" in p for p in problems)


def test_options_for_fixed_layout_refused():
    with pytest.raises(DataError, match=r"data.labels applies to the layouts .*not prostate_multisite"):
        get_layout("prostate_multisite", None, {"labels": ["PZ"]})


# ------------------------------------------------------------------------------------------------ spec

def _spec(tmp_path, **data):
    from sweeps.spec import parse_spec

    raw = {"name": "own", "data": {"source": "A", "targets": ["B"], **data},
           "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]}}}
    return parse_spec(raw, where="test", base_dir=tmp_path, env={})


def test_spec_layout_options(tmp_path):
    from sweeps.spec import SpecError

    ds = write_nnunet(tmp_path)
    spec = _spec(tmp_path, layout="nnunet", root=str(ds), sites_from="cases.csv", channels="ADC",
                 labels=["PZ", {"whole": ["PZ", "TZ"]}], window=[-100, 200])
    assert spec.data.layout_options == {"sites_from": str(tmp_path / "cases.csv"), "channels": ["ADC"],
                                        "labels": ["PZ", {"whole": ["PZ", "TZ"]}]}
    assert _spec(tmp_path, layout="nnunet", root=str(ds)).data.layout_options is None
    with pytest.raises(SpecError, match=r"data.label_values.*applies to the layouts \['folder2d'\], not \['nnunet'\]"):
        _spec(tmp_path, layout="nnunet", root=str(ds), label_values={"lesion": 255})
    with pytest.raises(SpecError, match=r"data.sites_from.*applies to the layouts .*not \['prostate_multisite'\]"):
        _spec(tmp_path, layout="prostate_multisite", root=str(ds), sites_from="cases.csv")
    with pytest.raises(SpecError, match=r"data.labels.*expected label names"):
        _spec(tmp_path, layout="nnunet", root=str(ds), labels=[1, 2])
    with pytest.raises(SpecError, match=r"data.pixel_spacing"):
        _spec(tmp_path, layout="folder2d", root=str(ds), pixel_spacing=-1)


# ------------------------------------------------------------------------------------------------ more

def test_fundus_cache_is_overlapping(tmp_path):
    from test_datasets import write_fgadr

    write_fgadr(tmp_path / "fg", n=3)
    path = build_slice_cache("fgadr", tmp_path / "fg", ["FGADR"], 8, tmp_path / "c", progress=False)
    m = open_slice_cache(path).manifest
    assert m["labels"] == ["MA", "HE", "EX", "SE"] and m["label_kind"] == "overlapping"


def test_folder2d_with_site_map_and_gray(tmp_path):
    root = write_folder2d(tmp_path / "f", sites=("all",), n=4)
    flat = tmp_path / "flat"
    (root / "all").rename(flat)
    (tmp_path / "map.csv").write_text("case_id,site,split\nimg0,X,train\nimg1,X,test\nimg2,Y,\nimg3,Y,\n")
    lay = get_layout("folder2d", flat, {"sites_from": str(tmp_path / "map.csv")})
    assert lay.sites(flat) == ["X", "Y"]
    assert [(c.case_id, c.split) for c in lay.list_cases(flat, "X")] == [("img0", "train"), ("img1", "test")]
    case = lay.load_case(lay.list_cases(flat, "Y")[0])
    assert case.image.shape == (16, 20, 1) and case.channel_norms == ("range255",)


def test_folder2d_mixed_channels_refused(tmp_path):
    root = write_folder2d(tmp_path / "f", sites=("S1",), n=2)
    Image.fromarray(np.full((16, 20, 3), 7, np.uint8) + np.arange(20, dtype=np.uint8)[None, :, None]).save(
        root / "S1" / "images" / "img1.png")
    with pytest.raises(DataError, match=r"img1.png: 3 image channel\(s\), but the cases before it have 1"):
        build_slice_cache("folder2d", root, ["S1"], 8, tmp_path / "c", progress=False)


def test_check_report_names_channels_and_labels(tmp_path):
    from trainables.data.check import format_report

    ds = write_nnunet(tmp_path, regions=True)
    report = check_dataset(ds, "nnunet", options=OPTS(tmp_path))
    text = format_report(report)
    assert report.ok, text
    assert "channels: ['T2', 'ADC']; labels: ['PZ', 'TZ', 'whole'] (overlapping" in text
    assert "site A: 3 cases" in text and "site B: 3 cases" in text
    bad = check_dataset(ds, "nnunet", options={"sites_from": str(tmp_path / "nope.csv")})
    assert not bad.ok and "nope.csv does not exist" in bad.errors[0]


def test_spec_labels_mapping_of_unions(tmp_path):
    ds = write_nnunet(tmp_path)
    spec = _spec(tmp_path, layout="nnunet", root=str(ds), labels={"whole": ["PZ", "TZ"], "pz": "PZ"})
    lay = get_layout("nnunet", ds, spec.data.layout_options)
    assert lay.labels == ("whole", "pz") and lay.label_kind == "overlapping"


def test_nnunet_test_split_and_ct(tmp_path):
    ds = write_nnunet(tmp_path, n=4)
    for sub, name in (("imagesTs", "pros_003_0000.nii.gz"), ("imagesTs", "pros_003_0001.nii.gz"),
                      ("labelsTs", "pros_003.nii.gz")):
        (ds / sub).mkdir(exist_ok=True)
        src = ds / ("labelsTr" if sub == "labelsTs" else "imagesTr") / name
        src.rename(ds / sub / name)
    meta = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**meta, "numTraining": 3, "channel_names": {"0": "CT", "1": "CT"}}))
    lay = get_layout("nnunet", ds)
    assert lay.modality == "ct" and [(c.case_id, c.split) for c in lay.list_cases(ds, "P")][-2:] == [
        ("pros_002", "train"), ("pros_003", "test")]
    assert lay.load_case(lay.list_cases(ds, "P")[0]).channel_norms == ("window", "window")
    (ds / "dataset.json").write_text(json.dumps({**meta, "numTraining": 4}))
    _, problems = get_layout("nnunet", ds).scan_cases(ds, "P")
    assert any("numTraining is 4 but imagesTr holds 3 case(s)" in p for p in problems)
