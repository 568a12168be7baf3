"""MLflow tracking from the driver only (docs/architecture.md "Tracking").

One MLflow experiment per sweep; a parent run per stage (``pool``, ``analysis``); one child run
per pool member, nested under the pool run through MLflow's ``mlflow.parentRunId`` tag. Runs are
found again by tags, so a resumed sweep reuses its runs instead of duplicating them.

We use ``MlflowClient`` (explicit run ids, no global active run) rather than Ray's
``MLflowLoggerCallback`` because a trial here yields several pool members (one per snapshot
epoch), each of which gets its own child run, and because resume must reuse existing runs.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

STAGE_TAG = "oodsweep.stage"
#: MLflow 3's experiment type: a model-training experiment opens the UI on its runs (not the GenAI overview)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
MEMBER_TAG = "oodsweep.member_id"
PARENT_TAG = "mlflow.parentRunId"


class Tracker:
    """Thin wrapper over ``MlflowClient`` for one sweep's experiment.

    Its methods take ``mlflow_id``, an MLflow run's id (not a training run: the records' ``run_id``).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_dir: str | Path | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_dir = Path(artifact_dir).resolve() if artifact_dir else None
        self._client = None
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                loc = self.artifact_dir.as_uri() if self.artifact_dir else None
                self._experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=loc,
                                                                    tags={KIND_TAG: KIND})
            else:
                self._experiment_id = exp.experiment_id
                if exp.tags.get(KIND_TAG) != KIND:
                    self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
                self._relocate(exp)
        return self._experiment_id

    def _relocate(self, exp) -> None:
        """Point the experiment's artifact location (and its runs') at ``artifact_dir`` when they differ.

        An experiment folder moved with its embedded ``mlflow.db`` keeps the old absolute artifact
        URIs, and MLflow would log new artifacts there, re-creating the old folder. MLflow has no API
        to change an artifact location, so for the embedded SQLite store inside the experiment (and
        only that one: a shared tracking server is never rewritten) the two columns are updated here.
        """
        if not self.artifact_dir or not self.tracking_uri.startswith("sqlite:///"):
            return
        new = self.artifact_dir.as_uri()
        old = exp.artifact_location
        db = Path(self.tracking_uri[len("sqlite:///"):])
        if old == new or not db.is_relative_to(self.artifact_dir.parent):
            return
        import sqlite3

        con = sqlite3.connect(db)
        try:
            with con:
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                            (new, int(exp.experiment_id)))
                con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                            "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                            (new, len(old) + 1, int(exp.experiment_id), len(old), old))
        finally:
            con.close()
        print(f"[oodsweep] MLflow artifacts of {self.experiment_name!r} now go to {new} (were {old})", flush=True)

    def find_run(self, tags: dict[str, str]):
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=2,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def get_or_create_run(self, name: str, tags: dict[str, str]) -> tuple[str, bool]:
        """Return (MLflow run id, created). A run with the same identifying tags is reused; ``name`` is the
        new run's display name."""
        run = self.find_run(tags)
        if run is not None:
            return run.info.run_id, False
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id, True

    def stage_run(self, stage: str) -> str:
        mlflow_id, _ = self.get_or_create_run(stage, {STAGE_TAG: stage})
        return mlflow_id

    def log_params(self, mlflow_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(mlflow_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(mlflow_id, params=new)

    def log_metrics(self, mlflow_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(mlflow_id, metrics=batch)

    def set_tags(self, mlflow_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(mlflow_id, k, str(v))

    def reopen(self, mlflow_id: str) -> None:
        self.client.update_run(mlflow_id, status="RUNNING")

    def end(self, mlflow_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(mlflow_id, status=status)

    def finish_done_stage(self, mlflow_id: str) -> None:
        """End the run of a stage found done if it is still RUNNING: a driver killed between writing
        the stage's done marker and ending its run leaves it so, and a resume skips the stage."""
        if self.client.get_run(mlflow_id).info.status == "RUNNING":
            self.end(mlflow_id, "FINISHED")

    def log_artifacts(self, mlflow_id: str, paths: Iterable[Path], base: Path, prefix: str = "") -> None:
        for p in paths:
            p = Path(p)
            rel = "/".join(x for x in (prefix, p.parent.relative_to(base).as_posix()) if x and x != ".")
            self.client.log_artifact(mlflow_id, str(p), artifact_path=rel or None)
