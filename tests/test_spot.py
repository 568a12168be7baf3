"""Spot instances: a trial whose node is preempted mid-training resumes, on the node that replaces it, from
its last ``pool.checkpoint_every`` checkpoint (not from its first epoch nor from a snapshot), and its records
equal those of an uninterrupted run; the defaults (``max_failures``, ``checkpoint_every``) are the spot-safe
ones; a trial that fails on every attempt leaves the others to finish and the driver names its members."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import OODSWEEP
from helpers import wait_for

from sweeps.interrupts import descendants
from trainables import records


def _spec(tmp_path: Path, data: Path, **pool) -> Path:
    spec = {"name": "spot", "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(data), "source": "SiteA",
                     "targets": ["SiteB"], "image_size": 32, "test_fraction": 0.25},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [4]},
                     "seed": {"grid": [0]}, "batch_size": 4, "resources": {"cpu": 1}, **pool},
            "analysis": {"metric": "iou_3d", "indicators": ["id_performance"]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ------------------------------------------------------------------ unit: the checkpoint epochs and the defaults

def test_a_pool_run_checkpoints_at_snapshots_and_every_checkpoint_every_epochs():
    from trainables.config import MemberConfig
    from trainables.member import PoolRun

    base = {"arch": "unet_r18", "lr": 1e-3, "seed": 0, "cache": "c", "source": "A", "targets": ["B"],
            "experiment_dir": "/x", "snapshots": [10, 20, 40]}
    run = PoolRun(MemberConfig.from_dict(base))
    assert MemberConfig.default("checkpoint_every") == 5
    assert [e for e in range(1, 41) if run.checkpoint(e)] == [5, 10, 15, 20, 25, 30, 35, 40]
    run = PoolRun(MemberConfig.from_dict({**base, "checkpoint_every": 3, "snapshots": [4, 7]}))
    assert [e for e in range(1, 8) if run.checkpoint(e)] == [3, 4, 6, 7]
    with pytest.raises(ValueError, match=r"MemberConfig: checkpoint_every must be an integer >= 1, got 0"):
        MemberConfig.from_dict({**base, "checkpoint_every": 0})


def test_spec_defaults_survive_preemption_and_bad_values_name_the_key(tmp_path, tiny_data):
    from sweeps.pool import param_space
    from sweeps.spec import SpecError, load_spec

    spec = load_spec(_spec(tmp_path, tiny_data))
    assert (spec.pool.max_failures, spec.pool.checkpoint_every) == (3, 5)
    assert spec.uncertainty is None or spec.uncertainty.max_failures == 3
    assert param_space(spec, tmp_path)["checkpoint_every"] == 5
    assert load_spec(_spec(tmp_path, tiny_data, checkpoint_every=2, max_failures=0)).pool.checkpoint_every == 2
    with pytest.raises(SpecError, match=r"pool\.checkpoint_every.*0"):
        load_spec(_spec(tmp_path, tiny_data, checkpoint_every=0))


# ------------------------------------------------------------------ integration: preemption on a two-node cluster

def _checkpointed_epochs(exp: Path) -> list[int]:
    """The epochs whose result the driver has taken together with a checkpoint (Tune's result.json)."""
    out = []
    for res in (exp / "pool").glob("*/result.json"):
        for line in res.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # a line being written
                continue
            if r.get("checkpoint_dir_name"):
                out.append(int(r["epoch"]))
    return out


@pytest.mark.integration
def test_a_preempted_trial_resumes_from_its_last_checkpoint_on_a_new_node(tmp_path, tiny_data):
    from ray.cluster_utils import Cluster

    # the head runs no trial (as cluster.yaml's): the one trial runs on the spot worker; snapshots [4] and
    # checkpoint_every 1: without the checkpoints between snapshots the trial would start again from epoch 0
    spec = _spec(tmp_path, tiny_data, checkpoint_every=1)
    exp = tmp_path / "runs" / "spot"
    # the lost node is found dead after 2 missed health checks 0.5 s apart (Ray's defaults: 5, 3 s apart)
    fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": fast})
    spot = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    proc = None
    try:
        log = (tmp_path / "run.log").open("w")
        proc = subprocess.Popen(OODSWEEP + ["run", str(spec), "--address", cluster.address], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: any(e >= 1 for e in _checkpointed_epochs(exp)), proc, "the first checkpoint", poll=0.05)
        # preempted: the node goes away with every process on it, and the autoscaler brings a new one
        doomed = [d for p in spot.all_processes.get("raylet", []) for d in descendants(p.process.pid)]
        cluster.remove_node(spot, allow_graceful=False)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        last = max(_checkpointed_epochs(exp))
        cluster.add_node(num_cpus=1)
        assert proc.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
    att = records.load_attempts(exp)
    assert len(att) == 2 and att["start_epoch"].iloc[0] == 0, att
    # restarted from the last checkpoint the driver had taken (or the one it was taking at the kill), an
    # epoch between snapshots: from checkpoint_every's checkpoints
    assert last < 4 and att["start_epoch"].iloc[1] in (last, last + 1) and att["start_epoch"].iloc[1] < 4, (last, att)
    members, slices = records.load_records(exp)
    assert members["member_id"].tolist() == ["unet_r18-lr0.001-s0-ep4"]

    # the same run uninterrupted (in this process, from the trial's own config): the same records
    from trainables.segment import train_segmenter

    params = json.loads(next((exp / "pool").glob("*/params.json")).read_text())
    ref = tmp_path / "uninterrupted"
    train_segmenter({**params, "experiment_dir": str(ref)})
    ref_members, ref_slices = records.load_records(ref)
    key = ["member_id", "site", "case_id", "slice_idx"]
    pd.testing.assert_frame_equal(slices.sort_values(key).reset_index(drop=True),
                                  ref_slices.sort_values(key).reset_index(drop=True))
    got = torch.load(records.resolve_checkpoint(exp, members["checkpoint"].iloc[0]), weights_only=True)["model"]
    want = torch.load(records.resolve_checkpoint(ref, ref_members["checkpoint"].iloc[0]), weights_only=True)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_trial_that_fails_every_attempt_leaves_the_others_and_the_driver_names_its_members(
        tmp_path, tiny_data, tiny_cache, tiny_member, monkeypatch):
    """The pool stage after Tune gave up on one of two trials (its max_failures spent) and finished the other
    (the session's trained run, its records copied in): the error names the failed trial and the members
    still missing, and only those. Tune itself is replaced by what it returned; no Ray starts."""
    from types import SimpleNamespace

    from helpers import copy_experiment
    from sweeps import driver, embeddings, interrupts, pool
    from sweeps.spec import load_spec
    from sweeps.tracking import Tracker

    path = tmp_path / "spec.yaml"
    raw = yaml.safe_load(_spec(tmp_path, tiny_data).read_text())
    raw["data"]["targets"] = ["SiteB", "SiteC"]  # the session's run's
    raw["pool"].update({"lr": {"grid": [1e-3, 1e-2]}, "epochs": {"snapshots": [1, 2]}})
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    copy_experiment(tiny_member["exp"], spec.experiment_dir)
    failed = spec.experiment_dir / "pool" / "unet_r18-lr0.01-s0-E2-0001"
    results = [SimpleNamespace(error=None, path=str(spec.experiment_dir / "pool" / "unet_r18-lr0.001-s0-E2-0000")),
               SimpleNamespace(error=RuntimeError("Traceback ...\nRuntimeError: the node died"), path=str(failed))]
    monkeypatch.setattr(driver, "_init_ray", lambda *a: None)
    monkeypatch.setattr(embeddings, "precompute_embeddings", lambda *a: None)
    monkeypatch.setattr(pool, "build_tuner", lambda *a: None)
    monkeypatch.setattr(interrupts, "tune_fit", lambda tuner: results)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "spot")
    try:
        with pytest.raises(RuntimeError) as e:
            driver.run_pool_stage(spec, tiny_cache, tracker)
    finally:
        tracker.close()
    msg = str(e.value)
    assert msg.startswith("1 pool trial(s) failed, each after 3 restart(s) (pool.max_failures); the other trials "
                          "ran to the end and their members are kept. Members missing: "
                          "unet_r18-lr0.01-s0-ep1, unet_r18-lr0.01-s0-ep2. "), msg
    assert f"{failed}: RuntimeError: the node died" in msg and "oodsweep resume" in msg
    assert not (spec.experiment_dir / "pool" / ".oodsweep-done").exists()
