"""Ctrl-C (SIGINT) and SIGTERM stop a sweep, at any stage, without restarting anything.

The driver installs its own handlers for both signals (``handling``) while it runs a sweep:

* outside a Tune experiment (data preparation, the SAM embedding pre-stage, the analysis) the first signal
  raises ``Interrupted`` in the driver's main thread at once;
* inside ``Tuner.fit()`` the signal is handed to Ray Tune's own interrupt (Tune's SIGUSR1 handler, the one
  its SIGINT handler also uses): Tune stops the running trials, keeps their last checkpoints and saves its
  experiment state with those trials still unfinished, so that a resume continues them from their
  checkpoints. ``TUNE_DISABLE_SIGINT_HANDLER=1`` keeps Tune from taking SIGINT itself: Tune would
  swallow it and return from ``fit()`` as if the stage had ended, and the driver would restart the trials.
  After ``fit()`` returns, ``raise_if_interrupted`` turns the signal into ``Interrupted``;
* a second signal exits at once (``os._exit``), after killing the processes this driver started (its local
  Ray) and releasing the driver lock.

``Interrupted`` is a ``KeyboardInterrupt`` (so Ray passes it through ``ray.get``); the driver turns it into
exit status 128 + the signal: 130 for SIGINT, 143 for SIGTERM. ``stop_own_processes`` ends what is left of the local Ray
after ``ray.shutdown()``: every process below the driver's own (read from /proc, Linux).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

from .console import log

__all__ = ["Interrupted", "after_interrupt", "descendants", "handling", "raise_if_interrupted", "signal_name",
           "signal_of", "stop_own_processes", "tune_fit", "record_ray_session", "reap_previous_ray",
           "forget_ray_session", "reinstall"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The driver was asked to stop by a signal (its exit status: ``128 + signum``).

    A ``KeyboardInterrupt``: Ray turns one raised by a signal handler during ``ray.get`` into its own
    ``KeyboardInterrupt`` (any other exception, a ``SystemExit`` too, it reports as a failure of the
    driver), and no ``except Exception`` on the way up catches it."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum
        self.code = 128 + signum


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


class _State:
    def __init__(self):
        self.signum: int | None = None
        self.lock_fd: int | None = None
        self.installed = False


_state = _State()


def _tune_noop(signum, frame) -> None:
    """SIGUSR1 between Tune experiments: Tune installs its own at each ``fit()``; this one keeps the default
    action (terminate the process) away while none runs."""


def _tune_handler_installed() -> bool:
    h = signal.getsignal(signal.SIGUSR1)
    return callable(h) and h is not _tune_noop


def _handler(signum, frame) -> None:
    if _state.signum is not None:  # the second signal: no more waiting
        log(f"{signal_name(signum)} again: exiting at once")
        _hard_exit(128 + _state.signum)
    _state.signum = signum
    log(f"{signal_name(signum)}: stopping the sweep (running trials stop, their last checkpoints are kept); "
        f"{'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again exits at once")
    if _tune_handler_installed():
        signal.raise_signal(signal.SIGUSR1)  # Tune's interrupt: stop the trials, save the state, return from fit()
        return
    raise Interrupted(signum)


def _hard_exit(code: int) -> None:
    stop_own_processes(grace_s=0.0)
    if _state.lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(_state.lock_fd)
    os._exit(code)


class _HideTuneRestoreHint(logging.Filter):
    """After an interrupt Tune suggests ``Tuner.restore(...)`` and lists the stopped trials as not complete;
    with oodsweep it is ``oodsweep resume``, which the driver's last line says."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state.signum is None:
            return True
        msg = record.getMessage()
        return not any(s in msg for s in ("Tuner.restore", "Stop signal received", "Trials did not complete"))


@contextlib.contextmanager
def handling(lock_fd: int | None = None):
    """Install the driver's SIGINT/SIGTERM handlers for the ``with`` block (main thread only; elsewhere a
    no-op). ``lock_fd``: the driver lock, closed by a second signal's immediate exit."""
    if threading.current_thread() is not threading.main_thread() or _state.installed:
        yield
        return
    old = {s: signal.getsignal(s) for s in (*SIGNALS, signal.SIGUSR1)}
    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune stops a trial gracefully: it may finish its epoch first (600 s by default); then it is killed
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "5")
    flt = _HideTuneRestoreHint()
    logging.getLogger("ray.tune").addFilter(flt)
    logging.getLogger("ray.tune.tune").addFilter(flt)
    _state.signum, _state.lock_fd, _state.installed = None, lock_fd, True
    try:
        for s in SIGNALS:
            signal.signal(s, _handler)
        signal.signal(signal.SIGUSR1, _tune_noop)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env
        logging.getLogger("ray.tune").removeFilter(flt)
        logging.getLogger("ray.tune.tune").removeFilter(flt)
        _state.installed, _state.lock_fd = False, None


