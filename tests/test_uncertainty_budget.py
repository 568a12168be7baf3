"""The δ-budget sensitivity (``uncertainty.sensitivity``): its spec key, its subset rule, its records and C4's
sensitivity rows on hand-built records; one tiny run of the stage on the shared finished sweep."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.budget_claims import KIND, budget_rows, with_budget_rows
from analysis.claim_rule import CLAIM_COLUMNS, NOT_TESTABLE, REFUTED, REPRODUCED
from analysis.claims import claims_markdown, claims_table, verdict_rows
from analysis.indicators import indicator_table
from sweeps.spec import SpecError, parse_spec
from sweeps.uncertainty_budget import budget_members
from trainables import records

TARGETS = ("B", "C")


def _spec(tmp_path, sensitivity, epochs=3) -> dict:
    return {"name": "b", "storage": str(tmp_path), "data": {"layout": "prostate_multisite", "root": str(tmp_path),
                                                            "source": "SiteA", "targets": ["SiteB"]},
            "pool": {"arch": "unet_r18", "lr": 1e-3, "epochs": 2},
            "uncertainty": {"epochs": epochs, **({} if sensitivity is None else {"sensitivity": sensitivity})}}


# --- the spec key ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, epochs, members", [
    ({}, 9, "per_run"),                               # the default: 3x the default δ's epochs, one member per run
    ({"epochs_factor": 4, "members": "all"}, 12, "all"),
    ({"epochs": 10, "members": 2}, 10, 2),
    ({"members": "per_config"}, 9, "per_config"),
])
def test_sensitivity_key(value, epochs, members, tmp_path):
    s = parse_spec(_spec(tmp_path, value)).uncertainty.sensitivity
    assert (s.epochs, s.members) == (epochs, members)
    assert parse_spec(_spec(tmp_path, None)).uncertainty.sensitivity is None


@pytest.mark.parametrize("value, expect", [
    ({"epochs": 3}, ["uncertainty.sensitivity.epochs", "3 is not longer than uncertainty.epochs (3)", "9"]),
    ({"epochs": 9, "epochs_factor": 3}, ["uncertainty.sensitivity", "gives both", "give one"]),
    ({"epochs_factor": 1}, ["uncertainty.sensitivity.epochs_factor", "must be >= 2"]),
    ({"epochs_factor": 2.5}, ["uncertainty.sensitivity.epochs_factor", "expected an integer"]),
    ({"members": "first"}, ["uncertainty.sensitivity.members", "'first'", "per_run, per_config, all"]),
    ({"members": 0}, ["uncertainty.sensitivity.members", "a number of members >= 1, got 0"]),
    ({"members": [1, 2]}, ["uncertainty.sensitivity.members", "expected 'per_run', 'per_config', 'all' or a number"]),
    ({"epoch": 9}, ["uncertainty.sensitivity.epoch", "unknown key", "epochs"]),
    ([9], ["uncertainty.sensitivity", "expected a mapping"]),
])
def test_sensitivity_key_errors_name_the_key(value, expect, tmp_path):
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(tmp_path, value))
    for part in expect:
        assert part in str(e.value), (part, str(e.value))


# --- the subset rule ------------------------------------------------------------------------------

def test_budget_members_rule():
    members = pd.DataFrame({"member_id": ["a-ep1", "a-ep2", "b-ep2", "b-ep1", "c", "d-ep1", "d-ep2"],
                            "run_id": ["a", "a", "b", "b", None, "d", "d"],
                            "epochs": [1, 2, 2, 1, 5, 3, 3]})
    every = members["member_id"].tolist()
    # one per run: its last snapshot (b's is listed first; d's tie goes to the first); records' order kept
    assert budget_members(members, every, "per_run") == ["a-ep2", "b-ep2", "c", "d-ep1"]
    assert budget_members(members, every, 2) == ["a-ep2", "b-ep2"]
    assert budget_members(members, every, 10) == ["a-ep2", "b-ep2", "c", "d-ep1"]
    assert budget_members(members, every, "all") == every
    # only among the members δ is fitted on
    assert budget_members(members, ["a-ep1", "c", "b-ep1"], "per_run") == ["a-ep1", "b-ep1", "c"]
    assert budget_members(members, ["a-ep1", "c"], "all") == ["a-ep1", "c"]
    # never an oracle-prompted member (C4 reads the label-free ones)
    prompted = members.assign(oracle_prompt=[False, False, True, True, False, False, False])
    assert budget_members(prompted, every, "per_run") == ["a-ep2", "c", "d-ep1"]
    assert budget_members(prompted, every, "all") == ["a-ep1", "a-ep2", "c", "d-ep1", "d-ep2"]


def test_budget_members_one_run_per_configuration():
    # two configurations x seeds; the lowest seed's run of each, its last snapshot, in the records' order
    members = pd.DataFrame({
        "member_id": ["u-1e3-s1-ep2", "u-1e3-s1-ep4", "u-1e3-s0-ep2", "u-1e3-s0-ep4", "u-5e4-s2-ep4",
                      "u-5e4-s1-ep4", "t-1e3-s0-ep4"],
        "run_id": ["u-1e3-s1", "u-1e3-s1", "u-1e3-s0", "u-1e3-s0", "u-5e4-s2", "u-5e4-s1", "t-1e3-s0"],
        "arch": ["unet", "unet", "unet", "unet", "unet", "unet", "transunet"],
        "lr": [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 1e-3],
        "seed": [1, 1, 0, 0, 2, 1, 0],
        "epochs": [2, 4, 2, 4, 4, 4, 4]})
    every = members["member_id"].tolist()
    assert budget_members(members, every, "per_config") == ["u-1e3-s0-ep4", "u-5e4-s1-ep4", "t-1e3-s0-ep4"]
    # per_run keeps all five runs of the same pool
    assert len(budget_members(members, every, "per_run")) == 5
    # without the configuration's columns every run is a configuration of its own (as per_run)
    bare = members[["member_id", "run_id", "epochs"]]
    assert budget_members(bare, every, "per_config") == budget_members(bare, every, "per_run")
    # oracle-prompted runs are left out before configurations are formed
    prompted = members.assign(oracle_prompt=[False] * 6 + [True])
    assert budget_members(prompted, every, "per_config") == ["u-1e3-s0-ep4", "u-5e4-s1-ep4"]


def test_budget_space_leaves_the_default_space_as_it_was(tmp_path, monkeypatch):
    from sweeps import cluster
    from sweeps.uncertainty import param_space
    from sweeps.uncertainty_budget import budget_space
    from trainables.uncertainty.config import DeltaConfig

    monkeypatch.setattr(cluster, "capacity", lambda: {"CPU": 2.0, "GPU": 0.0})
    raw = _spec(tmp_path, None)
    raw["uncertainty"]["lam"] = {"grid": [1.0, 10.0]}
    plain = param_space(parse_spec(raw), tmp_path / "c", ["a"], {"a": "a.pt"}, {"a"})
    raw["uncertainty"]["sensitivity"] = {"epochs": 7}
    spec = parse_spec(raw)
    assert param_space(spec, tmp_path / "c", ["a"], {"a": "a.pt"}, {"a"}) == plain  # the key changes no δ trial
    assert "records_folder" not in plain
    longer = budget_space(spec, tmp_path / "c", ["a"], {"a": "a.pt"}, frozenset())
    point = longer["group"]["grid_search"][0]["members"][0]
    cfg = DeltaConfig.from_dict({**{k: v for k, v in longer.items() if k not in ("group", "_train")}, **point})
    assert (cfg.epochs, cfg.baselines, cfg.lams, cfg.records_folder) == (7, (), {"ggd": 1.0}, "uncertainty_budget")
    assert longer["_train"]["storage"] == str(spec.experiment_dir / "uncertainty_budget" / "train")
    assert plain["_train"]["storage"] == str(spec.experiment_dir / "uncertainty" / "train")


# --- the records ----------------------------------------------------------------------------------

def _unc_rows(member: str, areas: dict[str, float], n_px: int = 100) -> pd.DataFrame:
    return pd.DataFrame([{"member_id": member, "method": "ggd", "site": site, "role": "ood", "case_id": "c0",
                          "slice_idx": 0, "area_px": n_px, "uncertain_px": int(round(a * n_px)),
                          "error_px": 0, "uncertain_error_px": 0, "fixed_px": 0, "mean_uncertainty": a, "map_ptp": 1.0}
                         for site, a in areas.items()])


def test_budget_records_are_apart_from_the_default(tmp_path):
    from trainables.uncertainty.group import recorded_members

    records.write_uncertainty_part(tmp_path, "m1", _unc_rows("m1", {"B": 0.2}))
    records.write_uncertainty_part(tmp_path, "m2", _unc_rows("m2", {"B": 0.4}), records.BUDGET_DELTA_RECORDS)
    records.write_uncertainty_fit(tmp_path, "m2", {"epochs": 9}, records.BUDGET_DELTA_RECORDS)
    assert recorded_members(tmp_path) == {"m1"}
    assert recorded_members(tmp_path, records.BUDGET_DELTA_RECORDS) == {"m2"}
    assert records.load_uncertainty(tmp_path)["member_id"].tolist() == ["m1"]
    assert records.load_uncertainty_budget(tmp_path)["member_id"].tolist() == ["m2"]
    assert (tmp_path / "records" / "uncertainty_budget.parquet").is_file()
    assert records.load_uncertainty_budget_fits(tmp_path)["epochs"].tolist() == [9]
    assert records.load_uncertainty_fits(tmp_path).empty


# --- C4's sensitivity rows --------------------------------------------------------------------------

def _table(n_runs: int, rng) -> tuple[pd.DataFrame, np.ndarray]:
    """A label-free indicator table of ``n_runs`` runs x 2 snapshots whose default δ's area is unrelated to OOD."""
    rows = []
    ood = rng.uniform(0.2, 0.9, (n_runs, 2))
    for k in range(n_runs):
        for ep in (1, 2):
            for t, o in zip(TARGETS, ood[k]):
                rows.append({"member_id": f"r{k}-ep{ep}", "arch": "unet_r18", "lr": 1e-3, "epochs": ep, "seed": k,
                             "source": "A", "target": t, "metric": "iou_3d", "id_score": 0.8, "ood_score": o,
                             "run_id": f"r{k}", "oracle_prompt": False, "val_score": 0.8})
    tb = indicator_table(pd.DataFrame(rows))
    tb["uncertain_area"] = rng.uniform(0.1, 0.3, len(tb))
    return tb, ood


