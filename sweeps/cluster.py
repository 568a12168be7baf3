"""Where a sweep runs: connecting to Ray, checks before launch, and GPU packing (docs/architecture.md "Cluster").

* ``connect``: a running cluster when ``--address`` or ``$RAY_ADDRESS`` says so (inside a Ray job
  the job sets ``$RAY_ADDRESS``), else a local Ray.
* ``check_storage`` / ``check_tracking``: refuse to launch on storage the cluster's nodes do not
  share, or with an MLflow store that cannot be reached, with the fix in the message.
* ``capacity`` / ``trial_resources`` / ``max_concurrent``: per-architecture GPU shares (the model
  registry's ``ModelSpec.gpu_share``) so that small models share a GPU (two UNet-R50 trials on one
  H100 gave 2.17x the throughput of one, docs/performance.md "GPU anchors"), and the number of concurrent trials
  from what the cluster has or, on an autoscaling cluster, can grow to.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .console import log
from .errors import ClusterError, StorageError, TrackingError
from .nodes import BOOTSTRAP_CONFIG, bootstrap_capacity, head_maximum, probe_storage  # noqa: F401 (re-exported)
from .spec import SpecError

#: The δ net is a UNet-R18-sized network (docs/performance.md "GPU anchors": 1.7 GiB at 256², batch 32).
DELTA_GPU_SHARE = 0.25

#: File systems every node of a cluster can see the same way (from ``/proc/mounts``).
SHARED_FS = ("nfs", "nfs4", "efs", "lustre", "cifs", "smb3", "smbfs", "glusterfs", "ceph", "beegfs", "gpfs",
             "fuse.s3fs", "fuse.mountpoint-s3", "fuse.gcsfuse", "fuse.juicefs", "fuse.goofys", "fuse.rclone",
             "fuse.sshfs", "9p", "virtiofs")
SHARED_ENV = "OODSWEEP_SHARED_STORAGE"
_started_local = False  # set by connect(): a local Ray of our own cannot autoscale
_said_no_gpu = False  # capacity() has logged that a cluster given by address shows no GPU


# ------------------------------------------------------------------ connecting

def connect(address: str | None = None, num_cpus: int | None = None, runtime_env: dict | None = None) -> bool:
    """Connect to the cluster ``address`` or ``$RAY_ADDRESS`` names, else start a local Ray. True when this
    call started a local Ray of the driver's own (only that one may be shut down or reaped by the driver).

    ``runtime_env`` (the spec's ``runtime_env:``) becomes the job's: Ray ships the user's packages to every
    node and puts them on each task's and trial's ``sys.path``."""
    import copy

    import ray

    global _started_local
    runtime_env = copy.deepcopy(runtime_env)  # ray.init rewrites it in place (local paths -> uploaded URIs)
    if ray.is_initialized():
        if runtime_env:
            log("Ray was already initialised in this process: the spec's runtime_env is not applied to it")
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"connecting to the Ray cluster at {address}")
        _started_local = False
        try:
            ray.init(address=address, runtime_env=runtime_env)
        except ConnectionError as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({e}); check --address / "
                               f"$RAY_ADDRESS, or unset both to run on a local Ray") from e
    else:
        log("starting a local Ray")
        # "local": a new Ray of our own, even when `ray start` left a cluster running on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                 runtime_env=runtime_env)
        _started_local = True
    return _started_local


ADDRESS_TIMEOUT_S = 10.0


def check_address(address: str | None = None, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse an unreachable cluster address (``--address`` or ``$RAY_ADDRESS``) within ``timeout`` seconds.

    ``ray.init`` keeps retrying an address where nothing answers (minutes of GCS warnings); one TCP
    connection to the head's port says the same at once. "auto" and "local" are left to Ray.
    """
    import socket
    from urllib.parse import urlsplit

    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    where = "--address" if address != os.environ.get("RAY_ADDRESS") else "$RAY_ADDRESS"
    u = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = u.hostname, u.port or (10001 if address.startswith("ray://") else 6379)
    except ValueError as e:
        raise ClusterError(f"{where} {address!r} is not a cluster address ({e}); give HOST:PORT of the head "
                           f"node (e.g. 10.0.0.5:6379), or unset it to run on a local Ray") from None
    if not host:
        raise ClusterError(f"{where} {address!r} is not a cluster address; give HOST:PORT of the head node "
                           f"(e.g. 10.0.0.5:6379), or unset it to run on a local Ray")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({where}): {e.strerror or e} within {timeout:g} s. "
            f"Check that the head node runs and the port is open: `ray status --address {host}:{port}` on a "
            f"machine that can see it (the head prints its address at `ray start --head`); then fix {where}, "
            f"or unset it to run on a local Ray. Nothing was started or frozen.") from None


