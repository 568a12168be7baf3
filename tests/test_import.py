"""`oodsweep import`: a pool trained outside oodsweep (a plain PyTorch loop here, predictions written with nibabel)
becomes an experiment folder whose records equal what its masks say; δ is fitted on Ray from the stored
predictions; bad inputs are errors naming the member, site, case and file."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import SITES, run_cli

SIDE, GRID = 40, 32  # the tiny data's native in-plane size and the cache's (conftest: 40 x 40 x 8 -> 32)


# --- a pool trained elsewhere -------------------------------------------------------------------------------

def _volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _slices(root: Path, site: str) -> tuple[np.ndarray, np.ndarray]:
    """Every slice of a site, min-max scaled per volume (the outside lab's own preprocessing): N x 1 x 40 x 40."""
    xs, ys = [], []
    for f in sorted((root / site).glob("Case??.nii.gz")):
        x, _ = _volume(f)
        y, _ = _volume(f.with_name(f.name.replace(".nii.gz", "_segmentation.nii.gz")))
        x = (x - x.min()) / (x.max() - x.min())
        xs.append(np.moveaxis(x, -1, 0)[:, None])
        ys.append(np.moveaxis(y > 0, -1, 0)[:, None])
    return np.concatenate(xs), np.concatenate(ys).astype(np.float32)


def train_outside(root: Path, out: Path) -> Path:
    """A pool of 4 members trained with plain PyTorch (2 seeds x snapshots after 20 and 30 Adam steps of a
    3-layer conv net, BCE weighted for the small foreground), each predicting every case of every site, written
    as NIfTI on the ground truth's grid with its affine: ``out/<member>/<site>/<case>.nii.gz``. Returns the
    members table."""
    import nibabel as nib
    import torch

    x, y = (torch.from_numpy(a) for a in _slices(root, "SiteA"))
    pos_weight = (1 - y.mean()) / y.mean()  # unweighted, 2.5% foreground: every member predicted nothing
    rows = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 5, padding=2))
        opt = torch.optim.Adam(net.parameters(), lr=0.02)
        for step in range(1, 31):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(net(x), y, pos_weight=pos_weight).backward()
            opt.step()
            if step not in (20, 30):
                continue
            mid = f"cnn-s{seed}-step{step}"
            rows.append({"member_id": mid, "run_id": f"cnn-s{seed}", "arch": "tiny_cnn", "lr": 0.05, "epochs": step,
                         "seed": seed, "oracle_prompt": "false"})
            for site in SITES:
                for f in sorted((root / site).glob("Case??.nii.gz")):
                    v, affine = _volume(f)
                    v = (v - v.min()) / (v.max() - v.min())
                    with torch.no_grad():
                        p = net(torch.from_numpy(np.moveaxis(v, -1, 0)[:, None])) > 0
                    mask = np.moveaxis(p[:, 0].numpy(), 0, -1).astype(np.uint8)
                    dst = out / mid / site / f.name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    nib.save(nib.Nifti1Image(mask, affine), str(dst))
    table = out.parent / "members.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def import_spec(tmp: Path, data: Path, cache: Path, members: Path, predictions: Path, **kw) -> Path:
    raw = {"name": "outside", "storage": str(tmp / "runs"),
           "data": {"layout": "prostate_multisite", "root": str(data), "source": "SiteA", "targets": ["SiteB", "SiteC"],
                    "image_size": GRID, "test_fraction": 0.25, "cache_dir": str(Path(cache).parent)},
           "imported": {"members": str(members), "predictions": str(predictions)},
           "uncertainty": {"epochs": 1, "lr": 1e-3, "batch_size": 4, "bayescap": {"width": 8, "blocks": 1},
                           "resources": {"cpu": 0.5}},
           "analysis": {"metric": "iou_3d"}, **kw}
    path = tmp / "import.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def counts_from_masks(pred_file: Path, truth_file: Path) -> np.ndarray:
    """tp, fp, fn, tn per slice of a case, from the NIfTI files alone: both on the 32 x 32 grid by nearest
    neighbour written out here (pixel i of the grid takes pixel floor(i * 40 / 32)), D x 4."""
    pick = np.floor(np.arange(GRID) * SIDE / GRID).astype(int)
    p = _volume(pred_file)[0][np.ix_(pick, pick)] > 0
    t = _volume(truth_file)[0][np.ix_(pick, pick)] > 0
    tp, fp, fn = (p & t).sum((0, 1)), (p & ~t).sum((0, 1)), (~p & t).sum((0, 1))
    return np.stack([tp, fp, fn, GRID * GRID - tp - fp - fn], axis=1)


