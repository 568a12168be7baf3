"""What the cluster's own nodes see (docs/cluster.md "Capacity and shared storage"): the autoscaler's maximums
read on the head node, and the experiment's storage probed from every node.

A driver may run anywhere: on the head (``ray up``'s ``ray submit``, a KubeRay RayJob), or on a laptop
connected through ``ray://``. What the driver's own machine holds (``~/ray_bootstrap_config.yaml``, its
mounts) then says nothing about the cluster, so both questions are asked of the cluster, as Ray tasks:

* ``head_maximum``: a zero-CPU task pinned to the head node (Ray gives the head the resource
  ``node:__internal_head__``) reads what the autoscaler may grow to: ``ray up``'s bootstrap config there,
  or, in a KubeRay pod, the RayCluster's worker groups (``maxReplicas`` x each pod's GPUs and CPUs) from the
  Kubernetes API with the pod's service account (the account KubeRay's autoscaler sidecar uses too).
  Ray has no public API for the autoscaler's configured maximums (``ray.autoscaler.sdk`` only requests
  resources), hence this task.
* ``probe_storage``: the driver writes a probe file under a path; one task per alive node (hard node
  affinity) reads it and writes its own; the driver reads those back. A node that cannot see the
  driver's file, or whose file the driver cannot see, does not share the storage.
"""
from __future__ import annotations

import json
import os
import secrets
import ssl
import urllib.request
from pathlib import Path

import yaml

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
#: The resource Ray gives the head node (and only it).
HEAD_RESOURCE = "node:__internal_head__"
#: Seconds to wait for a probe task before giving up on it (a node too busy to start a zero-CPU task).
PROBE_TIMEOUT_S = 60.0
#: Where a Kubernetes pod finds its service account.
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GPU_KEY = "nvidia.com/gpu"


def bootstrap_capacity(path: str | os.PathLike = BOOTSTRAP_CONFIG) -> dict[str, float]:
    """What an autoscaling cluster can grow to, from the config `ray up` leaves on the head node."""
    p = Path(path).expanduser()
    if not p.is_file():
        return {}
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    total: dict[str, float] = {}
    for name, t in (cfg.get("available_node_types") or {}).items():
        n = 1 if name == cfg.get("head_node_type") else int(t.get("max_workers", cfg.get("max_workers", 0)) or 0)
        for k, v in (t.get("resources") or {}).items():
            if k in ("CPU", "GPU"):
                total[k] = total.get(k, 0.0) + n * float(v)
    return total



def _quantity(v) -> float:
    """A Kubernetes CPU/GPU quantity ("8", 8, "500m") as a number."""
    s = str(v).strip()
    return float(s[:-1]) / 1000.0 if s.endswith("m") else float(s)


def _pod_resources(group: dict) -> dict[str, float]:
    """CPUs and GPUs Ray sees in one pod of a KubeRay group: ``rayStartParams`` first, else the container's limits."""
    params = group.get("rayStartParams") or {}
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers") or [{}])
    res = containers[0].get("resources") or {}
    limits = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    out = {}
    for key, param, limit in (("CPU", "num-cpus", "cpu"), ("GPU", "num-gpus", GPU_KEY)):
        v = params.get(param, limits.get(limit, 0))
        out[key] = _quantity(v) if v not in (None, "") else 0.0
    return out


def raycluster_maximum(spec: dict) -> dict[str, float]:
    """What a KubeRay ``RayCluster`` spec can grow to: the head's pod plus ``maxReplicas`` (else ``replicas``)
    pods of each worker group (``workerGroupSpecs``), each pod's CPUs and GPUs as Ray counts them."""
    total = dict(_pod_resources(spec.get("headGroupSpec") or {}))
    for g in spec.get("workerGroupSpecs") or []:
        n = g.get("maxReplicas", g.get("replicas", 0)) or 0
        for k, v in _pod_resources(g).items():
            total[k] = total.get(k, 0.0) + int(n) * v
    return total


def kuberay_maximum(timeout: float = 5.0) -> dict[str, float]:
    """In a KubeRay pod: the RayCluster's maximum (``raycluster_maximum``) from the Kubernetes API; {} elsewhere
    or when the pod's service account may not read it."""
    name, host = os.environ.get("RAY_CLUSTER_NAME"), os.environ.get("KUBERNETES_SERVICE_HOST")
    if not (name and host and (SERVICE_ACCOUNT / "token").is_file()):
        return {}
    try:
        ns = (SERVICE_ACCOUNT / "namespace").read_text().strip()
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        req = urllib.request.Request(f"https://{host}:{port}/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:  # noqa: S310 (https only)
            return raycluster_maximum(json.loads(r.read()).get("spec") or {})
    except (OSError, ValueError, ssl.SSLError):
        return {}


def _head_maximum_here() -> dict[str, float]:
    return bootstrap_capacity() or kuberay_maximum()


def head_maximum(timeout: float = PROBE_TIMEOUT_S) -> dict[str, float]:
    """The autoscaler's maximum CPUs and GPUs, read on the head node by a zero-CPU Ray task ({} when the
    cluster has no autoscaler config there, or the task does not run within ``timeout``)."""
    import ray

    task = ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_retries=0)(_head_maximum_here)
    ref = task.remote()
    try:
        return dict(ray.get(ref, timeout=timeout))
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        ray.cancel(ref, force=True)
        return {}


def _probe_node(folder: str, token: str, node_id: str) -> bool:
    """On one node: whether the driver's probe file is there with its token; then write this node's own."""
    try:
        seen = (Path(folder) / f".oodsweep-probe-{token}").read_text() == token
    except OSError:
        seen = False
    try:
        (Path(folder) / f".oodsweep-probe-{token}-{node_id}").write_text(token)
    except OSError:
        pass
    return seen


def probe_storage(folder: str | os.PathLike, nodes: list[dict], timeout: float = PROBE_TIMEOUT_S
                  ) -> dict[str, bool] | None:
    """Does every node of ``nodes`` (``ray.nodes()`` entries) share ``folder`` with the driver?

    Returns ``{"<node address> (<node id>)": shared}``, shared when the node read the driver's probe file and
    the driver reads the node's; None when the probe could not run (``folder`` cannot be created here, or
    a node's task did not answer within ``timeout``: the caller falls back to its static check).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(folder)
    token = secrets.token_hex(8)
    probe = folder / f".oodsweep-probe-{token}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    except OSError:
        return None
    task = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    alive = [n for n in nodes if n.get("Alive")]
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        str(folder), token, n["NodeID"]) for n in alive]
    try:
        seen = ray.get(refs, timeout=timeout)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        for r in refs:
            ray.cancel(r, force=True)
        return None
    finally:
        probe.unlink(missing_ok=True)
    out = {}
    for n, s in zip(alive, seen):
        back = folder / f".oodsweep-probe-{token}-{n['NodeID']}"
        out[f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})"] = bool(s) and back.is_file()
        back.unlink(missing_ok=True)
    return out