def node_hosts() -> list[str]:
    """The IP addresses of the cluster's live nodes (one entry per node)."""
    import ray

    return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]


# ------------------------------------------------------------------ checks before launch

def filesystem_type(path: str | os.PathLike, mounts: str | None = None) -> str:
    """The type of the file system holding ``path``: the longest mount point above it in /proc/mounts."""
    p = Path(path).resolve()  # symlinks of the existing part resolved; the rest taken as written
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    best, fstype = "", "unknown"
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def check_storage_on_nodes(path: str | os.PathLike, nodes: list[dict], what: str = "storage") -> None:
    """Refuse ``path`` when a node of the cluster does not share it with the driver, asked of the nodes.

    A cluster given by address (``ray://``, KubeRay, Slurm, ``ray up``) is probed: a Ray task on each
    alive node reads a file the driver wrote under ``path`` and writes its own (``nodes.probe_storage``).
    Where the probe cannot run, and on a local Ray of the driver's own, the static check
    (``check_storage``: the file system type of ``path`` here) decides.
    """
    hosts = [n["NodeManagerAddress"] for n in nodes if n.get("Alive")]
    if "://" in str(path) or os.environ.get(SHARED_ENV, "") == "1":
        return
    if not _started_local:
        shared = probe_storage(path, nodes)
        if shared is not None:
            bad = [n for n, ok in shared.items() if not ok]
            if not bad:
                return
            raise StorageError(
                f"{what} {str(path)!r} is not shared by every node of the Ray cluster: {len(bad)} of {len(shared)} "
                f"node(s) ({', '.join(bad)}) did not see the file this driver wrote there, or wrote one the "
                f"driver cannot read: trials there would write where the driver cannot read. Put `storage:` "
                f"(or $OODSWEEP_STORAGE) on storage every node and the driver mount at the same path "
                f"(cluster.yaml mounts the S3 bucket at /mnt/oodsweep), or an object store URL.")
        log(f"{what}: the nodes' storage probe did not answer; judging {str(path)!r} by its file system here")
    check_storage(path, hosts, what)


def check_storage(path: str | os.PathLike, hosts: list[str], what: str = "storage",
                  mounts: str | None = None) -> None:
    """Refuse a node-local ``path`` on a cluster whose nodes are on more than one machine.

    Trials on every node write their records, checkpoints and caches under ``path``, and the
    driver reads them: the nodes must share it. Nodes on one machine (``ray.cluster_utils``,
    a laptop) share any local path.
    """
    if "://" in str(path) or len(set(hosts)) <= 1 or os.environ.get(SHARED_ENV, "") == "1":
        return
    fstype = filesystem_type(path, mounts)
    if fstype in SHARED_FS:
        return
    raise StorageError(
        f"{what} {str(path)!r} is on a node-local file system ({fstype}) but the Ray cluster has "
        f"{len(set(hosts))} machines ({', '.join(sorted(set(hosts)))}): trials on other nodes would write "
        f"where the driver cannot read. Put `storage:` (or $OODSWEEP_STORAGE) on storage every node mounts "
        f"at the same path (cluster.yaml mounts the S3 bucket at /mnt/oodsweep), or, if this path is "
        f"shared in a way oodsweep does not recognise, set {SHARED_ENV}=1.")


#: Where smp and timm fetch ImageNet encoder weights from (Hugging Face Hub; GitHub release assets).
WEIGHT_HOSTS: tuple[tuple[str, int], ...] = (("huggingface.co", 443), ("github.com", 443))


def check_pretrained_weights(spec, hosts: tuple[tuple[str, int], ...] = WEIGHT_HOSTS, timeout: float = 3.0) -> None:
    """``pool.encoder_weights: imagenet`` needs the weight hosts: fail before any trial starts if one
    cannot be reached (a TCP connect with a short timeout), saying how to give the weights offline."""
    import socket

    if spec.pool.encoder_weights is None or str(spec.pool.encoder_weights) != "imagenet":
        return
    from trainables.models import encoder_file_name

    for host, port in hosts:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            files = sorted({f for a in spec.pool.arch.values if (f := encoder_file_name(a, spec.pool.models))})
            raise SpecError(
                f"pool.encoder_weights: 'imagenet' is downloaded by smp/timm when each trial starts, but "
                f"{host}:{port} cannot be reached from this machine ({e or type(e).__name__}). Give the weights "
                f"offline: pool.encoder_weights: /path/to/dir holding {', '.join(files)} (the encoders' ImageNet "
                f"state dicts, e.g. saved with torch.save on a connected machine), or a single file when the "
                f"pool has one encoder; or encoder_weights: null for random init") from None


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with the fix, when the MLflow tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http(s) only)
                if r.status == 200:
                    return
                problem = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            problem = str(getattr(e, "reason", e))
        raise TrackingError(f"the MLflow server at {uri} does not answer ({problem}). Start it (cluster.yaml's "
                        f"head_setup_commands do: `mlflow server --host 127.0.0.1 --port 5000 ...`), or set "
                        f"`tracking.uri` / $MLFLOW_TRACKING_URI to a reachable server or to "
                        f"sqlite:////ABSOLUTE/PATH/mlflow.db")
    if uri.startswith("sqlite:"):
        path = uri.split("sqlite:///", 1)[-1]
        if not path.startswith("/"):
            raise TrackingError(f"tracking URI {uri!r} is relative; Ray Tune changes each trial's working directory. "
                            f"Use sqlite:////ABSOLUTE/PATH/mlflow.db (four slashes)")
        folder = Path(path).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the folder of the MLflow database {path!r}: {e}") from e
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"the folder of the MLflow database {path!r} is not writable; choose another "
                            f"`tracking.uri` or $MLFLOW_TRACKING_URI")
        return
    if uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise TrackingError(f"tracking URI {uri!r} is a plain file store, which MLflow 3 refuses; use "
                        f"sqlite:////ABSOLUTE/PATH/mlflow.db or an MLflow server (http://host:port)")