@pytest.fixture(scope="module")
def outside(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("outside")
    table = train_outside(tiny_data, tmp / "preds")
    return tmp, table, tmp / "preds"


@pytest.mark.integration
def test_imported_pool_records_delta_and_analysis(outside, tiny_data, tiny_cache, tmp_path):
    from sweeps.cli import main
    from sweeps.status import experiment_status
    from trainables import records
    from trainables.data.cache import open_slice_cache

    _, table, preds = outside
    spec = import_spec(tmp_path, tiny_data, tiny_cache, table, preds)
    proc = run_cli("import", str(spec), "--num-cpus", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    exp = tmp_path / "runs" / "outside"
    members, slices = records.load_records(exp)
    assert sorted(members["member_id"]) == sorted(pd.read_csv(table)["member_id"])
    assert members["imported"].all() and (members["checkpoint"] == "").all()
    assert set(members["arch"]) == {"tiny_cnn"} and members["run_id"].nunique() == 2

    # every per-slice count equals the one computed from the written masks (and the cache's own ground truth
    # equals the grid written out in counts_from_masks: the check does not lean on the import's resampling)
    cache = open_slice_cache(tiny_cache)
    scored = slices[slices["role"].isin(["id", "ood", "val"])]
    per_member = scored.groupby("member_id")[["tp", "fp", "fn"]].sum()
    assert (per_member > 0).all().all() and per_member.drop_duplicates().shape[0] == 4  # 4 different, non-empty
    assert set(scored["site"]) == set(SITES) and set(scored["role"]) == {"id", "ood", "val"}
    for (mid, site, case), g in scored.groupby(["member_id", "site", "case_id"]):
        g = g.sort_values("slice_idx")
        truth = tiny_data / site / f"{case}_segmentation.nii.gz"
        want = counts_from_masks(preds / mid / site / f"{case}.nii.gz", truth)
        np.testing.assert_array_equal(g[["tp", "fp", "fn", "tn"]].to_numpy(), want[g["slice_idx"].to_numpy()])
        rows = cache.rows(site)[(cache.index["case_id"].to_numpy()[cache.rows(site)] == case)]
        pick = np.floor(np.arange(GRID) * SIDE / GRID).astype(int)
        gt = np.moveaxis(_volume(truth)[0][np.ix_(pick, pick)] > 0, -1, 0)
        np.testing.assert_array_equal(np.asarray(cache.masks[rows], dtype=bool), gt)

    # δ from the stored predictions on the training split, on Ray; TTA and MC dropout skipped for these members
    unc = records.load_uncertainty(exp)
    assert set(unc["member_id"]) == set(members["member_id"])
    assert set(unc["method"]) == {"ggd", "bayescap"}
    fits = records.load_uncertainty_fits(exp)
    assert set(fits["fit_split"]) == {"train"} and (fits["fit_slices"] > 0).all()
    assert "imported members fitted on their stored predictions" in proc.stdout + proc.stderr

    st = experiment_status(exp)
    assert st["pool"]["state"] == "done" and st["pool"]["members_done"] == 4 and st["pool"]["runs_done"] == 2
    assert st["uncertainty"]["state"] == "done"
    assert main(["analyze", str(exp), "--no-mlflow"]) == 0
    tables = (exp / "analysis" / "tables.md").read_text()
    assert "were imported (predicted masks, no model)" in tables
    assert (exp / "analysis" / "claims.md").exists()
    perf = pd.read_csv(exp / "analysis" / "performance.csv")
    assert set(perf["member_id"]) == set(members["member_id"])
    assert main(["report", str(exp)]) == 0
    # MLflow: the pool run with a child run per imported member, as a trained pool has
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name("outside").experiment_id
    pool = client.search_runs([eid], filter_string="tags.`oodsweep.stage` = 'pool'")[0]
    runs = client.search_runs([eid], filter_string=f"tags.`mlflow.parentRunId` = '{pool.info.run_id}'")
    assert sorted(r.data.tags["oodsweep.member_id"] for r in runs) == sorted(members["member_id"])
    assert all("id_iou_3d" in r.data.metrics for r in runs)


# --- bad inputs (unit tier: no Ray; each error names the file or key) ------------------------------------------

@pytest.fixture(scope="module")
def perfect(tmp_path_factory, tiny_data):
    """Predictions that are the ground truth itself, for 2 members (files copied), and their members table."""
    tmp = tmp_path_factory.mktemp("perfect")
    for mid in ("m1", "m2"):
        for site in SITES:
            for f in sorted((tiny_data / site).glob("Case??_segmentation.nii.gz")):
                dst = tmp / "preds" / mid / site / f.name.replace("_segmentation", "")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dst)
    (tmp / "members.csv").write_text("member_id,run_id,arch,oracle_prompt\nm1,r1,a,false\nm2,r2,a,false\n")
    return tmp


def scored_case(cache_dir: Path, site: str) -> str:
    """A case of ``site``'s test split (scored as ID or OOD: its prediction is always read)."""
    from trainables.data.cache import open_slice_cache

    cache = open_slice_cache(cache_dir)
    return str(cache.index["case_id"].to_numpy()[cache.rows(site, "test")][0])


def _import(tmp: Path, perfect: Path, tiny_data, tiny_cache, preds: Path | None = None, members: Path | None = None):
    from sweeps.importer import import_pool
    from sweeps.spec import load_spec

    if preds is None:
        preds = tmp / "preds"
        shutil.copytree(perfect / "preds", preds)
    spec = import_spec(tmp, tiny_data, tiny_cache, members or perfect / "members.csv", preds)
    return import_pool(load_spec(spec), track=False), preds


def test_perfect_predictions_score_one(perfect, tiny_data, tiny_cache, tmp_path):
    from trainables import records

    spec, _ = _import(tmp_path, perfect, tiny_data, tiny_cache)
    _, slices = records.load_records(spec.experiment_dir)
    assert (slices["fp"] == 0).all() and (slices["fn"] == 0).all()
    assert set(records.metric_by(slices, "iou_3d")) == {1.0}
    assert spec.uncertainty.fit_split == "train"


def test_missing_case_names_member_site_case_and_file(perfect, tiny_data, tiny_cache, tmp_path):
    from trainables.data.base import DataError

    case = scored_case(tiny_cache, "SiteB")
    preds = tmp_path / "preds"
    shutil.copytree(perfect / "preds", preds)
    (preds / "m2" / "SiteB" / f"{case}.nii.gz").unlink()
    with pytest.raises(DataError, match=rf"member m2, site SiteB, case {case}: no prediction .*m2/SiteB/{case}"):
        _import(tmp_path, perfect, tiny_data, tiny_cache, preds=preds)


def test_prediction_of_another_shape(perfect, tiny_data, tiny_cache, tmp_path):
    from helpers import write_nifti
    from trainables.data.base import DataError

    preds = tmp_path / "preds"
    shutil.copytree(perfect / "preds", preds)
    case = scored_case(tiny_cache, "SiteC")
    bad = write_nifti(preds / "m1" / "SiteC" / f"{case}.nii.gz", np.zeros((32, 32, 8), np.uint8))
    with pytest.raises(DataError, match=rf"member m1, site SiteC, case {case}: {bad} has shape \(32, 32, 8\) but "
                                        rf".*shape \(40, 40, 8\)"):
        _import(tmp_path, perfect, tiny_data, tiny_cache, preds=preds)


def test_non_binary_and_reoriented_predictions(perfect, tiny_data, tiny_cache, tmp_path):
    import nibabel as nib

    from trainables.data.base import DataError

    preds = tmp_path / "preds"
    shutil.copytree(perfect / "preds", preds)
    case = scored_case(tiny_cache, "SiteA")
    f = preds / "m1" / "SiteA" / f"{case}.nii.gz"
    img = nib.load(str(f))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.float32) * 0.7, img.affine), str(f))
    with pytest.raises(DataError, match=rf"member m1, site SiteA, case {case}: .*{case}.nii.gz is not a binary mask"):
        _import(tmp_path, perfect, tiny_data, tiny_cache, preds=preds)
    flip = img.affine.copy()
    flip[0, 0] = -flip[0, 0]  # LAS instead of RAS: the arrays would not match voxel for voxel
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), flip), str(f))
    with pytest.raises(DataError, match=rf"member m1, site SiteA, case {case}: .*{case}.nii.gz: orientation LAS"):
        _import(tmp_path, perfect, tiny_data, tiny_cache, preds=preds)


