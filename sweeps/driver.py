"""The driver: validate, prepare data, run the stages in order, track (docs/architecture.md "Rooms", "Resume").

Stages hand off through the experiment directory only; a finished stage is skipped on rerun.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable

from trainables import records

from . import interrupts
from .analysis_blocks import ray_block_map  # the agreement's blocks as Ray tasks while the sweep's Ray is up
from .console import command, log
from .experiment import DONE_MARKER, POOL_STAGE, SPEC_FILE, UNCERTAINTY_STAGE, check_frozen, driver_lock, freeze
from .spec import SweepSpec
from .tracking import Tracker, finish_tracking, tracker_for
from .user_models import check_pool_models

__all__ = ["IncompleteError", "fit_until_recorded", "member_set_tag", "missing_records", "prepare_data",
           "run_analysis_stage", "run_pool_stage", "run_sweep", "run_uncertainty_stage", "tracker_for"]


def prepare_data(spec: SweepSpec, progress: bool = True) -> Path:
    """Generate synthetic sites if the spec asks for them, then build (or find) the slice cache."""
    from trainables.data.cache import build_slice_cache

    d = spec.data
    if d.synthetic is not None:
        from trainables.data.synthetic import write_synthetic_sites

        log(f"synthetic sites under {d.root}")
        write_synthetic_sites(d.root, sites=[d.source, *d.targets], cases_per_site=d.synthetic.cases_per_site,
                              shape=d.synthetic.shape, seed=d.synthetic.seed)
    t = time.time()
    cache = build_slice_cache(d.layout, d.root, [d.source, *d.targets], d.image_size, spec.cache_root,
                              split_seed=d.split_seed, test_fraction=d.test_fraction,
                              skip_bad_cases=d.skip_bad_cases, progress=progress,
                              site_sources=d.site_sources(), labels=d.labels, window=d.window, split=d.split,
                              layout_options=d.layout_options)
    log(f"slice cache {cache} ({time.time() - t:.1f}s)")
    _check_sites(spec, cache)
    return cache


def _check_sites(spec: SweepSpec, cache_dir: Path) -> None:
    """Every site the pool needs has slices in the cache (bad cases may have been skipped)."""
    from trainables.data.cache import open_slice_cache
    from trainables.data.layouts import DataError

    cache = open_slice_cache(cache_dir)
    need = [(spec.data.source, "train"), (spec.data.source, "test")]
    need += [(t, spec.data.target_split) for t in spec.data.targets]
    for site, split in need:
        try:
            cache.rows(site, split)
        except KeyError:
            raise DataError(f"site {site!r} has no usable {split} cases in {spec.data.root} (cache {cache_dir}; "
                            f"skipped: {[s['case_id'] for s in cache.manifest['skipped'] if s['site'] == site]}); "
                            f"fix its files or remove it from the spec") from None


def _init_ray(spec: SweepSpec, address: str | None, num_cpus: int | None) -> None:
    """Connect (or start a local Ray), then check that every node can reach the experiment's storage."""
    import ray

    from . import cluster, guards

    started_local = cluster.connect(address, num_cpus, spec.runtime_env)
    interrupts.reinstall()  # ray.init replaced the driver's SIGTERM handler with its own (which aborts)
    if started_local:  # a cluster given by address is not ours: a later driver must never reap it
        interrupts.record_ray_session(spec.experiment_dir)
    guards.check_nodes(spec, ray.nodes())  # one trial must fit the largest node's memory
    nodes = ray.nodes()
    cluster.check_storage_on_nodes(spec.remote or spec.experiment_dir, nodes, "storage")
    cluster.check_storage_on_nodes(spec.cache_root, nodes, "data.cache_dir")


def _trial_errors(results) -> list[str]:
    """One line per failed Tune trial: its folder and the last line of its error."""
    out = []
    for r in results:
        text = str(r.error).strip()
        out.append(f"{r.path}: {text.splitlines()[-1] if text else repr(r.error)}")
    return out


