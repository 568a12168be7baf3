"""The tracking outbox (``sweeps.outbox``) without a tracking store: ``apply`` is a plain function here that fails
as an unreachable server does, or refuses as a server does a bad value."""
from __future__ import annotations

import time

from sweeps.outbox import Outbox, summary, transient, unsent


class Store:
    """Stands for the tracking server: down (ConnectionError) until ``up``; ``refuse`` makes it reject an op."""

    def __init__(self, up: bool = True):
        self.up, self.got, self.calls = up, [], 0

    def apply(self, op: dict) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionError("[Errno 111] Connection refused")
        if op.get("bad"):
            raise ValueError("INVALID_PARAMETER_VALUE: changed param")
        self.got.append(op["n"])


def _op(n: int, **kw) -> dict:
    return {"op": "metrics", "run": {"name": f"r{n % 2}", "tags": {}}, "metrics": {"a": 1.0, "b": 2.0}, "n": n, **kw}


def test_sent_in_order_and_the_file_goes(tmp_path):
    store = Store()
    box = Outbox(tmp_path / "o.jsonl", store.apply)
    for i in range(5):
        box.put(_op(i))
    assert box.flush(5) == 0
    assert store.got == [0, 1, 2, 3, 4]
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.sent").exists()


def test_a_store_that_does_not_answer_holds_nothing_up_and_loses_nothing(tmp_path):
    store = Store(up=False)
    box = Outbox(tmp_path / "o.jsonl", store.apply)
    t = time.monotonic()
    for i in range(4):
        box.put(_op(i))  # returns at once: the caller is Tune's control loop
    assert time.monotonic() - t < 0.5
    left = box.flush(10)  # one more try, then it gives up: not the full 10 s
    assert left == 4 and time.monotonic() - t < 5 and "Connection refused" in box.error
    assert len(unsent(tmp_path / "o.jsonl")) == 4
    assert summary(box.pending()) == "2 run(s) (8 metric values, 0 params, 0 other operations)"

    # the process ends; the next one (a resume, an analyze) finds the file and sends it once the store answers
    store2 = Store(up=True)
    box2 = Outbox(tmp_path / "o.jsonl", store2.apply)
    assert box2.flush(5) == 0 and store2.got == [0, 1, 2, 3]
    assert unsent(tmp_path / "o.jsonl") == []


def test_the_store_comes_back_while_running(tmp_path):
    store = Store(up=False)
    box = Outbox(tmp_path / "o.jsonl", store.apply)
    box.put(_op(0))
    box.flush(5)
    assert box.error
    store.up = True
    box.put(_op(1))
    assert box.flush(10) == 0 and store.got == [0, 1] and box.error is None


def test_partly_sent_file_resumes_after_the_sent_count(tmp_path):
    """A process killed after sending 2 of 3: the next sends the third only."""
    store = Store()
    box = Outbox(tmp_path / "o.jsonl", store.apply)
    store.up = False
    for i in range(3):
        box.put(_op(i))
    box.flush(2)
    (tmp_path / "o.sent").write_text("2")
    store2 = Store()
    assert Outbox(tmp_path / "o.jsonl", store2.apply).flush(5) == 0
    assert store2.got == [2]


def test_a_refused_operation_is_dropped_not_retried(tmp_path):
    store = Store()
    box = Outbox(tmp_path / "o.jsonl", store.apply)
    box.put(_op(0, bad=True))
    box.put(_op(1))
    assert box.flush(5) == 0 and store.got == [1] and len(box.rejected) == 1


def test_transient_errors():
    from mlflow.exceptions import MlflowException

    assert transient(ConnectionError("refused"))
    assert transient(MlflowException("API request to http://x/api failed with exception Max retries exceeded"))
    assert not transient(MlflowException("Changing param values is not allowed", error_code="INVALID_PARAMETER_VALUE"))
    assert not transient(FileNotFoundError("artifact gone"))
    assert not transient(ValueError("bad"))