# ------------------------------------------------------------------ GPU packing

def capacity() -> dict[str, float]:
    """CPUs and GPUs the cluster has now (``ray.cluster_resources``) or, if it autoscales, can have.

    The autoscaler's maximum is read on the head node (``nodes.head_maximum``: ``ray up``'s bootstrap config
    or a KubeRay RayCluster), not on the driver's machine, so a driver connected through ``ray://`` or
    running in a KubeRay job sees the GPU workers its cluster may start. A local Ray of the driver's own
    cannot grow: its resources are all.
    """
    import ray

    now = ray.cluster_resources()
    grow = {} if _started_local else head_maximum()
    cap = {k: max(float(now.get(k, 0.0)), float(grow.get(k, 0.0))) for k in ("CPU", "GPU")}
    global _said_no_gpu
    if not _started_local and not cap["GPU"] and not _said_no_gpu:
        _said_no_gpu = True  # once per driver: capacity() is asked per stage
        log("the Ray cluster has no GPU now and no autoscaler maximum with GPUs was found on its head node: "
            "`gpu: auto` gives trials no GPU; set pool.resources.gpu (and uncertainty.resources.gpu) to ask "
            "for GPUs anyway")
    return cap


def largest_node_cpus() -> float:
    """The CPUs of the largest alive node (a task runs on one node): 0 when Ray reports none."""
    import ray

    return max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


def gpu_share(arch: str | None, gpu: float | str | None, per_arch: dict[str, dict[str, Any]] | None,
              has_gpu: bool, models: dict | None = None) -> float:
    """The GPU fraction one trial of ``arch`` asks for (``arch`` None: the δ net).

    The share of ``gpu: auto`` is the architecture's ``ModelSpec.gpu_share`` (``trainables.models.resolve_model``;
    ``models``: the pool's open architectures, whose definition may set ``gpu_share``); an architecture
    that does not resolve is an error listing the registered ones.
    """
    from trainables.models import MODELS, resolve_model

    spec = None
    if arch is not None:
        try:
            spec = resolve_model(arch, models)
        except (KeyError, ValueError):
            raise SpecError(f"pool.arch: unknown architecture {arch!r}, so its GPU share is unknown; registered "
                            f"architectures: {', '.join(MODELS)} (trainables.models.MODELS), or an open one "
                            f"(smp:<Arch>:<encoder>, monai:<Network>, {{target: ...}}) with its gpu_share") from None
    override = (per_arch or {}).get(arch or "", {}).get("gpu")
    if override is not None:
        return float(override)
    if gpu not in (None, "auto"):
        return float(gpu)
    if not has_gpu:
        return 0.0
    return DELTA_GPU_SHARE if spec is None else spec.gpu_share


def trial_resources(arch: str, cpu: float, gpu: float | str | None, per_arch: dict | None,
                    has_gpu: bool, models: dict | None = None) -> dict[str, float]:
    cpu = float((per_arch or {}).get(arch, {}).get("cpu", cpu))
    return {"cpu": cpu, "gpu": gpu_share(arch, gpu, per_arch, has_gpu, models)}


def max_concurrent(demands: list[dict[str, float]], cap: dict[str, float]) -> int:
    """How many trials can run at once: the cluster's capacity over the smallest trial's demand."""
    n = []
    cpu = min(d["cpu"] for d in demands)
    if cpu > 0:
        n.append(int(cap.get("CPU", 1) // cpu))
    gpus = [d["gpu"] for d in demands if d.get("gpu")]
    if gpus and len(gpus) == len(demands):  # every trial needs a GPU share
        n.append(int(round(cap.get("GPU", 0) / min(gpus), 6)))
    return max(1, min(n) if n else 1)
