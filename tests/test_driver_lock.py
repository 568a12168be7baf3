"""A running driver is respected: `oodsweep analyze` (also with --allow-incomplete) and `oodsweep report` on
an experiment whose driver holds the lock refuse and name the pid and host that hold it; with --out they
write elsewhere and log nothing to MLflow. The lock is held by a real second process, taken the way the
driver takes it (``sweeps.lock.driver_lock``)."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from sweeps.cli import main

from helpers import copy_experiment

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from pathlib import Path; from sweeps.lock import driver_lock; "
        "fd = driver_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)")


def hold_lock(exp: Path) -> subprocess.Popen:
    """A process holding ``exp``'s driver lock (as a running driver does) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(exp)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def frozen_experiment(folder: Path) -> Path:
    """An experiment folder with only its frozen spec (synthetic sites: nothing else needs to exist)."""
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump({
        "name": folder.name, "storage": str(folder.parent),
        "data": {"layout": "prostate_multisite", "root": str(folder.parent / "data"), "source": "SiteA",
                 "targets": ["SiteB"], "image_size": 32, "synthetic": {"cases_per_site": 4, "shape": [40, 40, 8]}},
        "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [1]}}}))
    return folder


def test_analyze_and_report_refuse_while_a_driver_holds_the_experiment(tmp_path, capsys):
    exp = frozen_experiment(tmp_path / "my runs" / "demo")
    holder = hold_lock(exp)
    try:
        for cmd in (["analyze", str(exp), "--allow-incomplete"], ["analyze", str(exp)], ["report", str(exp)]):
            assert main(cmd) == 1, cmd
            err = capsys.readouterr().err
            assert err.startswith(f"oodsweep: experiment in use: {exp}: a driver is running this experiment "
                                  f"(pid {holder.pid} on {os.uname().nodename} since "), err
            assert f"`oodsweep {cmd[0]} '{exp}' --out DIR`" in err and f"`oodsweep status '{exp}'`" in err
        assert main(["analyze", str(exp), "--out", str(exp / "analysis")]) == 1  # --out: not the driver's folder
        assert "a driver is running this experiment" in capsys.readouterr().err
        assert sorted(p.name for p in exp.iterdir()) == [".driver.lock", "spec.yaml"]  # no analysis/, no mlflow.db
    finally:
        holder.kill()
        holder.wait()
    main(["analyze", str(exp), "--allow-incomplete", "--no-mlflow"])  # the holder is gone: no longer refused
    assert "a driver is running" not in capsys.readouterr().err


def _runs(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs").fetchone()[0]


def test_analyze_out_beside_a_running_driver_writes_elsewhere_and_logs_nothing(finished, tmp_path, capsys):
    exp, _ = copy_experiment(finished["exp"], tmp_path / "exp")
    before = _runs(exp / "mlflow.db")
    analysis = sorted(p.name for p in (exp / "analysis").rglob("*"))
    holder = hold_lock(exp)
    try:
        out = tmp_path / "elsewhere"
        assert main(["analyze", str(exp), "--allow-incomplete", "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert f"a driver is running {exp} (pid {holder.pid}" in err and "nothing is logged to MLflow" in err
        assert (out / "tables.md").is_file() and (out / "claims.md").is_file()
        assert _runs(exp / "mlflow.db") == before  # no MLflow run beside the driver's (SQLite: one writer)
        assert sorted(p.name for p in (exp / "analysis").rglob("*")) == analysis
    finally:
        holder.kill()
        holder.wait()
