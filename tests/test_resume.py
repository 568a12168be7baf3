"""Sweeps survive interruption: the driver SIGKILLed during the pool stage, between the stages and
during the uncertainty stage; `oodsweep resume` continues each time, retrains nothing finished, loses
and duplicates no record, keeps one MLflow child run per trial, and ends with the records of the
uninterrupted run (the session's `finished` sweep, same spec and seeds).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import OODSWEEP, run_cli, tiny_spec
from test_determinism import assert_same_records

from trainables import records

pytestmark = pytest.mark.integration


def _start(*args, log: Path) -> subprocess.Popen:
    # its own session: the kill takes the driver and the local Ray it started, as a closed laptop would
    return subprocess.Popen(OODSWEEP + list(args), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 400) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended (rc {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing of that driver's session may live on and keep writing into the experiment
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)


def _member_parts(exp: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (exp / "records" / "parts").glob("*.member.json")}


def _unc_parts(exp: Path) -> dict[str, int]:
    d = exp / "records" / "uncertainty" / "parts"
    return {p.stem: p.stat().st_mtime_ns for p in d.glob("*.parquet")} if d.is_dir() else {}


def test_killed_driver_resumes_without_retraining(finished, tmp_path, tiny_data):
    spec = tiny_spec(tmp_path / "runs", tiny_data)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    exp = tmp_path / "runs" / "tiny"
    pool_done = exp / "pool" / ".oodsweep-done"
    unc_done = exp / "uncertainty" / ".oodsweep-done"

    # 1. killed during the pool stage: after the first member, before the stage ends
    p = _start("run", str(path), "--num-cpus", "2", log=tmp_path / "run1.log")
    _kill_when(p, lambda: len(_member_parts(exp)) >= 1 and not pool_done.exists(), "the first pool member")
    assert not pool_done.exists(), "the pool finished before the kill; the test did not interrupt it"
    kept1 = _member_parts(exp)
    finished_runs = {m.split("-ep")[0] for m in kept1 if m.endswith("-ep2.member.json")}
    st = run_cli("status", str(exp))
    assert st.returncode == 0 and "interrupted" in st.stdout and "oodsweep resume" in st.stdout, st.stdout

    # 2. resumed, then killed between the stages: as soon as the pool is marked done
    p = _start("resume", str(exp), "--num-cpus", "2", log=tmp_path / "run2.log")
    _kill_when(p, pool_done.exists, "the end of the pool stage")
    assert len(_unc_parts(exp)) == 0
    for name, mtime in kept1.items():  # the runs finished before the kill were not trained again
        if name.split("-ep")[0] in finished_runs:
            assert _member_parts(exp)[name] == mtime, f"{name} was written again after the resume"

    # 3. resumed, then killed during the uncertainty stage, after the first scored member
    p = _start("resume", str(exp), "--num-cpus", "2", log=tmp_path / "run3.log")
    _kill_when(p, lambda: len(_unc_parts(exp)) >= 1 and not unc_done.exists(), "the first δ member")
    scored = _unc_parts(exp)

    # 4. resumed to the end
    proc = run_cli("resume", str(exp), "--num-cpus", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pool stage already done" in proc.stdout
    for name, mtime in scored.items():
        assert _unc_parts(exp)[name] == mtime, f"δ of {name} was fitted again after the resume"

    # training starts: a run that had finished before a kill never started again
    att = records.load_attempts(exp)
    pool_att = att[att["stage"] == "pool"]
    for run in finished_runs:
        assert (pool_att["run"].str.startswith(run)).sum() == 1, pool_att
    assert set(pool_att["run"]) == {"unet_r18-lr0.001-s0-E2", "unet_effb0-lr0.001-s0-E2"}
    unc_att = att[att["stage"] == "uncertainty"]
    for mid in scored:
        assert (unc_att["run"] == mid).sum() == 1, unc_att
    assert set(unc_att["run"]) == set(_unc_parts(exp))

    # the records equal the uninterrupted run's, bit for bit (tests/test_determinism.py), no row lost or
    # duplicated. δ trains one epoch here, so no δ fit resumes between epochs (where its bfloat16 Adam
    # moments would make it differ in the last bits: trainables.uncertainty.compact_optimizer_state)
    ref = finished["exp"]
    for name, keys in (("members.parquet", ["member_id"]), ("slices.parquet", ["member_id", "site", "role",
                                                                                 "case_id", "slice_idx"])):
        assert not pd.read_parquet(exp / "records" / name).duplicated(keys).any(), name
    assert_same_records(ref, exp)

    # MLflow: one parent per stage, one child per pool member and per δ trial, none left running
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    stages = [r.data.tags["oodsweep.stage"] for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(stages) == ["analysis", "pool", "uncertainty"]
    parents = {r.info.run_id: r.data.tags["oodsweep.stage"] for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = [(parents[r.data.tags["mlflow.parentRunId"]], r.info.run_name) for r in runs
                if "mlflow.parentRunId" in r.data.tags]
    members = pd.read_parquet(exp / "records" / "members.parquet")["member_id"]
    assert sorted(n for s, n in children if s == "pool") == sorted(members)
    assert len([n for s, n in children if s == "uncertainty"]) == len(members)
    assert all(r.info.status == "FINISHED" for r in runs)
    st = run_cli("status", str(exp))
    assert "pool      done" in st.stdout and "uncertainty done" in st.stdout and "interrupted" not in st.stdout


def test_second_driver_on_one_experiment_is_refused(finished, tmp_path):
    """While a driver holds an experiment, `oodsweep run`/`resume` on it refuse instead of racing it."""
    import fcntl

    fd = os.open(finished["exp"] / ".driver.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"pid 4242 on test-host", 0)
        proc = run_cli("resume", str(finished["exp"]))
        assert proc.returncode == 1 and "another oodsweep driver" in proc.stderr and "pid 4242" in proc.stderr
        st = run_cli("status", str(finished["exp"]))
        assert "driver    pid 4242 on test-host" in st.stdout
    finally:
        os.close(fd)
