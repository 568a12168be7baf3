"""Stage 2: a post-hoc uncertainty net per pool member (docs/architecture.md "Rooms", "Uncertainty", "Stages").

One Ray Tune trial per group of pool members (``member_groups``: by default the snapshot members of one
training run; ``uncertainty.group_size``); each trial builds and fits a Ray Train ``TorchTrainer`` whose
workers run ``trainables.uncertainty.group.fit_group``: ``fit_uncertainty`` for each member in turn, in
the same processes (DDP across workers when the spec asks for more than one), skipping the members
already recorded. The Train run has a deterministic name (``delta-<group>``) under the experiment's
``uncertainty/train`` folder, so a restarted trial resumes its run from the last checkpoint, which
names its member. Ray is imported inside functions only.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from trainables import records

from . import reconcile
from .console import log
from .experiment import UNCERTAINTY_STAGE
from .spec import SweepSpec
from .tracking import Tracker


def _train_worker(config: dict) -> None:
    """Runs in each Ray Train worker: ``fit_group`` over the group's members (``group``, one δ config each).

    Never report Tune's reserved key ``done``: Tune would end the trial on it while the Train
    controller still runs, and the worker group's placement group would stay reserved (Ray 2.60).
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        try:
            ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
            ray.train.report(metrics, checkpoint=ckpt)
        finally:
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)

    from .objstore import trial_copy

    ids = [p["member_id"] for p in config["group"]]  # on object storage: a working copy with the group's records

    def mine(rel: str) -> bool:
        return any(f"/{m}." in f"/{rel}" or f"/{m}/" in f"/{rel}" for m in ids)

    with trial_copy(config, mine) as (cfg, push):
        _fit_worker(dict(cfg), push, report, rank, world)


def _fit_worker(cfg: dict, push, report_train, rank: int, world: int) -> None:
    import ray.train
    import ray.train.torch

    from trainables.uncertainty.group import fit_group

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        push()  # (object storage) the records written so far, before the report
        report_train(metrics, ckpt_dir)

    configs = [{**cfg, **point} for point in cfg.pop("group")]
    wrap = ray.train.torch.prepare_model if world > 1 else None
    checkpoint = ray.train.get_checkpoint()  # the latest of the group: it names its member (trainables.uncertainty.group)
    if checkpoint is None:
        fit_group(configs, report=report, wrap_model=wrap, rank=rank, world_size=world)
    else:
        with checkpoint.as_directory() as d:
            fit_group(configs, report=report, wrap_model=wrap, rank=rank, world_size=world, resume_from=d)


#: how often a δ Train run's controller polls its workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, unless set)
HEALTH_CHECK_S = "0.25"


def members_file(storage: str | Path, name: str) -> Path:
    """The list of a group's members beside its Train run (``<storage>/delta-<name>.members``)."""
    return Path(storage) / f"delta-{name}.members"


def uncertainty_trial(config: dict) -> None:
    """Ray Tune function trainable: the δ of a group of pool members (``group``: its ``name`` and its
    ``members``' points), as one Ray Train run that fits them one after another."""
    import json

    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainables.uncertainty.group import recorded_members

    from .objstore import STORAGE_KEY, filesystem, trial_copy

    cfg = dict(config)
    train_cfg = cfg.pop("_train")
    group = cfg.pop("group")
    points = group["members"]
    ids = {p["member_id"] for p in points}
    folder = cfg.get("records_folder", records.DEFAULT_DELTA_RECORDS)  # the δ-budget sensitivity's: its own
    with trial_copy(cfg, lambda rel: rel.startswith(f"records/{folder}/parts/")) as (local, _):
        done = ids <= recorded_members(local["experiment_dir"], folder)
    if done:
        for p in points:  # each member's result, so that the driver's tracker ends each member's run
            tune.report({"epoch": int(cfg.get("epochs", 0)), "scored": 1, "skipped": 1, "member_id": p["member_id"]})
        return
    if "://" not in str(train_cfg["storage"]):  # (remote storage: Ray's own retention applies, nothing is pruned)
        listing = members_file(train_cfg["storage"], group["name"])
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(json.dumps([p["member_id"] for p in points]))
    # the Train controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s) and so
    # notices a finished group (or a failed worker) only then; Ray passes the variable on to the controller.
    # At 0.25 s a Train run ends about 4 s sooner (bench/uncertainty_stage.py); a value set by the user stays
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S)
    trainer = TorchTrainer(
        _train_worker, train_loop_config={**cfg, "group": points},
        scaling_config=ScalingConfig(num_workers=train_cfg["workers"], use_gpu=train_cfg["gpu"] > 0,
                                     resources_per_worker={"CPU": train_cfg["cpu"],
                                                           **({"GPU": train_cfg["gpu"]} if train_cfg["gpu"] else {})}),
        # a resume needs the latest state only: older checkpoints are deleted as new ones arrive; a worker
        # group that dies (a preempted spot node) restarts from it up to train_max_failures times
        run_config=RunConfig(name=f"delta-{group['name']}", storage_path=train_cfg["storage"],
                             storage_filesystem=filesystem(cfg[STORAGE_KEY])[0] if cfg.get(STORAGE_KEY) else None,
                             callbacks=[TuneReportCallback()], checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=train_cfg.get("max_failures", 0))),
    )
    trainer.fit()


