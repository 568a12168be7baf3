"""Surface records (HD95, NSD per case at the cache grid's spacing) and ``--metric hd95`` / ``nsd``."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from trainables import records
from trainables.data.cache import SPACING_COLUMNS, SliceCache
from trainables.surface import case_scores, surface_records, write_member_surface

from test_import import _import, perfect  # noqa: F401  (``perfect``: a module fixture used below)


def _cube(shape=(16, 16, 6), lo=(4, 4, 1), hi=(10, 10, 4), shift=(0, 0, 0)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a + s, b + s) for a, b, s in zip(lo, hi, shift))] = True
    return m


def _monai(pred: np.ndarray, truth: np.ndarray, spacing, tol: float) -> tuple[float, float]:
    p, t = (torch.from_numpy(a)[None, None].float() for a in (pred, truth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(p, t, [tol], include_background=True, spacing=list(spacing))
    return float(hd.item()), float(nsd.item())


def _cache(cases: dict[str, np.ndarray], spacing=(0.5, 0.5, 3.0), labels=None, with_spacing=True) -> SliceCache:
    """A slice cache in memory: each case an S x S x D (or S x S x D x L) truth volume of site "T"."""
    masks, rows = [], []
    for cid, vol in cases.items():
        for z in range(vol.shape[2]):
            masks.append(vol[:, :, z] if vol.ndim == 3 else np.moveaxis(vol[:, :, z], -1, 0))
            rows.append({"site": "T", "case_id": cid, "slice_idx": z, "split": "test",
                         **(dict(zip(SPACING_COLUMNS, spacing)) if with_spacing else {})})
    masks = np.stack(masks).astype(np.uint8)
    images = np.zeros((len(masks), 1) + masks.shape[-2:], np.float16)
    return SliceCache(path=Path("/memory"), images=images, masks=masks, index=pd.DataFrame(rows),
                      manifest={"labels": labels or ["organ"]})


def test_recorded_values_equal_monai_on_the_same_masks_and_spacing(tmp_path):
    truth = {"c0": _cube(), "c1": _cube(hi=(12, 9, 5))}
    cache = _cache(truth)
    pred_vols = {"c0": _cube(shift=(1, 2, 0)), "c1": _cube(hi=(12, 9, 5), shift=(0, 0, 1))}
    # the member's slices in a shuffled order: the records must put each case back in slice order
    rows = np.random.default_rng(0).permutation(len(cache.index))
    idx = cache.index.iloc[rows]
    pred = np.stack([pred_vols[c][:, :, z] for c, z in zip(idx["case_id"], idx["slice_idx"])])
    write_member_surface(tmp_path, "m1", cache, [("T", "ood", rows)], {"T": pred}, 2.0)
    got = records.load_surface(tmp_path)
    assert (tmp_path / "records" / "surface.parquet").exists()
    assert list(got.columns) == list(records.SURFACE_COLUMNS)
    assert list(got["case_id"]) == ["c0", "c1"] and set(got["member_id"]) == {"m1"}
    for _, r in got.iterrows():
        hd, nsd = _monai(pred_vols[r["case_id"]], truth[r["case_id"]], (0.5, 0.5, 3.0), 2.0)
        assert r["hd95_mm"] == pytest.approx(hd) and r["nsd"] == pytest.approx(nsd)
        assert r["empty"] == "none" and r["label"] == "organ" and r["tolerance_mm"] == 2.0
        assert (r["spacing_h"], r["spacing_w"], r["spacing_d"]) == (0.5, 0.5, 3.0)
    # hand-checkable: c0 moved 1 and 2 voxels in-plane at 0.5 mm: no surface point is more than 1 mm off
    c0 = got.iloc[0]
    assert 0.5 <= c0["hd95_mm"] <= math.hypot(0.5, 1.0) + 1e-6 and c0["nsd"] == 1.0


def test_anisotropic_spacing_moves_the_values_the_expected_way():
    truth, pred = _cube(), _cube(shift=(0, 0, 1))  # one slice off along depth
    iso = case_scores(pred, truth, (0.5, 0.5, 0.5), 2.0)
    aniso = case_scores(pred, truth, (0.5, 0.5, 3.0), 2.0)
    # 3 mm slices: the top and bottom faces are 3 mm off (0.5 mm at isotropic 0.5 mm), beyond the 2 mm tolerance
    assert iso[0] == pytest.approx(0.5) and iso[1] == 1.0
    assert aniso[0] == pytest.approx(3.0) and aniso[1] < 1.0
    assert aniso[0] == pytest.approx(_monai(pred, truth, (0.5, 0.5, 3.0), 2.0)[0])


def test_empty_masks_are_recorded_as_documented():
    cube, empty = _cube(), np.zeros((16, 16, 6), dtype=bool)
    diag = math.sqrt((16 * 0.5) ** 2 + (16 * 0.5) ** 2 + (6 * 3.0) ** 2)
    assert case_scores(empty, cube, (0.5, 0.5, 3.0), 2.0) == (pytest.approx(diag), 0.0, "pred")
    assert case_scores(cube, empty, (0.5, 0.5, 3.0), 2.0) == (pytest.approx(diag), 0.0, "truth")
    hd, nsd, flag = case_scores(empty, empty, (0.5, 0.5, 3.0), 2.0)
    assert math.isnan(hd) and math.isnan(nsd) and flag == "both"
    # the analysis' mean over cases leaves a both-empty case out, counts a missed one at its worst
    df = pd.DataFrame({"member_id": "m", "site": "T", "label": "organ", "case_id": ["a", "b", "c"],
                       "hd95_mm": [1.0, diag, np.nan], "nsd": [1.0, 0.0, np.nan]})
    assert records.surface_by(df, "hd95").iloc[0] == pytest.approx((1.0 + diag) / 2)
    assert records.surface_by(df, "nsd").iloc[0] == pytest.approx(0.5)


def test_a_photograph_is_scored_in_2d_and_labels_apart():
    truth = np.zeros((16, 16, 1, 2), dtype=bool)
    truth[4:10, 4:10, 0, 0] = True                       # label A present, label B absent
    pred = truth.copy()
    pred[:, :, 0, 0] = np.roll(truth[:, :, 0, 0], 2, axis=1)
    cache = _cache({"img": truth}, spacing=(1.0, 1.0, 1.0), labels=["A", "B"])
    df = surface_records(cache, "T", "ood", np.arange(1), pred.transpose(2, 3, 0, 1), 2.0)  # D x L x H x W
    a, b = df.set_index("label").loc["A"], df.set_index("label").loc["B"]
    hd2d, nsd2d = _monai(pred[:, :, 0, 0], truth[:, :, 0, 0], (1.0, 1.0), 2.0)
    assert a["hd95_mm"] == pytest.approx(hd2d) == pytest.approx(2.0) and a["nsd"] == pytest.approx(nsd2d)
    assert b["empty"] == "both" and math.isnan(b["nsd"])


def test_a_cache_without_spacing_columns_reads_as_one_with_a_warning():
    cache = _cache({"c0": _cube()}, with_spacing=False)
    with pytest.warns(UserWarning, match="no spacing columns"):
        df = surface_records(cache, "T", "id", np.arange(len(cache.index)), np.asarray(cache.masks), 2.0)
    assert (df["spacing_d"] == 1.0).all() and df["hd95_mm"].iloc[0] == 0.0


def test_cache_index_holds_the_grid_spacing(tiny_cache):
    from trainables.data.cache import open_slice_cache
    from trainables.data.synthetic import SPACING

    index = open_slice_cache(tiny_cache).index
    # the tiny sites are 40 x 40 x 8 at SPACING, cached at 32 x 32: in-plane 40 / 32 times coarser
    assert np.allclose(index["spacing_h"], SPACING[0] * 40 / 32) and np.allclose(index["spacing_w"], SPACING[1] * 40 / 32)
    assert np.allclose(index["spacing_d"], SPACING[2])


# --- the analysis with --metric hd95 / nsd ------------------------------------------------------

def _write_records(exp: Path) -> dict[str, float]:
    """Six members, a source A and a target B; HD95 on B grows as the ID IoU falls. Returns member -> B's mean HD95."""
    hd_b = {}
    for k in range(6):
        mid = f"unet_r18-lr0.001-s{k}-ep1"
        id_iou = 0.5 + 0.08 * k
        member = {"member_id": mid, "run_id": mid, "arch": "unet_r18", "lr": 1e-3, "epochs": 1, "seed": k,
                  "batch_size": 4, "source": "A", "checkpoint": "", "oracle_prompt": False}
        slices = pd.DataFrame([dict(member_id=mid, site=s, role=r, case_id="c0", slice_idx=0, tp=int(100 * v),
                                    fp=100 - int(100 * v), fn=0, tn=0, area_px=100)
                               for s, r, v in (("A", "id", id_iou), ("B", "ood", id_iou - 0.2))])
        hd_b[mid] = 12.0 - 1.5 * k
        surf = pd.DataFrame([dict(site=s, role=r, case_id=c, label="organ", hd95_mm=h, nsd=n, empty="none",
                                  tolerance_mm=2.0, spacing_h=0.5, spacing_w=0.5, spacing_d=3.0)
                             for s, r, c, h, n in (("A", "id", "c0", 3.0 - 0.2 * k, 0.6 + 0.05 * k),
                                                   ("B", "ood", "c0", hd_b[mid] - 1, 0.3 + 0.05 * k),
                                                   ("B", "ood", "c1", hd_b[mid] + 1, 0.3 + 0.05 * k),
                                                   ("B", "ood", "c2", np.nan, np.nan))])
        records.write_surface_part(exp, mid, surf.assign(member_id=mid))
        records.write_member_part(exp, member, slices)
    return hd_b


