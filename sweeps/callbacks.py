"""Driver-side Ray Tune callbacks (imported only where Ray is installed)."""
from __future__ import annotations

from ray import tune

from .members import member_epochs, trial_member_ids, trial_name
from .tracking import MEMBER_TAG, PARENT_TAG, STAGE_TAG, Tracker


class MlflowPoolCallback(tune.Callback):
    """Driver-side: one MLflow child run per pool member, metrics logged as epochs arrive."""

    # the attribute names stay as they were: Tune pickles the callbacks into an experiment's state, and a
    # resume of an experiment started by an older version unpickles them
    def __init__(self, tracker: Tracker, parent_mlflow_id: str):
        self.tracker = tracker
        self.parent_run_id = parent_mlflow_id
        self._runs: dict[str, dict[int, str]] = {}  # trial id -> {member epoch: MLflow run id}
        self._last_step: dict[str, int] = {}

    def _member_runs(self, trial) -> dict[int, str]:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        cfg = trial.config
        runs = {}
        for ep, mid in zip(member_epochs(cfg), trial_member_ids(cfg)):
            rid, created = self.tracker.get_or_create_run(
                mid, {MEMBER_TAG: mid, PARENT_TAG: self.parent_run_id})
            if created:
                self.tracker.log_params(rid, {
                    "arch": cfg["arch"], "lr": cfg["lr"], "seed": cfg["seed"], "epochs": ep,
                    "batch_size": cfg["batch_size"], "run_id": trial_name(cfg), "source": cfg["source"],
                    "targets": ",".join(cfg["targets"]), "trial_id": trial.trial_id})
            else:  # resumed: do not log the epochs it already has a second time
                hist = self.tracker.client.get_metric_history(rid, "epoch")
                self._last_step[rid] = max((int(m.value) for m in hist), default=0)
            runs[ep] = rid
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
            if epoch <= ep and epoch > self._last_step.get(rid, 0):
                self.tracker.log_metrics(rid, metrics, step=epoch)
                self._last_step[rid] = epoch
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
    """Driver-side: one MLflow child run per trial of a per-member stage (e.g. uncertainty)."""

    def __init__(self, tracker: Tracker, parent_mlflow_id: str, stage: str):
        self.tracker = tracker
        self.parent_run_id = parent_mlflow_id  # (the name an older version pickled)
        self.stage = stage
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}

    def _run(self, trial) -> str:
        if trial.trial_id not in self._runs:
            cfg = {**trial.config, **trial.config.get("member", {})}
            mid = cfg["member_id"]
            rid, created = self.tracker.get_or_create_run(
                f"{self.stage}-{mid}", {MEMBER_TAG: mid, PARENT_TAG: self.parent_run_id, STAGE_TAG: self.stage})
            if created:
                self.tracker.log_params(rid, {k: cfg[k] for k in ("member_id", "epochs", "lr", "lam", "beta",
                                                                  "batch_size", "passes", "fit_split") if k in cfg})
                self.tracker.log_params(rid, {"baselines": ",".join(cfg.get("baselines", [])),
                                              "trial_id": trial.trial_id})
            else:
                hist = self.tracker.client.get_metric_history(rid, "epoch")
                self._last_step[rid] = max((int(m.value) for m in hist), default=0)
            self._runs[trial.trial_id] = rid
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = self._run(trial)
        epoch = int(result.get("epoch", 0))
        # δ's convergence (held-out loss and Dice(μ > 0.5, ŷ) each epoch) and the maps' AUROC per site
        metrics = {k: v for k, v in result.items()
                   if k.startswith(("loss_", "ua_", "heldout_", "final_", "auroc_")) or k in ("epoch", "epoch_seconds")}
        if result.get("scored"):
            self.tracker.log_metrics(rid, metrics, step=epoch)
        elif epoch > self._last_step.get(rid, 0):
            self.tracker.log_metrics(rid, metrics, step=epoch)
            self._last_step[rid] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.end(self._run(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        rid = self._run(trial)
        self.tracker.set_tags(rid, {"oodsweep.error": str(getattr(trial, "error_file", None) or "see the trial folder")})
        self.tracker.end(rid, "FAILED")
