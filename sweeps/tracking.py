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
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

from .console import log
from .spec_schema import SweepSpec

STAGE_TAG = "oodsweep.stage"
#: MLflow 3's experiment type: a model-training experiment opens the UI on its runs (not the GenAI overview)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
MEMBER_TAG = "oodsweep.member_id"
PARENT_TAG = "mlflow.parentRunId"
#: the file in the experiment folder where operations wait while the tracking store does not answer
OUTBOX_FILE = "mlflow-outbox.jsonl"
#: how long the end of a run waits for the queue to empty (less once the store is found not answering)
FLUSH_S = 60.0
#: each HTTP request to a tracking server: seconds and retries (MLflow's defaults, 120 s and 7 retries with
#: backoff, stall a caller for minutes); the outbox retries itself. The environment may set others.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
#: one outbox per tracking store and experiment in a process: a Tracker unpickled from Tune's experiment
#: state (the callbacks') sends through the driver's
_OUTBOXES: dict[tuple[str, str], Any] = {}
_OUTBOXES_LOCK = threading.Lock()


class Tracker:
    """Thin wrapper over ``MlflowClient`` for one sweep's experiment.

    Its methods take ``mlflow_id``, an MLflow run's id (not a training run: the records' ``run_id``).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_dir: str | Path | None = None,
                 outbox: str | Path | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_dir = Path(artifact_dir).resolve() if artifact_dir else None
        self.outbox_path = Path(outbox) if outbox else None
        self._client = None
        self._experiment_id: str | None = None
        self._init_sender()

    def _init_sender(self) -> None:
        self._ids: dict[str, str] = {}  # repr(RunRef) -> MLflow run id
        self._fresh: set[str] = set()  # runs this process created (nothing to skip in them)
        self._steps: dict[tuple[str, str], set[int]] = {}
        self._params: dict[str, set[str]] = {}
        self._data: dict[str, Any] = {}

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment state
        return {k: v for k, v in self.__dict__.items()
                if k in ("tracking_uri", "experiment_name", "artifact_dir", "outbox_path")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"outbox_path": None, **state, "_client": None, "_experiment_id": None})
        self._init_sender()

    @property
    def outbox(self):
        """The process's outbox for this store and experiment (shared with unpickled copies)."""
        from .outbox import Outbox

        with _OUTBOXES_LOCK:
            key = (self.tracking_uri, self.experiment_name)
            if key not in _OUTBOXES:
                _OUTBOXES[key] = Outbox(self.outbox_path, self.apply, what=f"MLflow ({self.tracking_uri})")
            return _OUTBOXES[key]

    def close(self, timeout: float = FLUSH_S) -> int:
        """Flush, then forget this process's outbox (a later Tracker reads what is unsent from its file)."""
        with _OUTBOXES_LOCK:
            box = _OUTBOXES.get((self.tracking_uri, self.experiment_name))
        if box is None:
            return 0
        left = box.flush(timeout)
        self._unsent, self._last_error = box.pending(), box.error
        with _OUTBOXES_LOCK:
            _OUTBOXES.pop((self.tracking_uri, self.experiment_name), None)
        return left

    @property
    def known_experiment_id(self) -> str | None:
        """The MLflow experiment's id if the store has told it (no request)."""
        return self._experiment_id

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
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
        new run's display name. Synchronous: the sender's, and tests'."""
        run = self.find_run(tags)
        if run is not None:
            return run.info.run_id, False
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id, True

    # -------------------------------------------------------------- queued: never blocks the caller
    def run_ref(self, name: str, tags: dict[str, str], parent: Ref | None = None) -> RunRef:
        """The MLflow run with these identifying tags (and ``parent``'s id as its parent), created on first
        use; nothing is sent until an operation on it is."""
        return RunRef(name, tuple(sorted((k, str(v)) for k, v in tags.items())), parent)

    def stage_run(self, stage: str) -> RunRef:
        return self.run_ref(stage, {STAGE_TAG: stage})

    def _put(self, op: str, ref: Ref, **data) -> None:
        self.outbox.put({"op": op, "run": _ref_json(ref), **data})

    def log_params(self, mlflow_id: Ref, params: dict[str, Any]) -> None:
        self._put("params", mlflow_id, params={k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, mlflow_id: Ref, metrics: dict[str, Any], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if clean:
            self._put("metrics", mlflow_id, metrics=clean, step=step or 0, ts=int(time.time() * 1000))

    def set_tags(self, mlflow_id: Ref, tags: dict[str, Any]) -> None:
        self._put("tags", mlflow_id, tags={k: str(v) for k, v in tags.items()})

    def reopen(self, mlflow_id: Ref) -> None:
        self._put("status", mlflow_id, status="RUNNING")

    def end(self, mlflow_id: Ref, status: str = "FINISHED") -> None:
        self._put("status", mlflow_id, status=status)

    def finish_done_stage(self, mlflow_id: Ref) -> None:
        """End the run of a stage found done if it is still RUNNING: a driver killed between writing
        the stage's done marker and ending its run leaves it so, and a resume skips the stage."""
        self._put("status", mlflow_id, status="FINISHED", only_if="RUNNING")

    def log_artifacts(self, mlflow_id: Ref, paths: Iterable[Path], base: Path, prefix: str = "") -> None:
        files = []
        for p in paths:
            p = Path(p)
            rel = "/".join(x for x in (prefix, p.parent.relative_to(base).as_posix()) if x and x != ".")
            files.append([str(p.resolve()), rel])
        if files:
            self._put("artifacts", mlflow_id, files=files)

    def flush(self, timeout: float = FLUSH_S) -> int:
        """Wait (at most ``timeout`` s, less once the store is found not answering) for the queued
        operations to be sent; return how many are not."""
        return self.outbox.flush(timeout)

    def unsent_line(self) -> str | None:
        """What is not sent yet, with where it waits and how it will be sent; None when all is."""
        with _OUTBOXES_LOCK:
            box = _OUTBOXES.get((self.tracking_uri, self.experiment_name))
        ops = box.pending() if box is not None else getattr(self, "_unsent", [])
        if not ops:
            return None
        from .outbox import summary

        why = f" ({self._last_error})" if getattr(self, "_last_error", None) else ""
        where = self.outbox_path or "memory (lost at exit)"
        return (f"MLflow: {len(ops)} operation(s) on {summary(ops)} not sent to {self.tracking_uri}{why}; they "
                f"wait in {where} and are sent when the store answers: on "
                f"the next `oodsweep resume` or `oodsweep analyze` of this experiment. The records hold every "
                f"value already")

    # -------------------------------------------------------------- the sender (background thread)
    def _resolve(self, ref: Ref) -> str:
        if isinstance(ref, str):
            return ref
        key = repr(ref)
        if key not in self._ids:
            tags = dict(ref.tags)
            if ref.parent is not None:
                tags[PARENT_TAG] = self._resolve(ref.parent)
            rid, created = self.get_or_create_run(ref.name, tags)
            self._ids[key] = rid
            if created:
                self._fresh.add(rid)
        return self._ids[key]

    def _logged_steps(self, rid: str, key: str) -> set[int]:
        """The steps of ``key`` already in a run this process did not create (a resumed or re-sent one)."""
        if (rid, key) not in self._steps:
            have = set() if rid in self._fresh else set(self._run_data(rid).metrics)
            hist = self.client.get_metric_history(rid, key) if key in have else []
            self._steps[(rid, key)] = {int(m.step) for m in hist}
        return self._steps[(rid, key)]

    def _run_data(self, rid: str):
        if rid not in self._data:
            self._data[rid] = self.client.get_run(rid).data
        return self._data[rid]

    def apply(self, op: dict) -> None:
        """Send one queued operation (the outbox's thread). Sending one twice changes nothing."""
        from mlflow.entities import Metric, Param

        rid = self._resolve(_ref_from_json(op["run"]))
        kind = op["op"]
        if kind == "params":
            have = {} if rid in self._fresh else self._run_data(rid).params
            sent = self._params.setdefault(rid, set(have))
            new = [Param(k, v) for k, v in op["params"].items() if k not in sent]
            if new:
                self.client.log_batch(rid, params=new)
                sent.update(p.key for p in new)
        elif kind == "metrics":
            step = int(op["step"])
            todo = [k for k in op["metrics"] if step not in self._logged_steps(rid, k)]
            if todo:
                self.client.log_batch(rid, metrics=[Metric(k, op["metrics"][k], op["ts"], step) for k in todo])
                for k in todo:
                    self._steps[(rid, k)].add(step)
        elif kind == "tags":
            for k, v in op["tags"].items():
                self.client.set_tag(rid, k, v)
        elif kind == "status":
            if op.get("only_if") and self.client.get_run(rid).info.status != op["only_if"]:
                return
            if op["status"] == "RUNNING":
                self.client.update_run(rid, status="RUNNING")
            else:
                self.client.set_terminated(rid, status=op["status"])
        elif kind == "artifacts":
            for path, rel in op["files"]:
                self.client.log_artifact(rid, path, artifact_path=rel or None)
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")


@dataclass(frozen=True)
class RunRef:
    """An MLflow run named by its identifying tags (and its parent's), resolved to an id when sent."""

    name: str
    tags: tuple[tuple[str, str], ...]
    parent: "Ref | None" = None


#: an MLflow run id (as older pickled callbacks hold) or a RunRef
Ref = Union[str, RunRef]


def _ref_json(ref: Ref) -> dict:
    if isinstance(ref, str):
        return {"id": ref}
    return {"name": ref.name, "tags": dict(ref.tags),
            **({"parent": _ref_json(ref.parent)} if ref.parent is not None else {})}


def _ref_from_json(d: dict) -> Ref:
    if "id" in d:
        return d["id"]
    parent = _ref_from_json(d["parent"]) if "parent" in d else None
    return RunRef(d["name"], tuple(sorted(d["tags"].items())), parent)


def tracker_for(spec: SweepSpec) -> Tracker:
    """The sweep's MLflow tracker; what an earlier run could not send (its outbox file) is sent from now on."""
    tracker = Tracker(spec.tracking(), spec.name, artifact_dir=spec.experiment_dir / "mlartifacts",
                      outbox=spec.experiment_dir / OUTBOX_FILE)
    tracker.outbox  # noqa: B018 - opened now: its unsent operations start going out
    return tracker


def finish_tracking(tracker: Tracker, timeout: float | None = None) -> int:
    """Wait a bounded time for the tracker's queue to empty; say what is still unsent. Returns that count."""
    left = tracker.close(FLUSH_S if timeout is None else timeout)
    line = tracker.unsent_line() if left else None
    if line:
        log(line)
    return left