def test_budget_rows_read_c4_at_both_budgets_on_the_same_members():
    rng = np.random.default_rng(5)
    tb, ood = _table(24, rng)
    # the longer δ, fitted on the last snapshot of each run: its area falls with the OOD score
    unc = pd.concat([_unc_rows(f"r{k}-ep2", {t: 0.5 - 0.5 * ood[k, j] for j, t in enumerate(TARGETS)})
                     for k in range(24)], ignore_index=True)
    rows = budget_rows(tb, unc, "3", "9", n_resamples=199)
    assert [r["scope"] for r in rows] == ["δ budget 3 epochs (subset of 24)", "δ budget 9 epochs (subset of 24)"]
    assert all(r["claim"] == "C4" and r["kind"] == KIND and r["n_members"] == 24 for r in rows)
    default, longer = rows
    assert default["verdict"] == REFUTED and abs(default["value"]) < 0.5
    assert longer["verdict"] == REPRODUCED and longer["value"] < -0.95
    # the default row is indicator_rows' C4 on the subset's own table, nothing else
    from analysis.claim_stats import indicator_rows

    sub = tb[tb["member_id"].str.endswith("-ep2")]
    again = indicator_rows(sub, "uncertain_area", "C4", "claim", "strong_negative", 199, per_target=False)[0]
    assert (again["value"], again["ci_low"], again["ci_high"]) == (default["value"], default["ci_low"],
                                                                   default["ci_high"])
    # in the report: after the verdict rows, never one of them, and in their own claims.md section
    claims = with_budget_rows(claims_table(tb, tb, n_resamples=99), rows)
    assert list(claims.columns) == CLAIM_COLUMNS and claims["kind"].iloc[-2:].tolist() == [KIND, KIND]
    assert KIND not in set(verdict_rows(claims)["kind"])
    assert claims.groupby("claim")["verdict"].first()["C4"] == claims.loc[
        (claims["claim"] == "C4") & (claims["scope"] == "overall"), "verdict"].iloc[0]
    md = claims_markdown(claims)
    assert "## δ's training budget" in md and "δ budget 9 epochs (subset of 24)" in md
    assert "## δ's training budget" not in claims_markdown(claims_table(tb, tb, n_resamples=0))


def test_budget_rows_without_records_or_with_too_few_members():
    rng = np.random.default_rng(1)
    tb, ood = _table(6, rng)
    assert budget_rows(tb, None, "3", "9") == [] and budget_rows(None, _unc_rows("r0-ep2", {"B": 0.1}), "3", "9") == []
    few = pd.concat([_unc_rows(f"r{k}-ep2", {"B": 0.1, "C": 0.2}) for k in range(2)], ignore_index=True)
    rows = budget_rows(tb, few, "1", "3", n_resamples=0)
    assert [r["verdict"] for r in rows] == [NOT_TESTABLE, NOT_TESTABLE]
    assert [r["scope"] for r in rows] == ["δ budget 1 epochs (subset of 2)", "δ budget 3 epochs (subset of 2)"]


# --- the stage, tiny: on a copy of the shared finished sweep ----------------------------------------

def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.integration
def test_budget_stage_on_a_finished_sweep(finished, tmp_path, capsys):
    from conftest import run_cli
    from helpers import copy_experiment

    exp, _ = copy_experiment(finished["exp"], tmp_path / "runs" / "tiny")
    before = _digest(exp / "records" / "uncertainty")
    raw = yaml.safe_load(Path(finished["spec"]).read_text())
    raw["storage"] = str(tmp_path / "runs")
    raw["uncertainty"]["sensitivity"] = {"epochs_factor": 3, "members": 1}  # δ 1 epoch -> 3, the first run's last
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(raw))
    proc = run_cli("run", str(spec), "--num-cpus", "2", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "δ-budget sensitivity: δ fitted again for 1 of 1 members" in proc.stdout + proc.stderr
    members, _ = records.load_records(exp)
    want = budget_members(members, members["member_id"].astype(str).tolist(), 1)
    parts = exp / "records" / "uncertainty_budget" / "parts"
    assert sorted(p.stem for p in parts.glob("*.parquet")) == want
    budget = records.load_uncertainty_budget(exp)
    assert set(budget["method"]) == {"ggd"} and set(budget["member_id"]) == set(want)
    assert records.load_uncertainty_budget_fits(exp)["epochs"].tolist() == [3]
    assert _digest(exp / "records" / "uncertainty") == before  # the default δ's records: untouched
    claims = pd.read_csv(exp / "analysis" / "claims.csv")
    sens = claims[claims["kind"] == KIND]
    assert sens["scope"].tolist() == ["δ budget 1 epochs (subset of 1)", "δ budget 3 epochs (subset of 1)"]
    # published: the export carries the sensitivity's records, so its rows re-derive (export's check compares)
    from sweeps.publish import export_experiment

    export_experiment(exp, tmp_path / "pub")
    assert (tmp_path / "pub" / "records" / "uncertainty_budget.parquet").is_file()
    assert len(list((tmp_path / "pub" / "records" / "uncertainty_budget" / "fits").glob("*.json"))) == 1
    # a rerun refits nothing: the stage (as the driver calls it) finds every member recorded and never needs Ray
    from sweeps.spec import load_spec
    from sweeps.tracking import finish_tracking, tracker_for
    from sweeps.uncertainty_budget import run_budget_stage

    stamp = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    loaded = load_spec(spec)
    tracker = tracker_for(loaded)
    try:
        assert run_budget_stage(loaded, Path("unused"), tracker, lambda: pytest.fail("Ray started: δ refitted")) == []
        # every member instead: only the 3 not yet recorded are to be fitted (stopped where Ray would start)
        raw["uncertainty"]["sensitivity"]["members"] = "all"
        spec.write_text(yaml.safe_dump(raw))

        class Stop(Exception):
            pass

        def stop():
            raise Stop
        capsys.readouterr()
        with pytest.raises(Stop):
            run_budget_stage(load_spec(spec), Path("unused"), tracker, stop)
        assert "δ fitted again for 3 of 4 members (all) at 3 epochs" in capsys.readouterr().out
    finally:
        finish_tracking(tracker)
    assert {p.name: p.stat().st_mtime_ns for p in parts.iterdir()} == stamp
    assert _digest(exp / "records" / "uncertainty") == before
