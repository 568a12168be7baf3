"""One driver per experiment: a second `oodsweep run`/`resume` on an experiment a driver holds is refused.

(A driver SIGKILLed during the pool stage, between the stages and during the uncertainty stage, and resumed
each time to the records of the uninterrupted run: tests/test_interrupts.py, which stops one sweep with
every signal in turn.)
"""
from __future__ import annotations

import os

import pytest
from conftest import run_cli

pytestmark = pytest.mark.integration


def test_second_driver_on_one_experiment_is_refused(finished, tmp_path):
    """While a driver holds an experiment, `oodsweep run`/`resume` on it refuse instead of racing it."""
    import fcntl

    fd = os.open(finished["exp"] / ".driver.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"pid 4242 on test-host", 0)
        proc = run_cli("resume", str(finished["exp"]))
        assert proc.returncode == 1 and "another oodsweep driver" in proc.stderr and "pid 4242" in proc.stderr
        st = run_cli("status", str(finished["exp"]))
        assert "driver    pid 4242 on test-host" in st.stdout
    finally:
        os.close(fd)
