"""The cache's case split: synthetic sites share the source's (targets tested on unseen anatomies), real sites
split on their own."""
from __future__ import annotations

import shutil

from trainables.data.cache import build_slice_cache, open_slice_cache
from trainables.data.splits import assign_splits, split_cases
from trainables.member import train_val_rows

SITES = ["SiteA", "SiteB", "SiteD"]
TINY = ["SiteA", "SiteB", "SiteC"]  # the session fixtures' sites
IDS = [f"Case{i:02d}" for i in range(10)]


def test_assign_splits_paired_follows_the_source():
    cases = {s: IDS for s in SITES}
    split_of, source_of = assign_splits(cases, {}, "dataset", 0, 0.2, paired="SiteA")
    src = split_cases(IDS, "SiteA", 0, 0.2)  # the source's split is the one it always had
    for s in SITES:
        assert {c: split_of[(s, c)] for c in IDS} == src
    assert source_of["SiteB"] == "SiteA's case split (the same synthetic anatomies)"
    # a case the source lacks (skipped there) is not a target test case
    split_of, _ = assign_splits({"SiteA": IDS[1:], "SiteB": IDS}, {}, "dataset", 0, 0.2, paired="SiteA")
    assert split_of[("SiteB", "Case00")] == "train"


def test_assign_splits_unpaired_is_per_site():
    split_of, source_of = assign_splits({s: IDS for s in SITES}, {}, "dataset", 0, 0.2)
    for s in SITES:
        assert {c: split_of[(s, c)] for c in IDS} == split_cases(IDS, s, 0, 0.2)
        assert source_of[s].startswith("random 80%/20%")
    # with these ids the per-site splits differ: the old behaviour tested targets on trained anatomies
    assert split_cases(IDS, "SiteA") != split_cases(IDS, "SiteB")


def _ids(cache, site, rows=None, split=None):
    rows = cache.rows(site, split) if rows is None else rows
    return set(cache.index["case_id"].to_numpy()[rows].astype(str))


def test_synthetic_targets_are_tested_on_the_sources_test_anatomies(tiny_cache):
    # the session's tiny synthetic cache (tests/conftest.py: SiteA-C, 4 cases each, test_fraction 0.25); on its
    # own, SiteB's split would test Case02, a case SiteA trains on
    cache = open_slice_cache(tiny_cache)
    ids = sorted(_ids(cache, "SiteA", split="all"))
    train, val = train_val_rows(cache, "SiteA", 0.1, 0)
    src_train, src_val, src_test = _ids(cache, "SiteA", train), _ids(cache, "SiteA", val), _ids(cache, "SiteA",
                                                                                                 split="test")
    assert (len(src_train), len(src_val), len(src_test)) == (2, 1, 1)
    assert {c for c, s in split_cases(ids, "SiteA", 0, 0.25).items() if s == "test"} == src_test  # as before
    for t in TINY[1:]:
        test = _ids(cache, t, split="test")
        assert test == src_test
        assert not test & (src_train | src_val)
        assert cache.manifest["split_source"][t] == "SiteA's case split (the same synthetic anatomies)"


def test_real_sites_keep_a_split_of_their_own(tiny_data, tmp_path):
    data = tmp_path / "real"
    shutil.copytree(tiny_data, data)
    (data / "synthetic.json").unlink()  # the same files, but nothing says the sites share their cases
    cache = open_slice_cache(build_slice_cache("prostate_multisite", data, TINY, 32, tmp_path / "c",
                                               test_fraction=0.25, progress=False))
    ids = sorted(_ids(cache, "SiteA", split="all"))
    for s in TINY:
        assert _ids(cache, s, split="test") == {c for c, v in split_cases(ids, s, 0, 0.25).items() if v == "test"}
    assert _ids(cache, "SiteB", split="test") != _ids(cache, "SiteA", split="test")
    assert "split_like" not in cache.manifest