def reinstall() -> None:
    """Take SIGTERM (and SIGINT) back after ``ray.init``: Ray's core worker installs a failure handler for
    SIGTERM in the driver that prints a stack and aborts the process (exit -6), replacing ours."""
    if _state.installed and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


def interrupted() -> int | None:
    """The signal that asked the driver to stop (None: none did)."""
    return _state.signum


def signal_of(e: KeyboardInterrupt) -> int:
    """The signal behind a ``KeyboardInterrupt`` (ours, or the one Ray raises in its place): SIGINT by default."""
    return getattr(e, "signum", None) or _state.signum or signal.SIGINT


def raise_if_interrupted() -> None:
    if _state.signum is not None:
        raise Interrupted(_state.signum)


def tune_fit(tuner):
    """``tuner.fit()``, stopped by the driver's signals through Tune's own interrupt; raises ``Interrupted``
    after Tune has stopped the trials and saved its state."""
    raise_if_interrupted()
    if _state.installed:
        signal.signal(signal.SIGUSR1, _tune_noop)  # no stale handler of an earlier fit() counts as Tune's
    try:
        results = tuner.fit()
    finally:
        if _state.installed:
            signal.signal(signal.SIGUSR1, _tune_noop)
    raise_if_interrupted()
    return results


def after_interrupt(experiment_dir: Path, signum: int) -> None:
    """Shut down what the driver started (its local Ray: no raylet, agent or worker stays; a cluster given by
    address is only disconnected from) and say how to continue. A second signal meanwhile exits at once."""
    import shlex
    import sys

    t = time.time()
    before = descendants()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    left = stop_own_processes(pids=before)
    forget_ray_session(experiment_dir)
    log(f"stopped by {signal_name(signum)} (Ray shut down in {time.time() - t:.1f}s"
        + (f", {left} leftover process(es) ended" if left else "") + "); the finished members and the running "
        f"trials' last checkpoints are kept. Continue with:\n    oodsweep resume {shlex.quote(str(experiment_dir))}")


#: in the experiment folder while a driver's local Ray runs: its session folder, to find what a driver
#: killed with SIGKILL left behind (Ray's agents can outlive their raylet)
RAY_SESSION_FILE = ".driver-ray-session"


def _session_dir_of_own_ray() -> str | None:
    for pid in descendants():
        for arg in _cmdline(pid).split("\0"):
            if arg.startswith("--session-dir="):
                return arg.split("=", 1)[1]
    return None


def record_ray_session(experiment_dir: Path) -> None:
    """Note the session folder of the local Ray this driver started (none: a cluster given by address)."""
    session = _session_dir_of_own_ray()
    if session:
        with contextlib.suppress(OSError):
            (Path(experiment_dir) / RAY_SESSION_FILE).write_text(session)


def reap_previous_ray(experiment_dir: Path) -> int:
    """End the processes of the local Ray an earlier driver of this experiment started and left running
    (killed with SIGKILL, it could not shut it down). Called with the driver lock held, so that driver is
    gone; only processes naming that session's own folder are ended. Returns how many."""
    marker = Path(experiment_dir) / RAY_SESSION_FILE
    try:
        session = marker.read_text().strip()
    except OSError:
        return 0
    pids = []
    if session and "/session_" in session:
        for cmd in Path("/proc").glob("[0-9]*/cmdline"):
            pid = int(cmd.parent.name)
            if pid != os.getpid() and session in _cmdline(pid) and _alive(pid):
                pids.append(pid)
    if pids:
        stop_own_processes(pids=pids, own=False)
        log(f"ended {len(pids)} process(es) of the Ray an earlier driver of this experiment left running "
            f"({session})")
    marker.unlink(missing_ok=True)
    return len(pids)


def forget_ray_session(experiment_dir: Path) -> None:
    (Path(experiment_dir) / RAY_SESSION_FILE).unlink(missing_ok=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int | None = None) -> list[int]:
    """Every process below ``pid`` (default: this one), read from /proc; [] where there is no /proc."""
    pid = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_own_processes(grace_s: float = 3.0, pids: list[int] | None = None, own: bool = True) -> int:
    """Terminate every process this driver started that is still alive (what ``ray.shutdown()`` left of
    the local Ray: agents, workers): its descendants now (``own``) and ``pids`` (its descendants before the
    shutdown, some of them since orphaned), SIGTERM first and SIGKILL after ``grace_s``; return how many."""
    pids = [p for p in dict.fromkeys([*(pids or []), *(descendants() if own else [])]) if _alive(p)]
    sig = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, sig)
    deadline = time.time() + grace_s
    while grace_s > 0 and time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        if _alive(p):
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
    return len(pids)
