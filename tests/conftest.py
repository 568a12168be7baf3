"""Shared fixtures: tiny synthetic sites and their slice cache, written once per test session."""
from __future__ import annotations

import os
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