def test_unknown_site_and_case(perfect, tiny_data, tiny_cache, tmp_path):
    from trainables.data.base import DataError

    preds = tmp_path / "preds"
    shutil.copytree(perfect / "preds", preds)
    (preds / "m1" / "SiteZ").mkdir()
    with pytest.raises(DataError, match=r"member m1: .*SiteZ is not a site of this experiment"):
        _import(tmp_path, perfect, tiny_data, tiny_cache, preds=preds)
    (preds / "m1" / "SiteZ").rmdir()
    shutil.copy(preds / "m1" / "SiteA" / "Case00.nii.gz", preds / "m1" / "SiteA" / "Case09.nii.gz")
    with pytest.raises(DataError, match=r"member m1, site SiteA: .*Case09.nii.gz: 'Case09' is not a case of site"):
        _import(tmp_path, perfect, tiny_data, tiny_cache, preds=preds)


def test_members_table_errors(tmp_path):
    from sweeps.import_table import read_members_table
    from sweeps.spec import SpecError

    t = tmp_path / "members.csv"
    t.write_text("member_id,run_id,arch,oracle_prompt\na,r1,x,false\nb,r1,x,false\na,r2,x,true\n")
    with pytest.raises(SpecError, match=rf"{t}: member_id 'a' is repeated \(lines \[2, 4\]\)"):
        read_members_table(t)
    t.write_text("member_id,run_id,arch\na,r1,x\n")
    with pytest.raises(SpecError, match=r"missing column\(s\) \['oracle_prompt'\]"):
        read_members_table(t)
    t.write_text("member_id,run_id,arch,oracle_prompt\na,r1,x,maybe\n")
    with pytest.raises(SpecError, match=r"row 2: oracle_prompt 'maybe' for member 'a'"):
        read_members_table(t)
    t.write_text("member_id,run_id,arch,oracle_prompt,lr\na/b,r1,x,no,\n")
    with pytest.raises(SpecError, match=r"member_id 'a/b' is not a usable id"):
        read_members_table(t)
    t.write_text("member_id,run_id,arch,oracle_prompt,lr,epochs\na,r1,x,no,,3\nb,r1,x,yes,1e-3,\n")
    df = read_members_table(t)
    assert df["lr"].tolist() == [0.0, 1e-3] and df["epochs"].tolist() == [3, 0]
    assert df["oracle_prompt"].tolist() == [False, True]


