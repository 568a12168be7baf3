"""deploy/kuberay: the RayJob against KubeRay's own CRD schema, and what a schema cannot check.

The RayJob is validated with ``jsonschema`` against the ``openAPIV3Schema`` of the served storage
version of KubeRay v1.7.0's RayJob CRD (a verbatim copy in tests/fixtures/kuberay/, its source named
there). Beyond the schema: the entrypoint is an ``oodsweep run`` line the real CLI parser accepts, the
spec in the ConfigMap loads with the project's loader and the pods' env, the GPU worker's CPUs and GPUs
match the spec's per-trial shares, every image is the installed Ray's version (as cluster.yaml's), the
head, the workers and MLflow share one ReadWriteMany volume at the path the spec's storage is under,
MLflow's Service, allowed hosts and tracking URI agree, token authentication is on, and the README's
shell lines use commands that exist.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import json
import math
import re
import shlex
from importlib.metadata import entry_points, version
from pathlib import Path

import jsonschema
import pytest
import yaml

import sweeps.cli
from sweeps import cluster
from sweeps.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kuberay"
CRD = ROOT / "tests" / "fixtures" / "kuberay" / "ray.io_rayjobs.yaml"
RAY_VERSION = version("ray")  # the installed Ray (importlib.metadata: no `import ray` in a unit test)
GPU = "nvidia.com/gpu"


# ------------------------------------------------------------------ the CRD's schema as JSON Schema

def _k8s_to_jsonschema(s: dict) -> dict:
    """A CRD's OpenAPI v3 schema node -> JSON Schema with the API server's meaning.

    jsonschema ignores keywords it does not know, which covers most of OpenAPI's and Kubernetes'
    extras: ``format: int32/int64/date-time`` (no format checker is passed), ``default`` (the API
    server fills defaults, a validator does not), ``x-kubernetes-map-type`` and the CEL rules of
    ``x-kubernetes-validations`` (not evaluated here; none of them concerns a field these manifests set).
    Four need a translation:

    * ``x-kubernetes-int-or-string: true`` (resource quantities, ports): integer or string. controller-gen
      writes an ``anyOf`` beside it already; a node without one gets it here.
    * unknown fields: a structural schema rejects a field it does not declare (kubectl's default
      ``--validate=strict``), unless ``x-kubernetes-preserve-unknown-fields``. OpenAPI says nothing, so
      every object node that lists ``properties`` and no ``additionalProperties`` gets
      ``additionalProperties: false``; this is what catches a misspelt key.
    * ``nullable: true``: null is allowed besides the node's type.
    * ``x-kubernetes-list-type: map`` / ``x-kubernetes-list-map-keys``, ``set``: unique keys / items,
      checked by the two keywords added to the validator (``_VALIDATOR``).
    """
    s = dict(s)
    if "properties" in s:
        s["properties"] = {k: _k8s_to_jsonschema(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = _k8s_to_jsonschema(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_k8s_to_jsonschema(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s and "type" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (s.get("type") == "object" and "properties" in s and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        s["additionalProperties"] = False
    if s.pop("nullable", False):
        s = {"anyOf": [s, {"type": "null"}]}
    return s


def _list_map_keys(validator, keys, instance, schema):
    """``x-kubernetes-list-map-keys``: no two items of the list share the values of ``keys``."""
    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k)) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"items {seen[key]} and {i} have the same {keys} "
                                                 f"({[item.get(k) for k in keys]}); they must be unique")
            seen.setdefault(key, i)


def _list_type(validator, kind, instance, schema):
    """``x-kubernetes-list-type: set``: no duplicate items."""
    if kind == "set" and validator.is_type(instance, "array"):
        items = [json.dumps(x, sort_keys=True) for x in instance]
        if len(set(items)) != len(items):
            yield jsonschema.ValidationError(f"duplicate items in a set-type list {instance!r}")


# OpenAPI v3.0's schema object follows JSON Schema draft 4 (boolean exclusiveMinimum/-Maximum)
_VALIDATOR = jsonschema.validators.extend(jsonschema.Draft4Validator, {
    "x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-list-type": _list_type})


@functools.cache
def crd_validator():
    """The validator of the CRD's served storage version (v1). LibYAML's loader when PyYAML has it:
    0.2 s for the 1.4 MB file, against seconds for the pure-Python one."""
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob"
    (served,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    assert f"{crd['spec']['group']}/{served['name']}" == "ray.io/v1"
    return _VALIDATOR(_k8s_to_jsonschema(served["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict, validator=None) -> list[str]:
    v = validator or crd_validator()
    return [f".{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def pod_template_validator():
    """core/v1 PodTemplateSpec's schema, as the CRD embeds it for the head's template: it checks the plain
    pods of mlflow.yaml and storage.yaml too (Kubernetes' own OpenAPI document is not in the repository)."""
    s = crd_validator().schema["properties"]["spec"]["properties"]["rayClusterSpec"]
    return _VALIDATOR(s["properties"]["headGroupSpec"]["properties"]["template"])


# ------------------------------------------------------------------ the manifests

@functools.cache
def _documents() -> tuple[tuple[str, dict], ...]:
    docs = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return tuple(docs)


def docs(kind: str) -> list[dict]:
    return [copy.deepcopy(d) for _, d in _documents() if d["kind"] == kind]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in docs(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {DEPLOY}, found {len(found)}"
    return found[0]


def rayjob() -> dict:
    return one("RayJob")


def head_pod(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def gpu_group(job: dict) -> dict:
    groups = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
              if GPU in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert len(groups) == 1, "expected one worker group with nvidia.com/gpu limits"
    return groups[0]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def mounts(pod: dict) -> dict[str, tuple[str, str]]:
    """mount path -> (kind, name) of what the pod's first container mounts there (PVC claim, ConfigMap)."""
    vols = pod["volumes"]
    out = {}
    for m in pod["containers"][0].get("volumeMounts", []):
        (v,) = [v for v in vols if v["name"] == m["name"]]
        if "persistentVolumeClaim" in v:
            out[m["mountPath"]] = ("pvc", v["persistentVolumeClaim"]["claimName"])
        elif "configMap" in v:
            out[m["mountPath"]] = ("configmap", v["configMap"]["name"])
        else:
            out[m["mountPath"]] = ("other", v["name"])
    return out


def cpus(q) -> float:
    """A Kubernetes CPU quantity ("8", 8, "500m") as KubeRay passes it to `ray start --num-cpus`: whole CPUs,
    rounded up (Go's resource.Quantity.Value())."""
    q = str(q)
    return float(math.ceil(float(q[:-1]) / 1000 if q.endswith("m") else float(q)))


def ray_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees in a pod of ``group``: rayStartParams' num-cpus/num-gpus, else what KubeRay
    derives from the container (CPUs: limits, else requests; GPUs: the nvidia.com/gpu limit)."""
    res = group["template"]["spec"]["containers"][0]["resources"]
    params = group.get("rayStartParams") or {}
    if "num-cpus" in params:
        cpu = float(params["num-cpus"])
    else:
        cpu = cpus(res.get("limits", {}).get("cpu") or res.get("requests", {}).get("cpu"))
    gpu = params.get("num-gpus") or res.get("limits", {}).get(GPU, 0)
    return cpu, float(gpu)


def cli_args(argv: list[str], monkeypatch) -> tuple[str, object]:
    """Parse ``argv`` (after ``oodsweep``) with the real CLI, every command replaced by a recorder."""
    called = []
    for name in [n for n in vars(sweeps.cli) if n.startswith("_cmd_")]:
        monkeypatch.setattr(sweeps.cli, name, lambda args, _n=name: called.append((_n, args)) or 0)
    assert sweeps.cli.main(argv) == 0
    return called[0]


def spec_from_configmap(tmp_path: Path, monkeypatch):
    """The spec the entrypoint runs, loaded from the ConfigMap the head mounts, with the head's env only."""
    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    _, args = cli_args(argv[1:], monkeypatch)
    path = Path(args.spec)
    kind, cm_name = mounts(head_pod(job))[str(path.parent)]
    assert kind == "configmap", f"the entrypoint's spec {path} is not in a ConfigMap the head mounts"
    f = tmp_path / path.name
    f.write_text(one("ConfigMap", cm_name)["data"][path.name])
    return load_spec(f, env=env(head_pod(job)["containers"][0]))


# ------------------------------------------------------------------ schema

def test_rayjob_passes_the_crd_schema():
    assert [d["kind"] for d in docs("RayJob")] == ["RayJob"]
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert schema_errors(job) == []


def test_the_plain_pods_pass_the_pod_template_schema():
    templates = [d["spec"]["template"] for d in docs("Deployment")]
    templates += [{"metadata": d["metadata"], "spec": d["spec"]} for d in docs("Pod")]
    assert len(templates) == 2
    for t in templates:
        assert schema_errors(t, pod_template_validator()) == []
    t = templates[0]
    t["spec"]["containers"][0]["volumeMount"] = t["spec"]["containers"][0].pop("volumeMounts")  # misspelt
    assert any("'volumeMount' was unexpected" in e for e in schema_errors(t, pod_template_validator()))


def _misspelt(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpec"] = job["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
    return ".spec.rayClusterSpec", "'workerGroupSpec' was unexpected"


def _replicas_two(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    return ".spec.rayClusterSpec.workerGroupSpecs.0.replicas", "'two' is not of type 'integer'"


def _gpu_list(job):  # an int-or-string quantity given as a list
    gpu_group(job)["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] = [1]
    return ".spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.nvidia.com/gpu", \
        "is not valid under any of the given schemas"


def _auth_mode(job):
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    return ".spec.rayClusterSpec.authOptions.mode", "is not one of ['disabled', 'token']"


def _no_template(job):
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    return ".spec.rayClusterSpec.headGroupSpec", "'template' is a required property"


def _same_port_twice(job):  # containers[].ports is a list-map keyed by containerPort and protocol
    ports = head_pod(job)["containers"][0]["ports"]
    ports.append({"containerPort": ports[0]["containerPort"], "name": "again"})
    return ".spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.ports", "must be unique"


@pytest.mark.parametrize("plant", [_misspelt, _replicas_two, _gpu_list, _auth_mode, _no_template, _same_port_twice])
def test_a_planted_error_is_rejected_by_the_schema(plant):
    job = rayjob()
    where, message = plant(job)
    errors = schema_errors(job)
    assert any(e.startswith(where + ":") and message in e for e in errors), errors


# ------------------------------------------------------------------ what a schema cannot check

def test_kuberays_own_checks_beyond_the_schema():
    """The rules the operator applies before it creates anything (KubeRay v1.7.0,
    ray-operator/controllers/ray/utils/validation.go) that concern fields these manifests set."""
    job = rayjob()
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47  # DNS-1035, MaxRayJobNameLength
    rc = job["spec"]["rayClusterSpec"]
    assert tuple(map(int, rc["rayVersion"].split(".")[:2])) >= (2, 52), "authOptions.mode token needs Ray 2.52+"
    assert not rc["authOptions"].get("enableK8sTokenAuth"), "not supported for a RayJob"
    assert rc["headGroupSpec"]["template"]["spec"]["containers"]
    for g in [rc["headGroupSpec"]] + rc["workerGroupSpecs"]:
        params = g.get("rayStartParams") or {}
        assert not (set(params) & {"num-cpus", "num-gpus", "memory", "resources"} and g.get("resources"))
        assert "labels" not in params
    for g in rc["workerGroupSpecs"]:
        assert g["template"]["spec"]["containers"]
        if not rc.get("enableInTreeAutoscaling"):
            assert 0 <= g["minReplicas"] <= g["maxReplicas"], g["groupName"]
    assert job["spec"].get("ttlSecondsAfterFinished", 0) >= 0 and job["spec"]["shutdownAfterJobFinishes"]


def test_the_entrypoint_is_oodsweep_run_and_the_cli_accepts_it(monkeypatch):
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["oodsweep", "run"], "the job runs the same `oodsweep run SPEC` as every other cluster"
    (script,) = entry_points(group="console_scripts", name="oodsweep")
    assert script.value == "sweeps.cli:main"  # so `oodsweep` in the image is the parser used here
    command, args = cli_args(argv[1:], monkeypatch)
    assert command == "_cmd_run" and args.spec.startswith("/")
    with pytest.raises(SystemExit):  # and the parser does refuse a verb it does not have
        cli_args(["runn", args.spec], monkeypatch)


def test_the_spec_in_the_configmap_loads_with_the_pods_env(tmp_path, monkeypatch):
    spec = spec_from_configmap(tmp_path, monkeypatch)
    assert spec.name and spec.tracking_uri is None  # MLflow comes from the pods' MLFLOW_TRACKING_URI
    job = rayjob()
    head_env, worker_env = env(head_pod(job)["containers"][0]), env(gpu_group(job)["template"]["spec"]["containers"][0])
    assert head_env == worker_env, "head and workers must see the same storage, data and MLflow settings"


def test_gpu_workers_are_packed_as_the_spec_asks(tmp_path, monkeypatch):
    """Every trial fits a worker, and its CPUs feed as many trials as its GPUs hold: for each architecture
    (and the δ net), trials per worker = GPUs / share, needing trials x cpu <= the worker's CPUs; the
    densest packing uses them all."""
    spec = spec_from_configmap(tmp_path, monkeypatch)
    job = rayjob()
    group = gpu_group(job)
    worker_cpu, worker_gpu = ray_resources(group)
    assert worker_gpu >= 1 and float(worker_gpu).is_integer()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert ray_resources(head) == (0.0, 0.0), "the head runs the driver only (cluster.yaml: head CPU 0)"
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] >= 1
    assert job["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling") is False  # fixed size: capacity at start

    demands = {a: cluster.trial_resources(a, spec.pool.cpu, spec.pool.gpu, spec.pool.per_arch, has_gpu=True)
               for a in spec.pool.arch.values}
    if spec.uncertainty is not None:
        demands["δ"] = {"cpu": spec.uncertainty.cpu, "gpu": cluster.gpu_share(None, spec.uncertainty.gpu, None, True)}
    per_worker = {}
    for what, d in demands.items():
        assert 0 < d["gpu"] <= worker_gpu and d["cpu"] <= worker_cpu, f"{what} {d} does not fit a worker"
        n = math.floor(worker_gpu / d["gpu"] + 1e-9)
        assert n * d["cpu"] <= worker_cpu, (f"{what}: {n} trials fill the worker's {worker_gpu:g} GPUs but need "
                                            f"{n * d['cpu']:g} CPUs, the worker has {worker_cpu:g}")
        per_worker[what] = n
    assert max(per_worker[w] * demands[w]["cpu"] for w in demands) == worker_cpu, "CPUs no trial can use"
    # by hand, as the manifest's comment says: 1 GPU, 8 CPUs; 4 quarter-GPU trials x 2 CPUs, 2 half-GPU ones
    assert (worker_cpu, worker_gpu) == (8, 1)
    assert per_worker == {"unet_r18": 4, "unet_effb0": 2, "medsam_tiny": 4, "δ": 4}


def test_every_image_is_the_installed_rays_version_as_in_cluster_yaml():
    base = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"] == base
    froms = re.findall(r"^FROM\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert froms == [base]
    job = rayjob()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == RAY_VERSION
    pods = [head_pod(job)] + [g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    pods += [d["spec"]["template"]["spec"] for d in docs("Deployment")] + [d["spec"] for d in docs("Pod")]
    images = {c["image"] for p in pods for c in p["containers"]}
    assert len(images) == 1, f"one image (built by deploy/kuberay/Dockerfile) everywhere, found {images}"
    assert images.pop().endswith(f"-ray{RAY_VERSION}"), "the image's tag names its Ray version"


def test_head_workers_and_mlflow_share_the_volume_the_spec_writes_to(tmp_path, monkeypatch):
    spec = spec_from_configmap(tmp_path, monkeypatch)
    job = rayjob()
    head = {p: v for p, v in mounts(head_pod(job)).items() if v[0] == "pvc"}
    assert len(head) == 1
    ((path, (_, claim)),) = head.items()
    pods = [g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    pods += [d["spec"]["template"]["spec"] for d in docs("Deployment")] + [d["spec"] for d in docs("Pod")]
    for pod in pods:
        assert mounts(pod).get(path) == ("pvc", claim), f"{pod['containers'][0]['name']} lacks {claim} at {path}"
    assert "ReadWriteMany" in one("PersistentVolumeClaim", claim)["spec"]["accessModes"]
    for what, p in [("storage", spec.storage), ("slice cache", spec.cache_root), ("data root", spec.data.root)]:
        assert Path(p).is_relative_to(path), f"the spec's {what} {p} is not on the shared volume {path}"


def test_mlflow_service_allowed_hosts_and_tracking_uri_agree():
    uri = env(head_pod(rayjob())["containers"][0])["MLFLOW_TRACKING_URI"]
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", uri)
    assert m, uri
    svc = one("Service", m[1])
    port = [p for p in svc["spec"]["ports"] if p["port"] == int(m[2])]
    assert port, f"MLFLOW_TRACKING_URI {uri} names port {m[2]}; Service {m[1]} has {svc['spec']['ports']}"
    dep = [d for d in docs("Deployment") if d["spec"]["template"]["metadata"]["labels"].items()
           >= svc["spec"]["selector"].items()]
    assert len(dep) == 1, "the Service selects the MLflow Deployment"
    (c,) = dep[0]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["mlflow", "server"]
    args = dict(a.split("=", 1) for a in c["args"])
    assert port[0]["targetPort"] in [p["name"] for p in c["ports"]]
    # MLflow's Host-header check (mlflow.server.security_utils.is_allowed_host_header: exact match, or
    # fnmatch when the pattern has a *); not imported, its module costs seconds to import
    allowed = args["--allowed-hosts"].split(",")
    for host in (f"{m[1]}:{m[2]}", f"{m[1]}.default.svc.cluster.local:{m[2]}", "localhost:5000"):
        assert any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed), host
    assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    (db,) = [e for e in c["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
    assert "secretKeyRef" in db["valueFrom"], "the database URI (with its password) comes from a Secret"
    policy = one("NetworkPolicy", "oodsweep-mlflow")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= svc["spec"]["selector"].items()
    sources = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
    assert {"ray.io/is-ray-node": "yes"} in sources


def test_token_authentication_is_on_and_its_secrets_are_documented():
    job = rayjob()
    auth = job["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    readme = (DEPLOY / "README.md").read_text()
    # KubeRay reads the token from the Secret's key auth_token; the MLflow database URI from key uri
    assert f"kubectl create secret generic {auth['secretName']} --from-literal=auth_token=" in readme
    (db,) = [e["valueFrom"]["secretKeyRef"] for d in docs("Deployment") for c in d["spec"]["template"]["spec"]
             ["containers"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert f"kubectl create secret generic {db['name']} --from-literal={db['key']}=" in readme
    for f in DEPLOY.iterdir():
        assert not re.search(r"RAY_AUTH_MODE\W+(disabled|off|none)|mode:\s*disabled", f.read_text(), re.I), f


SHELL_COMMANDS = {"kubectl", "docker", "helm", "ray", "oodsweep"}


def test_readme_shell_lines_use_commands_that_exist(monkeypatch):
    """Every line of the README's ```bash blocks runs one of SHELL_COMMANDS (comments, continuations and
    VAR=value prefixes aside), and every oodsweep command line in them (also after `kubectl exec ... --`) is
    accepted by the real CLI parser."""
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
    assert blocks and {lang for lang, _ in blocks} <= {"bash", "text", "yaml"}
    lines = [ln.strip() for lang, b in blocks if lang == "bash" for ln in b.replace("\\\n", " ").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines
    checked = 0
    for ln in lines:
        argv = shlex.split(ln, comments=True)
        while re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value before a command sets its env
            argv = argv[1:]
        assert argv[0] in SHELL_COMMANDS, f"README shell line {ln!r} runs {argv[0]!r}"
        # oodsweep as the command, or as the command run by `kubectl exec ... --` / `ray job submit ... --`
        starts = [0] + [i + 1 for i, a in enumerate(argv) if a == "--"]
        at = next((i for i in starts if argv[i:i + 1] == ["oodsweep"]), None)
        if at is not None:
            rest = argv[at + 1:]
            end = next((i for i, a in enumerate(rest) if a in ("|", ">", "&&", ";")), len(rest))
            cli_args(rest[:end], monkeypatch)
            checked += 1
    assert checked >= 2
