"""Experiments on object storage (sweeps.objstore, sweeps.objlock) against a real S3 API: moto's server on
loopback. Unit tests of the working copy and the lock, then a sweep (pool and δ) on a two-node Ray cluster with
`storage: s3://...`: killed during the pool stage, resumed from the checkpoint Tune's state in the bucket names,
analysed, with the experiment only in the bucket.
"""
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
from conftest import OODSWEEP

from sweeps import objlock, objstore
from sweeps.errors import LockError

BUCKET = "oodsweep-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port, the AWS variables pointing at it, one bucket."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.2)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield {"client": client, "env": env}
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"][len(prefix):] for p in pages for o in p.get("Contents", [])]


# ------------------------------------------------------------------ units

def test_uri_and_spec_storage(tmp_path):
    from sweeps.spec import parse_spec

    assert objstore.is_remote("s3://b/p") and objstore.is_remote("gs://b") and not objstore.is_remote(tmp_path)
    assert not objstore.is_remote("file:///x")
    raw = {"name": "x", "storage": "s3://b/p/", "data": {"layout": "prostate_multisite", "root": str(tmp_path),
           "source": "A", "targets": ["B"], "image_size": 32},
           "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]}}}
    spec = parse_spec(raw, base_dir=tmp_path)
    assert spec.storage == "s3://b/p" and spec.cache_root.is_absolute()
    with pytest.raises(RuntimeError, match="object storage"):
        spec.experiment_dir  # noqa: B018
    assert objstore.remap({"a": "/t/x/r/c.pt", "b": ["/t/x"], "c": "/t/xy"}, "/t/x", "/n") == \
        {"a": "/n/r/c.pt", "b": ["/n"], "c": "/t/xy"}


def test_mirror_round_trip_puts_markers_last(tmp_path):
    import pyarrow.fs as pafs

    fs, remote = pafs.LocalFileSystem(), tmp_path / "bucket"
    remote.mkdir()
    a = objstore.Mirror(fs, str(remote), tmp_path / "a")
    (tmp_path / "a" / "records" / "parts").mkdir(parents=True)
    (tmp_path / "a" / "records" / "parts" / "m.member.json").write_text("{}")
    (tmp_path / "a" / "records" / "parts" / "m.slices.parquet").write_text("s")
    (tmp_path / "a" / ".scratch").mkdir()
    (tmp_path / "a" / ".scratch" / "ck").write_text("never uploaded")
    order = []
    real = fs.open_output_stream
    fs_calls = type("F", (), {"type_name": "local", "create_dir": lambda self, p, recursive: fs.create_dir(p, recursive=recursive),
                              "open_output_stream": lambda self, p: (order.append(p), real(p))[1],
                              "get_file_info": lambda self, p: fs.get_file_info(p)})()
    a.fs = fs_calls
    assert a.push() == 2
    assert order[-1].endswith("m.member.json") and not (remote / ".scratch").exists()
    assert a.push() == 0  # nothing changed
    b = objstore.Mirror(fs, str(remote), tmp_path / "b")
    assert b.pull() == 2 and (tmp_path / "b" / "records" / "parts" / "m.slices.parquet").read_text() == "s"
    (tmp_path / "b" / "records" / "parts" / "m.slices.parquet").unlink()  # set aside: deleted remotely too
    b.push()
    assert not (remote / "records" / "parts" / "m.slices.parquet").exists()


def test_working_copies_of_dead_processes_are_removed(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    for name in (f"oodsweep-{dead.pid}-abc", f"oodsweep-{dead.pid}-trial-x", f"oodsweep-{os.getpid()}-def",
                 "oodsweep-cache"):
        (tmp_path / name / "tiny").mkdir(parents=True)
    objstore._remove_orphans()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"oodsweep-{os.getpid()}-def", "oodsweep-cache"])


def test_attempts_one_file_each_when_the_folder_exists(tmp_path):
    from trainables import records

    records.log_attempt(tmp_path, "pool", "r1", 0)  # local experiment: the appended log, as before
    assert (tmp_path / "records" / "attempts.jsonl").read_text().count("\n") == 1
    (tmp_path / "records" / "attempts").mkdir()
    records.log_attempt(tmp_path, "pool", "r1", 1)
    records.log_attempt(tmp_path, "pool", "r2", 0)
    assert len(list((tmp_path / "records" / "attempts").glob("*.json"))) == 2
    assert (tmp_path / "records" / "attempts.jsonl").read_text().count("\n") == 1
    assert list(records.load_attempts(tmp_path)["start_epoch"]) == [0, 1, 0]