def test_analysis_with_metric_hd95_scores_minus_the_mean_hd95(tmp_path):
    from analysis import run_analysis

    exp = tmp_path / "exp"
    hd_b = _write_records(exp)
    res = run_analysis(exp, metric="hd95", n_resamples=0)
    perf = pd.read_csv(Path(res["out_dir"]) / "performance.csv").set_index("member_id")
    for mid, h in hd_b.items():  # the mean over cases, the both-empty case c2 left out, negated
        assert perf.loc[mid, "ood_score"] == pytest.approx(-h) and perf.loc[mid, "metric"] == "hd95"
    assert perf["degenerate"].eq(False).all() if "degenerate" in perf else True
    c = next(c for c in res["correlations"] if c["indicator"] == "id_performance")
    # a better ID score (-HD95 on A closer to 0) goes with a smaller HD95 on B: positive, as for every metric
    assert c["spearman_rho"] == pytest.approx(1.0) and c["probit_slope"] is None
    assert any("hd95" in n and "probit" in n for n in res["notes"])
    assert json.loads((Path(res["out_dir"]) / "summary.json").read_text())["metric"] == "hd95"

    from analysis.prepare import prepare

    perf = prepare(exp, "nsd", ["id_performance"], warn=False).perf  # what run_analysis reads for nsd
    assert np.allclose(sorted(perf["ood_score"]), [0.3 + 0.05 * k for k in range(6)])
    assert np.allclose(sorted(perf["id_score"]), [0.6 + 0.05 * k for k in range(6)])


