"""Stopping a sweep as a user does, killing its driver, and losing the tracking server under it.

* One tiny sweep stopped four times and resumed each time (Ray is started once per driver, and each start is
  expensive, so one sweep carries every stop): Ctrl-C (SIGINT to the real driver process) once the pool has
  registered a checkpoint, SIGKILL to the driver's session between the stages, SIGTERM in the δ stage, SIGKILL
  in the δ stage after a δ member is scored. A signalled driver exits within seconds with 130 / 143, says the
  (shell-quoted) `oodsweep resume` line, releases the lock and leaves no process of its local Ray; nothing
  finished is trained or fitted again, and the last resume ends with the records of the uninterrupted run (the
  session's `finished` sweep) and no duplicate MLflow run.
* A run of 10 epochs: Ctrl-C mid-way, two Ctrl-C at once, SIGKILL mid-training; it continues from its checkpoint.
* A real `mlflow server` on loopback killed during the pool stage: the sweep still finishes (exit 0) with
  every member recorded and says what is unsent; once the server is back (same store), `oodsweep analyze`
  sends it: every run logged once.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import OODSWEEP, run_cli, tiny_spec
from helpers import start_mlflow_server
from test_determinism import assert_same_records

from sweeps.experiment import driver_running
from sweeps.interrupts import descendants
from trainables import records

pytestmark = pytest.mark.integration

#: how long a stopped driver may take to exit (Tune stops the trials within ~5 s, Ray's shutdown ~2 s; the
#: rest is slack for a loaded machine)
STOP_S = 45


def _start(*args, log: Path, env: dict | None = None) -> subprocess.Popen:
    p = subprocess.Popen(OODSWEEP + list(args), stdout=log.open("w"), stderr=subprocess.STDOUT,
                         start_new_session=True, env={**os.environ, **(env or {})})
    p.log = log  # for _wait's message
    return p


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 400) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            log = getattr(proc, "log", None)
            tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
            raise AssertionError(f"the driver ended (rc {proc.returncode}) before {what}:\n{tail}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _stop(proc: subprocess.Popen, sig: int, log: Path) -> tuple[float, str]:
    """Send ``sig`` to the driver alone (not its group); return the seconds to its exit and its output.
    Asserts that no process it had started (its local Ray) is left."""
    ray_pids = descendants(proc.pid)
    assert any("raylet" in _cmdline(p) for p in ray_pids), "the driver had no local Ray to shut down"
    t0 = time.time()
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=STOP_S * 3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the driver did not stop: {log.read_text()[-3000:]}") from None
    took = time.time() - t0
    deadline = time.time() + 5  # an orphan reparented to init is reaped there
    while time.time() < deadline and any(_alive(p) for p in ray_pids):
        time.sleep(0.2)
    left = [f"{p} {_cmdline(p)[:100]}" for p in ray_pids if _alive(p)]
    for p in ray_pids:  # never leave them to the rest of the suite
        if _alive(p):
            os.kill(p, signal.SIGKILL)
    assert not left, f"processes of the stopped driver still alive: {left}"
    return took, log.read_text()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _staging(log: Path) -> Path | None:
    """Where the driver of ``log`` has Tune write each pool trial's result.json as it takes the result (the folder
    of Tune's TensorBoard hint). The experiment folder gets a copy only at Tune's state snapshots, at least 10 s
    apart, which a short run can end before: waiting for that copy made the Ctrl-C late, or miss the run."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    m = re.search(r"tensorboard --logdir (\S+/pool/driver_artifacts)", text)
    return Path(m.group(1)) if m else None


def _with_checkpoint(exp: Path, log: Path | None = None) -> set[str]:
    """The pool runs whose epoch-1 result the driver has taken (its result.json, in the experiment or where the
    driver of ``log`` stages it, has epoch 1) with the trial's epoch-1 checkpoint in the experiment."""
    staged = _staging(log) if log is not None else None
    res = [p for d in [exp / "pool", *([staged] if staged else [])] for p in d.glob("*/result.json")
           if p.stat().st_size]
    return {p.parent.name.rsplit("-", 1)[0] for p in res
            if (exp / "pool" / p.parent.name / "checkpoint_000000").is_dir() and '"epoch": 1' in p.read_text()}