def finished_train_runs(train_dir: Path, scored: set[str]) -> list[Path]:
    """The Train run folders of ``train_dir`` whose members are all scored (their resume checkpoints serve no
    more): ``delta-<member>`` of a one-member group, and each group whose ``members_file`` lists only scored
    members (``reconcile.train_groups``)."""
    out = [train_dir / f"delta-{m}" for m in sorted(scored)]
    return out + [train_dir / f"delta-{name}" for name, ids in reconcile.train_groups(train_dir).items()
                  if ids and set(ids) <= scored]


def baseline_members(spec: SweepSpec, members: pd.DataFrame, slices: pd.DataFrame) -> set[str]:
    """Members that get the baselines too: all, or the N best by performance on the source's validation
    split (its test split when the experiment has none: data.val_fraction 0), never chosen on a reported split
    when a validation split exists."""
    n = spec.uncertainty.baseline_members
    if n is None or n >= len(members):
        return set(members["member_id"])
    role = "val" if (slices["role"] == "val").any() else "id"
    score = records.metric_by(slices[slices["role"] == role], spec.analysis.metric, by=["member_id"])
    ranked = score.reindex(members["member_id"]).fillna(-1).sort_values(ascending=False, kind="stable")
    by = members.set_index("member_id")
    if spec.uncertainty.baseline_per_run:  # a member without a run is a run of its own
        group = by["run_id"].fillna(by.index.to_series()) if "run_id" in by else by.index.to_series()
    elif spec.uncertainty.baseline_per_arch:
        group = by["arch"]
    else:
        return set(ranked.index[:n])
    return {m for g in group.unique() for m in ranked[group.reindex(ranked.index) == g].index[:n]}


def delta_members(spec: SweepSpec, members: pd.DataFrame, with_baselines: set[str]) -> list[str]:
    """The members δ is fitted on, in the records' order: all, or with ``uncertainty.prompted_members:
    with_baselines`` all but the box-prompted members (``oracle_prompt``) that get no baselines."""
    ids = members["member_id"].astype(str)
    if spec.uncertainty.prompted_members == "all":
        return list(ids)
    prompted = members["oracle_prompt"].fillna(False).astype(bool)
    return [m for m, p in zip(ids, prompted) if not p or m in with_baselines]


def expected_delta_members(spec: SweepSpec, pool_complete: bool) -> list[str]:
    """The members the δ stage is to record (``status`` and the analysis's completeness check): every pool
    member, less (``prompted_members: with_baselines``) the box-prompted ones without baselines. Those
    are read from the pool's records, so before the pool is complete every expected member counts."""
    ids = reconcile.expected_members(spec) or records.member_part_ids(spec.experiment_dir)
    if spec.uncertainty.prompted_members == "all" or not pool_complete:
        return ids
    members, slices = records.load_records(spec.experiment_dir)
    return delta_members(spec, members, baseline_members(spec, members, slices))


#: The keys of each member's grid point in the δ stage's space (``param_space``'s ``member``); an imported
#: member's point adds ``IMPORTED_POINT_KEYS`` (a trained member's point is as it always was).
MEMBER_POINT_KEYS = ("member_id", "checkpoint", "baselines")
IMPORTED_POINT_KEYS = ("yhat",)


def imported_members(members: pd.DataFrame) -> set[str]:
    """The members imported from elsewhere (``oodsweep import``: the ``imported`` mark of their records): no
    model, their ŷ is their stored predictions."""
    if "imported" not in members.columns:
        return set()
    flag = members["imported"].astype("boolean").fillna(False).astype(bool)
    return set(members.loc[flag, "member_id"].astype(str))


def member_baselines(spec: SweepSpec, member_id: str, with_baselines: set[str], stored: set[str]) -> list[str]:
    """The baselines a member's trial runs: none outside ``with_baselines``; an imported member (``stored``)
    only those on ŷ (BayesCap, ``ggd_yhat_only``): TTA and MC dropout run the member's model, which it has not."""
    from trainables.uncertainty.scoring import MODEL_FREE_BASELINES

    if member_id not in with_baselines:
        return []
    names = list(spec.uncertainty.baselines)
    return [b for b in names if b in MODEL_FREE_BASELINES] if member_id in stored else names