def test_spec_with_imported_section(perfect, tiny_data, tiny_cache, tmp_path):
    from sweeps.spec import SpecError, load_spec

    spec = load_spec(import_spec(tmp_path, tiny_data, tiny_cache, perfect / "members.csv", perfect / "preds"))
    assert spec.imported.member_ids == ("m1", "m2") and spec.n_runs() == 2 and spec.n_members() == 2
    with pytest.raises(SpecError, match=r"pool: a spec with an `imported:` section .* has no pool section"):
        load_spec(import_spec(tmp_path, tiny_data, tiny_cache, perfect / "members.csv", perfect / "preds",
                              pool={"arch": "unet_r18", "lr": 1e-3, "epochs": 1}))


def test_fit_split_falls_back_to_validation(perfect, tiny_data, tiny_cache, tmp_path):
    """Without the training split's predictions δ is fitted on the validation cases (written into the frozen spec);
    a spec that asks for the training split then gets an error naming the member."""
    from sweeps.experiment import load_experiment_spec
    from sweeps.importer import needed_cases
    from sweeps.spec import SpecError, load_spec
    from trainables import records
    from trainables.data.cache import open_slice_cache

    preds = tmp_path / "preds"
    shutil.copytree(perfect / "preds", preds)
    cache = open_slice_cache(tiny_cache)
    site, _, rows = needed_cases(load_spec(import_spec(tmp_path, tiny_data, tiny_cache, perfect / "members.csv",
                                                       preds)), cache)["train"]
    for case in set(cache.index["case_id"].to_numpy()[rows]):
        for mid in ("m1", "m2"):
            (preds / mid / site / f"{case}.nii.gz").unlink()
    spec, _ = _import(tmp_path, perfect, tiny_data, tiny_cache, preds=preds)
    assert spec.uncertainty.fit_split == "val"
    assert load_experiment_spec(spec.experiment_dir).uncertainty.fit_split == "val"
    assert records.predictions_path(spec.experiment_dir, "m1", "SiteA", "val").exists()
    assert not records.predictions_path(spec.experiment_dir, "m1", "SiteA", "train").exists()
    other = tmp_path / "other"
    other.mkdir()
    path = import_spec(other, tiny_data, tiny_cache, perfect / "members.csv", preds,
                       uncertainty={"epochs": 1, "fit_split": "train"})
    from sweeps.importer import import_pool

    with pytest.raises(SpecError, match=r"fit_split is 'train' but member m1 .* no predictions for the source's "
                                        r"training-split cases"):
        import_pool(load_spec(path), track=False)


