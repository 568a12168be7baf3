"""The tracking outbox: MLflow calls leave the driver's critical path (the records are the truth, MLflow a view).

``Outbox.put`` appends an operation (a JSON-able dict) to a list and to a JSON-lines file in the experiment
folder (``mlflow-outbox.jsonl``) and returns at once; a daemon thread sends the operations in order through
a function the tracker gives (``apply``). An operation that fails because the tracking server does not
answer (``transient``) stays first in line and is tried again after a growing pause (1 s doubling to 30 s);
one the server refuses (a bad value, a deleted run) is dropped and counted, so it cannot hold up the others.
How many operations are sent is written next to the file (``mlflow-outbox.sent``), and both files go once
everything is sent: a driver killed, interrupted or ending with the server down leaves its unsent operations
there, and the next process that opens the outbox (``oodsweep resume``, ``oodsweep analyze``) sends them.
An operation sent just before a kill may be sent twice: the tracker's operations are written so that a
second time changes nothing (runs are found by their tags, logged params and metric steps are skipped).

No library does this here: MLflow's own asynchronous logging (``synchronous=False``) keeps its queue in
memory only, so a driver that ends with the server down loses what it held.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .console import log

#: error codes of an MLflow server that mean "not now" rather than "never"
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def transient(e: BaseException) -> bool:
    """Whether an MLflow call failed because the store could not be reached (try again later)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = str(e)
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # not imported: not one of its errors
    if mlflow_exceptions is not None:
        if isinstance(e, mlflow_exceptions.RestException):
            return str(e.error_code) in TRANSIENT_CODES
        if isinstance(e, mlflow_exceptions.MlflowException) and ("API request to" in text or "Max retries" in text):
            return True
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # an artifact file gone: no later try finds it
    return isinstance(e, OSError) or "database is locked" in text or "Connection refused" in text


class Outbox:
    """An ordered, file-backed queue of tracking operations, sent by a background thread."""

    def __init__(self, path: str | os.PathLike | None, apply: Callable[[dict], None], what: str = "MLflow"):
        self.path = Path(path) if path else None
        self.sent_path = self.path.with_suffix(".sent") if self.path else None
        self.apply, self.what = apply, what
        self._ops: list[dict] = []
        self._next = 0  # index of the first unsent operation
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._hurry = False  # flush(): try again now instead of after the pause
        self._attempts = 0  # failed attempts since the last success
        self.error: str | None = None  # the last transient error, None once the store answers
        self.rejected: list[str] = []
        self.sent = 0
        self._load()

    # -------------------------------------------------------------- the file
    def _load(self) -> None:
        if not self.path or not self.path.exists():
            return
        done = 0
        try:
            done = int(self.sent_path.read_text().strip() or 0) if self.sent_path.exists() else 0
        except (OSError, ValueError):
            done = 0
        ops = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a process killed while writing it
                continue
        self._ops = ops[done:]
        self._rewrite()
        if self._ops:
            log(f"{self.what}: {len(self._ops)} operation(s) not sent by an earlier run ({self.path}); sending them")
            self._start()

    def _rewrite(self) -> None:
        """The file holds exactly the unsent operations (and no .sent count)."""
        self._ops, self._next = self._ops[self._next:], 0
        if not self.path:
            return
        try:
            if not self._ops:
                self.path.unlink(missing_ok=True)
            else:
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text("".join(json.dumps(op) + "\n" for op in self._ops))
                os.replace(tmp, self.path)
            self.sent_path.unlink(missing_ok=True)
        except OSError as e:
            log(f"{self.what}: cannot rewrite {self.path} ({e})")

    def _append(self, op: dict) -> None:
        if not self.path:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(op) + "\n")
        except OSError as e:  # the records are the truth: a full or read-only disk must not stop training
            log(f"{self.what}: cannot keep an operation in {self.path} ({e}); it is sent from memory only")

    def _mark_sent(self) -> None:
        if not self.path:
            return
        if self._next == len(self._ops):
            self._rewrite()
            return
        try:
            tmp = self.sent_path.with_name(f".{self.sent_path.name}.tmp")
            tmp.write_text(str(self._next))
            os.replace(tmp, self.sent_path)
        except OSError:
            pass

    # -------------------------------------------------------------- the queue
    def put(self, op: dict) -> None:
        with self._cv:
            self._ops.append(op)
            self._append(op)
            self._cv.notify_all()
        self._start()

    def pending(self) -> list[dict]:
        with self._cv:
            return list(self._ops[self._next:])

    def _start(self) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="oodsweep-tracking", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._next >= len(self._ops):
                    self._cv.wait()
                op = self._ops[self._next]
            try:
                self.apply(op)
            except Exception as e:  # noqa: BLE001 - any failure of the store is judged here, none reaches Tune
                if transient(e):
                    with self._cv:
                        if self.error is None:
                            log(f"{self.what} does not answer ({_short(e)}); training goes on, its logging waits "
                                f"in {self.path or 'memory'} and is sent when it answers again")
                        self.error = _short(e)
                        self._attempts += 1
                        end = time.monotonic() + min(30.0, 2.0 ** min(self._attempts - 1, 5))
                        while not self._hurry and end > time.monotonic():
                            self._cv.wait(timeout=end - time.monotonic())
                        self._hurry = False
                        self._cv.notify_all()
                    continue
                self.rejected.append(f"{op.get('op')} {op.get('run', {}).get('name', '')}: {_short(e)}")
                log(f"{self.what} refused an operation ({self.rejected[-1]}); it is dropped, the records keep "
                    f"the values")
            with self._cv:
                if self.error is not None:
                    log(f"{self.what} answers again: sending what waited")
                self.error, self._attempts = None, 0
                self._next += 1
                self.sent += 1
                self._mark_sent()
                self._cv.notify_all()

    def flush(self, timeout: float) -> int:
        """Wait until everything is sent, or ``timeout`` seconds, or one more attempt failed while the store
        does not answer; return how many operations are still unsent."""
        deadline = time.monotonic() + timeout
        with self._cv:
            if self._next < len(self._ops):
                self._start_locked()
            failed_before = self._attempts
            if self.error is not None:  # waiting out a pause: try now
                self._hurry = True
                self._cv.notify_all()
            while self._next < len(self._ops):
                left = deadline - time.monotonic()
                if left <= 0 or (self.error is not None and self._attempts > failed_before):
                    break
                self._cv.wait(timeout=min(left, 0.5))
            return len(self._ops) - self._next

    def _start_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="oodsweep-tracking", daemon=True)
            self._thread.start()


def unsent(path: str | os.PathLike) -> list[dict]:
    """The operations an outbox file still holds (no thread, no store: ``oodsweep status``)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        sent_file = path.with_suffix(".sent")
        done = int(sent_file.read_text().strip() or 0) if sent_file.exists() else 0
        lines = path.read_text(errors="replace").splitlines()
    except (OSError, ValueError):
        return []
    ops = []
    for line in lines[done:]:
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return ops


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'…' if len(text) > 200 else ''}"


def summary(ops: list[dict]) -> str:
    """"3 runs (12 metric values, 5 params, 2 status changes)": what the unsent operations hold."""
    runs = {json.dumps(op.get("run"), sort_keys=True) for op in ops}
    metrics = sum(len(op.get("metrics", {})) for op in ops if op.get("op") == "metrics")
    params = sum(len(op.get("params", {})) for op in ops if op.get("op") == "params")
    other = sum(1 for op in ops if op.get("op") not in ("metrics", "params"))
    return f"{len(runs)} run(s) ({metrics} metric values, {params} params, {other} other operations)"