def member_groups(member_ids: list[str], with_baselines: set[str], runs: dict[str, str],
                  group_size: int | None) -> list[tuple[str, list[str]]]:
    """The δ stage's groups, ``(name, member ids)``, one Tune trial (one Ray Train run) each.

    ``group_size`` None (``uncertainty.group_size: run``): the members of one training run (``runs``: member ->
    its run; a member without one is a group of its own), named by the run; an integer N: N members at a time
    in the stage's order, named by the first (N = 1: a trial per member, named by it). The members with
    baselines come first (their fits take about twice as long), and so do the groups holding one, so that no
    long trial starts in the last wave; a group's members keep the records' order."""
    ordered = sorted(member_ids, key=lambda m: m not in with_baselines)
    if group_size is not None:
        chunks = [ordered[i:i + group_size] for i in range(0, len(ordered), group_size)]
        return [(c[0], c) for c in chunks]
    by_run: dict[str, list[str]] = {}
    for m in member_ids:
        by_run.setdefault(runs.get(m) or m, []).append(m)
    groups = sorted(by_run.items(), key=lambda g: not any(m in with_baselines for m in g[1]))
    return [(name, ids) for name, ids in groups]


def member_runs(spec: SweepSpec) -> dict[str, str]:
    """Each recorded member's training run (``run_id`` of the members' records; none for an imported member
    whose table gives none)."""
    try:
        members, _ = records.load_records(spec.experiment_dir)
    except FileNotFoundError:  # no pool recorded (yet): no runs to group by
        return {}
    if "run_id" not in members.columns:
        return {}
    return {str(m): str(r) for m, r in zip(members["member_id"], members["run_id"]) if isinstance(r, str) and r}


def param_space(spec: SweepSpec, cache_dir: Path, member_ids: list[str], checkpoints: dict[str, str],
                with_baselines: set[str], stored: set[str] | frozenset = frozenset(),
                runs: dict[str, str] | None = None) -> dict:
    """The δ stage's Tune space: one grid point per group of members (``group``: its ``name`` and one point per
    member, ``member_groups``) and the fixed config, whose keys are checked against
    ``trainables.uncertainty.config.DeltaConfig`` (``_train`` is the trial's own: the Train run's resources,
    storage and failure budget). ``stored``: the imported members, whose ŷ is read from their stored
    predictions (``yhat: stored``) instead of their model's. ``runs``: each member's training run (the default
    groups); read from the records when None."""
    from ray import tune

    from trainables.uncertainty.config import DeltaConfig

    from . import cluster

    u = spec.uncertainty
    gpu = cluster.gpu_share(None, u.gpu, None, cluster.capacity().get("GPU", 0) > 0)

    def point(m: str) -> dict:  # a member's id, checkpoint and baselines; an imported one's ŷ is stored
        return dict(zip(MEMBER_POINT_KEYS, (m, "" if m in stored else checkpoints[m],
                                            member_baselines(spec, m, with_baselines, stored))),
                    **({"yhat": "stored"} if m in stored else {}))
    if runs is None:
        runs = member_runs(spec) if u.group_size is None else {}
    groups = member_groups(member_ids, with_baselines, runs, u.group_size)
    space = {
        "group": tune.grid_search([{"name": name, "members": [point(m) for m in ids]} for name, ids in groups]),
        "cache": str(cache_dir), "source": spec.data.source, "targets": list(spec.data.targets),
        "target_split": spec.data.target_split, "experiment_dir": str(spec.experiment_dir),
        "epochs": u.epochs, "lr": u.lr, "lam": list(u.lam) if isinstance(u.lam, tuple) else u.lam,
        "beta": u.beta, "learn_beta": u.learn_beta,
        "batch_size": u.batch_size, "passes": u.passes, "fit_split": u.fit_split, **u.bayescap,
        "val_fraction": spec.data.val_fraction, "split_seed": spec.data.split_seed,
        "checkpoint_every": u.checkpoint_every, "num_threads": max(1, int(u.cpu)), **u.training,
        "gpu_share": gpu or None,
        # only when set: the default's trial configs stay as they were
        **({"scoring": u.scoring} if u.scoring != DeltaConfig.default("scoring") else {}),
        **({"band_px": u.band_px} if u.band_px != DeltaConfig.default("band_px") else {}),
        "_train": {"workers": u.workers, "cpu": u.cpu, "gpu": gpu, "max_failures": u.train_max_failures,
                   "storage": str(spec.experiment_dir / UNCERTAINTY_STAGE / "train")},
    }
    DeltaConfig.check_keys([k for k in space if k not in ("group", "_train")] + list(MEMBER_POINT_KEYS)
                           + list(IMPORTED_POINT_KEYS))
    if spec.remote:  # object storage (sweeps.objstore): Ray Train writes there, the trials work in local copies
        from .objstore import trial_keys, tune_storage

        space.update(trial_keys(spec, cache_dir))
        space["_train"]["storage"] = tune_storage(spec, spec.experiment_dir / UNCERTAINTY_STAGE / "train")["path"]
        embeddings = prompted_embeddings(spec, cache_dir, member_ids)
        if embeddings:
            from .objstore import EMBED_KEY

            space[EMBED_KEY] = embeddings
    return space