def fit_until_recorded(stage_dir: Path, fit: Callable[[list[str] | None], list], gaps: Callable[[], dict[str, str]],
                        invalidate: Callable[[dict[str, str]], None], what: str) -> tuple[list, list]:
    """Run a stage's Tuner (``fit(None)``); if no trial failed but members are still without ``what``, Tune
    restored trials it counts as finished whose records are gone: set its state aside and run those members
    again (``fit(member ids)``). Returns the results and the failed ones."""
    from . import reconcile

    results = fit(None)  # a Ctrl-C or SIGTERM ends here (sweeps.interrupts.Interrupted): nothing is restarted
    failed = [r for r in results if r.error is not None]
    still = gaps()
    if still and not failed:
        log(f"{stage_dir.name} stage: {len(still)} member(s) still without {what} after Tune's restore "
            f"({', '.join(sorted(still))}); running them again")
        invalidate(still)
        reconcile.retire_tune_state(stage_dir)
        results = fit(list(still))
        failed = [r for r in results if r.error is not None]
    return results, failed


def run_pool_stage(spec: SweepSpec, cache: Path, tracker: Tracker, address: str | None = None,
                   num_cpus: int | None = None, relocated: bool = False) -> None:
    from . import reconcile
    from .pool import build_tuner

    exp = spec.experiment_dir
    marker = exp / POOL_STAGE / DONE_MARKER
    parent = tracker.stage_run(POOL_STAGE)
    tracker.log_params(parent, {"n_runs": spec.n_runs(), "n_members": spec.n_members(),
                                "source": spec.data.source, "targets": ",".join(spec.data.targets),
                                "image_size": spec.data.image_size, "spec": str(exp / SPEC_FILE)})
    gaps = reconcile.pool_gaps(spec)
    if marker.exists() and not gaps:
        log(f"pool stage already done ({len(records.member_part_ids(exp))} members): skipped")
        tracker.finish_done_stage(parent)
        return
    if spec.imported is not None:  # nothing to train: the records come from `oodsweep import`
        owed = "; ".join(f"{m}: {w}" for m, w in gaps.items()) or "the import did not finish"
        raise RuntimeError(f"{exp} holds a pool trained elsewhere and its records are incomplete ({owed}); "
                           f"run `oodsweep import` with its spec again to rewrite them")
    retire = marker.exists() or relocated  # Tune's state says done, or holds the old folder's paths
    if gaps and marker.exists():
        for mid, why in gaps.items():
            log(f"pool member {mid}: {why}; its training run is done again")
    reconcile.invalidate_members(spec, {m: w for m, w in gaps.items() if m != "(search)"})
    marker.unlink(missing_ok=True)
    tracker.reopen(parent)
    _init_ray(spec, address, num_cpus)
    from .embeddings import precompute_embeddings

    precompute_embeddings(spec, cache)  # SAM embeddings once per cache key, before any trial (cluster-wide)
    how = (f", searched by Ray Tune's OptunaSearch ({spec.search.num_samples} samples, {spec.search.mode} "
           f"{spec.search.metric})" if spec.search else " (grid)")
    log(f"pool stage: {spec.n_runs()} training runs -> {spec.n_members()} pool members{how}")
    t = time.time()
    records.clear_scratch(exp)
    if retire and reconcile.retire_tune_state(exp / POOL_STAGE):
        log("pool stage: Tune's saved state set aside (pool/.superseded/); the records say what is left")
    results, errors = fit_until_recorded(
        exp / POOL_STAGE, lambda _: interrupts.tune_fit(build_tuner(spec, cache, tracker, parent)),
        lambda: reconcile.pool_gaps(spec),
        lambda still: reconcile.invalidate_members(spec, {m: w for m, w in still.items() if m != "(search)"}),
        "a record")
    freed = reconcile.prune_checkpoints(r.path for r in results if r.error is None)
    if freed:
        log(f"removed the finished trials' resume checkpoints ({freed / 2**20:.0f} MB)")
    tracker.log_metrics(parent, {"pool_seconds": time.time() - t, "failed_trials": len(errors),
                                 "members": len(records.member_part_ids(exp))})
    if errors:
        tracker.end(parent, "FAILED")
        msgs = "\n  - ".join(_trial_errors(errors))
        missing = ", ".join(sorted(reconcile.pool_gaps(spec))) or "none"
        raise RuntimeError(f"{len(errors)} pool trial(s) failed, each after {spec.pool.max_failures} restart(s) "
                           f"(pool.max_failures); the other trials ran to the end and their members are kept. Members "
                           f"missing: {missing}. `{command('oodsweep', 'resume', exp)}` retries only the failed "
                           f"trials:\n  - {msgs}")
    records.merge_parts(exp)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    tracker.end(parent, "FINISHED")


