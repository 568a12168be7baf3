"""The experiment's driver lock: ``<experiment>/.driver.lock``, held (``flock``) by the running driver, which
writes its pid, host and start time into it. Standard library only, so that a check (``oodsweep analyze``,
``status``) or a test can take or read it without importing the spec machinery."""
from __future__ import annotations

import os
import time
from pathlib import Path

from .console import command
from .errors import LockError

DRIVER_LOCK = ".driver.lock"


def driver_lock(exp: Path):
    """Hold ``<exp>/.driver.lock`` while a driver runs this experiment (released even on SIGKILL).

    Two drivers on one experiment would run the same trials twice; the second is refused.
    """
    import fcntl

    path = exp / DRIVER_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise LockError(f"another oodsweep driver is running this experiment ({other or 'pid unknown'}); wait for "
                        f"it, or stop it first (`{command('oodsweep', 'status', exp)}` shows its progress)") from None
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {since}".encode(), 0)
    return fd


def driver_running(exp: Path) -> str | None:
    """Who holds the experiment's driver lock on this machine (None when no driver runs)."""
    import fcntl

    remote = exp / ".oodsweep-remote"  # a working copy of an experiment on object storage (sweeps.objstore)
    if remote.is_file():
        from .objlock import holder

        return holder(remote.read_text().strip())
    path = exp / DRIVER_LOCK
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "a driver"
    finally:
        os.close(fd)
    return None