def test_lock_object_is_conditional_and_stale_after_its_holder_dies(s3):
    uri = f"s3://{BUCKET}/locks/a"
    held = objlock.acquire(uri)
    try:
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            objlock.acquire(uri)
        assert objlock.holder(uri).startswith(f"pid {os.getpid()}")
        with pytest.raises(Exception, match="PreconditionFailed|412"):  # S3 itself refuses a second create
            s3["client"].put_object(Bucket=BUCKET, Key="locks/a/.driver.lock", Body=b"x", IfNoneMatch="*")
    finally:
        objlock.release(held)
    assert objlock.holder(uri) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    body = {"pid": dead.pid, "host": socket.gethostname(), "since": "then", "beat": time.time()}
    s3["client"].put_object(Bucket=BUCKET, Key="locks/a/.driver.lock", Body=json.dumps(body).encode())
    assert objlock.holder(uri) is None  # its driver was killed: taken over at once
    objlock.release(objlock.acquire(uri))


def test_cache_published_with_its_file_list_last_and_fetched_once(s3, tmp_path, monkeypatch):
    from types import SimpleNamespace

    cache = tmp_path / "built" / "key123"
    (cache / "sub").mkdir(parents=True)
    (cache / "images.npy").write_bytes(b"x" * 10)
    (cache / "sub" / "index.parquet").write_bytes(b"y")
    spec = SimpleNamespace(remote=f"s3://{BUCKET}/c/exp", storage=f"s3://{BUCKET}/c", data=SimpleNamespace(cache_dir=None))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node"))
    (tmp_path / "node").mkdir()
    with pytest.raises(Exception, match="not published"):
        objstore.fetch_cache(f"s3://{BUCKET}/c/.cache/slices/key123")
    uri = objstore.publish_cache(spec, cache)
    assert uri == f"s3://{BUCKET}/c/.cache/slices/key123"
    assert sorted(_keys(s3["client"], "c/.cache/slices/key123/")) == ["images.npy", "published.json", "sub/index.parquet"]
    local = objstore.fetch_cache(uri)
    assert local == tmp_path / "node" / "oodsweep-cache" / "key123"
    assert (local / "sub" / "index.parquet").read_bytes() == b"y" and (local / "published.json").is_file()
    s3["client"].delete_object(Bucket=BUCKET, Key="c/.cache/slices/key123/images.npy")
    assert objstore.fetch_cache(uri) == local  # this node's copy is reused, not downloaded again


def test_tune_state_retired_in_the_bucket(s3):
    """Setting a stage's Tune state aside (a relocated experiment, or a done stage with a record gone) moves it
    in the bucket: Tune keeps it only there, so a move in the working copy alone left Tuner.restore to find it."""
    from ray import tune

    from sweeps import reconcile

    client, prefix = s3["client"], "retire/exp/"
    for key in ("pool/tuner.pkl", "pool/experiment_state-2026.json", "pool/trial_a/checkpoint_000000/model.pt",
                "pool/.oodsweep-done", "uncertainty/tuner.pkl", "uncertainty/train/delta-a/checkpoint_000000/d.pt",
                "records/parts/m.member.json"):
        client.put_object(Bucket=BUCKET, Key=prefix + key, Body=b"x")
    fs, root = objstore.filesystem(f"s3://{BUCKET}/retire/exp")
    assert tune.Tuner.can_restore(f"{root}/pool", storage_filesystem=fs)
    local = objstore.checkout(f"s3://{BUCKET}/retire/exp")
    try:
        dest = reconcile.retire_tune_state(local / "pool")
        assert dest is not None and dest.parent == local / "pool" / ".superseded"
        assert reconcile.retire_tune_state(local / "uncertainty").parent == local / "uncertainty" / ".superseded"
    finally:
        objstore.release(local)
    keys = set(_keys(client, prefix))
    assert not tune.Tuner.can_restore(f"{root}/pool", storage_filesystem=fs)
    assert not tune.Tuner.can_restore(f"{root}/uncertainty", storage_filesystem=fs)
    at = f"pool/.superseded/{dest.name}/"
    assert {at + "tuner.pkl", at + "experiment_state-2026.json", at + "trial_a/checkpoint_000000/model.pt"} <= keys
    assert {"pool/.oodsweep-done", "uncertainty/train/delta-a/checkpoint_000000/d.pt",  # kept where they were
            "records/parts/m.member.json"} <= keys
    assert not [k for k in keys if k.startswith(("pool/trial_a", "pool/experiment_state", "uncertainty/tuner"))]
    assert reconcile.retire_tune_state(Path("/nonexistent/pool")) is None  # a local stage that is not there


