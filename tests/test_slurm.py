"""A real Slurm on this machine: munge, slurmctld and slurmd started from a one-node slurm.conf
on loopback, then `sbatch deploy/slurm/oodsweep.sbatch demo --smoke` exactly as a user submits it
(the script's resources overridden on sbatch's command line). The job starts a Ray head with
`srun`, an MLflow server and the sweep as a Ray job under token authentication; the test checks
the job's state, the experiment's records, the runs in the MLflow server's store, and that the
job left no Ray or MLflow process behind, then stops the daemons by their pid files.

The set-up installs Debian's slurm-wlm and munge (apt-get, as root) when they are missing.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slurm]
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "slurm" / "oodsweep.sbatch"
JOB_TIMEOUT_S = 600


def _free_port() -> int:
    """A free port outside 10000-19999 (the range Ray hands to its worker processes)."""
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if not 10000 <= port < 20000:
            return port


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d, name)).exists()),
                                      None)


def _ensure_slurm() -> None:
    assert os.geteuid() == 0, "the Slurm test runs slurmctld/slurmd/munged as root (SlurmUser=root); run it as root"
    missing = [pkg for pkg, exe in (("slurm-wlm", "slurmctld"), ("slurm-wlm", "slurmd"), ("slurm-wlm", "sbatch"),
                                    ("munge", "munged"), ("munge", "mungekey")) if not _tool(exe)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *sorted(set(missing))]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed (the Slurm test needs {missing}):\n{proc.stderr[-2000:]}"


def _pids_with(text: str) -> list[int]:
    """Processes whose command line mentions ``text`` (read from /proc)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes().replace(b"\0", b" "):
                out.append(int(cmdline.parent.name))
        except OSError:
            pass
    return [p for p in out if p != os.getpid()]


def _kill_pidfile(path: Path, timeout: float = 20.0) -> None:
    """Stop the daemon whose pid ``path`` holds: SIGTERM, then SIGKILL if it outlives ``timeout``."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        t0 = time.time()
        while time.time() - t0 < wait:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _run(cmd: list[str], env: dict, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture
def slurm_cluster():
    """munged, slurmctld and slurmd for a one-node cluster on 127.0.0.1, everything in a temp folder."""
    _ensure_slurm()
    t_setup = time.time()
    d = Path(tempfile.mkdtemp(prefix="oo-slurm-", dir="/tmp"))  # short: Ray's socket paths live under it
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    pidfiles = [d / "slurmd.pid", d / "slurmctld.pid", d / "munged.pid"]  # stopped in this order
    try:
        _run([_tool("mungekey"), "--create", "--keyfile", str(d / "munge.key")], env)
        _run([_tool("munged"), "--force", f"--socket={d}/munge.sock", f"--key-file={d}/munge.key",
              f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log", f"--seed-file={d}/munged.seed"], env)
        # this machine as slurmd sees it (NodeName=<short hostname> CPUs=... RealMemory=...)
        node = _run([_tool("slurmd"), "-C"], env).stdout.splitlines()[0]
        name = re.match(r"NodeName=(\S+)", node).group(1)
        ctld_port, slurmd_port = _free_port(), _free_port()
        (d / "slurm.conf").write_text(f"""ClusterName=oodsweep-test
