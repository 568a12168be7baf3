"""A real `ray up` on this machine: sshd on 127.0.0.1 with a key made here, a `local`-provider cluster
file whose head is 127.0.0.1, the smoke demo submitted with `ray job submit` under token
authentication, its records and MLflow runs checked, then `ray down` and everything stopped by pid.

The set-up installs openssh-server, rsync and netcat (apt-get, as root) when they are missing.
"""
from __future__ import annotations

import json
import os
import re
import secrets
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
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.rayup]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _ensure_tools() -> None:
    missing = [t for t, path in (("openssh-server", "/usr/sbin/sshd"), ("rsync", shutil.which("rsync")),
                                 ("netcat-openbsd", shutil.which("nc"))) if not (path and Path(path).exists())]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed (the ray up test needs {missing}):\n{proc.stderr[-2000:]}"


def _ray(*args, env, timeout=300, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"ray {' '.join(args)}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                     f"{proc.stderr[-3000:]}"
    return proc


def _pids_with(text: str) -> list[int]:
    """Processes whose command line mentions ``text`` (read from /proc)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                out.append(int(cmdline.parent.name))
        except OSError:
            pass
    return [p for p in out if p != os.getpid()]


@pytest.fixture
def loopback_sshd():
    """sshd on 127.0.0.1:<free port> accepting one key made here; stopped by its pid afterwards."""
    _ensure_tools()
    d = Path(tempfile.mkdtemp(prefix="oo-rayup-", dir="/tmp"))  # short: Ray's socket paths live under it
    for name in ("key", "hostkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "key.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/hostkey
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory sshd insists on
    subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config")], check=True)
    for _ in range(50):
        if (d / "sshd.pid").exists():
            break
        time.sleep(0.1)
    pid = int((d / "sshd.pid").read_text())
    try:
        yield {"dir": d, "port": port, "key": d / "key", "user": os.environ.get("USER") or "root"}
    finally:
        os.kill(pid, signal.SIGTERM)
        shutil.rmtree(d, ignore_errors=True)


def test_ray_up_job_submit_with_token_auth(loopback_sshd, tmp_path):
    import getpass

    d = loopback_sshd["dir"]
    token = d / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs_port, dash_port = _free_port(), _free_port()
    ray_tmp = d / "ray"
    auth_env = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}"
    home = Path.home()
    bootstrap = [home / "ray_bootstrap_config.yaml", home / "ray_bootstrap_key.pem"]
    had = {p: p.exists() for p in bootstrap}
    config = {
        "cluster_name": f"oodsweep-loopback-{gcs_port}",
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": {"ssh_user": getpass.getuser(), "ssh_private_key": str(loopback_sshd["key"]),
                 "ssh_proxy_command": f"nc 127.0.0.1 {loopback_sshd['port']}"},
        # the head "installs" the project: here it is the venv this test runs in, with ray[default]
        "setup_commands": [f"{BIN}/oodsweep --help > /dev/null",
                           f"{BIN}/python -c 'import ray.dashboard, mlflow, trainables'"],
        "head_start_ray_commands": [
            f"{BIN}/ray stop",
            f"{auth_env} {BIN}/ray start --head --port={gcs_port} --dashboard-host=127.0.0.1 "
            f"--dashboard-port={dash_port} --num-cpus=2 --temp-dir={ray_tmp} --disable-usage-stats"],
        "worker_start_ray_commands": [],
    }
    cfg = tmp_path / "loopback.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    address = f"http://127.0.0.1:{dash_port}"
    try:
        _ray("up", "-y", "--no-config-cache", str(cfg), env=env)
        # token authentication is on: a client without the token is refused
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        refused = _ray("job", "list", "--address", address, env=no_token, timeout=60, check=False)
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

        storage = tmp_path / "runs"
        sub = _ray("job", "submit", "--address", address, "--no-wait", "--",
                   str(BIN / "oodsweep"), "demo", "--smoke", "--storage", str(storage), env=env, timeout=120)
        job = re.search(r"raysubmit_\w+", sub.stdout + sub.stderr).group(0)
        t0, status = time.time(), ""
        while time.time() - t0 < 400:
            st = _ray("job", "status", job, "--address", address, env=env, timeout=60)
            # "Job 'raysubmit_...' succeeded" / "... failed" / "... was stopped"
            m = re.search(r"(succeeded|failed|stopped)", st.stdout + st.stderr, re.I)
            if m:
                status = m.group(1).upper()
                break
            time.sleep(3)
        logs = _ray("job", "logs", job, "--address", address, env=env, timeout=60).stdout
        assert status == "SUCCEEDED", f"job {job}: {status or 'timed out'}\n{logs[-5000:]}"
        assert "connecting to the Ray cluster" in logs  # the driver used the job's cluster

        exp = storage / "demo-smoke"
        members = pd.read_parquet(exp / "records" / "members.parquet")
        assert len(members) == 2
        unc = pd.read_parquet(exp / "records" / "uncertainty.parquet")
        assert set(unc["member_id"]) == set(members["member_id"])
        assert (exp / "analysis" / "tables.md").exists()
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("demo-smoke").experiment_id])
        stages = sorted(r.data.tags.get("oodsweep.stage") for r in runs if "mlflow.parentRunId" not in r.data.tags)
        assert stages == ["analysis", "pool", "uncertainty"]
        assert sum("mlflow.parentRunId" in r.data.tags for r in runs) == 4  # 2 members x (pool, uncertainty)
        assert json.loads((exp / "analysis" / "summary.json").read_text())
    finally:
        down = _ray("down", "-y", str(cfg), env=env, timeout=120, check=False)
        # `ray down` runs `ray stop` in a login shell on the head, where this venv's `ray` is not on the
        # PATH: stop the head's processes by pid (all of them carry the cluster's temp dir)
        for _ in range(3):
            pids = _pids_with(str(ray_tmp))
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(1)
        for p in bootstrap:  # what `ray up` left in the head's home
            if not had[p] and p.exists():
                p.unlink()
    assert down.returncode == 0, down.stderr[-2000:]
    assert not _pids_with(str(ray_tmp))
