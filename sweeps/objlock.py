"""The driver lock of an experiment on object storage: the object ``<experiment>/.driver.lock``.

``flock`` holds only on one host, and an object store has no rename-if-absent; S3 has conditional writes:
a ``PUT`` with ``If-None-Match: *`` creates the lock object only when none exists (HTTP 412 otherwise), and
one with ``If-Match: <etag>`` rewrites it only while it is still ours. The holder rewrites it every
``BEAT_S`` seconds with the time; a lock whose time is older than ``$OODSWEEP_LOCK_TTL_S`` (default 120 s),
or whose holder was a process on this host that no longer exists (a driver killed with SIGKILL cannot
delete its lock), is stale and taken over. Other schemes (``gs://``, ...) have no conditional write
through pyarrow: the lock object is written without one, which guards against a second driver started
later but not against two started in the same second.

boto3 (the AWS SDK, which sends the conditional headers) does the S3 requests; it reads the endpoint,
region and credentials from the same variables as pyarrow (``$AWS_ENDPOINT_URL``, ``$AWS_REGION``, ...).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from .errors import LockError

LOCK_NAME = ".driver.lock"
BEAT_S = 10.0


def ttl() -> float:
    return float(os.environ.get("OODSWEEP_LOCK_TTL_S", "120"))


@dataclass
class Held:
    uri: str
    etag: str | None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def _split(uri: str) -> tuple[str, str, str]:
    scheme, rest = uri.split("://", 1)
    bucket, _, prefix = rest.strip("/").partition("/")
    return scheme.lower(), bucket, f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME


def _client():
    import boto3

    return boto3.client("s3")


def _body() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "beat": time.time()}).encode()


def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"


def _stale(info: dict) -> bool:
    if time.time() - float(info.get("beat", 0)) > ttl():
        return True
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


def read(uri: str) -> tuple[dict, str] | None:
    """The lock object's contents and ETag, None when there is none."""
    scheme, bucket, key = _split(uri)
    if scheme == "s3":
        c = _client()
        try:
            r = c.get_object(Bucket=bucket, Key=key)
        except c.exceptions.NoSuchKey:
            return None
        return json.loads(r["Body"].read() or b"{}"), r["ETag"]
    from .objfs import filesystem

    fs, root = filesystem(uri)
    try:
        with fs.open_input_stream(f"{root}/{LOCK_NAME}") as f:
            return json.loads(f.read() or b"{}"), ""
    except (FileNotFoundError, OSError):
        return None


def holder(uri: str) -> str | None:
    """Who holds the lock of the experiment at ``uri`` (None when no live driver does)."""
    got = read(uri)
    return None if got is None or _stale(got[0]) else _describe(got[0])


def _put(uri: str, condition: dict) -> str | None:
    scheme, bucket, key = _split(uri)
    if scheme == "s3":
        return _client().put_object(Bucket=bucket, Key=key, Body=_body(), **condition)["ETag"]
    from .objfs import filesystem

    fs, root = filesystem(uri)
    with fs.open_output_stream(f"{root}/{LOCK_NAME}") as f:
        f.write(_body())
    return None


def _conflict(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def acquire(uri: str) -> Held:
    """Create the lock object, or take over a stale one; a live one is a ``LockError`` naming its holder."""
    from .console import command

    for _ in range(3):
        got = read(uri)
        if got is not None:
            info, etag = got
            if not _stale(info):
                raise LockError(f"another oodsweep driver is running the experiment {uri} ({_describe(info)}); "
                                f"wait for it, or stop it first (`{command('oodsweep', 'status', uri)}` shows its "
                                f"progress); a lock left by a killed driver expires after $OODSWEEP_LOCK_TTL_S "
                                f"({ttl():g} s)")
            condition = {"IfMatch": etag} if etag else {}
        else:
            condition = {"IfNoneMatch": "*"} if uri.startswith("s3://") else {}
        try:
            held = Held(uri, _put(uri, condition))
        except Exception as e:  # noqa: BLE001  (botocore's ClientError: another driver won the race)
            if _conflict(e):
                continue
            raise
        held.thread = threading.Thread(target=_beat, args=(held,), name="oodsweep-lock", daemon=True)
        held.thread.start()
        return held
    raise LockError(f"the driver lock of {uri} changes hands continuously; another driver is starting on it")


def _beat(held: Held) -> None:
    while not held.stop.wait(min(BEAT_S, ttl() / 4)):
        try:
            held.etag = _put(held.uri, {"IfMatch": held.etag} if held.etag else {})
        except Exception:  # noqa: BLE001  (taken over after a long stall, or the store not answering: retried)
            pass


def release(held: Held) -> None:
    held.stop.set()
    if held.thread is not None:
        held.thread.join()
    scheme, bucket, key = _split(held.uri)
    if scheme == "s3":
        _client().delete_object(Bucket=bucket, Key=key)
    else:
        from .objfs import filesystem

        fs, root = filesystem(held.uri)
        fs.delete_file(f"{root}/{LOCK_NAME}")
