"""Driver-side Ray Tune callbacks (imported only where Ray is installed).

They run in Tune's control loop: every MLflow call goes through the tracker's outbox (``sweeps.outbox``),
so a slow or absent tracking server never holds up the trials."""
from __future__ import annotations

from ray import tune

from .members import member_epochs, trial_member_ids, trial_name
from .tracking import MEMBER_TAG, STAGE_TAG, Ref, Tracker


class MlflowPoolCallback(tune.Callback):
    """Driver-side: one MLflow child run per pool member, metrics logged as epochs arrive."""

    # the attribute names stay as they were: Tune pickles the callbacks into an experiment's state, and a
    # resume of an experiment started by an older version unpickles them
    def __init__(self, tracker: Tracker, parent_mlflow_id: str):
        self.tracker = tracker
        self.parent_run_id = parent_mlflow_id
        self._runs: dict[str, dict[int, Ref]] = {}  # trial id -> {member epoch: its MLflow run}
        self._last_step: dict[str, int] = {}  # (unused since the tracker skips logged steps; kept for pickles)

    def _member_runs(self, trial) -> dict[int, Ref]:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        cfg = trial.config
        runs = {}
        for ep, mid in zip(member_epochs(cfg), trial_member_ids(cfg)):
            # queued (the tracker's outbox): a resumed run is found by its tags, its params and the epochs it
            # has are not logged twice
            ref = self.tracker.run_ref(mid, {MEMBER_TAG: mid}, parent=self.parent_run_id)
            self.tracker.log_params(ref, {
                "arch": cfg["arch"], "lr": cfg["lr"], "seed": cfg["seed"], "epochs": ep,
                "batch_size": cfg["batch_size"], "run_id": trial_name(cfg), "source": cfg["source"],
                "targets": ",".join(cfg["targets"]), "trial_id": trial.trial_id})
            runs[ep] = ref
        self._runs[trial.trial_id] = runs
        return runs

    def on_trial_start(self, iteration, trials, trial, **info):
        self._member_runs(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", 0))
        if epoch <= 0:
            return
        metrics = {k: v for k, v in result.items()
                   if k in ("train_loss", "epoch", "train_seconds", "eval_seconds")
                   or k.startswith(("id_", "ood_"))}
        for ep, rid in self._member_runs(trial).items():
            if epoch <= ep:
                self.tracker.log_metrics(rid, metrics, step=epoch)
            if epoch == ep and result.get("member_id"):
                self.tracker.set_tags(rid, {"oodsweep.checkpoint_epoch": ep})

    def on_trial_complete(self, iteration, trials, trial, **info):
        for rid in self._member_runs(trial).values():
            self.tracker.end(rid, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        for rid in self._member_runs(trial).values():
            self.tracker.set_tags(rid, {"oodsweep.error": str(getattr(trial, "error_file", None) or "see the trial folder under pool/")})
            self.tracker.end(rid, "FAILED")


class MlflowMemberCallback(tune.Callback):
    """Driver-side: one MLflow child run per member of a per-member stage (e.g. uncertainty), whose trials fit
    one member (``member``) or a group of them (``group``: results name their ``member_id``)."""

    def __init__(self, tracker: Tracker, parent_mlflow_id: str, stage: str):
        self.tracker = tracker
        self.parent_run_id = parent_mlflow_id  # (the name an older version pickled)
        self.stage = stage
        self._runs: dict = {}  # trial id -> {member id: its MLflow run} (an older version: trial id -> run)
        self._last_step: dict[str, int] = {}
        self._done: set = set()  # the runs of a group's members that are scored (ended before their trial)

    def _member_runs(self, trial) -> dict[str, Ref]:
        runs = self._runs.setdefault(trial.trial_id, {})
        if not isinstance(runs, dict):  # pickled by a version with one run per trial
            runs = self._runs[trial.trial_id] = {self._members(trial)[0]["member_id"]: runs}
        return runs

    @staticmethod
    def _members(trial) -> list[dict]:
        cfg = trial.config
        points = cfg["group"]["members"] if "group" in cfg else [cfg.get("member", cfg)]
        return [{**{k: v for k, v in cfg.items() if k not in ("group", "member")}, **p} for p in points]

    def _run(self, trial, member_id: str | None = None) -> Ref:
        runs = self._member_runs(trial)
        cfgs = {c["member_id"]: c for c in self._members(trial)}
        mid = member_id if member_id in cfgs else next(iter(cfgs))
        if mid not in runs:
            cfg = cfgs[mid]
            ref = self.tracker.run_ref(f"{self.stage}-{mid}", {MEMBER_TAG: mid, STAGE_TAG: self.stage},
                                       parent=self.parent_run_id)
            self.tracker.log_params(ref, {k: cfg[k] for k in ("member_id", "epochs", "lr", "lam", "beta",
                                                              "batch_size", "passes", "fit_split") if k in cfg})
            self.tracker.log_params(ref, {"baselines": ",".join(cfg.get("baselines", [])),
                                          "trial_id": trial.trial_id})
            runs[mid] = ref
        return runs[mid]

    def on_trial_start(self, iteration, trials, trial, **info):
        if len(self._members(trial)) == 1:  # a group's runs start with their member's first result
            self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = self._run(trial, result.get("member_id"))
        epoch = int(result.get("epoch", 0))
        # δ's convergence (held-out loss and Dice(μ > 0.5, ŷ) each epoch) and the maps' AUROC per site; a
        # step the run has already is skipped by the tracker
        metrics = {k: v for k, v in result.items()
                   if k.startswith(("loss_", "ua_", "heldout_", "final_", "auroc_")) or k in ("epoch", "epoch_seconds")}
        self.tracker.log_metrics(rid, metrics, step=epoch)
        if result.get("scored") and result.get("member_id"):  # a group's member is done: its records are written
            self.tracker.end(rid, "FINISHED")
            self._done.add(rid)

    def on_trial_complete(self, iteration, trials, trial, **info):
        for rid in self._member_runs(trial).values():
            if rid not in getattr(self, "_done", ()):
                self.tracker.end(rid, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        runs = self._member_runs(trial) or {None: self._run(trial)}
        for rid in (r for r in runs.values() if r not in getattr(self, "_done", ())):
            self.tracker.set_tags(rid, {"oodsweep.error": str(getattr(trial, "error_file", None) or "see the trial folder")})
            self.tracker.end(rid, "FAILED")
