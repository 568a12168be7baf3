"""Stage 2: a post-hoc uncertainty net per pool member (docs/architecture.md "Rooms", "Uncertainty", "Stages").

One Ray Tune trial per pool member; each trial builds and fits a Ray Train ``TorchTrainer`` whose
workers run ``trainables.uncertainty.fit_uncertainty`` (DDP across workers when the spec asks for
more than one). The Train run has a deterministic name (``delta-<member>``) under the experiment's
``uncertainty/train`` folder, so a restarted trial resumes its run from the last checkpoint.
Ray is imported inside functions only.
"""
from __future__ import annotations

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
    """Runs in each Ray Train worker.

    Never report Tune's reserved key ``done``: Tune would end the trial on it while the Train
    controller still runs, and the worker group's placement group would stay reserved (Ray 2.60).
    """
    import ray.train
    import ray.train.torch

    from trainables.uncertainty import fit_uncertainty

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        try:
            ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
            ray.train.report(metrics, checkpoint=ckpt)
        finally:
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)

    cfg = dict(config)
    wrap = ray.train.torch.prepare_model if world > 1 else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        summary = fit_uncertainty(cfg, report=report, wrap_model=wrap, rank=rank, world_size=world)
    else:
        with checkpoint.as_directory() as d:
            summary = fit_uncertainty({**cfg, "resume_from": d}, report=report, wrap_model=wrap, rank=rank,
                                      world_size=world)
    if summary is None:  # ranks > 0 meet rank 0's final report
        report({"epoch": int(cfg.get("epochs", 0)), "scored": 1}, None)


def uncertainty_trial(config: dict) -> None:
    """Ray Tune function trainable: one pool member's δ, as a Ray Train run."""
    from ray import tune
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = dict(config)
    train_cfg = cfg.pop("_train")
    if (records.records_dir(cfg["experiment_dir"]) / "uncertainty" / "parts" / f"{cfg['member_id']}.parquet").exists():
        tune.report({"epoch": int(cfg.get("epochs", 0)), "scored": 1, "skipped": 1})
        return
    trainer = TorchTrainer(
        _train_worker, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=train_cfg["workers"], use_gpu=train_cfg["gpu"] > 0,
                                     resources_per_worker={"CPU": train_cfg["cpu"],
                                                           **({"GPU": train_cfg["gpu"]} if train_cfg["gpu"] else {})}),
        # a resume needs the latest state only: older checkpoints are deleted as new ones arrive
        run_config=RunConfig(name=f"delta-{cfg['member_id']}", storage_path=train_cfg["storage"],
                             callbacks=[TuneReportCallback()], checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


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
    if not spec.uncertainty.baseline_per_arch:
        return set(ranked.index[:n])
    arch = members.set_index("member_id")["arch"]
    return {m for a in arch.unique() for m in ranked[arch.reindex(ranked.index) == a].index[:n]}


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
    from trainables.uncertainty_scoring import MODEL_FREE_BASELINES

    if member_id not in with_baselines:
        return []
    names = list(spec.uncertainty.baselines)
    return [b for b in names if b in MODEL_FREE_BASELINES] if member_id in stored else names


def param_space(spec: SweepSpec, cache_dir: Path, member_ids: list[str], checkpoints: dict[str, str],
                with_baselines: set[str], stored: set[str] | frozenset = frozenset()) -> dict:
    """The δ stage's Tune space: one grid point per member (``member``, merged into the trial's config by
    ``_trial_fn``) and the fixed config, whose keys are checked against ``trainables.delta_config.DeltaConfig``
    (``_train`` is the trial's own: the Train run's resources and storage). ``stored``: the imported members,
    whose ŷ is read from their stored predictions (``yhat: stored``) instead of their model's."""
    from ray import tune

    from trainables.delta_config import DeltaConfig

    from . import cluster

    u = spec.uncertainty
    gpu = cluster.gpu_share(None, u.gpu, None, cluster.capacity().get("GPU", 0) > 0)
    # one grid point per member: its id, checkpoint and whether it also gets the baselines; the members with
    # baselines first (they take about twice as long), so that no long trial starts in the last wave
    member_ids = sorted(member_ids, key=lambda m: m not in with_baselines)
    points = [dict(zip(MEMBER_POINT_KEYS, (m, "" if m in stored else checkpoints[m],
                                           member_baselines(spec, m, with_baselines, stored))),
                   **({"yhat": "stored"} if m in stored else {}))  # ŷ from its stored predictions, no checkpoint
              for m in member_ids]
    space = {
        "member": tune.grid_search(points),
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
        "_train": {"workers": u.workers, "cpu": u.cpu, "gpu": gpu,
                   "storage": str(spec.experiment_dir / UNCERTAINTY_STAGE / "train")},
    }
    DeltaConfig.check_keys([k for k in space if k not in ("member", "_train")] + list(MEMBER_POINT_KEYS)
                           + list(IMPORTED_POINT_KEYS))
    return space


def _trial_fn(config: dict) -> None:
    cfg = dict(config)
    cfg.update(cfg.pop("member"))
    uncertainty_trial(cfg)


def build_tuner(spec: SweepSpec, cache_dir: Path, tracker: Tracker, parent_mlflow_id: str, todo: list[str],
                checkpoints: dict[str, str], with_baselines: set[str], stored: set[str] | frozenset = frozenset()):
    from ray import tune

    from .callbacks import MlflowMemberCallback

    u = spec.uncertainty
    path = spec.experiment_dir / UNCERTAINTY_STAGE
    trainable = tune.with_resources(_trial_fn, {"cpu": u.trial_cpu})
    space = param_space(spec, cache_dir, todo, checkpoints, with_baselines, stored)
    if tune.Tuner.can_restore(str(path)):
        log(f"resuming the uncertainty stage from {path}")
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True,
                                  param_space=space)
    max_conc = u.max_concurrent_trials
    if max_conc is None:
        from . import cluster

        t = space["_train"]
        demand = {"cpu": u.trial_cpu + u.workers * u.cpu, "gpu": u.workers * t["gpu"]}
        max_conc = cluster.max_concurrent([demand], cluster.capacity())
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_conc,
                                    trial_name_creator=lambda t: f"delta-{t.config['member']['member_id']}",
                                    trial_dirname_creator=lambda t: f"delta-{t.config['member']['member_id']}-"
                                                                    f"{t.trial_id}"),
        run_config=tune.RunConfig(name=UNCERTAINTY_STAGE, storage_path=str(spec.experiment_dir),
                                  callbacks=[MlflowMemberCallback(tracker, parent_mlflow_id, UNCERTAINTY_STAGE)],
                                  failure_config=tune.FailureConfig(max_failures=u.max_failures)),
    )
