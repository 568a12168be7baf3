"""Shared fixtures: tiny synthetic sites and their slice cache, written once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
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