def run_uncertainty_stage(spec: SweepSpec, cache: Path, tracker: Tracker, address: str | None = None,
                          num_cpus: int | None = None, relocated: bool = False) -> list[str]:
    """Fit δ for every pool member that has no uncertainty records yet; return the failed trials' errors."""
    from . import uncertainty as stage

    exp = spec.experiment_dir
    marker = exp / UNCERTAINTY_STAGE / DONE_MARKER
    parent = tracker.stage_run(UNCERTAINTY_STAGE)
    u = spec.uncertainty
    tracker.log_params(parent, {"epochs": u.epochs, "lr": u.lr, "lam": u.lam, "beta": u.beta,
                                "baselines": ",".join(u.baselines), "passes": u.passes, "workers": u.workers})
    from . import reconcile

    members, slices = records.load_records(exp)
    with_baselines = stage.baseline_members(spec, members, slices)
    wanted = stage.delta_members(spec, members, with_baselines)
    gaps = reconcile.uncertainty_gaps(spec, wanted)
    todo = [m for m in wanted if m in gaps]
    done = set(wanted) - set(todo)
    if marker.exists() and not todo:
        log(f"uncertainty stage already done ({len(done)} members): skipped")
        tracker.finish_done_stage(parent)
        return []
    if todo:
        if marker.exists():
            for mid in todo:
                log(f"uncertainty of {mid}: {gaps[mid]}; δ is fitted again")
        retire = marker.exists() or relocated
        reconcile.invalidate_uncertainty(spec, gaps)
        marker.unlink(missing_ok=True)
        tracker.reopen(parent)
        _init_ray(spec, address, num_cpus)
        log(f"uncertainty stage: a δ net per pool member ({len(todo)} to fit, {len(done)} done), "
            f"{u.epochs} epochs, baselines {', '.join(u.baselines) or 'none'}")
        t = time.time()
        checkpoints = {m: str(records.resolve_checkpoint(exp, c)) for m, c in zip(members["member_id"],
                                                                                   members["checkpoint"])}
        stored = stage.imported_members(members)  # no model: ŷ from their stored predictions
        if stored:
            from trainables.uncertainty.scoring import MODEL_FREE_BASELINES

            skipped = [b for b in u.baselines if b not in MODEL_FREE_BASELINES]
            log(f"δ of the {len(stored)} imported members fitted on their stored predictions (ŷ) on the source's "
                f"{u.fit_split} split" + (f"; {', '.join(skipped)} skipped for them (they run the member's model)"
                                          if skipped else ""))
        if len(wanted) < len(members):
            log(f"δ skipped for the {len(members) - len(wanted)} box-prompted members without baselines "
                f"(uncertainty.prompted_members: {u.prompted_members}; their uncertain area is not label-free)")
        if len(with_baselines) < len(members):
            split = "validation" if (slices["role"] == "val").any() else "ID test"
            which = (f"{u.baseline_members} best members of each architecture ({len(with_baselines)})"
                     if u.baseline_per_arch else f"{u.baseline_members} best members of each training run "
                     f"({len(with_baselines)})" if u.baseline_per_run else f"{len(with_baselines)} best members")
            log(f"baselines for the {which} by {split} {spec.analysis.metric} (uncertainty.baseline_members)")
        records.clear_scratch(exp)
        if retire and reconcile.retire_tune_state(exp / UNCERTAINTY_STAGE):
            log("uncertainty stage: Tune's saved state set aside (uncertainty/.superseded/); the records say "
                "what is left")
        _, failed = fit_until_recorded(
            exp / UNCERTAINTY_STAGE,
            lambda ids: interrupts.tune_fit(stage.build_tuner(spec, cache, tracker, parent, ids or todo, checkpoints,
                                                              with_baselines, stored)),
            lambda: reconcile.uncertainty_gaps(spec, todo), lambda still: reconcile.invalidate_uncertainty(spec, still),
            "a δ record")
        errors = _trial_errors(failed)
        scored = set(records.uncertainty_part_ids(exp))
        stage.close_member_runs(tracker, parent, scored & set(wanted))
        train_dir = exp / UNCERTAINTY_STAGE / "train"
        freed = reconcile.prune_checkpoints(stage.finished_train_runs(train_dir, scored))
        if freed:
            log(f"removed the scored members' δ resume checkpoints ({freed / 2**20:.0f} MB)")
        tracker.log_metrics(parent, {"uncertainty_seconds": time.time() - t, "failed_trials": len(errors)})
    else:
        errors = []
    records.load_uncertainty(exp)  # merges the δ parts into records/uncertainty.parquet (Table 4: the analysis's)
    if errors:
        tracker.end(parent, "FAILED")
    else:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        tracker.end(parent, "FINISHED")
    return errors


