"""A lab's own datasets end to end, each through a tiny sweep (pool of one member for one epoch, the δ stage, the
analysis) on one local Ray started once for the module:

* an nnU-Net v2 folder with a site map: 2 image channels (T2, ADC) and 2 mutually exclusive labels (PZ, TZ),
  trained with a softmax over background + classes; per-label slice and surface records, ``analyze --label all``;
* a Medical Segmentation Decathlon folder (4D images, channels on the 4th axis) with a site map;
* a 2D PNG folder (``folder2d``), scored in 2D.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from test_layouts_own import write_decathlon, write_folder2d, write_nnunet

pytestmark = pytest.mark.integration

POOL = {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]}, "seed": {"grid": [0]},
        "batch_size": 4, "resources": {"cpu": 1}}
DELTA = {"epochs": 1, "lr": 1e-3, "passes": 2, "batch_size": 4, "resources": {"cpu": 0.5},
         "baselines": ["tta_color"]}


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray (2 CPUs) for the module's three sweeps: a Ray start each would double the module's time."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def _sweep(tmp_path, name: str, data: dict, address: str):
    import ray

    from sweeps.driver import run_sweep
    from sweeps.spec import parse_spec

    spec = parse_spec({"name": name, "storage": str(tmp_path / "runs"),
                       "data": {"image_size": 32, "test_fraction": 0.25, **data},
                       "pool": POOL, "uncertainty": DELTA, "analysis": {"metric": "iou_3d"}})
    try:
        run_sweep(spec, address=address)
    finally:
        ray.shutdown()
    exp = tmp_path / "runs" / name
    members = pd.read_parquet(exp / "records" / "members.parquet")
    slices = pd.read_parquet(exp / "records" / "slices.parquet")
    from trainables import records

    surface = records.load_surface(exp)  # merged from the members' parts
    unc = pd.read_parquet(exp / "records" / "uncertainty.parquet")
    assert len(members) == 1 and set(unc["member_id"]) == set(members["member_id"])
    assert set(unc["method"]) == {"ggd", "tta_color"}
    assert (exp / "analysis" / "table4.csv").is_file()
    return exp, slices, surface


def test_nnunet_two_channels_two_exclusive_labels(tmp_path, ray_address):
    import torch

    from trainables import records

    ds = write_nnunet(tmp_path, n=8)
    check = run_cli("data", "check", str(ds), "--layout", "nnunet", "--sites-from", str(tmp_path / "cases.csv"))
    assert check.returncode == 0 and "site A: 4 cases" in check.stdout, check.stdout + check.stderr
    assert "channels: ['T2', 'ADC']; labels: ['PZ', 'TZ'] (exclusive" in check.stdout, check.stdout
    exp, slices, surface = _sweep(tmp_path, "own", {"layout": "nnunet", "root": str(ds), "source": "A",
                                                    "targets": ["B"], "sites_from": str(tmp_path / "cases.csv")},
                                  ray_address)
    manifest = json.loads(next((tmp_path / "runs" / ".cache" / "slices").glob("nnunet-32-*/manifest.json"))
                          .read_text())
    assert manifest["labels"] == ["PZ", "TZ"] and manifest["label_kind"] == "exclusive"
    assert manifest["counts"]["A/train"]["cases"] + manifest["counts"]["A/test"]["cases"] == 4
    members, _ = records.load_records(exp)
    state = torch.load(exp / members["checkpoint"].iloc[0], weights_only=True)
    assert (state["label_kind"], state["classes"], state["in_channels"]) == ("exclusive", 3, 2)
    pred, _, _ = records.load_predictions(exp / "records" / "predictions" / members["member_id"].iloc[0] / "B.npz")
    assert pred.shape[1] == 2 and not (pred.sum(1) > 1).any()  # softmax classes never overlap
    # per label: slice counts and surface metrics (HD95 in mm at the cache grid's spacing, NSD in [0, 1])
    assert set(slices["label"]) == {"PZ", "TZ"} and set(surface["label"]) == {"PZ", "TZ"}
    assert set(surface["site"]) == {"A", "B"} and surface["nsd"].dropna().between(0, 1).all()
    assert (surface["hd95_mm"].dropna() >= 0).all() and (surface["spacing_d"] == 3.0).all()
    assert (exp / "analysis" / "table1_per_label.csv").is_file()
    proc = run_cli("analyze", str(exp), "--label", "all", "--metric", "nsd", "--no-mlflow", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for label in ("PZ", "TZ"):
        assert (exp / "analysis" / "per_label" / label / "performance.csv").is_file()


def test_decathlon_4d_images_with_a_site_map(tmp_path, ray_address):
    ds = write_decathlon(tmp_path, n=6)
    rows = ["case_id,site"] + [f"prostate_{k:02d},{'A' if k < 3 else 'B'}" for k in range(6)]
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    _, slices, surface = _sweep(tmp_path, "msd", {"layout": "decathlon", "root": str(ds), "source": "A",
                                                  "targets": ["B"], "sites_from": str(tmp_path / "cases.csv"),
                                                  "labels": {"whole": ["PZ", "TZ"]}}, ray_address)
    assert set(slices["site"]) == {"A", "B"} and set(surface["label"]) == {"whole"}
    assert np.isfinite(surface["hd95_mm"]).any()


def test_folder2d_png_sites(tmp_path, ray_address):
    root = write_folder2d(tmp_path / "png", n=4)
    _, slices, surface = _sweep(tmp_path, "png", {"layout": "folder2d", "root": str(root), "source": "S1",
                                                  "targets": ["S2"]}, ray_address)
    assert set(slices["site"]) == {"S1", "S2"} and (slices["slice_idx"] == 0).all()  # a photograph is one slice
    assert not surface.duplicated(["site", "case_id"]).any() and (surface["spacing_d"] == 1.0).all()