SlurmctldHost={name}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes={name} Default=YES MaxTime=INFINITE State=UP
""")
        _run([_tool("slurmctld")], env)
        _run([_tool("slurmd")], env)
        t0, state = time.time(), ""
        while time.time() - t0 < 60:
            state = _run([_tool("sinfo"), "-h", "-o", "%t"], env, check=False).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-1500:] for p in sorted((d / "log").glob("*.log")))
        assert state == "idle", f"the Slurm node is {state or 'not reported'}, not idle, after 60 s\n{logs}"
        assert _run([_tool("srun"), "hostname"], env).stdout.strip()
        print(f"\n[test_slurm] munged, slurmctld and slurmd up, node idle, srun ran: {time.time() - t_setup:.0f} s")
        yield {"dir": d, "env": env, "partition": "test", "cpus": int(re.search(r"CPUs=(\d+)", node).group(1))}
    finally:
        for p in pidfiles:
            _kill_pidfile(p)
        shutil.rmtree(d, ignore_errors=True)


def test_sbatch_runs_the_smoke_demo_on_ray_with_mlflow(slurm_cluster):
    d, partition = slurm_cluster["dir"], slurm_cluster["partition"]
    storage, ray_tmp, home = d / "runs", d / "ray", d / "home"
    home.mkdir()
    mlflow_port = _free_port()
    # the environment a user submits from: the project's environment on the PATH, the settings the
    # script documents; nothing of this machine's own Ray, MLflow or oodsweep settings
    env = {k: v for k, v in slurm_cluster["env"].items()
           if not k.startswith(("RAY_", "OODSWEEP_", "MLFLOW_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "HOME": str(home), "OODSWEEP_STORAGE": str(storage),
                "RAY_TMPDIR": str(ray_tmp), "RAY_PORT": str(_free_port()),
                "RAY_DASHBOARD_PORT": str(_free_port()), "RAY_AGENT_PORT": str(_free_port()),
                "RAY_CLIENT_PORT": str(_free_port()), "MLFLOW_PORT": str(mlflow_port), "MLFLOW_WORKERS": "1"})
    cpus = min(2, slurm_cluster["cpus"])
    job = None
    try:
        sub = _run(["sbatch", "--parsable", f"--partition={partition}", "--nodes=1", f"--cpus-per-task={cpus}",
                    "--gpus-per-task=0", "--time=15", f"--output={d}/job-%j.out", f"--chdir={d}",
                    str(SCRIPT), "demo", "--smoke"], env)
        job = sub.stdout.strip().split(";")[0]
        t0, state = time.time(), ""
        while time.time() - t0 < JOB_TIMEOUT_S:
            info = _run(["scontrol", "show", "job", "-o", job], env, check=False).stdout
            state = (re.search(r"JobState=(\S+)", info) or [None, ""])[1]
            if state and state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                break
            time.sleep(2)
        out_file = d / f"job-{job}.out"
        out = out_file.read_text() if out_file.exists() else "(no job output)"
        print(f"[test_slurm] job {job}: {state} after {time.time() - t0:.0f} s; the script's lines:")
        print("\n".join(line for line in out.splitlines() if line.startswith(("[oodsweep.sbatch", "[oodsweep] done"))))
        assert state == "COMPLETED", f"Slurm job {job}: {state or 'no state'} after {time.time() - t0:.0f} s\n" \
                                     f"{out[-6000:]}"
        assert re.search(r"\] Ray job oodsweep-slurm-\S+: succeeded", out), out[-4000:]
        assert "[oodsweep] connecting to the Ray cluster" in out  # the driver ran on the job's Ray cluster
        assert f"[oodsweep] MLflow tracking at http://127.0.0.1:{mlflow_port}" in out  # and logged to its server
        assert "Ray stopped on 1 node(s)" in out and "MLflow server stopped" in out

        exp = storage / "demo-smoke"
        members = pd.read_parquet(exp / "records" / "members.parquet")
        assert len(members) == 2  # the smoke pool: unet_r18 snapshots at epochs 1 and 2
        unc = pd.read_parquet(exp / "records" / "uncertainty.parquet")
        assert set(unc["member_id"]) == set(members["member_id"])
        assert (exp / "analysis" / "tables.md").exists()
        assert (storage / "data" / "synthetic-prostate-smoke").is_dir()  # OODSWEEP_DATA under the storage
        assert not (exp / "mlflow.db").exists()  # the runs went to the server, not to a SQLite of the experiment

        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")  # the server's store (its default)
        runs = client.search_runs([client.get_experiment_by_name("demo-smoke").experiment_id])
        stages = sorted(r.data.tags.get("oodsweep.stage") for r in runs if "mlflow.parentRunId" not in r.data.tags)
        assert stages == ["analysis", "pool", "uncertainty"]
        assert sum("mlflow.parentRunId" in r.data.tags for r in runs) == 4  # 2 members x (pool, uncertainty)

        token = home / ".ray" / "auth_token"  # `ray get-auth-token --generate` made it, readable by its owner only
        assert token.stat().st_size > 0 and token.stat().st_mode & 0o077 == 0
        # the job stopped what it started
        assert not _pids_with(str(ray_tmp)), "Ray processes of the job are still running"
        assert not _pids_with(f"--port {mlflow_port}"), "the job's MLflow server is still running"
    finally:
        if job:
            _run(["scancel", job], env, check=False)
        for _ in range(30):  # a job cancelled or timed out above: Slurm stops its processes within KillWait
            if not _pids_with(str(ray_tmp)) and not _pids_with(f"--port {mlflow_port}"):
                break
            time.sleep(1)
        for pid in _pids_with(str(ray_tmp)) + _pids_with(f"--port {mlflow_port}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