@pytest.mark.integration
def test_sam_embeddings_published_to_the_bucket_and_fetched_by_a_trial_elsewhere(s3, tiny_data, tmp_path, monkeypatch,
                                                                                  request):
    """A box-prompted pool on object storage: the pre-stage's Ray task computes the SAM embeddings on its node and
    publishes them beside the slice cache in the bucket; a trial on a node that has neither (a fresh temporary
    folder) gets both, and its embeddings are complete; a second pre-stage finds them there and adds nothing."""
    import ray

    from sweeps import pool
    from sweeps.driver import prepare_data
    from sweeps.embeddings import precompute_embeddings
    from sweeps.spec import parse_spec
    from trainables.medsam import EmbeddingJob, encoder_runs, missing_embeddings

    raw = {"name": "sam", "storage": f"s3://{BUCKET}/emb",
           "data": {"layout": "prostate_multisite", "root": str(tiny_data), "source": "SiteA", "targets": ["SiteB"],
                    "image_size": 32, "test_fraction": 0.25},
           "pool": {"arch": {"grid": ["medsam_tiny"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]}}}
    spec = parse_spec(raw, base_dir=tmp_path)
    # the Ray task's temporary folder (its worker inherits TMPDIR); short, for Ray's socket paths under it
    node = Path(tempfile.mkdtemp(prefix="oe", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(node, ignore_errors=True))
    monkeypatch.setenv("TMPDIR", str(node))
    monkeypatch.setattr("tempfile.tempdir", str(node))
    from ray.cluster_utils import Cluster

    # a cluster of its own, as the other in-process tests start theirs (a bare ray.init here left RAY_AUTH_MODE
    # set in this process, and a later test's `ray start` with a HOME of its own then wanted a token)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=cluster.address)
    try:
        with objstore.session(spec) as spec:
            cache = prepare_data(spec, progress=False)
            objstore.publish_cache(spec, cache)
            precompute_embeddings(spec, cache)
            space = pool.param_space(spec, cache)
            precompute_embeddings(spec, cache)  # found in the bucket: nothing computed again
    finally:
        ray.shutdown()
        cluster.shutdown()
    uri = space[objstore.EMBED_KEY]["medsam_tiny"]
    key = uri.rsplit("/", 1)[-1]
    published = _keys(s3["client"], f"emb/.cache/sam-embeddings/{key}/")
    assert {"published.json", "manifest.json", "embeddings.npy"} <= set(published), published
    assert len(encoder_runs(node / "oodsweep-cache" / "sam-embeddings", key)) == 1  # the encoder ran once

    other = tmp_path / "trial-node"  # a node with nothing of the experiment on it
    other.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(other))
    config = {k: v for k, v in space.items() if not isinstance(v, dict) or k == objstore.EMBED_KEY}
    config.update(arch="medsam_tiny", lr=1e-3, seed=0)
    with objstore.trial_copy(config, lambda rel: False) as (cfg, _):
        assert objstore.EMBED_KEY not in cfg and Path(cfg["cache"]).is_relative_to(other)
        folder = Path(cfg["cache"]).parent / "sam-embeddings" / key
        assert (folder / "published.json").is_file() and (folder / "embeddings.npy").is_file()
        assert missing_embeddings(EmbeddingJob.of(cfg)) == 0  # what the trial reads (embeddings_ready) is there


# ------------------------------------------------------------------ a sweep on S3, killed and resumed

def _run(args: list[str], cwd: Path, env: dict, log: Path, timeout: float = 300) -> None:
    p = subprocess.Popen(OODSWEEP + args, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                         start_new_session=True, env={**os.environ, **env})
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = "timeout"
    assert rc == 0, f"oodsweep {args[0]}: {rc}\n" + log.read_text()[-6000:]