def _checkpoint_registered(exp: Path, log: Path) -> bool:
    """A pool run's epoch-1 result and checkpoint taken by the driver of ``log``. Tune logs the result, then
    registers its checkpoint in its next event: a second's grace for that."""
    if not _with_checkpoint(exp, log):
        return False
    time.sleep(1.0)
    return True


def _mlflow_runs(uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name(name).experiment_id])


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 400) -> None:
    """SIGKILL the driver's whole session (the driver and the local Ray it started, as a closed laptop would)
    once ``ready()``; wait until nothing of that session lives on to write into the experiment."""
    _wait(ready, proc, what, timeout)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)


def _member_parts(exp: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (exp / "records" / "parts").glob("*.member.json")}


def _unc_parts(exp: Path) -> dict[str, int]:
    d = exp / "records" / "uncertainty" / "parts"
    return {p.stem: p.stat().st_mtime_ns for p in d.glob("*.parquet")} if d.is_dir() else {}


def test_stopped_and_killed_driver_resumes_to_the_uninterrupted_records(finished, tmp_path, tiny_data):
    """One sweep (the tiny spec of the session's `finished` run) stopped four times, each time resumed:

    1. Ctrl-C in the pool stage once a trial's epoch-1 checkpoint is registered;
    2. SIGKILL to the driver's session (driver and local Ray) between the stages, as soon as the pool is done;
    3. SIGTERM in the δ stage once a δ fit has started;
    4. SIGKILL to the driver's session in the δ stage, after it scored a δ member;
    5. resumed to the end.

    A signalled driver exits within seconds with 130 / 143, says the (shell-quoted) `oodsweep resume` line,
    releases the lock and leaves no process of its local Ray; after a SIGKILL `status` says interrupted.
    Nothing finished is trained or fitted again (a pool run with a checkpoint at the Ctrl-C is not trained
    from scratch again; test_ctrl_c_twice_kill_and_resume_from_checkpoint shows the checkpoint in use), no
    record is lost or duplicated, and the sweep ends with the records of the uninterrupted run, bit for bit
    (tests/test_determinism.py), and one MLflow run per stage and trial, each FINISHED, no epoch logged twice.
    (The SIGKILL during the pool stage: test_ctrl_c_twice_kill_and_resume_from_checkpoint.)"""
    storage = tmp_path / "my runs"  # a space: the printed resume line must be quoted
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(storage, tiny_data)))
    exp = storage / "tiny"
    pool_done = exp / "pool" / ".oodsweep-done"
    unc_done = exp / "uncertainty" / ".oodsweep-done"
    resume_line = f"oodsweep resume {shlex.quote(str(exp))}"
    t_all = time.time()

    # 1. Ctrl-C in the pool stage, once a trial's epoch-1 checkpoint is registered
    log1 = tmp_path / "run1.log"
    p = _start("run", str(path), "--num-cpus", "2", log=log1)
    _wait(lambda: _checkpoint_registered(exp, log1), p, "the first pool checkpoint")
    checkpointed = _with_checkpoint(exp, log1)
    took, out = _stop(p, signal.SIGINT, log1)
    print(f"SIGINT in the pool stage: exit {p.returncode} after {took:.1f}s ({sorted(checkpointed)} checkpointed)")
    assert p.returncode == 130, out[-3000:]
    assert took < STOP_S, f"{took:.0f}s to stop"
    assert resume_line in out and "stopped by Ctrl-C (SIGINT)" in out, out[-2000:]
    assert "Tuner.restore" not in out and "running them again" not in out and "Traceback" not in out
    assert driver_running(exp) is None
    assert not pool_done.exists()
    st = run_cli("status", str(exp))
    assert st.returncode == 0 and "interrupted" in st.stdout, st.stdout
    kept1 = _member_parts(exp)
    done_runs = {m.split("-ep")[0] for m in kept1 if m.endswith("-ep2.member.json")}  # recorded to the end

    # 2. resumed, then SIGKILLed with its local Ray between the stages: as soon as the pool is marked done
    p = _start("resume", str(exp), "--num-cpus", "2", log=tmp_path / "run2.log")
    _kill_when(p, pool_done.exists, "the end of the pool stage")
    assert len(_unc_parts(exp)) == 0
    for name, mtime in kept1.items():  # the runs finished before the Ctrl-C were not trained again
        if name.split("-ep")[0] in done_runs:
            assert _member_parts(exp)[name] == mtime, f"{name} was written again after the resume"
    st = run_cli("status", str(exp))  # the lock of a killed driver is stale: interrupted, not running
    assert st.returncode == 0 and "interrupted" in st.stdout and "oodsweep resume" in st.stdout, st.stdout

    # 3. resumed, then SIGTERM in the δ stage, once a δ fit has started
    log3 = tmp_path / "run3.log"
    p = _start("resume", str(exp), "--num-cpus", "2", log=log3)
    started = lambda: (exp / "records" / "attempts.jsonl").exists() and \
        (records.load_attempts(exp)["stage"] == "uncertainty").any()  # noqa: E731
    _wait(started, p, "the first δ fit")
    took, out = _stop(p, signal.SIGTERM, log3)
    print(f"SIGTERM in the δ stage: exit {p.returncode} after {took:.1f}s")
    assert p.returncode == 143, out[-3000:]
    assert took < STOP_S and resume_line in out and "stopped by SIGTERM" in out, out[-2000:]
    assert driver_running(exp) is None
    assert not unc_done.exists()

    # 4. resumed, then SIGKILLed in the δ stage once it has scored a δ member (of those left)
    before = set(_unc_parts(exp))
    p = _start("resume", str(exp), "--num-cpus", "2", log=tmp_path / "run4.log")
    _kill_when(p, lambda: len(set(_unc_parts(exp)) - before) >= 1 and not unc_done.exists(), "a δ member scored")
    scored = _unc_parts(exp)
    n_attempts = len(records.load_attempts(exp))

    # 5. resumed to the end
    proc = run_cli("resume", str(exp), "--num-cpus", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pool stage already done" in proc.stdout
    print(f"stopped four times and resumed: {time.time() - t_all:.0f}s")
    for name, mtime in scored.items():
        assert _unc_parts(exp)[name] == mtime, f"δ of {name} was fitted again after the resume"

    # training starts: a pool run with a checkpoint at the Ctrl-C was not trained from scratch again (it
    # started again from its checkpoint or, its last epoch recorded while it stopped, not at all); a run
    # recorded to its end never started again; a δ member scored before the last kill was not started again
    att = records.load_attempts(exp)
    pool = att[att["stage"] == "pool"]
    print(att[["stage", "run", "start_epoch"]].to_string())
    assert set(pool["run"]) == {"unet_r18-lr0.001-s0-E2", "unet_effb0-lr0.001-s0-E2"}, pool
    for run in checkpointed:
        assert (pool[pool["run"] == run]["start_epoch"] == 0).sum() == 1, (run, pool)
    for run in done_runs:
        assert (pool["run"].str.startswith(run)).sum() == 1, (run, pool)
    unc = att[att["stage"] == "uncertainty"]
    assert set(unc["run"]) == set(_unc_parts(exp))
    assert not set(att.iloc[n_attempts:]["run"]) & set(scored), att.iloc[n_attempts:]

    for name, keys in (("members.parquet", ["member_id"]),
                       ("slices.parquet", ["member_id", "site", "role", "case_id", "slice_idx"])):
        assert not pd.read_parquet(exp / "records" / name).duplicated(keys).any(), name
    assert_same_records(finished["exp"], exp)

    client, runs = _mlflow_runs(f"sqlite:///{exp / 'mlflow.db'}", "tiny")
    parents = {r.info.run_id: r.data.tags["oodsweep.stage"] for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(parents.values()) == ["analysis", "pool", "uncertainty"]
    children = [(parents[r.data.tags["mlflow.parentRunId"]], r.info.run_name) for r in runs
                if "mlflow.parentRunId" in r.data.tags]
    members = sorted(pd.read_parquet(exp / "records" / "members.parquet")["member_id"])
    assert sorted(n for s, n in children if s == "pool") == members
    assert sorted(n for s, n in children if s == "uncertainty") == sorted(f"uncertainty-{m}" for m in members)
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:  # no epoch logged twice by the stopped and resumed drivers
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "epoch")]
        assert len(steps) == len(set(steps)), (r.info.run_name, steps)
    st = run_cli("status", str(exp))
    assert "pool      done" in st.stdout and "uncertainty done" in st.stdout and "interrupted" not in st.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(port: int, store: Path, log: Path) -> subprocess.Popen:
    return start_mlflow_server(port, ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                                      "--artifacts-destination", str(store / "artifacts")], log, timeout=90)


