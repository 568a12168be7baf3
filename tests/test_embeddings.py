"""The cluster-wide SAM embedding cache: the pool's pre-stage (``sweeps.embeddings``) computes each cache once,
before the trials, which only read it; on a two-node Ray cluster (``ray.cluster_utils``) the encoder runs once."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from trainables import records
from trainables.data.cache import open_slice_cache
from trainables.medsam import (LITE_SHA256, SamOptions, build_member_model, embedding_key, embedding_key_for,
                               encoder_runs, encoder_source, prepare_embeddings)


def _cfg(cache: Path, emb: Path, **kw) -> dict:
    return {"arch": "medsam_tiny", "cache": str(cache), "embedding_dir": str(emb), "num_threads": 1, **kw}


def test_embedding_key_for_a_config_is_the_built_models(tiny_cache, tmp_path):
    cache = open_slice_cache(tiny_cache)
    cfg = _cfg(tiny_cache, tmp_path / "emb")
    with pytest.warns(UserWarning, match="RANDOMLY"):
        model = build_member_model("medsam_tiny", SamOptions(), seed=5, in_channels=1)
    # the driver's key (no model built) is the one the trial's model gives; the trial's seed does not enter it
    assert embedding_key_for(cfg) == embedding_key(model, cache) and embedding_key_for(cfg).startswith("tiny-64-")
    assert embedding_key_for({**cfg, "sam_init_seed": 1}) != embedding_key_for(cfg)  # another random encoder
    assert encoder_source({"arch": "medsam_lite"}) == {"variant": "lite", "img_size": 256, "sam_sha256": LITE_SHA256,
                                                       "init_seed": 0}


def test_prepare_embeddings_computes_once_and_trials_only_read(tiny_cache, tmp_path):
    from trainables.segment import train_segmenter

    emb = tmp_path / "emb"
    exp = tmp_path / "exp"
    trial = {**_cfg(tiny_cache, emb), "lr": 1e-3, "seed": 0, "source": "SiteA", "targets": ["SiteB"],
             "experiment_dir": str(exp), "epochs": 1, "batch_size": 8, "embeddings_ready": True}
    # a trial told that the pre-stage ran, with nothing there: an error naming the folder, no encoder run
    with pytest.warns(UserWarning, match="RANDOMLY"), pytest.raises(FileNotFoundError) as err:
        train_segmenter(trial)
    key = embedding_key_for(trial)
    assert str(emb / key) in str(err.value) and "rerun `oodsweep run`" in str(err.value)
    assert encoder_runs(emb) == [] and not (emb / key).exists()
    with pytest.raises(ValueError, match="'unet_r18' is not box-prompted.*medsam_tiny"):
        prepare_embeddings({**trial, "arch": "unet_r18"})

    with pytest.warns(UserWarning, match="RANDOMLY"):
        folder = prepare_embeddings(trial)  # a trial's config: the keys it does not need are ignored
        assert prepare_embeddings(trial) == folder == emb / key  # found, not recomputed
        (member,) = train_segmenter(trial)  # reads the cache
    runs = encoder_runs(emb)
    assert len(runs) == 1 and runs[0]["key"] == key and runs[0]["pid"] == os.getpid()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"] == key and manifest["embedded_slices"] > 0
    assert member["epochs"] == 1


def test_pre_stage_only_for_pools_with_a_prompted_arch(tiny_data, tiny_cache, tmp_path):
    import ray

    from sweeps.embeddings import embedding_jobs, precompute_embeddings
    from sweeps.pool import param_space
    from sweeps.spec import parse_spec

    raw = {"name": "t", "storage": str(tmp_path / "runs"),
           "data": {"layout": "prostate_multisite", "root": str(tiny_data), "source": "SiteA",
                    "targets": ["SiteB"], "image_size": 32},
           "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3, 1e-4]}, "epochs": {"snapshots": [1]},
                    "seed": {"grid": [0, 1]}}}
    plain = parse_spec(raw)
    assert embedding_jobs(plain, tiny_cache) == {} and precompute_embeddings(plain, tiny_cache) == []
    assert not ray.is_initialized()  # no Ray call at all
    assert "embeddings_ready" not in param_space(plain, tiny_cache)
    raw["pool"]["arch"] = {"grid": ["unet_r18", "medsam_tiny"]}
    mixed = parse_spec(raw)
    jobs = embedding_jobs(mixed, tiny_cache)  # 2 lrs x 2 seeds of medsam_tiny: one cache key, one task
    assert list(jobs) == [embedding_key_for({"arch": "medsam_tiny", "cache": str(tiny_cache)})]
    job = jobs[next(iter(jobs))]
    assert job.arch == "medsam_tiny" and job.source == "SiteA" and job.targets == ("SiteB",)
    assert param_space(mixed, tiny_cache)["embeddings_ready"] is True
    # once the cache is on the storage, the driver finds it: no task (Ray is not even needed)
    cache = Path(shutil.copytree(tiny_cache, tmp_path / "caches" / tiny_cache.name))
    with pytest.warns(UserWarning, match="RANDOMLY"):
        folder = prepare_embeddings(next(iter(embedding_jobs(mixed, cache).values())))
    assert folder.parent == cache.parent / "sam-embeddings"
    assert precompute_embeddings(mixed, cache) == [folder] and not ray.is_initialized()


@pytest.mark.integration
def test_two_node_cluster_runs_the_encoder_once(tmp_path, tiny_data, capfd):
    """``run_sweep`` (what `oodsweep run --address` calls; in this process, to save a CLI start) on a head and
    a worker node of 1 CPU each, two medsam_tiny trials of 1 CPU (so they run one per node): the pre-stage's
    Ray task embeds the slices once, before either trial starts; both trials only read."""
    import ray
    from ray.cluster_utils import Cluster

    from sweeps.driver import run_sweep
    from sweeps.spec import parse_spec

    spec = parse_spec({
        "name": "sam2", "storage": str(tmp_path / "runs"),
        "data": {"layout": "prostate_multisite", "root": str(tiny_data), "source": "SiteA", "targets": ["SiteB"],
                 "image_size": 32, "test_fraction": 0.25, "cache_dir": str(tmp_path / "cache")},
        "pool": {"arch": {"grid": ["medsam_tiny"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [1]},
                 "seed": {"grid": [0, 1]}, "batch_size": 8, "resources": {"cpu": 1}},
        "analysis": {"metric": "iou_3d", "indicators": ["id_performance"]}})
    exp = tmp_path / "runs" / "sam2"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run_sweep(spec, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = capfd.readouterr().out
    emb = tmp_path / "cache" / "sam-embeddings"
    (folder,) = [p for p in emb.iterdir() if not p.name.startswith(".")]
    runs = encoder_runs(emb)
    att = records.load_attempts(exp)
    assert len(runs) == 1 and runs[0]["key"] == folder.name, runs  # the encoder ran once
    assert len(att) == 2 and att["pid"].nunique() == 2  # two trials, two processes
    # ... in the pre-stage's task, before either trial started, not in a trial
    assert runs[0]["pid"] not in set(att["pid"]) and runs[0]["started"] < att["time"].min()
    assert "computing once, before the trials, in a Ray task" in out and "ready in" in out
    assert len(records.load_records(exp)[0]) == 2