@pytest.mark.integration
def test_sweep_on_s3_killed_resumed_analysed(s3, tiny_data, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    uri = f"s3://{BUCKET}/exp"
    spec = {"name": "tiny", "storage": uri,
            "data": {"layout": "prostate_multisite", "root": str(tiny_data), "source": "SiteA",
                     "targets": ["SiteB", "SiteC"], "image_size": 32, "test_fraction": 0.25},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [1, 6]},
                     "seed": {"grid": [0]}, "batch_size": 4, "resources": {"cpu": 1}},
            # the δ stage too: its Ray Train run keeps its state in the bucket, its trial works in a copy
            "uncertainty": {"epochs": 1, "baselines": [], "passes": 2, "resources": {"cpu": 0.5}, "trial_cpu": 0.1},
            "analysis": {"metric": "iou_3d"}}
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "tiny.yaml").write_text(yaml.safe_dump(spec))
    # Tune's experiment state saved at most every second (not every 10 s): the kill below waits for it to name
    # the first checkpoint, so the resumed run must start from it
    env = {"OODSWEEP_SYNC_S": "1", "TMPDIR": str(tmp_path / "tmp"), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    (tmp_path / "tmp").mkdir()
    cluster = Cluster()  # two nodes of 1 CPU; their raylets (and so the trials) see the AWS variables
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        log = tmp_path / "run1.log"
        p = subprocess.Popen(OODSWEEP + ["run", "tiny.yaml", "--address", cluster.address], cwd=work,
                             stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **env})
        t0 = time.time()
        # killed mid-pool: the run's first member recorded, and Tune's state in the bucket naming its checkpoint
        # (epoch 1; the run goes on to epoch 6), the second member not yet
        def state_names_a_checkpoint() -> bool:
            states = [k for k in _keys(s3["client"], "exp/tiny/pool/") if k.startswith("experiment_state-")]
            return any(b"checkpoint_00000" in s3["client"].get_object(Bucket=BUCKET, Key=f"exp/tiny/pool/{k}")["Body"]
                       .read() for k in states)

        while not (any(k.endswith(".member.json") for k in _keys(s3["client"], "exp/tiny/records/parts/"))
                   and state_names_a_checkpoint()):
            assert p.poll() is None, log.read_text()[-4000:]
            assert time.time() - t0 < 300, log.read_text()[-4000:]
            time.sleep(0.3)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        assert sum(k.endswith(".member.json") for k in _keys(s3["client"], "exp/tiny/records/parts/")) == 1
        assert "exp/tiny/pool/.oodsweep-done" not in _keys(s3["client"], "")
        assert ".driver.lock" in _keys(s3["client"], "exp/tiny/")  # left behind by the killed driver

        _run(["resume", f"{uri}/tiny", "--address", cluster.address], work, env, tmp_path / "resume.log")
        _run(["analyze", f"{uri}/tiny"], work, env, tmp_path / "analyze.log")
    finally:
        ray.shutdown()
        cluster.shutdown()
    keys = set(_keys(s3["client"], "exp/tiny/"))
    for k in ("spec.yaml", "records/members.parquet", "records/slices.parquet", "pool/.oodsweep-done", "mlflow.db"):
        assert k in keys, sorted(keys)
    assert sum(k.startswith("records/parts/") and k.endswith(".member.json") for k in keys) == 2
    assert any(k.startswith("records/checkpoints/") for k in keys)
    assert any(k.startswith("analysis/") for k in keys)
    assert "uncertainty/.oodsweep-done" in keys and sum(  # δ of both members, from the Train run in the bucket
        k.startswith("records/uncertainty/parts/") and k.endswith(".parquet") for k in keys) == 2, sorted(keys)
    assert any(k.startswith("uncertainty/train/delta-") for k in keys), sorted(keys)
    assert any(k.startswith(".cache/slices/") and k.endswith("/published.json") for k in _keys(s3["client"], "exp/"))
    attempts = [json.loads(s3["client"].get_object(Bucket=BUCKET, Key=f"exp/tiny/{k}")["Body"].read())
                for k in keys if k.startswith("records/attempts/")]
    assert {a["run"] for a in attempts if a["stage"] == "uncertainty"} == {f"unet_r18-lr0.001-s0-ep{e}" for e in (1, 6)}
    attempts = [a for a in attempts if a["stage"] == "pool"]
    # the killed run's start and its restart, one file each; the restart resumed from the checkpoint Tune's state
    # in the bucket named (epoch 1, or epoch 5's, pool.checkpoint_every, when a later state was saved before the kill)
    assert len(attempts) == 2 and {a["run"] for a in attempts} == {"unet_r18-lr0.001-s0-E6"}, attempts
    starts = sorted(a["start_epoch"] for a in attempts)
    assert starts[0] == 0 and starts[1] in (1, 5), attempts
    assert ".driver.lock" not in keys and "attempts.jsonl" not in " ".join(keys)
    assert sorted(os.listdir(work)) == ["tiny.yaml"]  # no experiment folder (nor anything else) written here
    assert not [p for p in (tmp_path / "tmp").glob("oodsweep-*") if p.name != "oodsweep-cache"]  # copies removed