def test_delta_space_reads_imported_members_from_their_predictions(tmp_path, monkeypatch):
    """An imported member's δ trial: ŷ from its stored predictions, no checkpoint, only the baselines on ŷ; a
    trained member's point is as before (its checkpoint, every baseline, ŷ from its model)."""
    from sweeps import cluster
    from sweeps.spec import parse_spec
    from sweeps.uncertainty import param_space
    from trainables.uncertainty.config import DeltaConfig

    monkeypatch.setattr(cluster, "capacity", lambda: {"CPU": 2.0, "GPU": 0.0})
    spec = parse_spec({"name": "x", "storage": str(tmp_path), "data": {"layout": "prostate_multisite",
                       "root": str(tmp_path), "source": "SiteA", "targets": ["SiteB"]},
                       "pool": {"arch": "unet_r18", "lr": 1e-3, "epochs": 1}, "uncertainty": {"epochs": 1}})
    space = param_space(spec, tmp_path / "cache", ["a", "b"], {"a": "a.pt", "b": "b.pt"}, {"a", "b"}, stored={"b"})
    fixed = {k: v for k, v in space.items() if k not in ("group", "_train")}
    cfgs = {p["member_id"]: DeltaConfig.from_dict({**fixed, **p}) for g in space["group"]["grid_search"]
            for p in g["members"]}
    assert (cfgs["a"].yhat, cfgs["a"].checkpoint, cfgs["a"].baselines) == ("model", "a.pt", spec.uncertainty.baselines)
    assert (cfgs["b"].yhat, cfgs["b"].checkpoint, cfgs["b"].baselines) == ("stored", "", ("bayescap",))


