"""Helpers the test files share (plain functions; the fixtures are in conftest.py): NIfTI files, the tiny
configs of train_segmenter and fit_uncertainty, a copy of an experiment for a test that writes into it, waiting
on a sweep started as a subprocess, and an MLflow tracking server on loopback.

Imported as ``from helpers import ...`` (pytest puts ``tests/`` on the path, as for ``conftest``).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def write_nifti(path: Path, array: np.ndarray, spacing=(0.6, 0.6, 3.0), affine=None) -> Path:
    """``array`` as a NIfTI file at ``path`` (folders made), voxel size ``spacing`` (a diagonal affine) unless
    ``affine`` is given. nibabel sets the header's zooms from the affine (checked equal to set_zooms)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0]) if affine is None else affine), str(path))
    return path


def member_config(cache, exp, **kw) -> dict:
    """train_segmenter's config of the tiny run the tests share: unet_r18, lr 1e-3, seed 0, source SiteA,
    targets SiteB and SiteC, members at epochs 1 and 2, batch 4, one torch thread; ``kw`` overrides.
    (conftest's ``tiny_member`` is this run, trained once per session.)"""
    return {"arch": "unet_r18", "lr": 1e-3, "seed": 0, "cache": str(cache), "source": "SiteA",
            "targets": ["SiteB", "SiteC"], "experiment_dir": str(exp), "snapshots": [1, 2], "batch_size": 4,
            "num_threads": 1, **kw}


def medsam_config(cache, exp, embedding_dir, **kw) -> dict:
    """train_segmenter's config of the tiny medsam_tiny run (conftest's ``medsam_run``): members at epochs 1
    and 2, batch 8, the SAM embeddings under ``embedding_dir``; ``kw`` overrides."""
    return {"arch": "medsam_tiny", "lr": 1e-3, "seed": 0, "cache": str(cache), "source": "SiteA",
            "targets": ["SiteB", "SiteC"], "experiment_dir": str(exp), "snapshots": [1, 2], "batch_size": 8,
            "embedding_dir": str(embedding_dir), "num_threads": 1, **kw}


def delta_config(member: dict, cache, exp, **kw) -> dict:
    """fit_uncertainty's config for ``member`` (its ``member_id`` and ``checkpoint``) on the tiny cache: δ for
    one epoch, 2 test-time passes, batch 4, one torch thread, source SiteA, targets SiteB and SiteC."""
    return {"member_id": member["member_id"], "checkpoint": member["checkpoint"], "cache": str(cache),
            "source": "SiteA", "targets": ["SiteB", "SiteC"], "experiment_dir": str(exp), "epochs": 1,
            "passes": 2, "batch_size": 4, "num_threads": 1, **kw}


def copy_experiment(src: Path, dst: Path, members: list[dict] | None = None) -> tuple[Path, list[dict]]:
    """Copy experiment ``src`` to ``dst`` (which may exist), for a test that writes into an experiment a
    session fixture shares. ``members``: the member dicts to keep (default: all); the other members' files
    (named by their member id) and the merged tables are left out, so the parts are merged again.

    Returns ``dst`` and the kept members with their ``checkpoint`` pointing into ``dst``.
    """
    from trainables import records

    src, dst = Path(src), Path(dst)
    keep = None if members is None else {m["member_id"] for m in members}
    drop = set() if keep is None else set(records.member_part_ids(src)) - keep
    merged = set() if keep is None else {"members.parquet", "slices.parquet"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in merged or any(n == d or n.startswith(f"{d}.") for d in drop)}

    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
    moved = [{**m, "checkpoint": str(dst / Path(m["checkpoint"]).relative_to(src))} for m in members or []]
    return dst, moved


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300, poll: float = 0.1) -> None:
    """Wait until ``cond()`` holds, failing when ``proc`` (a sweep run as a subprocess) ends first or after
    ``timeout`` seconds; ``what`` names the awaited event in the failure."""
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before {what}")
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(poll)


def start_mlflow_server(port: int, args: list[str], log: Path, env: dict | None = None,
                        timeout: float = 120) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` with one worker and ``args`` (stores), in a session of its own
    (stop it with ``os.killpg``), returned once its ``/health`` answers; its output goes to ``log``."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", *args],
                            env=env, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
        assert proc.poll() is None, log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    raise AssertionError(f"mlflow server did not start: {log.read_text()[-3000:]}")
