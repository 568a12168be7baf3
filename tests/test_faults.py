"""Faults during a sweep: a two-node cluster (``ray.cluster_utils.Cluster``) that loses its worker node
finishes on the head. (A trial's process killed mid-training, resumed from its last checkpoint:
tests/test_interrupts.py, test_ctrl_c_twice_kill_and_resume_from_checkpoint, whose 10-epoch run has room for it.)"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import OODSWEEP
from helpers import wait_for

from trainables import records
from sweeps.interrupts import descendants

pytestmark = pytest.mark.integration


def _pool_spec(tmp_path: Path, data: Path, archs: list[str], snapshots: list[int]) -> Path:
    spec = {"name": "faults", "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(data), "source": "SiteA",
                     "targets": ["SiteB"], "image_size": 32, "test_fraction": 0.25},
            "pool": {"arch": {"grid": archs}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": snapshots},
                     "seed": {"grid": [0]}, "batch_size": 4, "resources": {"cpu": 1}, "max_failures": 2},
            "analysis": {"metric": "iou_3d", "indicators": ["id_performance"]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _check_pool(exp: Path, runs: int, snapshots: list[int]) -> pd.DataFrame:
    members, slices = records.load_records(exp)
    assert len(members) == runs * len(snapshots) and not members["member_id"].duplicated().any()
    assert not slices.duplicated(["member_id", "site", "case_id", "slice_idx"]).any()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    all_runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    children = [r.info.run_name for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(children) == sorted(members["member_id"])  # a restarted trial reuses its MLflow runs
    return records.load_attempts(exp)


def test_cluster_loses_its_worker_node(tmp_path, tiny_data):
    from ray.cluster_utils import Cluster

    # 8 epochs: on an idle machine 2 epochs of this tiny task took ~1 s, so the node was removed after
    # both trials had finished and nothing was lost
    snapshots = [1, 8]
    spec = _pool_spec(tmp_path, tiny_data, ["unet_r18", "unet_effb0"], snapshots)
    exp = tmp_path / "runs" / "faults"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    proc = None
    try:
        log = (tmp_path / "run.log").open("w")
        proc = subprocess.Popen(OODSWEEP + ["run", str(spec), "--address", cluster.address], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        # two trials on two 1-CPU nodes: one runs on the worker node; take the node away mid-training
        wait_for(lambda: len(records.load_attempts(exp)) >= 2, proc, "both trials to start")
        time.sleep(1.0)
        # A lost node takes every process on it along: remove_node kills its raylet and stores, and its
        # worker processes (the trial's among them) are killed here, as a machine that goes away would
        doomed = [d for p in worker.all_processes.get("raylet", []) for d in descendants(p.process.pid)]
        cluster.remove_node(worker, allow_graceful=False)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert proc.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-4000:]
        out = (tmp_path / "run.log").read_text()
        assert "connecting to the Ray cluster" in out
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
    att = _check_pool(exp, 2, snapshots)
    assert len(att) == 3, att  # the trial that lost its node started once more, on the head
    assert att.groupby("run").size().sort_values().tolist() == [1, 2]
