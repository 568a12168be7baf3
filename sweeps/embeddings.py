"""The pool's pre-stage: every SAM embedding cache the pool needs, computed once before its trials start.

The embedding cache (``trainables.medsam``) is guarded by an ``fcntl.flock``, which is host-local and not
honoured on object storage (s3fs): two trials starting together on two nodes would both run the frozen
encoder. So the driver, at the start of the pool stage, finds the distinct cache keys of the pool's
box-prompted architectures (``trainables.models.MODELS[arch].prompted``), and runs one Ray task per key
that is not on the storage yet, with that architecture's trial resources (so a ViT-B encoder runs on a
GPU node), calling ``trainables.medsam.prepare_embeddings``. The trials are then told ``embeddings_ready``
(``sweeps.pool.param_space``) and only read the cache. A pool without a box-prompted architecture skips
all of it (no task, no Ray call).

Ray is imported inside functions only.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from .console import log
from .spec import SweepSpec


def prompted_archs(spec: SweepSpec) -> list[str]:
    """The pool's box-prompted architectures, in the spec's order."""
    from trainables.models import is_prompted

    return [a for a in spec.pool.arch.values if is_prompted(a, spec.pool.models)]


def embedding_jobs(spec: SweepSpec, cache_dir: Path) -> dict[str, Any]:
    """``{cache key: the trainables.medsam.EmbeddingJob of its first architecture}``: one entry per distinct
    embedding cache the pool's box-prompted trials read (empty when the pool has none). The key is computed
    without building a model (``trainables.medsam.embedding_key_for``)."""
    if not prompted_archs(spec):
        return {}
    from .pool import arch_jobs, param_space

    jobs: dict[str, Any] = {}
    for key, job in arch_jobs(spec, param_space(spec, cache_dir)).values():
        jobs.setdefault(key, job)  # the first architecture's job per key
    return jobs


def _prepare(job) -> tuple[str, float]:
    """The Ray task: ``prepare_embeddings`` of an ``EmbeddingJob`` on the node Ray chose; (folder, seconds)."""
    from trainables.medsam import prepare_embeddings

    t = time.perf_counter()
    return str(prepare_embeddings(job)), time.perf_counter() - t


def _prepare_published(job, cache_uri: str, uri: str) -> tuple[str, float]:
    """The Ray task on object storage: this node's copy of the published slice cache and of the embeddings
    published at ``uri`` so far, the missing rows computed (``prepare_embeddings``), and the embeddings published
    again when anything was added (their file list last); (folder on this node, seconds)."""
    from trainables.medsam import missing_embeddings, prepare_embeddings

    from . import objstore
    from .errors import StorageError

    t = time.perf_counter()
    cache = objstore.fetch_cache(cache_uri)
    job = dataclasses.replace(job, cache=str(cache))
    try:
        folder = objstore.fetch_embeddings(uri, cache)
    except StorageError:  # none published yet
        folder = None
    if folder is None or missing_embeddings(job):
        folder = prepare_embeddings(job)
        objstore.publish_folder(folder, uri, replace=True)
    return str(folder), time.perf_counter() - t


def precompute_embeddings(spec: SweepSpec, cache_dir: Path) -> list[Path]:
    """Make every embedding cache the pool needs exist before its trials start; return their folders.

    Caches already on the storage are found by the driver (no task); the others are computed by one Ray
    task each, with the resources of a trial of their architecture, all at once. Needs Ray connected
    (the pool stage has), unless the pool has no box-prompted architecture.
    """
    jobs = embedding_jobs(spec, cache_dir)
    if not jobs:
        return []
    from trainables.medsam import embedding_folder, missing_embeddings

    from . import cluster, objstore

    folders = {key: embedding_folder(job) for key, job in jobs.items()}
    cache_uri = objstore.cache_uri(spec, cache_dir)
    # object storage: each cache is published to the bucket by its task (checked there, computed where missing)
    published = {key: objstore.embeddings_uri(spec, key) for key, job in jobs.items()
                 if cache_uri and job.sam.embedding_dir is None}
    todo = {key: job for key, job in jobs.items() if key in published or missing_embeddings(job)}
    for key in set(jobs) - set(todo):
        log(f"SAM embeddings {key}: found in {folders[key].parent}")
    if todo:
        import ray

        has_gpu = cluster.capacity().get("GPU", 0) > 0
        refs = {}
        for key, job in todo.items():
            res = cluster.trial_resources(job.arch, spec.pool.cpu, spec.pool.gpu, spec.pool.per_arch, has_gpu)
            if not res["gpu"]:  # on CPUs the encoder is the slow part and nothing else runs yet: a whole node
                res["cpu"] = max(res["cpu"], cluster.largest_node_cpus())
                job = dataclasses.replace(job, num_threads=max(1, int(res["cpu"])))
            if key in published:
                log(f"SAM embeddings {key} ({job.arch}): checked against {published[key]} and computed where missing, "
                    f"before the trials, in a Ray task ({res['cpu']:g} CPU, {res['gpu']:g} GPU)")
                task = ray.remote(_prepare_published).options(num_cpus=res["cpu"], num_gpus=res["gpu"], max_retries=1,
                                                              name=f"sam-embeddings-{key}")
                refs[key] = task.remote(job, cache_uri, published[key])
                continue
            log(f"SAM embeddings {key} ({job.arch}): computing once, before the trials, in a Ray task "
                f"({res['cpu']:g} CPU, {res['gpu']:g} GPU)")
            task = ray.remote(_prepare).options(num_cpus=res["cpu"], num_gpus=res["gpu"], max_retries=1,
                                                name=f"sam-embeddings-{key}")
            refs[key] = task.remote(job)
        for key, ref in refs.items():
            try:
                folder, seconds = ray.get(ref)
            except Exception as e:  # RayTaskError wraps the task's own error: keep its last line
                text = str(e).strip()
                last = text.splitlines()[-1] if text else type(e).__name__
                raise RuntimeError(f"computing the SAM embeddings {folders[key]} ({todo[key].arch}) failed: "
                                   f"{last}. Fix the cause and rerun `oodsweep run` (finished pool members are "
                                   f"kept)") from None
            if key in published:  # (written on the task's node, beside its copy of the slice cache)
                if Path(folder).name != key:
                    raise RuntimeError(f"the SAM embeddings were written to {folder}, but the driver expected the "
                                       f"key {key} (trainables.medsam.embedding_key_for disagrees with embedding_key)")
                log(f"SAM embeddings {key}: ready in {published[key]} ({seconds:.1f}s)")
                continue
            if Path(folder) != folders[key]:  # trainables' key and the driver's disagree: a bug, not bad input
                raise RuntimeError(f"the SAM embeddings were written to {folder}, but the driver expected "
                                   f"{folders[key]} (trainables.medsam.embedding_key_for disagrees with "
                                   f"embedding_key)")
            log(f"SAM embeddings {key}: ready in {folders[key].parent} ({seconds:.1f}s)")
    return [folders[key] for key in jobs]  # (on object storage: where they would be on the driver's node)
