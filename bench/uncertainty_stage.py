"""What does the δ stage cost beyond its fits? The stage's wall time over its fits' own time, one run.

Trains a pool on the demo's data without Ray (``trainables.segment.train_segmenter``, the demo preset's
runs and snapshot epochs; ``--archs``/``--lrs`` take fewer), then runs the δ stage's own Tune trials
(``sweeps.uncertainty.param_space`` and ``trial_fn``: a Ray Train ``TorchTrainer`` per trial) on a local
Ray, one trial at a time, twice on copies of the same pool:

* ``group_size 1``: a trial (a Train run) per member, as the stage ran before groups;
* the spec's ``group_size`` (default ``run``: a training run's snapshot members per Train run);

and then once more without Ray: the default layout's groups fitted one after another in this process
(``trainables.uncertainty.group.fit_group``), timing ``score_member`` too. This splits the grouped stage's time
into the δ epochs, the scoring (every site with δ and, for the members that get them, the baselines), the rest of
the work in the worker (loading the member, ŷ of the fit split, the held-out curve) and what Tune and Train add.

For each it prints the stage's wall time, the sum of its δ epochs' own seconds (``epoch_seconds``, the
fits' training time, as the trials report it) and their ratio (the goal: <= 1.3 with groups, about 2.1
with a Train run per member at demo size), and the Ray processes the stage started: the distinct
``ray::`` worker processes under this Ray's raylet seen while the stage ran (sampled every 0.1 s), per
trial and by name (the Train controller, the worker group's workers, ...). The records of the two
layouts are compared too (the largest difference of the per-slice uncertainty columns).

    python bench/uncertainty_stage.py [--archs unet_r18] [--num-cpus 2]
    python bench/uncertainty_stage.py --smoke   # tiny data, one run, to check that the script works

Timings are comparable within one run only (run it on an otherwise idle machine).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sweeps" / "presets" / "demo.yaml"
# run as a script, this folder comes first on sys.path, and bench/analysis.py would shadow the analysis package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def demo_spec(tmp: Path, smoke: bool, archs: list[str] | None, lrs: list[float] | None, name: str):
    from sweeps.spec import load_spec

    raw = yaml.safe_load(DEMO.read_text())
    raw["name"] = name
    raw["pool"].pop("repeat", None)  # the grid's runs only (train_pool trains seed 0 of each): the demo's 12 members
    if archs:
        raw["pool"]["arch"] = {"grid": archs}
    if lrs:
        raw["pool"]["lr"] = {"grid": lrs}
    if smoke:  # a few 32-px slices, 1 run of 2 snapshots, δ for 1 epoch without baselines
        raw["data"].update(synthetic={"cases_per_site": 4, "shape": [32, 32, 6], "seed": 0}, image_size=32,
                           targets=["SiteB"])
        raw["pool"].update(arch={"grid": archs or ["unet_r18"]}, lr={"grid": lrs or [1e-3]},
                           epochs={"snapshots": [1, 2]}, batch_size=4)
        raw["uncertainty"].update(epochs=1, baselines=[], passes=2)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_spec(path, env={**os.environ, "OODSWEEP_STORAGE": str(tmp / "runs"),
                                "OODSWEEP_DATA": str(tmp / "data")})


def train_pool(spec, cache: Path) -> None:
    from trainables.segment import train_segmenter

    d, p = spec.data, spec.pool
    for arch in p.arch.values:
        for lr in p.lr.values:
            train_segmenter({"cache": str(cache), "source": d.source, "targets": list(d.targets), "num_threads": 1,
                             "target_split": d.target_split, "arch": arch, "lr": lr, "seed": 0,
                             "snapshots": list(p.epochs.values), "batch_size": p.batch_size,
                             "experiment_dir": str(spec.experiment_dir)})


class RayProcesses:
    """The distinct ``ray::`` processes under this driver's raylet that start while the block runs, sampled
    every 0.1 s in a thread (psutil)."""

    def __init__(self):
        import psutil
        import ray

        node = ray._private.worker._global_node  # this driver's own local Ray (started in main)
        self.raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        try:
            children = self.raylet.children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].startswith("ray::") and (p.pid not in self.seen or self.seen[p.pid] == "ray::IDLE"):
                self.seen[p.pid] = cmd[0]  # a worker is IDLE until it becomes an actor or runs a task

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self):
        self._sample()
        self.before = set(self.seen)  # the idle workers already there
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def started(self) -> Counter:
        return Counter(name for pid, name in self.seen.items() if pid not in self.before)


def run_stage(spec, cache: Path, group_size: int | None) -> dict:
    """The δ stage's trials on ``spec``'s pool, one at a time; its wall time, epoch seconds and processes."""
    import dataclasses

    from ray import tune

    from sweeps import uncertainty as stage
    from trainables import records

    spec = dataclasses.replace(spec, uncertainty=dataclasses.replace(spec.uncertainty, group_size=group_size))
    exp = spec.experiment_dir
    space = stage_space(spec, cache)
    tuner = tune.Tuner(tune.with_resources(stage.trial_fn, {"cpu": spec.uncertainty.trial_cpu}), param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=1),
                       run_config=tune.RunConfig(name="uncertainty", storage_path=str(exp), verbose=0))
    with RayProcesses() as procs:
        t = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - t
    errors = [str(r.error) for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"δ stage failed (group_size {group_size}): {errors[0][-2000:]}")
    epochs = sum(float(r.metrics_dataframe["epoch_seconds"].fillna(0).sum()) for r in results
                 if r.metrics_dataframe is not None and "epoch_seconds" in r.metrics_dataframe)
    return {"trials": len(results), "members": sum(len(g["members"]) for g in space["group"]["grid_search"]),
            "wall": wall, "epochs": epochs,
            "processes": procs.started(), "records": records.load_uncertainty(exp)}


def run_in_process(spec, cache: Path, space: dict) -> dict:
    """The same groups as the stage's default layout, fitted here with ``fit_group`` (no Ray): what the stage
    costs without Tune and Train. ``space``: the stage's ``param_space`` (built while Ray was up). Besides the
    wall time and the epochs, the time in ``score_member`` (every site with every method), so that the rest
    (loading the member, ŷ of the fit split, the held-out curve) is the difference."""
    import trainables.uncertainty.fit as fit_module
    from trainables import records
    from trainables.uncertainty.group import fit_group

    space = {k: v for k, v in space.items() if k != "_train"}
    groups = space.pop("group")["grid_search"]
    seconds = {"epochs": 0.0, "scoring": 0.0}
    real = fit_module.score_member

    def timed_scoring(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            seconds["scoring"] += time.perf_counter() - t

    def report(metrics: dict, ckpt_dir: str | None) -> None:  # as the Train worker's: checkpoints are not kept
        seconds["epochs"] += float(metrics.get("epoch_seconds") or 0)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    fit_module.score_member = timed_scoring
    try:
        t = time.perf_counter()
        for g in groups:
            fit_group([{**space, **p} for p in g["members"]], report=report)  # (space: built for this spec)
        wall = time.perf_counter() - t
    finally:
        fit_module.score_member = real
    return {"trials": len(groups), "members": sum(len(g["members"]) for g in groups), "wall": wall,
            "epochs": seconds["epochs"], "scoring": seconds["scoring"],
            "records": records.load_uncertainty(spec.experiment_dir)}


def stage_space(spec, cache: Path) -> dict:
    """The δ stage's Tune space for ``spec``'s pool (the spec's groups), as the driver builds it."""
    from sweeps import uncertainty as stage
    from trainables import records

    exp = spec.experiment_dir
    members, slices = records.load_records(exp)
    with_baselines = stage.baseline_members(spec, members, slices)
    ids = stage.delta_members(spec, members, with_baselines)
    checkpoints = {m: str(records.resolve_checkpoint(exp, c)) for m, c in zip(members["member_id"],
                                                                               members["checkpoint"])}
    return stage.param_space(spec, cache, ids, checkpoints, with_baselines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="*", default=None, help="the pool's architectures (default: the demo's)")
    ap.add_argument("--lrs", nargs="*", type=float, default=None, help="the pool's learning rates (default: the demo's)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny data and pool: checks that the script runs")
    args = ap.parse_args()
    import ray

    from sweeps.driver import prepare_data

    with tempfile.TemporaryDirectory(prefix="oodsweep-stage-bench-") as tmp:
        tmp = Path(tmp)
        one = demo_spec(tmp, args.smoke, args.archs, args.lrs, "per-member")
        grouped = demo_spec(tmp, args.smoke, args.archs, args.lrs, "grouped")
        alone = demo_spec(tmp, args.smoke, args.archs, args.lrs, "in-process")
        cache = prepare_data(one, progress=False)
        t = time.perf_counter()
        train_pool(one, cache)
        print(f"pool trained without Ray in {time.perf_counter() - t:.0f}s", flush=True)
        shutil.copytree(one.experiment_dir, grouped.experiment_dir)
        shutil.copytree(one.experiment_dir, alone.experiment_dir)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False)
        try:
            before = run_stage(one, cache, 1)
            after = run_stage(grouped, cache, grouped.uncertainty.group_size)
            space = stage_space(alone, cache)
        finally:
            ray.shutdown()
        bare = run_in_process(alone, cache, space)
    size = grouped.uncertainty.group_size
    for label, r in ((f"group_size 1 (a Train run per member)", before),
                     (f"group_size {size or 'run'} (the default)" if size is None else f"group_size {size}", after)):
        n = sum(r["processes"].values())
        print(f"{label}: {r['members']} members in {r['trials']} trials; stage {r['wall']:.1f}s, δ epochs "
              f"{r['epochs']:.1f}s -> ratio {r['wall'] / max(r['epochs'], 1e-9):.2f}; Ray processes started "
              f"{n} ({n / r['trials']:.1f} per trial: "
              + ", ".join(f"{k} {v}" for k, v in sorted(r["processes"].items())) + ")")
    rest = bare["wall"] - bare["epochs"] - bare["scoring"]
    print(f"the same {bare['trials']} groups without Ray (fit_group in this process): {bare['wall']:.1f}s = δ epochs "
          f"{bare['epochs']:.1f}s + scoring every site with every method {bare['scoring']:.1f}s + the rest (loading, "
          f"ŷ of the fit split, the held-out curve) {rest:.1f}s -> ratio "
          f"{bare['wall'] / max(bare['epochs'], 1e-9):.2f}; "
          f"Tune and Train added {after['wall'] - bare['wall']:.1f}s to the grouped stage "
          f"({(after['wall'] - bare['wall']) / max(after['trials'], 1):.1f}s a trial)")
    # an estimate across two layouts (the in-process run's scoring and rest taken from the grouped stage's wall
    # time): what the grouped stage spends beyond fitting and scoring, the cost groups were made to cut
    print(f"the grouped stage less that scoring and rest, over its δ epochs: "
          f"{(after['wall'] - bare['scoring'] - rest) / max(after['epochs'], 1e-9):.2f}")
    cols = ["uncertain_px", "uncertain_error_px", "error_px", "map_ptp", "mean_uncertainty"]
    keys = ["member_id", "method", "site", "case_id", "slice_idx"]
    a = before["records"].sort_values(keys).reset_index(drop=True)
    b = after["records"].sort_values(keys).reset_index(drop=True)
    c = bare["records"].sort_values(keys).reset_index(drop=True)
    same_rows = a[keys].equals(b[keys]) and a[keys].equals(c[keys])
    diff = float(max((a[cols].astype(float) - x[cols].astype(float)).abs().max().max() for x in (b, c))) \
        if same_rows else float("nan")
    print(f"records of the three: same rows {same_rows}; largest difference {diff:.2g} (goal <= 1e-6)")
    ratio = after["wall"] / max(after["epochs"], 1e-9)
    print(f"ratio with groups {ratio:.2f} (goal <= 1.3), without {before['wall'] / max(before['epochs'], 1e-9):.2f}")
    return 0 if same_rows and diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
