"""One tiny sweep end to end on an nnU-Net dataset with a site map: 2 image channels, a union label,
one pool member for one epoch, the δ stage and the analysis, through the real CLI on a local Ray."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import run_cli
from test_layouts_own import write_nnunet

pytestmark = pytest.mark.integration


def test_nnunet_sweep_end_to_end(tmp_path):
    ds = write_nnunet(tmp_path, n=8)
    spec = {"name": "own", "storage": str(tmp_path / "runs"),
            "data": {"layout": "nnunet", "root": str(ds), "sites_from": str(tmp_path / "cases.csv"),
                     "labels": {"whole_prostate": ["PZ", "TZ"]}, "source": "A", "targets": ["B"],
                     "image_size": 32, "test_fraction": 0.25},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]},
                     "seed": {"grid": [0]}, "batch_size": 4, "resources": {"cpu": 1}},
            "uncertainty": {"epochs": 1, "lr": 1e-3, "passes": 2, "batch_size": 4, "resources": {"cpu": 0.5},
                            "baselines": [], "bayescap": {"width": 8, "blocks": 1}},
            "analysis": {"metric": "iou_3d"}}
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(spec))
    check = run_cli("data", "check", str(ds), "--layout", "nnunet", "--sites-from", str(tmp_path / "cases.csv"))
    assert check.returncode == 0 and "site A: 4 cases" in check.stdout, check.stdout + check.stderr
    assert "channels: ['T2', 'ADC']; labels: ['PZ', 'TZ'] (exclusive" in check.stdout, check.stdout
    proc = run_cli("run", str(path), "--num-cpus", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    exp = tmp_path / "runs" / "own"
    members = pd.read_parquet(exp / "records" / "members.parquet")
    slices = pd.read_parquet(exp / "records" / "slices.parquet")
    assert len(members) == 1 and set(slices["site"]) == {"A", "B"}
    assert set(pd.read_parquet(exp / "records" / "uncertainty.parquet")["member_id"]) == set(members["member_id"])
    assert (exp / "analysis").is_dir()
    caches = list((tmp_path / "runs" / ".cache" / "slices").glob("nnunet-32-*/manifest.json"))
    manifest = json.loads(caches[0].read_text())
    assert manifest["labels"] == ["whole_prostate"] and manifest["label_kind"] == "exclusive"
    assert manifest["counts"]["A/train"]["cases"] + manifest["counts"]["A/test"]["cases"] == 4
