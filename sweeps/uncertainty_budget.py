"""The δ-budget sensitivity (``uncertainty.sensitivity``; docs/uncertainty.md "δ's training budget").

After the δ stage, δ is fitted a second time for a subset of its members (``budget_members``), with the
sensitivity's longer budget (``epochs``), and recorded apart: ``records/uncertainty_budget/`` and its merged
``records/uncertainty_budget.parquet``, never the default δ's records. The fits run as the δ stage's do (one
Ray Tune trial per group of members, each a Ray Train run of ``trainables.uncertainty.group.fit_group``: the
trial function is ``sweeps.uncertainty.trial_fn``), under their own Tune run ``<experiment>/uncertainty_budget``,
and the longer δ is fitted alone: no baselines, the first λ only. A member whose budget slice part exists is
skipped (a killed stage refits only what is missing), as in the δ stage. Ray is imported inside functions only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from trainables import records

from . import uncertainty as stage
from .console import log
from .spec import SweepSpec
from .tracking import Tracker

#: The stage's folder in the experiment (its Tune run and Train runs), its MLflow stage name, and its records' folder.
BUDGET_STAGE = records.BUDGET_DELTA_RECORDS


def budget_members(members: pd.DataFrame, delta_ids: list[str], rule: str | int) -> list[str]:
    """The members the longer δ is fitted on, in the records' order, among those δ is fitted on (``delta_ids``).

    ``rule``: "all"; "per_run": each training run's last snapshot member (its highest ``epochs``; the first in
    the records' order on a tie; a member without a ``run_id`` is a run of its own), one per run so that the
    run-level bootstrap keeps every run; "per_config": of those, one run per configuration (the run's
    ``CONFIG_COLUMNS`` that the records have, seed excluded: the lowest ``seed``, then the records' order), so
    every architecture x learning rate is in it at a third of per_run's cost with three seeds; an integer N: the
    first N of "per_run", runs in the records' order.
    Oracle-prompted members (``oracle_prompt``: the SAM family scored with ground-truth boxes) are never
    picked: C4 reads the label-free members only, so a longer δ on them would be fitted for nothing.
    """
    wanted = set(map(str, delta_ids))
    df = members[members["member_id"].astype(str).isin(wanted)]
    if "oracle_prompt" in df.columns:
        df = df[~df["oracle_prompt"].fillna(False).astype(bool)]
    df = df.reset_index(drop=True)
    ids = df["member_id"].astype(str).tolist()
    if rule == "all":
        return ids
    run_col = df["run_id"] if "run_id" in df.columns else pd.Series([None] * len(df))
    runs = [r if isinstance(r, str) and r else m for r, m in zip(run_col, ids)]
    epochs = (pd.to_numeric(df["epochs"], errors="coerce") if "epochs" in df.columns
              else pd.Series([0.0] * len(df))).fillna(-1).tolist()
    best: dict[str, int] = {}  # run -> the row of its last snapshot (insertion order: the runs' first appearance)
    for i, run in enumerate(runs):
        if run not in best or epochs[i] > epochs[best[run]]:
            best[run] = i
    rows = list(best.values())
    if rule == "per_config":
        rows = _one_run_per_config(df, rows)
    picked = [ids[i] for i in rows]
    if rule not in ("per_run", "per_config"):
        picked = picked[: int(rule)]
    return [m for m in ids if m in set(picked)]


#: what makes two training runs the same configuration for ``per_config`` (the seed aside); a column the
#: records lack is left out, so an imported pool without them counts each run as a configuration of its own
CONFIG_COLUMNS = ("arch", "lr", "batch_size", "source")


def _one_run_per_config(df: pd.DataFrame, rows: list[int]) -> list[int]:
    """Of the runs' last-snapshot rows, the one with the lowest seed per configuration (records' order on a tie)."""
    cols = [c for c in CONFIG_COLUMNS if c in df.columns]
    if not cols:
        return rows
    seeds = pd.to_numeric(df["seed"], errors="coerce") if "seed" in df.columns else pd.Series([0.0] * len(df))
    keep: dict[tuple, int] = {}
    for i in rows:
        key = tuple("" if pd.isna(v) else str(v) for v in df.loc[i, cols])
        s = seeds.iloc[i]
        if key not in keep or (not pd.isna(s) and (pd.isna(seeds.iloc[keep[key]]) or s < seeds.iloc[keep[key]])):
            keep[key] = i
    return sorted(keep.values())


def budget_space(spec: SweepSpec, cache_dir: Path, member_ids: list[str], checkpoints: dict[str, str],
                 stored: set[str] | frozenset) -> dict:
    """The sensitivity's Tune space: the δ stage's (``sweeps.uncertainty.param_space``) without baselines, with the
    longer ``epochs``, the first λ, its own records' folder and its own Train storage."""
    u = spec.uncertainty
    space = stage.param_space(spec, cache_dir, member_ids, checkpoints, set(), stored)
    space.update(epochs=u.sensitivity.epochs, records_folder=BUDGET_STAGE,
                 lam=u.lam[0] if isinstance(u.lam, tuple) else u.lam)
    train = spec.experiment_dir / BUDGET_STAGE / "train"
    if spec.remote:
        from .objstore import tune_storage

        space["_train"]["storage"] = tune_storage(spec, train)["path"]
    else:
        space["_train"]["storage"] = str(train)
    return space