def test_cli_report_takes_metric_hd95_and_refuses_it_without_surface_records(tmp_path, capsys):
    from sweeps.cli import main

    exp = tmp_path / "exp"
    _write_records(exp)
    assert main(["report", str(exp), "--metric", "hd95"]) == 0
    assert "claims report written" in capsys.readouterr().out
    (exp / "records" / "surface.parquet").unlink()
    for p in (exp / "records" / "surface").glob("*.parquet"):
        p.unlink()
    from analysis import run_analysis

    with pytest.raises(ValueError, match="surface_tolerance_mm"):
        run_analysis(exp, metric="nsd", n_resamples=0)


# --- the spec key --------------------------------------------------------------------------------

def test_spec_key_reaches_the_trials_and_is_checked(tmp_path):
    from test_spec import base, edit

    from sweeps.pool import param_space
    from sweeps.spec import SpecError, parse_spec
    from trainables.config import MemberConfig

    spec = parse_spec(base(tmp_path))
    assert spec.data.surface_tolerance_mm == 2.0 == MemberConfig.default("surface_tolerance_mm")
    assert param_space(spec, tmp_path / "cache")["surface_tolerance_mm"] == 2.0
    off = parse_spec(edit(base(tmp_path), "data.surface_tolerance_mm", None))
    assert off.data.surface_tolerance_mm is None
    assert param_space(parse_spec(edit(base(tmp_path), "data.surface_tolerance_mm", 1.5)),
                       tmp_path / "cache")["surface_tolerance_mm"] == 1.5
    with pytest.raises(SpecError, match="data.surface_tolerance_mm"):
        parse_spec(edit(base(tmp_path), "data.surface_tolerance_mm", -1))
    with pytest.raises(SpecError, match="analysis.metric.*surface_tolerance_mm: null"):
        parse_spec(edit(edit(base(tmp_path), "data.surface_tolerance_mm", None), "analysis", {"metric": "nsd"}))
    assert parse_spec(edit(base(tmp_path), "analysis", {"metric": "hd95"})).analysis.metric == "hd95"