class IncompleteError(RuntimeError):
    """The analysis was asked for on an experiment whose records are not all there."""


def missing_records(spec: SweepSpec) -> list[str]:
    """One line per pool member or δ record the spec calls for that is missing or unreadable."""
    from . import reconcile

    gaps = reconcile.pool_gaps(spec)
    out = [f"pool member {m}: {w}" for m, w in gaps.items()]
    if spec.uncertainty is not None:
        from .uncertainty import expected_delta_members

        ids = expected_delta_members(spec, pool_complete=not gaps)
        out += [f"uncertainty of {m}: {w}" for m, w in reconcile.uncertainty_gaps(spec, ids).items() if m not in gaps]
    return out


def member_set_tag(row: dict) -> str:
    """The MLflow metric-key suffix of a result row's member set: "" for the label-free rows (the plain
    key), else "/<set>" in the characters MLflow allows in a key ("label-free (non-degenerate)" ->
    "/label-free_non-degenerate")."""
    members = row.get("members")
    if members in (None, "label-free"):
        return ""
    return "/" + re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_\-.]", "_", str(members))).strip("_")


def severity_chain(spec: SweepSpec) -> list[str] | None:
    """The targets of growing shift severity (the pool-health check): for synthetic sites, those that mix
    every kind of shift (``trainables.data.synthetic``: SiteB < SiteC < SiteD), not the one-kind sites
    (SiteE–H, each a kind of its own at about SiteC's strength); None (all targets, in the spec's order)
    for real data."""
    if spec.data.synthetic is None:
        return None
    from trainables.data.synthetic import SYNTHETIC_SITES

    return [t for t in spec.data.targets if t in SYNTHETIC_SITES and SYNTHETIC_SITES[t].kind == "mixed"]


