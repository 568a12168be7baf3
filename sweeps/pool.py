"""Stage 1: the pool, as a Ray Tune experiment with one trial per training run (docs/architecture.md "Rooms", "Specs").

Ray is imported inside functions only: the CLI's ``analyze`` and ``status`` commands, and the
trainables themselves, run on machines without it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .console import log
from .experiment import POOL_STAGE
from .members import member_epochs, trial_member_ids, trial_name
from .spec import Param, SweepSpec
from .tracking import Tracker

#: the trial-config key of ``pool.sam_checkpoint: {arch: file}`` (read by ``sam_weights_of``, never by a trial)
SAM_PER_ARCH = "sam_per_arch"


# ------------------------------------------------------------------ the Tune trial (runs in a worker)

def pool_trial(config: dict) -> None:
    """Ray Tune function trainable: one ``train_segmenter`` run, resumable from its checkpoint.

    On object storage it runs in a node-local working copy holding the finished members' records
    (``sweeps.objstore.trial_copy``): its checkpoints go from local disk to Ray, its records are uploaded
    before each report."""
    from .objstore import trial_copy

    with trial_copy(config, lambda rel: rel.startswith("records/parts/") and rel.endswith(".member.json")) as (cfg, push):
        _pool_trial(cfg, push)


def _pool_trial(config: dict, push) -> None:
    from ray import tune

    from trainables.segment import train_segmenter

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        push()  # (object storage) the records written so far, before Tune records the checkpoint
        if ckpt_dir is None:
            tune.report(metrics)
            return
        try:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
        finally:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    from trainables import records

    # Tune saves its experiment state every ~10 s: a driver killed just after a run finished may
    # restore it as unfinished. Its members are in the records already: never train it again.
    mids = trial_member_ids(config)
    done = set(records.member_part_ids(config["experiment_dir"]))
    if all(m in done for m in mids):
        tune.report({"epoch": max(member_epochs(config)), "skipped": 1})
        return
    # the trial's GPU fraction sizes what the loop keeps in device memory (trainables.accel)
    config = {**sam_weights_of(config), "gpu_share": tune.get_context().get_trial_resources().required_resources.get("GPU") or None}
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        train_segmenter(config, report=report)
    else:  # a restarted trial continues from its last checkpoint (snapshot or checkpoint_every) instead of retraining
        with checkpoint.as_directory() as d:
            train_segmenter({**config, "resume_from": d}, report=report)


# ------------------------------------------------------------------ building the Tuner (driver)

def _tune_param(p: Param, searching: bool):
    from ray import tune

    if p.kind == "grid":
        return tune.choice(list(p.values)) if searching else tune.grid_search(list(p.values))
    if p.kind == "choice":
        return tune.choice(list(p.values))
    if p.kind == "loguniform":
        return tune.loguniform(*p.values)
    return tune.uniform(*p.values)


def param_space(spec: SweepSpec, cache_dir: Path) -> dict[str, Any]:
    """The Tune search space: arch x lr x seed (x epochs in grid mode) plus the fixed trial config.

    Its keys are checked against the trial's ``trainables.config.MemberConfig`` (every key a field, every
    required field given), so that a renamed field fails here, at the driver, not in every trial."""
    searching = spec.search is not None
    pool = spec.pool
    space: dict[str, Any] = {
        "arch": _tune_param(pool.arch, searching),
        "lr": _tune_param(pool.lr, searching),
        "seed": _tune_param(pool.seed, searching),
        "cache": str(cache_dir),
        "source": spec.data.source,
        "targets": list(spec.data.targets),
        "target_split": spec.data.target_split,
        "val_fraction": spec.data.val_fraction,
        "split_seed": spec.data.split_seed,
        "surface_tolerance_mm": spec.data.surface_tolerance_mm,
        "experiment_dir": str(spec.experiment_dir),
        "batch_size": pool.batch_size,
        "weight_decay": pool.weight_decay,
        "num_threads": max(1, int(pool.cpu)),
        "checkpoint_every": pool.checkpoint_every,
        **pool.training,
    }
    if pool.sam_checkpoint is not None:
        space["sam_checkpoint"] = str(pool.sam_checkpoint)
    if pool.sam_sha256 is not None:
        space["sam_sha256"] = pool.sam_sha256
    if pool.sam_channels is not None:
        space["sam_channels"] = list(pool.sam_channels)
    if pool.sam_per_arch:  # each SAM architecture's own weights: the trial takes its own (sam_weights_of)
        space[SAM_PER_ARCH] = pool.sam_per_arch
    if pool.encoder_weights is not None:
        space["encoder_weights"] = str(pool.encoder_weights)
    if pool.models:  # the open architectures' definitions: each trial resolves its own arch id with them
        space["model_defs"] = pool.models
    from trainables.models import is_prompted

    if any(is_prompted(a, pool.models) for a in pool.arch.values):
        space["embeddings_ready"] = True  # the pool's pre-stage computes them (sweeps.embeddings): trials only read
    if searching and not spec.search.metric.startswith("val_"):
        # the searcher reads its metric in every epoch's report; between snapshots only val_* is scored
        space["eval_every_epoch"] = True
    if pool.epochs.mode == "snapshots":
        space["snapshots"] = list(pool.epochs.values)
    else:
        space["epochs"] = _tune_param(Param("grid", pool.epochs.values), searching)
    from trainables.config import MemberConfig

    MemberConfig.check_keys([k for k in space if k != SAM_PER_ARCH])
    from .objstore import trial_keys

    space.update(trial_keys(spec, cache_dir))  # object storage: read by the trial's working copy (sweeps.objstore)
    if space.get("embeddings_ready"):  # ... and (object storage) the SAM embeddings it fetches beside the cache
        from .objstore import EMBED_KEY

        uris = published_embeddings(spec, space)
        if uris:
            space[EMBED_KEY] = uris
    return space


def arch_jobs(spec: SweepSpec, space: dict) -> dict[str, tuple[str, Any]]:
    """``{arch: (cache key, EmbeddingJob)}`` for each box-prompted architecture of the pool, from the pool's Tune
    space (``sweeps.pool.param_space``)."""
    from trainables.medsam import EmbeddingJob, embedding_key_for
    from trainables.models import is_prompted

    # source, targets and target_split: only the rows the sweep reads are embedded (trainables.medsam.sweep_rows)
    fixed = {k: space[k] for k in ("cache", "sam_checkpoint", "sam_sha256", "num_threads", "device", "source",
                                   "targets", "target_split", "model_defs", "sam_channels") if k in space}
    out: dict[str, tuple[str, Any]] = {}
    for arch in [a for a in spec.pool.arch.values if is_prompted(a, spec.pool.models)]:
        per_arch = {"sam_per_arch": space["sam_per_arch"]} if "sam_per_arch" in space else {}
        job = EmbeddingJob.from_dict(sam_weights_of({**fixed, "arch": arch, **per_arch}))  # the arch's own weights
        out[arch] = (embedding_key_for(job), job)
    return out


def published_embeddings(spec: SweepSpec, space: dict) -> dict[str, str]:
    """``{arch: uri}``: where each box-prompted architecture's SAM embeddings are published for the pool's trials
    (``sweeps.objstore.EMBED_KEY``) when the experiment is on object storage; empty otherwise, and for an
    architecture whose embeddings go to a folder of the user's (``embedding_dir``)."""
    from . import objstore

    if objstore.embeddings_uri(spec, "x") is None:
        return {}
    return {arch: objstore.embeddings_uri(spec, key) for arch, (key, job) in arch_jobs(spec, space).items()
            if job.sam.embedding_dir is None}


