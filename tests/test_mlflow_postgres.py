"""MLflow on a PostgreSQL run store outlives the node that serves it (docs/cluster.md, "MLflow that outlives the
head node"): a real PostgreSQL on loopback, an `mlflow server` on it (as cluster.yaml's head starts one), a tiny
sweep logs its runs there; the server is stopped and a new one started on the same database (a replaced head),
the driver runs the same spec again (finished stages are skipped), and every run is still there, once.

The set-up installs Debian's postgresql (apt-get, as root) when ``initdb`` is missing. PostgreSQL refuses to
run as root: as root its commands run as the ``postgres`` user (``runuser``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from helpers import start_mlflow_server

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_keeps_mlflow_off_the_head_disk():
    """The head's MLflow server: its run store from the secret through MLFLOW_BACKEND_STORE_URI (no SQLite on
    the head, no password on a command line), its artifacts on the bucket, and the secret read by valid Python."""
    import shlex

    cmds = yaml.safe_load((ROOT / "cluster.yaml").read_text())["head_setup_commands"]
    server = next(c for c in cmds if "mlflow server" in c)
    assert 'MLFLOW_BACKEND_STORE_URI="$(cat ~/.mlflow-db-uri)"' in server and "--backend-store-uri" not in server
    assert "sqlite" not in server and "--artifacts-destination s3://" in server
    assert any("psycopg2-binary" in c for c in cmds)
    secret = next(c for c in cmds if "secretsmanager" in c)
    assert secret.startswith("(umask 077;") and secret.endswith("> ~/.mlflow-db-uri)")
    words = shlex.split(secret[1:-1])
    compile(words[words.index("-c") + 1], "<cluster.yaml>", "exec")  # the head runs it


def _free_port() -> int:
    """A free port outside 10000-19999 (the range Ray hands to its worker processes)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10000 <= port < 20000:
            return port


def _pg_bin() -> Path:
    def found() -> list[Path]:
        return sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))

    if not found():  # Debian's packages, as tests/test_slurm.py installs Slurm's
        assert os.geteuid() == 0, "PostgreSQL is not installed (initdb not found) and only root can apt-get it"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed (the test needs PostgreSQL):\n{proc.stderr[-2000:]}"
    return found()[-1].parent


@pytest.fixture
def postgres():
    """A PostgreSQL cluster on 127.0.0.1 (trust authentication, loopback only) with a database ``mlflow``;
    its SQLAlchemy URI (SQLAlchemy 2.1 takes a bare postgresql:// for psycopg 3: the driver is named). Stopped and removed afterwards."""
    bin_dir = _pg_bin()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # not under pytest's tmp_path: its parents are private to this user, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="oodsweep-pg-"))
    data, port = root / "data", _free_port()
    if as_pg:
        shutil.chown(root, "postgres")

    def pg(*cmd: str, timeout: float = 120) -> None:
        proc = subprocess.run(as_pg + [str(bin_dir / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{cmd[0]} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"

    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
           f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _mlflow_server(store_uri: str, artifacts: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    # the run store's URI through the environment, as cluster.yaml's head passes it
    proc = start_mlflow_server(port, ["--artifacts-destination", str(artifacts)], log,
                               env={**os.environ, "MLFLOW_BACKEND_STORE_URI": store_uri}, timeout=120)
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    """The server and its web workers (its own session) end, as a head node's processes do."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _runs(uri: str) -> dict[str, tuple[str, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pgsweep")
    runs = client.search_runs([exp.experiment_id])
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"duplicated runs: {sorted(names)}"
    for r in runs:  # no epoch logged twice
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "epoch")]
        assert len(steps) == len(set(steps)), (r.info.run_name, steps)
    return {r.info.run_name: (r.info.run_id, r.info.status) for r in runs}


@pytest.mark.integration
@pytest.mark.postgres
def test_runs_in_postgresql_outlive_the_server_and_a_restarted_driver(tmp_path, tiny_data, postgres):
    spec = {"name": "pgsweep", "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(tiny_data), "source": "SiteA",
                     "targets": ["SiteB"], "image_size": 32, "test_fraction": 0.25},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [1]},
                     "seed": {"grid": [0]}, "batch_size": 4, "resources": {"cpu": 1}},
            "analysis": {"metric": "iou_3d", "indicators": ["id_performance"]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    artifacts, log = tmp_path / "bucket", tmp_path / "mlflow.log"
    member = "unet_r18-lr0.001-s0-ep1"

    server, uri = _mlflow_server(postgres, artifacts, log)
    try:
        out = run_cli("run", str(path), "--num-cpus", "1", env={"MLFLOW_TRACKING_URI": uri})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        first = _runs(uri)
    finally:
        _stop(server)
    assert sorted(first) == sorted(["pool", member, "analysis"]), first
    assert all(status == "FINISHED" for _, status in first.values()), first

    # the head is gone; a new one starts its own MLflow server on the same database, and the sweep again
    server, uri = _mlflow_server(postgres, artifacts, log)
    try:
        out = run_cli("run", str(path), "--num-cpus", "1", env={"MLFLOW_TRACKING_URI": uri})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "pool stage already done" in out.stdout + out.stderr
        assert _runs(uri) == first  # the same runs, found by their tags, none added
        from mlflow import MlflowClient

        run = MlflowClient(uri).get_run(first[member][0])
        assert run.data.tags["mlflow.parentRunId"] == first["pool"][0] and "id_iou_3d" in run.data.metrics
    finally:
        _stop(server)
    assert not (tmp_path / "runs" / "pgsweep" / "mlflow-outbox.jsonl").exists()  # everything was sent