def run_analysis_stage(spec: SweepSpec, tracker: Tracker | None, metric: str | None = None,
                       out_dir: Path | None = None, allow_incomplete: bool = False, label: str | None = None,
                       memory_gib: float | None = None, probit_clip: str | float | None = None) -> dict:
    from analysis import run_analysis

    exp = spec.experiment_dir
    metric = metric or spec.analysis.metric
    missing = missing_records(spec)
    if missing and not allow_incomplete:
        raise IncompleteError(
            f"{exp} is incomplete, the analysis would leave these out: " + "; ".join(missing[:10])
            + (f"; and {len(missing) - 10} more" if len(missing) > 10 else "")
            + f". `{command('oodsweep', 'resume', exp)}` redoes them; "
              f"`{command('oodsweep', 'analyze', exp, '--allow-incomplete')}` analyses what is there and lists "
              f"what is missing in tables.md")
    for line in missing:
        log(f"analysis without {line}")
    t = time.time()
    result = run_analysis(exp, metric=metric, out_dir=out_dir, indicators=list(spec.analysis.indicators),
                          degenerate_floor=spec.analysis.degenerate_floor, missing=missing,
                          target_order=list(spec.data.targets), severity_chain=severity_chain(spec), label=label,
                          memory_gib=memory_gib or spec.analysis.memory_gib, map_blocks=ray_block_map(),
                          probit_clip=probit_clip if probit_clip is not None else spec.analysis.probit_clip)
    for note in result.get("notes", []):
        log(f"analysis: {note}")
    if tracker is not None:
        rid = tracker.stage_run("analysis")
        tracker.reopen(rid)
        tracker.log_params(rid, {"metric": metric, "indicators": ",".join(spec.analysis.indicators)})
        stats = ("pearson_r", "spearman_rho", "kendall_tau", "probit_slope", "probit_r2")
        tag = member_set_tag
        for c in result.get("correlations", []):
            tracker.log_metrics(rid, {f"{c.get('indicator')}/{c.get('target')}{tag(c)}_{k}": c.get(k) for k in stats
                                      if c.get(k) is not None})
        for sel in result.get("selection", []):
            if sel.get("regret") is not None:
                tracker.log_metrics(rid, {f"regret/{sel.get('indicator')}/{sel.get('target')}{tag(sel)}":
                                          sel["regret"]})
        tracker.log_metrics(rid, {"analysis_seconds": time.time() - t})
        out = Path(result["out_dir"])
        files = [Path(f) for f in result["files"]]
        tracker.log_artifacts(rid, files, base=out)
        tracker.end(rid, "FINISHED")
        # the pool's parent run carries the analysis of its members too (small files)
        tracker.log_artifacts(tracker.stage_run("pool"), files, base=out, prefix="analysis")
        finish_tracking(tracker)  # the last stage: what is sent is sent, what is not is counted
    return result


def run_sweep(spec: SweepSpec, address: str | None = None, num_cpus: int | None = None) -> dict:
    """Run every stage of ``spec`` that is not done yet; return where the results are.

    Order: every check that can refuse the spec (a changed frozen spec, the cluster's address, the
    tracking store, the data) runs before the spec is frozen, so a refused first run leaves nothing
    that blocks the corrected one.

    SIGINT (Ctrl-C) and SIGTERM stop it at any stage (``sweeps.interrupts``): the running trials stop with
    their last checkpoints, nothing is restarted, the local Ray is shut down, the lock released, the
    message says how to continue, and ``SystemExit`` carries status 130 (SIGINT) or 143 (SIGTERM).
    """
    from . import objstore

    with objstore.session(spec) as spec:  # object storage: a node-local working copy, uploaded as it goes
        return _run_sweep(spec, address, num_cpus)


