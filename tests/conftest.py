"""Shared fixtures: tiny synthetic sites and their slice cache, written once per test session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
NEEDED_GIB = 2.0  # what one run of the suite writes (experiment dirs, Ray sessions), with room to spare


def pytest_report_header(config):
    """Free disk where the tests write: a full disk otherwise shows up as odd errors in torch.save."""
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    line = f"oodsweep: {free:.1f} GiB free in {tempfile.gettempdir()} (the suite writes about 1.5 GiB)"
    if free < NEEDED_GIB:
        line += f"  WARNING: under {NEEDED_GIB} GiB, tests may fail with I/O errors; free some disk"
    return line


#: Fixtures that run the tiny sweep on a local Ray: a test that uses one is an integration test.
RAY_FIXTURES = {"finished", "pristine"}


def pytest_collection_modifyitems(config, items):
    """The tiers' rule (docs/development.md, "Tests"): a test that starts Ray is marked ``integration``; one that asks for
    a Ray-run fixture gets the mark here even where its module forgot it, and ``rayup`` implies it."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("rayup"):
            item.add_marker(pytest.mark.integration)


SITES = ["SiteA", "SiteB", "SiteC"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from trainables.data.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_sites(root, sites=SITES, cases_per_site=4, shape=(40, 40, 8), seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_cache(tiny_data, tmp_path_factory) -> Path:
    from trainables.data.cache import build_slice_cache

    return build_slice_cache("prostate_multisite", tiny_data, SITES, 32, tmp_path_factory.mktemp("cache"),
                             test_fraction=0.25, progress=False)


@pytest.fixture(scope="session")
def tiny_member(tiny_cache, tmp_path_factory) -> dict:
    """The tiny unet_r18 run (``helpers.member_config``: members at epochs 1 and 2), trained once per session
    for every test that needs a trained member, with its records merged as the driver does.

    ``{"config", "exp", "members", "reports"}``: ``reports`` are the reporter's ``(metrics, state folder)``
    per epoch, the folders copied out of the experiment (the resumable state at epochs 1 and 2). Shared:
    read it, never write into it; a test that writes copies it first (``helpers.copy_experiment``).
    """
    from helpers import member_config
    from trainables import records
    from trainables.segment import train_segmenter

    tmp = tmp_path_factory.mktemp("tiny_member")
    cfg = member_config(tiny_cache, tmp / "exp")
    reports = []

    def keep(metrics, ckpt):  # like the Ray reporter: the folder is consumed, then removed
        kept = None if ckpt is None else str(shutil.copytree(ckpt, tmp / f"state-ep{metrics['epoch']}"))
        if ckpt is not None:
            shutil.rmtree(ckpt)
        reports.append((metrics, kept))

    members = train_segmenter(cfg, report=keep)
    records.merge_parts(cfg["experiment_dir"])
    return {"config": cfg, "exp": Path(cfg["experiment_dir"]), "members": members, "reports": reports}


@pytest.fixture(scope="session")
def medsam_run(tiny_cache, tmp_path_factory):
    """One medsam_tiny run (``helpers.medsam_config``: 2 epochs, a member at each) through train_segmenter,
    once per session: ``(exp, members, reports)``; the reports' state folders are kept where the run put them."""
    from helpers import medsam_config
    from trainables.segment import train_segmenter

    tmp = tmp_path_factory.mktemp("medsam_run")
    cfg = medsam_config(tiny_cache, tmp / "exp", tmp / "emb")
    reports = []
    with pytest.warns(UserWarning, match="RANDOMLY"):
        members = train_segmenter(cfg, report=lambda m, d: reports.append((m, d)))
    return Path(cfg["experiment_dir"]), members, reports


OODSWEEP = [sys.executable, "-m", "sweeps.cli"]


def run_cli(*args, env=None, cwd=None, timeout=600):
    return subprocess.run(OODSWEEP + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def tiny_spec(storage: Path, data: Path) -> dict:
    """The tiny end-to-end sweep: 2 architectures x 1 lr, members at epochs 1 and 2, δ for 1 epoch."""
    return {"name": "tiny", "storage": str(storage),
            "data": {"layout": "prostate_multisite", "root": str(data), "source": "SiteA",
                     "targets": ["SiteB", "SiteC"], "image_size": 32, "test_fraction": 0.25},
            "pool": {"arch": {"grid": ["unet_r18", "unet_effb0"]}, "lr": {"grid": [1e-3]},
                     "epochs": {"snapshots": [1, 2]}, "seed": {"grid": [0]}, "batch_size": 4,
                     "resources": {"cpu": 1}},
            "uncertainty": {"epochs": 1, "lr": 1e-3, "passes": 2, "batch_size": 4, "resources": {"cpu": 0.5},
                            "bayescap": {"width": 8, "blocks": 1}},
            "analysis": {"metric": "iou_3d"}}


@pytest.fixture(scope="session")
def finished(tmp_path_factory, tiny_data):
    """The tiny sweep run once, uninterrupted, through the CLI on a local Ray with 2 CPUs."""
    import yaml

    tmp = tmp_path_factory.mktemp("e2e")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp / "runs", tiny_data)))
    # about 80 s on an idle 2-core machine; the limit only guards against a hang (a loaded shared machine
    # took ~580 s, near run_cli's default 600)
    proc = run_cli("run", str(path), "--num-cpus", "2", cwd=tmp, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"spec": path, "exp": tmp / "runs" / "tiny", "out": proc.stdout + proc.stderr, "tmp": tmp}