def test_finished_sweep_has_surface_records(finished):
    """The tiny end-to-end sweep (conftest ``finished``) wrote a surface part per member, merged on read."""
    members, slices = records.load_records(finished["exp"])
    surface = records.load_surface(finished["exp"])
    assert surface is not None and set(surface["member_id"]) == set(members["member_id"])
    scored = slices[slices["role"] != "val"].groupby(["member_id", "site"])["case_id"].nunique()
    assert surface.groupby(["member_id", "site"])["case_id"].nunique().equals(scored)  # every case, once
    assert set(surface["empty"]) <= {"none", "pred", "truth", "both"} and (surface["tolerance_mm"] == 2.0).all()
    ok = surface[surface["empty"] == "none"]
    assert (ok["hd95_mm"] >= 0).all() and ok["nsd"].between(0, 1).all()
    assert np.allclose(surface["spacing_d"], 3.0) and np.allclose(surface["spacing_h"], 0.6 * 40 / 32)
    assert (finished["exp"] / "records" / "surface.parquet").exists()


def test_a_damaged_surface_part_names_the_file_and_the_fix(tmp_path):
    _write_records(tmp_path)
    part = tmp_path / "records" / "surface" / "unet_r18-lr0.001-s3-ep1.parquet"
    part.write_bytes(b"not parquet")
    with pytest.raises(records.RecordsError, match=r"s3-ep1.parquet is damaged.*oodsweep resume .*trains that member"):
        records.load_surface(tmp_path)


def test_an_imported_pool_gets_surface_records(perfect, tiny_data, tiny_cache, tmp_path):
    """``oodsweep import`` of predictions equal to the ground truth: HD95 0 mm and NSD 1 on every scored case."""
    spec, _ = _import(tmp_path, perfect, tiny_data, tiny_cache)
    surface = records.load_surface(spec.experiment_dir)
    _, slices = records.load_records(spec.experiment_dir)
    assert set(surface["member_id"]) == {"m1", "m2"} and set(surface["role"]) == {"id", "ood"}
    assert len(surface) == len(slices[slices["role"] != "val"].drop_duplicates(["member_id", "site", "case_id"]))
    assert (surface["hd95_mm"] == 0).all() and (surface["nsd"] == 1).all() and (surface["empty"] == "none").all()