def test_stored_predictions_refuse_model_baselines(perfect, tiny_data, tiny_cache, tmp_path):
    """δ from stored predictions without Ray: ŷ is the stored mask (here the ground truth, so δ's error area is 0);
    a baseline that needs the model is refused, naming the member."""
    from trainables import records
    from trainables.uncertainty import fit_uncertainty

    spec, _ = _import(tmp_path, perfect, tiny_data, tiny_cache)
    cfg = {"member_id": "m1", "checkpoint": "", "yhat": "stored", "cache": str(tiny_cache), "source": "SiteA",
           "targets": ["SiteB", "SiteC"], "experiment_dir": str(spec.experiment_dir), "epochs": 1, "batch_size": 4,
           "num_threads": 1}
    with pytest.raises(ValueError, match=r"pool member m1 has no model .* \['tta_noise'\] need one"):
        fit_uncertainty({**cfg, "baselines": ["tta_noise"]})
    fit_uncertainty({**cfg, "baselines": [], "width": 4})
    unc = records.load_uncertainty(spec.experiment_dir)
    assert set(unc["method"]) == {"ggd"} and (unc["error_px"] == 0).all()


def test_png_predictions_of_photographs(tmp_path):
    """2D data: a PNG per case (IDRiD source, FGADR target, one lesion type); masks equal to the ground truth score
    perfectly, a PNG that is not binary is refused naming the file."""
    from PIL import Image

    from sweeps.importer import import_pool
    from sweeps.spec import parse_spec
    from test_datasets import LESIONS, write_fgadr, write_idrid
    from trainables import records
    from trainables.data.base import DataError

    truth = {"IDRiD": write_idrid(tmp_path / "IDRiD"), "FGADR": write_fgadr(tmp_path / "FGADR")}
    ex = LESIONS.index("EX")
    for site, cases in truth.items():
        for case, m in cases.items():
            (tmp_path / "preds" / "m1" / site).mkdir(parents=True, exist_ok=True)
            Image.fromarray(m[..., ex]).save(tmp_path / "preds" / "m1" / site / f"{case}.png")
    (tmp_path / "members.csv").write_text("member_id,run_id,arch,oracle_prompt\nm1,r1,a,false\n")
    raw = {"name": "fundus", "storage": str(tmp_path / "runs"),
           "data": {"sites": {"IDRiD": {"layout": "idrid", "root": str(tmp_path / "IDRiD")},
                              "FGADR": {"layout": "fgadr", "root": str(tmp_path / "FGADR")}},
                    "source": "IDRiD", "targets": ["FGADR"], "lesions": ["EX"], "image_size": 16,
                    "val_fraction": 0, "cache_dir": str(tmp_path / "cache")},
           "imported": {"members": str(tmp_path / "members.csv"), "predictions": str(tmp_path / "preds")}}
    spec = import_pool(parse_spec(raw), track=False)
    _, slices = records.load_records(spec.experiment_dir)
    assert set(slices["site"]) == {"IDRiD", "FGADR"} and (slices["fp"] + slices["fn"] == 0).all()
    assert slices["tp"].sum() > 0
    bad = tmp_path / "preds" / "m1" / "IDRiD" / "IDRiD_04.png"
    Image.fromarray((truth["IDRiD"]["IDRiD_04"][..., ex] * 200).astype(np.uint8)).save(bad)
    with pytest.raises(DataError, match=rf"member m1, site IDRiD, case IDRiD_04: {bad} is not a binary mask"):
        import_pool(parse_spec({**raw, "name": "fundus2"}), track=False)


def test_cli_refuses_a_duplicate_member_id(perfect, tiny_data, tiny_cache, tmp_path, capsys):
    """Through the command line: a members table with a repeated id stops `oodsweep import` before anything is
    written, with the file and the id (exit 2, as every invalid spec)."""
    from sweeps.cli import main

    table = tmp_path / "dup.csv"
    table.write_text("member_id,run_id,arch,oracle_prompt\nm1,r1,a,false\nm1,r2,a,false\n")
    spec = import_spec(tmp_path, tiny_data, tiny_cache, perfect / "members.csv", perfect / "preds")
    assert main(["import", str(spec), "--members", str(table)]) == 2
    err = capsys.readouterr().err
    assert f"imported.members: {table}: member_id 'm1' is repeated (lines [2, 3])" in err
    assert not (tmp_path / "runs").exists()