def sam_weights_of(config: dict) -> dict:
    """A trial's config with its architecture's SAM weights (``pool.sam_checkpoint: {arch: file}``) in
    ``sam_checkpoint``/``sam_sha256`` and the per-architecture table removed."""
    per_arch = config.get(SAM_PER_ARCH)
    if per_arch is None:
        return config
    out = {k: v for k, v in config.items() if k != SAM_PER_ARCH}
    return {**out, **{k: v for k, v in per_arch.get(config["arch"], {}).items() if v is not None}}


def repeat_points(spec: SweepSpec) -> list[dict]:
    """``pool.repeat``'s extra runs as Tune's ``points_to_evaluate``: ``{arch, lr, seed}`` each (the other keys,
    ``epochs`` in grid mode included, are the grid's)."""
    return [{"arch": a, "lr": lr, "seed": s} for a, lr, s in spec.pool.repeat]


def search_of(spec: SweepSpec):
    """The Tuner's ``(search_alg, num_samples)``: Optuna for a search; for a grid, Tune's default generator
    (None, 1), or with ``pool.repeat`` a ``BasicVariantGenerator`` whose ``points_to_evaluate`` are the extra
    runs: each point is one sample (its own run, or one per ``pool.epochs`` value in grid mode), then one more
    sample is the whole grid, exactly the runs it has without the repeat."""
    if spec.search is not None:
        from ray.tune.search.optuna import OptunaSearch

        return (OptunaSearch(metric=spec.search.metric, mode=spec.search.mode, seed=spec.search.seed),
                spec.search.num_samples)
    points = repeat_points(spec)
    if not points:
        return None, 1
    import logging

    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune warns that a point's seed is not in pool.seed's grid: that is what a repeat is for
    tune_log = logging.getLogger("ray.tune.search.variant_generator")
    if not any(isinstance(f, _SeedPresetFilter) for f in tune_log.filters):
        tune_log.addFilter(_SeedPresetFilter())
    return BasicVariantGenerator(points_to_evaluate=points), len(points) + 1


