"""A driver killed with SIGKILL cannot shut its local Ray down; the next driver of the experiment ends
what is left (``sweeps.interrupts.reap_previous_ray``). No Ray here: stand-in processes name a session."""
from __future__ import annotations


def test_leftover_ray_of_a_killed_driver_is_ended(tmp_path):
    """What a SIGKILLed driver's local Ray left running (processes naming its session folder) is ended by the
    next driver of the experiment; other processes are not touched."""
    import subprocess
    import sys
    import uuid

    from sweeps.interrupts import RAY_SESSION_FILE, reap_previous_ray

    session = f"/tmp/ray/session_test_{uuid.uuid4().hex}"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    leftover = subprocess.Popen([*sleeper, f"--session-dir={session}"])
    other = subprocess.Popen([*sleeper, "--session-dir=/tmp/ray/session_someone_else"])
    try:
        (tmp_path / RAY_SESSION_FILE).write_text(session)
        assert reap_previous_ray(tmp_path) == 1
        assert leftover.wait(timeout=10) is not None and other.poll() is None
        assert not (tmp_path / RAY_SESSION_FILE).exists()
        assert reap_previous_ray(tmp_path) == 0  # nothing noted: nothing to do
    finally:
        for p in (leftover, other):
            p.kill()
            p.wait()
