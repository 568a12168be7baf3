"""cluster.yaml against Ray's own autoscaler validation; the checks before launch; GPU packing;
security: safe YAML, weights-only checkpoints, loopback MLflow, token authentication left on."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml

from sweeps import cluster
from sweeps.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def _validate(config: dict) -> dict:
    # the functions Ray's own tests (python/ray/tests/test_autoscaler_yaml.py) validate configs with
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    import ray

    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    prepared = _validate(cfg)
    assert prepared["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"  # the client's Ray version
    head = cfg["head_node_type"]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != head}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 and v["resources"].get("CPU") for v in workers.values())
    assert all(v.get("min_workers", 0) <= v["max_workers"] for v in workers.values())


@pytest.mark.parametrize("breakage", ["unknown_key", "bad_type", "bad_head"])
def test_a_broken_cluster_yaml_fails_validation(breakage):
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    if breakage == "unknown_key":
        cfg["available_node_types"]["gpu.a10g"]["resourcez"] = {"GPU": 1}
    elif breakage == "bad_type":
        cfg["max_workers"] = "eight"
    else:
        cfg["head_node_type"] = "no.such.type"
    with pytest.raises(Exception):
        _validate(cfg)


def test_every_cluster_yaml_key_is_commented():
    lines = CLUSTER_YAML.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            above = [ln for ln in lines[:i] if ln.strip()][-1]
            assert above.lstrip().startswith("#"), f"top-level key {line.split(':')[0]!r} has no comment above it"
    for name, t in yaml.safe_load(CLUSTER_YAML.read_text())["available_node_types"].items():
        assert f"  {name}:" in CLUSTER_YAML.read_text()


def test_servers_bind_to_loopback_and_token_auth_stays_on():
    text = CLUSTER_YAML.read_text()
    mlflow = [c for c in yaml.safe_load(text)["head_setup_commands"] if "mlflow server" in c]
    assert mlflow and all("--host 127.0.0.1" in c for c in mlflow)
    assert "--dashboard-host=127.0.0.1" in text
    docs = [ROOT / "README.md", CLUSTER_YAML] + list((ROOT / "docs").rglob("*.md")) + \
        list((ROOT / "sweeps").rglob("*.py")) + \
        list((ROOT / "sweeps" / "presets").glob("*.yaml"))
    for f in docs:
        t = f.read_text()
        assert not re.search(r"RAY_AUTH_MODE\s*=\s*(disabled|off|none)", t, re.I), f"{f} turns token auth off"
        assert "--host 0.0.0.0" not in t, f"{f} binds a server to every interface"


def test_spec_yaml_is_parsed_safely(tmp_path):
    from sweeps.spec import load_spec

    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError):
        load_spec(bad)
    assert not marker.exists()


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_refuse_pickles_that_run_code(tmp_path):
    from trainables.segment import load_member

    marker = tmp_path / "pwned"
    evil = tmp_path / "member.pt"
    torch.save({"model": _RunsCode(str(marker)), "arch": "unet_r18", "in_channels": 1}, evil)
    with pytest.raises(Exception) as e:
        load_member(evil)
    assert not marker.exists()
    assert "weights_only" in str(e.value) or "Unsupported" in str(e.value) or "member.pt" in str(e.value)


# ------------------------------------------------------------------ checks before launch

MOUNTS = """\
/dev/vda / ext4 rw 0 0
server:/export /mnt/nfs nfs4 rw 0 0
s3fs /mnt/oodsweep fuse.s3fs rw 0 0
"""


def test_filesystem_type_takes_the_longest_mount():
    assert cluster.filesystem_type("/mnt/nfs/runs/x", MOUNTS) == "nfs4"
    assert cluster.filesystem_type("/mnt/oodsweep/runs", MOUNTS) == "fuse.s3fs"
    assert cluster.filesystem_type("/mnt/nfsother", MOUNTS) == "ext4"


def test_node_local_storage_on_several_machines_is_refused(monkeypatch):
    monkeypatch.delenv(cluster.SHARED_ENV, raising=False)
    cluster.check_storage("/home/me/runs", ["10.0.0.1"], mounts=MOUNTS)  # one machine: fine
    cluster.check_storage("/home/me/runs", ["10.0.0.1", "10.0.0.1"], mounts=MOUNTS)  # nodes on one host
    cluster.check_storage("/mnt/nfs/runs", ["10.0.0.1", "10.0.0.2"], mounts=MOUNTS)
    cluster.check_storage("/mnt/oodsweep/runs", ["10.0.0.1", "10.0.0.2"], mounts=MOUNTS)
    with pytest.raises(SpecError) as e:
        cluster.check_storage("/home/me/runs", ["10.0.0.1", "10.0.0.2"], mounts=MOUNTS)
    msg = str(e.value)
    assert "/home/me/runs" in msg and "ext4" in msg and "2 machines" in msg and "/mnt/oodsweep" in msg
    monkeypatch.setenv(cluster.SHARED_ENV, "1")
    cluster.check_storage("/home/me/runs", ["10.0.0.1", "10.0.0.2"], mounts=MOUNTS)


def test_tracking_store_is_checked_before_launch(tmp_path):
    import socket

    cluster.check_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    for uri, words in (("sqlite:///runs/mlflow.db", "relative"), ("./mlruns", "plain file store"),
                       ("file:///tmp/mlruns", "plain file store")):
        with pytest.raises(SpecError, match=words):
            cluster.check_tracking(uri)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(SpecError, match="does not answer") as e:
        cluster.check_tracking(f"http://127.0.0.1:{port}", timeout=2)
    assert "MLFLOW_TRACKING_URI" in str(e.value)


# ------------------------------------------------------------------ GPU packing

def test_gpu_shares_per_architecture():
    assert cluster.trial_resources("unet_r18", 1, None, {}, has_gpu=True) == {"cpu": 1.0, "gpu": 0.25}
    assert cluster.trial_resources("unet_r50", 2, None, {}, has_gpu=True) == {"cpu": 2.0, "gpu": 0.5}
    assert cluster.trial_resources("unet_r50", 2, None, {}, has_gpu=False) == {"cpu": 2.0, "gpu": 0.0}
    assert cluster.trial_resources("unet_r50", 2, 1.0, {}, has_gpu=True)["gpu"] == 1.0  # the spec's number
    over = {"unet_r50": {"gpu": 0.2, "cpu": 3}}
    assert cluster.trial_resources("unet_r50", 1, None, over, has_gpu=True) == {"cpu": 3.0, "gpu": 0.2}
    assert cluster.gpu_share(None, None, None, has_gpu=True) == cluster.DELTA_GPU_SHARE
    from trainables.models import MODELS

    assert cluster.trial_resources("medsam_lite", 1, None, {}, has_gpu=True)["gpu"] == MODELS["medsam_lite"].gpu_share
    with pytest.raises(SpecError, match="unknown architecture 'unet_r1000'.*registered architectures: unet_r18"):
        cluster.trial_resources("unet_r1000", 1, None, {}, has_gpu=True)  # not a whole GPU by default
    # 8 GPUs, 64 CPUs: quarter-GPU trials are limited by the GPUs (32), 1-CPU CPU trials by the CPUs
    assert cluster.max_concurrent([{"cpu": 1, "gpu": 0.25}, {"cpu": 1, "gpu": 0.5}], {"CPU": 64, "GPU": 8}) == 32
    assert cluster.max_concurrent([{"cpu": 1, "gpu": 0.0}], {"CPU": 2, "GPU": 0}) == 2
    assert cluster.max_concurrent([{"cpu": 4, "gpu": 0.0}], {"CPU": 2, "GPU": 0}) == 1


def test_capacity_of_an_autoscaling_cluster_comes_from_its_bootstrap_config(tmp_path):
    cfg = _validate(yaml.safe_load(CLUSTER_YAML.read_text()))
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cap = cluster.bootstrap_capacity(path)
    types = cfg["available_node_types"]
    assert cap["GPU"] == sum(t["max_workers"] * t["resources"].get("GPU", 0) for n, t in types.items()
                             if n != cfg["head_node_type"])
    assert cap["GPU"] >= 8
    assert cluster.bootstrap_capacity(tmp_path / "missing.yaml") == {}


def test_spec_gpu_auto_and_per_arch_overrides(tmp_path):
    raw = {"name": "x", "storage": str(tmp_path), "data": {"layout": "prostate_multisite", "root": str(tmp_path),
                                                           "source": "A", "targets": ["B"]},
           "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]},
                    "resources": {"cpu": 2, "per_arch": {"unet_r18": {"gpu": 0.125}}}}}
    spec = parse_spec(raw)
    assert spec.pool.gpu is None and spec.pool.per_arch == {"unet_r18": {"gpu": 0.125}}
    raw["pool"]["resources"]["per_arch"] = {"no_such_net": {"gpu": 1}}
    with pytest.raises(SpecError, match="no_such_net"):
        parse_spec(raw)
    raw["pool"]["resources"] = {"gpu": "lots"}
    with pytest.raises(SpecError, match="pool.resources.gpu"):
        parse_spec(raw)