def _pool_only_spec(tmp_path: Path, data: Path, name: str, snapshots=(1, 2), **pool) -> Path:
    """One unet_r18 run, members at ``snapshots`` (epochs 1 and 2), no δ: the smallest sweep that trains.
    ``pool``: more keys of its ``pool`` section."""
    spec = {"name": name, "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(data), "source": "SiteA",
                     "targets": ["SiteB"], "image_size": 32, "test_fraction": 0.25},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]},
                     "epochs": {"snapshots": list(snapshots)}, "seed": {"grid": [0]}, "batch_size": 4,
                     "resources": {"cpu": 1}, **pool},
            "analysis": {"metric": "iou_3d", "indicators": ["id_performance"]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_ctrl_c_twice_kill_and_resume_from_checkpoint(tmp_path, tiny_data):
    """One run of 10 epochs (one sweep for every stop, as each driver start costs a Ray start):

    * a Ctrl-C once its epoch-1 checkpoint is registered stops it mid-way;
    * a resume stopped by two Ctrl-C exits at once (no waiting for Tune) and still leaves no Ray process and
      no lock;
    * a resume SIGKILLed with its local Ray while the run trains leaves a stale lock that `status` reads as
      interrupted;
    * in the last resume the trial's process is killed mid-training while the driver lives: Tune starts the
      trial again (``pool.max_failures``) from its last checkpoint, in a new process, and the run ends, its
      MLflow runs reused.

    Every start of the run after the first continues from its epoch-1 checkpoint, never from epoch 0."""
    path = _pool_only_spec(tmp_path, tiny_data, "twice", snapshots=[1, 10], max_failures=2)
    exp = tmp_path / "runs" / "twice"

    log1 = tmp_path / "run1.log"
    p = _start("run", str(path), "--num-cpus", "2", log=log1)
    _wait(lambda: _checkpoint_registered(exp, log1), p, "the first pool checkpoint")
    took, out = _stop(p, signal.SIGINT, log1)
    print(f"SIGINT at epoch 1 of 10: exit {p.returncode} after {took:.1f}s")
    assert p.returncode == 130 and took < STOP_S, out[-3000:]
    assert records.member_part_ids(exp) == ["unet_r18-lr0.001-s0-ep1"], "the run was not stopped mid-way"

    log2 = tmp_path / "run2.log"
    p = _start("resume", str(exp), "--num-cpus", "2", log=log2)
    _wait(lambda: "resuming the pool stage" in log2.read_text(), p, "the pool stage")
    ray_pids = descendants(p.pid)
    assert any("raylet" in _cmdline(c) for c in ray_pids)
    t0 = time.time()
    os.kill(p.pid, signal.SIGINT)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGINT)
    try:
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    took = time.time() - t0
    out = log2.read_text()
    print(f"two SIGINTs: exit {rc} after {took:.1f}s")
    assert rc == 130 and "again: exiting at once" in out, out[-3000:]
    assert took < 15, f"{took:.0f}s"
    assert driver_running(exp) is None
    time.sleep(1)
    left = [f"{q} {_cmdline(q)[:100]}" for q in ray_pids if _alive(q)]
    for q in ray_pids:
        if _alive(q):
            os.kill(q, signal.SIGKILL)
    assert not left, left

    # SIGKILL to the resumed driver's session (driver and local Ray, as a closed laptop) while its trial trains
    n_attempts = len(records.load_attempts(exp))
    p = _start("resume", str(exp), "--num-cpus", "2", log=tmp_path / "run3.log")
    _kill_when(p, lambda: len(records.load_attempts(exp)) > n_attempts, "the run to start training again")
    assert records.member_part_ids(exp) == ["unet_r18-lr0.001-s0-ep1"], "the run ended before the kill"
    st = run_cli("status", str(exp))
    assert st.returncode == 0 and "interrupted" in st.stdout and "oodsweep resume" in st.stdout, st.stdout

    # the last resume: its trial's process killed once it trains (the driver lives); Tune starts it again
    log4 = tmp_path / "run4.log"
    n_attempts = len(records.load_attempts(exp))
    p = _start("resume", str(exp), "--num-cpus", "2", log=log4)
    try:
        _wait(lambda: len(records.load_attempts(exp)) > n_attempts, p, "the run to start training again")
        pid = int(records.load_attempts(exp)["pid"].iloc[-1])
        os.kill(pid, signal.SIGKILL)
        assert records.member_part_ids(exp) == ["unet_r18-lr0.001-s0-ep1"], "the run ended before the kill"
        assert p.wait(timeout=400) == 0, log4.read_text()[-4000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert sorted(records.member_part_ids(exp)) == ["unet_r18-lr0.001-s0-ep1", "unet_r18-lr0.001-s0-ep10"]
    att = records.load_attempts(exp)
    print(att[["run", "start_epoch", "pid"]].to_string())
    assert (att["start_epoch"] == 0).sum() == 1, att  # trained from scratch once
    assert len(att) >= 4 and (att["start_epoch"].iloc[1:] >= 1).all(), att  # then from its checkpoints
    killed = att["pid"] == pid
    assert killed.sum() == 1 and len(att) == n_attempts + 2, att  # the killed trial started once more,
    assert att["pid"].iloc[-1] != pid and att["start_epoch"].iloc[-1] == 1, att  # in a new process, from epoch 1
    members, slices = records.load_records(exp)
    assert not members["member_id"].duplicated().any()
    assert not slices.duplicated(["member_id", "site", "case_id", "slice_idx"]).any()
    client, runs = _mlflow_runs(f"sqlite:///{exp / 'mlflow.db'}", "twice")
    children = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert children == sorted(members["member_id"])  # a restarted trial reuses its MLflow runs


def test_tracking_server_down_during_the_pool(tmp_path, tiny_data):
    path = _pool_only_spec(tmp_path, tiny_data, "outage")
    exp = tmp_path / "runs" / "outage"
    store = tmp_path / "server"
    store.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(port, store, tmp_path / "server.log")
    log = tmp_path / "run.log"
    p = _start("run", str(path), "--num-cpus", "2", log=log, env={"MLFLOW_TRACKING_URI": uri})
    try:
        # the server goes away as the first member's records appear: the pool is still running
        _wait(lambda: any((exp / "records" / "parts").glob("*.member.json")), p, "the first pool member")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        t_kill = time.time()
        assert p.wait(timeout=300) == 0, log.read_text()[-4000:]
        took = time.time() - t_kill
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    out = log.read_text()
    print(f"sweep finished {took:.0f}s after the server was killed")
    assert took < 150 and "Traceback" not in out, out[-3000:]
    assert "does not answer" in out and "not sent to" in out and "metric values" in out, out[-3000:]
    members, _ = records.load_records(exp)
    assert sorted(members["member_id"]) == ["unet_r18-lr0.001-s0-ep1", "unet_r18-lr0.001-s0-ep2"]
    assert (exp / "mlflow-outbox.jsonl").exists()
    unsent = [line for line in out.splitlines() if "not sent to" in line]
    print(unsent[-1])

    # the server back on the same store: `analyze` sends what waited, once
    server = _mlflow_server(port, store, tmp_path / "server.log")
    try:
        proc = run_cli("analyze", str(exp), env={"MLFLOW_TRACKING_URI": uri}, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "not sent to" not in proc.stdout + proc.stderr
        assert not (exp / "mlflow-outbox.jsonl").exists()
        client, runs = _mlflow_runs(uri, "outage")
        stages = sorted(r.data.tags["oodsweep.stage"] for r in runs if "mlflow.parentRunId" not in r.data.tags)
        assert stages == ["analysis", "pool"], stages
        children = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
        assert children == sorted(members["member_id"])
        for r in runs:
            assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "epoch")]
            assert len(steps) == len(set(steps)), (r.info.run_name, steps)
        ep2 = next(r for r in runs if r.info.run_name == "unet_r18-lr0.001-s0-ep2")
        assert sorted(m.step for m in client.get_metric_history(ep2.info.run_id, "epoch")) == [1, 2]
        assert ep2.data.params["epochs"] == "2"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