def prompted_embeddings(spec: SweepSpec, cache_dir: Path, member_ids: list[str]) -> dict[str, str]:
    """``{member id: uri}``: the published SAM embeddings (object storage) of each box-prompted member, which its
    δ trial downloads (ŷ and MC dropout read them); empty when the pool has no box-prompted architecture."""
    from .embeddings import prompted_archs
    from .objstore import EMBED_KEY
    from .pool import param_space as pool_space

    if not prompted_archs(spec):
        return {}
    by_arch = pool_space(spec, cache_dir).get(EMBED_KEY, {})  # {arch: uri}, as the pool's trials get it
    members, _ = records.load_records(spec.experiment_dir)
    if "arch" not in members.columns:  # (an imported pool's table without architectures: no model to prompt)
        return {}
    arch_of = dict(zip(members["member_id"].astype(str), members["arch"].astype(str)))
    return {m: by_arch[arch_of[m]] for m in member_ids if arch_of.get(m) in by_arch}


def trial_fn(config: dict) -> None:
    """The Tune trainable: a trial's config (a group, or one member of a stage started before groups) to
    ``uncertainty_trial``."""
    cfg = dict(config)
    if "member" in cfg:  # a trial of a stage started before groups: its one member
        point = cfg.pop("member")
        cfg["group"] = {"name": point["member_id"], "members": [point]}
    uncertainty_trial(cfg)


def group_trial_name(config: dict) -> str:
    g = config.get("group") or {"name": config["member"]["member_id"]}
    return f"delta-{g['name']}"


def build_tuner(spec: SweepSpec, cache_dir: Path, tracker: Tracker, parent_mlflow_id: str, todo: list[str],
                checkpoints: dict[str, str], with_baselines: set[str], stored: set[str] | frozenset = frozenset()):
    from ray import tune

    from .callbacks import MlflowMemberCallback

    u = spec.uncertainty
    from .objstore import tune_storage

    where = tune_storage(spec, spec.experiment_dir / UNCERTAINTY_STAGE)  # object storage: Ray writes to it
    path, fs = where.pop("path"), where.get("storage_filesystem")
    trainable = tune.with_resources(trial_fn, {"cpu": u.trial_cpu})
    space = param_space(spec, cache_dir, todo, checkpoints, with_baselines, stored)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"resuming the uncertainty stage from {spec.remote or spec.experiment_dir}/{UNCERTAINTY_STAGE}")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True,
                                  param_space=space, storage_filesystem=fs)
    max_conc = u.max_concurrent_trials
    if max_conc is None:
        from . import cluster

        t = space["_train"]
        demand = {"cpu": u.trial_cpu + u.workers * u.cpu, "gpu": u.workers * t["gpu"]}
        max_conc = cluster.max_concurrent([demand], cluster.capacity())
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_conc,
                                    trial_name_creator=lambda t: group_trial_name(t.config),
                                    trial_dirname_creator=lambda t: f"{group_trial_name(t.config)}-{t.trial_id}"),
        run_config=tune.RunConfig(name=UNCERTAINTY_STAGE, **where,
                                  callbacks=[MlflowMemberCallback(tracker, parent_mlflow_id, UNCERTAINTY_STAGE)],
                                  failure_config=tune.FailureConfig(max_failures=u.max_failures)),
    )


def close_member_runs(tracker: Tracker, parent, member_ids, stage: str = UNCERTAINTY_STAGE) -> None:
    """End the MLflow run of every scored member FINISHED, creating it where it is missing.

    A group's member run starts with the member's first result (``callbacks.MlflowMemberCallback``); a driver
    killed after the trial's last result but before the tracker's outbox sent it leaves Tune's trial finished
    and the member without a run, which no resumed trial reports again. The run is found by its tags, so a run
    that exists is only ended (again)."""
    from .tracking import MEMBER_TAG, STAGE_TAG

    for mid in sorted(member_ids):
        ref = tracker.run_ref(f"{stage}-{mid}", {MEMBER_TAG: mid, STAGE_TAG: stage}, parent=parent)
        tracker.end(ref, "FINISHED")