class _SeedPresetFilter:
    """Drops Tune's "Pre-set value `S` is not within valid values of parameter `seed`" (``pool.repeat``'s seeds)."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Pre-set value") and "parameter `seed`" in msg)


def build_tuner(spec: SweepSpec, cache_dir: Path, tracker: Tracker, parent_mlflow_id: str):
    """A new Tuner for the pool stage, or the restored one if this experiment already started it."""
    from ray import tune

    from . import cluster

    from .objstore import tune_storage

    where = tune_storage(spec, spec.experiment_dir / POOL_STAGE)  # object storage: Ray writes to it directly
    path, fs = where.pop("path"), where.get("storage_filesystem")
    cap = cluster.capacity()
    has_gpu = cap.get("GPU", 0) > 0
    archs = spec.pool.arch.values if spec.pool.arch.kind in ("grid", "choice") else tuple(spec.pool.per_arch)
    models = spec.pool.models
    demands = {a: cluster.trial_resources(a, spec.pool.cpu, spec.pool.gpu, spec.pool.per_arch, has_gpu, models)
               for a in archs}
    for a, d in demands.items():
        log(f"pool trials of {a}: {d['cpu']:g} CPU, {d['gpu']:g} GPU")
    # the architecture is a searched parameter: each trial asks for its own architecture's share
    trainable = tune.with_resources(
        pool_trial, lambda config: cluster.trial_resources(config["arch"], spec.pool.cpu, spec.pool.gpu,
                                                           spec.pool.per_arch, has_gpu, models))
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"resuming the pool stage from {spec.remote or spec.experiment_dir}/{POOL_STAGE}")
        try:
            return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                      param_space=param_space(spec, cache_dir), storage_filesystem=fs)
        except (AttributeError, ImportError) as e:  # pickled by an older version (e.g. a function since renamed)
            from .reconcile import retire_tune_state

            retire_tune_state(spec.experiment_dir / POOL_STAGE)
            log(f"pool stage: Tune's saved state cannot be loaded by this version ({type(e).__name__}: {e}); set "
                f"aside (pool/.superseded/), the records say what is left")
    max_conc = spec.pool.max_concurrent_trials or cluster.max_concurrent(list(demands.values()), cap)
    log(f"up to {max_conc} pool trials at once (cluster: {cap['CPU']:g} CPU, {cap['GPU']:g} GPU)")
    search_alg, num_samples = search_of(spec)
    from .callbacks import MlflowPoolCallback

    callback = MlflowPoolCallback(tracker, parent_mlflow_id)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec, cache_dir),
        tune_config=tune.TuneConfig(max_concurrent_trials=max_conc, search_alg=search_alg,
                                    trial_name_creator=lambda t: trial_name(t.config),
                                    trial_dirname_creator=lambda t: f"{trial_name(t.config)}-{t.trial_id}",
                                    num_samples=num_samples),
        run_config=tune.RunConfig(
            name=POOL_STAGE, **where, callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=spec.pool.max_failures),
            # Resume checkpoints only (a member's weights are written to records/checkpoints, never
            # pruned): the latest is the one a restarted trial needs; two kept since Tune forces an
            # experiment-state snapshot once per num_to_keep checkpoints (fewer writes to storage)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )
