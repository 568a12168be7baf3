"""trainables.records.compact: the uncertainty records read in batches into smaller types hold the same values."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from trainables import records
from trainables.records import load_uncertainty, load_uncertainty_compact, read_uncertainty_file


def _rows(member: str, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    k = np.arange(n)
    return pd.DataFrame({
        "member_id": member, "method": np.where(k % 2 == 0, "ggd", "bayescap"),
        "site": np.where(k % 3 == 0, "Source", "TargetB"), "role": np.where(k % 3 == 0, "id", "ood"),
        "case_id": [f"Case{i // 2}" for i in k], "slice_idx": k % 2,
        "uncertain_px": rng.integers(0, 4096, n), "error_px": rng.integers(0, 4096, n), "area_px": 4096,
        "mean_uncertainty": rng.random(n), "uncertain_error_px": pd.array([None if i == 1 else int(i) for i in k], "Int64"),
        "fixed_px": pd.array([7] * n, "Int64"), "map_ptp": rng.random(n)})


@pytest.fixture
def exp(tmp_path):
    for i, m in enumerate(["zeta", "alpha"]):
        records.write_uncertainty_part(tmp_path, m, _rows(m, 6, i))
    return tmp_path


def _as_loaded(df: pd.DataFrame, like: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: df[c].astype(str).astype(like[c].dtype) if like[c].dtype == "string"
                         else df[c].astype(like[c].dtype) for c in like.columns})


def test_compact_holds_the_same_values_in_smaller_types(exp):
    whole = load_uncertainty(exp)  # merges the parts into uncertainty.parquet
    # batches of 4 rows: "zeta" appears only in a later batch than "alpha"; "ggd" is seen before "bayescap"
    small = read_uncertainty_file(records.records_dir(exp) / "uncertainty.parquet", batch_rows=4)
    assert list(small.columns) == list(whole.columns)
    assert str(small["member_id"].dtype) == "category" and small["uncertain_px"].dtype == np.int32
    assert small["uncertain_error_px"].dtype == "Int32" and small["mean_uncertainty"].dtype == np.float64
    assert list(small["member_id"].cat.categories) == ["alpha", "zeta"]  # sorted
    assert list(small["method"].cat.categories) == ["bayescap", "ggd"]  # not the order first seen
    assert list(small["member_id"][5:7]) == ["alpha", "zeta"] and list(small["method"][:2]) == ["ggd", "bayescap"]
    assert pd.isna(small["uncertain_error_px"][1]) and small["uncertain_error_px"][2] == 2
    pd.testing.assert_frame_equal(_as_loaded(small, whole), whole)


def test_aggregates_equal_the_whole_tables(exp):
    whole = load_uncertainty(exp)
    small = read_uncertainty_file(records.records_dir(exp) / "uncertainty.parquet", batch_rows=5)
    for df in (whole, small):
        df["sq"] = ((df["uncertain_px"] - df["error_px"]) / df["area_px"]) ** 2
    a = whole.groupby(["method", "site"])["sq"].mean()
    b = small.groupby(["method", "site"])["sq"].mean()
    assert list(a.index) == list(b.index)  # the same groups in the same (sorted) order
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())


def test_compact_rebuilds_a_stale_merge_and_none_without_records(exp, tmp_path_factory):
    load_uncertainty(exp)
    merged = records.records_dir(exp) / "uncertainty.parquet"
    old = merged.stat().st_mtime_ns
    os.utime(merged, ns=(old - 10**10, old - 10**10))  # a part is newer than the merge
    records.write_uncertainty_part(exp, "beta", _rows("beta", 3, 9))
    small = load_uncertainty_compact(exp)
    assert sorted(small["member_id"].cat.categories) == ["alpha", "beta", "zeta"] and len(small) == 15
    assert load_uncertainty_compact(tmp_path_factory.mktemp("empty")) is None