def _run_sweep(spec: SweepSpec, address: str | None, num_cpus: int | None) -> dict:
    from . import cluster, guards, objstore, reconcile

    exp = spec.experiment_dir
    guards.check_before_launch(spec, address, num_cpus)  # storage writable, memory and disk: nothing written yet
    exp.mkdir(parents=True, exist_ok=True)
    lock = driver_lock(exp)
    try:
        with interrupts.handling(lock):
            try:
                interrupts.reap_previous_ray(exp)
                frozen, changes = check_frozen(spec)
                cluster.check_address(address)
                cluster.check_tracking(spec.tracking())
                cluster.check_pretrained_weights(spec)
                log(f"experiment {spec.remote or exp}")
                cache = prepare_data(spec)
                objstore.publish_cache(spec, cache)  # object storage: uploaded for the trials on other nodes
                check_pool_models(spec, cache)
                moved_from = reconcile.relocated(spec)
                freeze(spec, frozen, changes)
                if moved_from:
                    log(f"this experiment ran from {moved_from} before: its paths now resolve under {exp}")
                reconcile.record_location(spec)
                return _run_stages(spec, cache, address, num_cpus, relocated=moved_from is not None)
            except KeyboardInterrupt as e:  # ours (sweeps.interrupts.Interrupted), or Ray's in its place
                signum = interrupts.signal_of(e)
                interrupts.after_interrupt(exp, signum)
                raise SystemExit(128 + signum) from None
    finally:
        os.close(lock)


def _run_stages(spec: SweepSpec, cache: Path, address: str | None, num_cpus: int | None,
                relocated: bool = False) -> dict:
    tracker = tracker_for(spec)
    log(f"MLflow tracking at {tracker.tracking_uri} (experiment {spec.name!r})")
    try:
        return _stages(spec, cache, tracker, address, num_cpus, relocated)
    except KeyboardInterrupt:
        finish_tracking(tracker, timeout=3.0)
        raise
    finally:
        finish_tracking(tracker)  # the analysis stage has flushed already: returns at once


def _stages(spec: SweepSpec, cache: Path, tracker: Tracker, address: str | None, num_cpus: int | None,
            relocated: bool) -> dict:
    t0 = time.time()
    exp = spec.experiment_dir
    run_pool_stage(spec, cache, tracker, address=address, num_cpus=num_cpus, relocated=relocated)
    errors = []
    if spec.uncertainty is not None:
        errors = run_uncertainty_stage(spec, cache, tracker, address=address, num_cpus=num_cpus,
                                       relocated=relocated)
        if spec.uncertainty.sensitivity is not None and not errors:  # δ again, longer (sweeps.uncertainty_budget)
            from .uncertainty_budget import run_budget_stage

            errors = run_budget_stage(spec, cache, tracker, lambda: _init_ray(spec, address, num_cpus), relocated)
    # after failed δ trials the others are analysed, and tables.md lists what is missing
    result = run_analysis_stage(spec, tracker, allow_incomplete=bool(errors))
    summary = {"experiment_dir": str(exp), "tracking_uri": tracker.tracking_uri,
               "analysis_dir": result["out_dir"], "seconds": round(time.time() - t0, 1),
               "members": len(records.member_part_ids(exp))}
    log(f"done in {summary['seconds']:.0f}s: {summary['members']} pool members")
    if result.get("pool_health"):
        from analysis.health import health_line

        log(health_line(result["pool_health"], spec.analysis.metric))
    log(f"  records:  {exp / records.RECORDS_DIR}")
    log(f"  analysis: {result['out_dir']} (tables.md, correlations.csv, plots/)")
    log(f"  MLflow:   {command('mlflow', 'ui', '--backend-store-uri', tracker.tracking_uri)}")
    # MLflow 3.17's UI opens on its GenAI view unless the workflow is named in the link (the experiment's
    # mlflow.experimentKind tag alone does not switch it: checked in headless Chromium)
    if tracker.known_experiment_id:  # None while the store has not answered
        log(f"            then http://127.0.0.1:5000/#/experiments/{tracker.known_experiment_id}"
            f"?workflowType=machine_learning")
    if errors:
        raise RuntimeError(f"{len(errors)} uncertainty trial(s) failed; the other members were scored and "
                           f"analysed. Fix the cause and run `{command('oodsweep', 'resume', exp)}` to retry only those:\n  - "
                           + "\n  - ".join(errors))
    return summary
