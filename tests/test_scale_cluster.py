"""A sweep on a cluster asks the cluster's nodes, not the driver's machine (sweeps/nodes.py): a ``ray://`` client
sees the autoscaler's maximum from the head's bootstrap config, the storage probe runs as one Ray task per node;
and the analysis' agreement blocks run as Ray tasks there (sweeps/analysis_blocks.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sweeps import nodes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _kill_naming(text: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line names ``text`` (the test's own Ray)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_naming(text)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids and time.time() < deadline and _pids_naming(text):
            time.sleep(0.3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line names ``text`` (our own head's temp folder), never by program name."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _client_server_logs(ray_tmp: Path) -> str:
    """The Ray client servers' stderr logs of the test's head, to say why a connection failed."""
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                   for p in sorted((ray_tmp / "session_latest" / "logs").glob("ray_client_server*.err")))


def test_raycluster_maximum_of_the_kuberay_job():
    """The deploy/kuberay RayJob's cluster: a CPU head (num-cpus 0) and 2 workers of 8 CPUs and 1 GPU."""
    docs = yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    (job,) = [d for d in docs if d and d.get("kind") == "RayJob"]
    spec = job["spec"]["rayClusterSpec"]
    cap = nodes.raycluster_maximum(spec)
    workers = spec["workerGroupSpecs"]
    assert cap["GPU"] == sum(g["maxReplicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]
                             [nodes.GPU_KEY] for g in workers) == 2
    # an autoscaling group counts its maxReplicas; rayStartParams override the limits; "500m" is half a CPU
    grown = {"headGroupSpec": {"rayStartParams": {"num-cpus": "500m"}},
             "workerGroupSpecs": [{"replicas": 0, "maxReplicas": 5, "rayStartParams": {"num-gpus": "2"},
                                   "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "4"}}}]}}}]}
    assert nodes.raycluster_maximum(grown) == {"CPU": 0.5 + 20.0, "GPU": 10.0}
    assert nodes.kuberay_maximum() == {}  # not in a pod


DRIVER = """
import json, sys, numpy as np, ray
from analysis.agreement import agreement_matrices
from sweeps import cluster, nodes
from sweeps.analysis_blocks import ray_block_map
exp, ids, gib = sys.argv[3], json.loads(sys.argv[4]), float(sys.argv[5])
roles = {"Src": "id", "Tgt": "ood"}
whole = agreement_matrices(exp, ids, roles, "iou_3d")       # before connecting: in-process, one pass
assert ray_block_map() is None
ray.init(sys.argv[1])
now = ray.cluster_resources()
cap = cluster.capacity()
probe = nodes.probe_storage(sys.argv[2], ray.nodes())
cluster.check_storage_on_nodes(sys.argv[2], ray.nodes())
by_ray = agreement_matrices(exp, ids, roles, "iou_3d", memory_gib=gib, map_blocks=ray_block_map(window=2))
diff = max(float(np.nanmax(np.abs(by_ray.matrices[s] - whole.matrices[s]))) for s in roles)
print("RESULT " + json.dumps({"now": now.get("GPU", 0), "cap": cap, "probe": probe, "diff": diff}))
ray.shutdown()
"""


@pytest.mark.integration
def test_a_ray_client_gets_the_heads_gpu_capacity(tmp_path):
    """A head with 2 (logical) GPUs whose bootstrap config lets 3 one-GPU workers join, and a second node: a
    driver connected through ray:// (its own HOME without any config) gets 2 GPUs now and 5 as the capacity,
    both nodes see its storage, and the agreement's blocks run as Ray tasks with the single pass's result."""
    from test_agreement_blocks import _gib_for_rows, _records

    ids = _records(tmp_path / "exp")
    head_home, driver_home = tmp_path / "head_home", tmp_path / "driver_home"
    head_home.mkdir()
    driver_home.mkdir()
    (head_home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump({
        "head_node_type": "head", "max_workers": 3,
        "available_node_types": {"head": {"resources": {"CPU": 1, "GPU": 2}, "max_workers": 0},
                                 "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 3}}}))
    ray_tmp = Path(tempfile.mkdtemp(prefix="oodcap", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "HOME": str(head_home), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        port, client_port = _free_port(), _free_port()
        head = subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "1", "--num-gpus", "2", "--port",
                               str(port), "--ray-client-server-port", str(client_port), "--temp-dir", str(ray_tmp),
                               "--include-dashboard=false", "--disable-usage-stats"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]  # Ray's own words when it fails
        subprocess.run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                        "--temp-dir", str(ray_tmp), "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, text=True, timeout=300)
        for attempt in range(3):
            r = subprocess.run([sys.executable, "-c", DRIVER, f"ray://127.0.0.1:{client_port}", str(tmp_path / "runs"),
                                str(tmp_path / "exp"), json.dumps(ids), str(_gib_for_rows(4, len(ids)))],
                               env={**os.environ, "HOME": str(driver_home)}, cwd=ROOT, capture_output=True,
                               text=True, timeout=180)
            # Ray's client proxy now and then fails to start the per-client server process on a loaded machine
            # (a known flake of Ray client, not of ours): connect again, as a user would, at most twice.
            if "Starting Ray client server failed" not in r.stderr:
                break
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:] + _client_server_logs(ray_tmp)
        res = json.loads(line[0][len("RESULT "):])
        assert res["now"] == 2.0
        assert res["cap"]["GPU"] == 5.0 and res["cap"]["CPU"] == 25.0
        assert list(res["probe"].values()) == [True, True]   # a task on each of the two nodes
        assert res["diff"] <= 1e-12
        assert not list((tmp_path / "runs").glob(".oodsweep-probe-*"))  # the probe files are cleaned up
    finally:
        _kill_naming(str(ray_tmp))
        left = _pids_naming(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the test's Ray head left: {left}"