def build_budget_tuner(spec: SweepSpec, cache_dir: Path, tracker: Tracker, parent, todo: list[str],
                       checkpoints: dict[str, str], stored: set[str] | frozenset):
    """The sensitivity's Tuner (restored from its folder when a killed driver left one)."""
    from ray import tune

    from .callbacks import MlflowMemberCallback
    from .objstore import tune_storage

    u = spec.uncertainty
    where = tune_storage(spec, spec.experiment_dir / BUDGET_STAGE)
    path, fs = where.pop("path"), where.get("storage_filesystem")
    trainable = tune.with_resources(stage.trial_fn, {"cpu": u.trial_cpu})
    space = budget_space(spec, cache_dir, todo, checkpoints, stored)
    max_conc = u.max_concurrent_trials
    if max_conc is None:  # as the δ stage's (sweeps.uncertainty.build_tuner)
        from . import cluster

        demand = {"cpu": u.trial_cpu + u.workers * u.cpu, "gpu": u.workers * space["_train"]["gpu"]}
        max_conc = cluster.max_concurrent([demand], cluster.capacity())
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"resuming the δ-budget sensitivity from {spec.remote or spec.experiment_dir}/{BUDGET_STAGE}")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True,
                                  param_space=space, storage_filesystem=fs)
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_conc,
                                    trial_name_creator=lambda t: stage.group_trial_name(t.config),
                                    trial_dirname_creator=lambda t: f"{stage.group_trial_name(t.config)}-{t.trial_id}"),
        run_config=tune.RunConfig(name=BUDGET_STAGE, **where,
                                  callbacks=[MlflowMemberCallback(tracker, parent, BUDGET_STAGE)],
                                  failure_config=tune.FailureConfig(max_failures=u.max_failures)),
    )


def run_budget_stage(spec: SweepSpec, cache: Path, tracker: Tracker, init_ray: Callable[[], None],
                     relocated: bool = False) -> list[str]:
    """Fit the longer δ for every member of the subset without budget records; return the failed trials' errors.

    ``init_ray``: connects to Ray (the driver's), called only when something is left to fit. ``relocated``: the
    experiment folder moved (Tune's saved state holds the old paths: set aside, as the δ stage does). The default
    δ's records are read (its members and checkpoints), never written."""
    from trainables.uncertainty.group import recorded_members

    from . import interrupts, reconcile

    s = spec.uncertainty.sensitivity
    exp = spec.experiment_dir
    members, slices = records.load_records(exp)
    delta_ids = stage.delta_members(spec, members, stage.baseline_members(spec, members, slices))
    subset = budget_members(members, delta_ids, s.members)
    done = recorded_members(exp, BUDGET_STAGE)
    todo = [m for m in subset if m not in done]
    parent = tracker.stage_run(BUDGET_STAGE)
    if not todo:
        log(f"δ-budget sensitivity already done ({len(subset)} members at {s.epochs} epochs): skipped")
        tracker.finish_done_stage(parent)
        records.load_uncertainty_budget(exp)
        return []
    tracker.reopen(parent)
    tracker.log_params(parent, {"epochs": s.epochs, "members": str(s.members), "n_members": len(subset)})
    log(f"δ-budget sensitivity: δ fitted again for {len(todo)} of {len(subset)} members ({s.members}) at "
        f"{s.epochs} epochs (the default δ: {spec.uncertainty.epochs}); records in {BUDGET_STAGE}/")
    init_ray()
    if relocated and reconcile.retire_tune_state(exp / BUDGET_STAGE):
        log("δ-budget sensitivity: Tune's saved state set aside (the folder moved); the records say what is left")
    checkpoints = {m: str(records.resolve_checkpoint(exp, c)) for m, c in zip(members["member_id"],
                                                                               members["checkpoint"])}
    results = interrupts.tune_fit(build_budget_tuner(spec, cache, tracker, parent, todo, checkpoints,
                                                     stage.imported_members(members)))
    failed = [r for r in results if r.error is not None]
    scored = recorded_members(exp, BUDGET_STAGE)
    still = [m for m in todo if m not in scored]
    if still and not failed:  # Tune's restored state counted them finished: fit them afresh
        reconcile.retire_tune_state(exp / BUDGET_STAGE)
        results = interrupts.tune_fit(build_budget_tuner(spec, cache, tracker, parent, still, checkpoints,
                                                         stage.imported_members(members)))
        failed = [r for r in results if r.error is not None]
        scored = recorded_members(exp, BUDGET_STAGE)
    stage.close_member_runs(tracker, parent, scored & set(subset), BUDGET_STAGE)
    freed = reconcile.prune_checkpoints(stage.finished_train_runs(exp / BUDGET_STAGE / "train", scored))
    if freed:
        log(f"removed the δ-budget fits' resume checkpoints ({freed / 2**20:.0f} MB)")
    records.load_uncertainty_budget(exp)  # merges the parts into records/uncertainty_budget.parquet
    errors = [f"{r.path}: {(str(r.error).strip().splitlines() or [repr(r.error)])[-1]}" for r in failed]
    tracker.end(parent, "FAILED" if errors else "FINISHED")
    return errors
