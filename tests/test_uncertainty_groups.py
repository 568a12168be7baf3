"""δ of a group of members in one process (trainables.uncertainty.group, no Ray): the records equal the
per-member fits', ŷ read from the stored predictions equals the model's, a killed group resumes at its first
unrecorded member; the stage's groups (sweeps.uncertainty.member_groups) and the spec key."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trainables import records
from trainables.data.cache import open_slice_cache
from trainables.member import eval_sets
from trainables.uncertainty import fit_group, fit_uncertainty
from trainables.uncertainty.config import DeltaConfig
from trainables.uncertainty.fit import load_frozen
from trainables.uncertainty.group import MEMBER_FILE, checkpoint_member, recorded_members
from trainables.uncertainty.scoring import frozen_predict, stored_site_predictions

from helpers import copy_experiment, delta_config

#: 2 δ epochs (a shuffle each), the baselines that draw from the member's generator (TTA noise, MC dropout)
FAST = {"epochs": 2, "lr": 1e-3, "passes": 2, "baselines": ["tta_noise", "mc_dropout"], "checkpoint_every": 1}


def _copy(tiny_member: dict, dst: Path) -> tuple[Path, list[dict]]:
    """The session's tiny run (members at epochs 1 and 2) copied to ``dst``: (experiment, its members)."""
    return copy_experiment(tiny_member["exp"], dst, tiny_member["members"])


def _configs(exp: Path, members: list[dict], cache, **kw) -> list[dict]:
    return [delta_config(m, cache, exp, **{**FAST, **kw}) for m in members]


def _records(exp: Path) -> dict[str, pd.DataFrame]:
    keys = ["member_id", "method", "site", "case_id", "slice_idx"]
    unc = records.load_uncertainty(exp).sort_values(keys).reset_index(drop=True)
    sites = records.load_uncertainty_sites(exp).sort_values(keys[:3]).reset_index(drop=True)
    fits = records.load_uncertainty_fits(exp)
    fits = fits.sort_values("member_id").reset_index(drop=True)[["member_id", "final_loss_ggd", "fit_slices"]]
    return {"uncertainty": unc, "sites": sites, "fits": fits}


def assert_records_close(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    for name in ra:
        pd.testing.assert_frame_equal(ra[name], rb[name], check_exact=False, rtol=1e-6, atol=1e-6, obj=name)


def test_stored_yhat_equals_the_models(tiny_member, tiny_cache):
    exp, cache = tiny_member["exp"], open_slice_cache(tiny_cache)
    cfg = DeltaConfig.from_dict(delta_config(tiny_member["members"][1], tiny_cache, exp))
    model = load_frozen(str(records.resolve_checkpoint(exp, cfg.checkpoint)), cfg.member_id, str(exp),
                        torch.device("cpu"))
    for site, _, rows in eval_sets(cache, cfg):
        stored = stored_site_predictions(exp, cfg.member_id, site, cache, rows)
        assert stored is not None and stored.dtype == torch.bool, site
        assert torch.equal(stored, frozen_predict(model, cache, rows, torch.device("cpu"))), site
    # rows the pool stored no prediction of (the fit split): None, the model predicts them
    assert stored_site_predictions(exp, cfg.member_id, cfg.source, cache, cache.rows(cfg.source, "train")) is None


def test_stored_yhat_equals_the_models_for_a_box_prompted_member(medsam_run, tiny_cache):
    """MedSAM: the pool's stored masks (oracle boxes, cached embeddings) equal the frozen member's ŷ."""
    exp, members, _ = medsam_run
    cache, m = open_slice_cache(tiny_cache), members[-1]
    cfg = DeltaConfig.from_dict(delta_config(m, tiny_cache, exp))
    model = load_frozen(str(records.resolve_checkpoint(exp, cfg.checkpoint)), cfg.member_id, str(exp),
                        torch.device("cpu"))
    for site, _, rows in eval_sets(cache, cfg):
        stored = stored_site_predictions(exp, cfg.member_id, site, cache, rows)
        assert stored is not None and torch.equal(stored, frozen_predict(model, cache, rows, torch.device("cpu")))


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_group_records_equal_per_member_records(tiny_member, tiny_cache, tmp_path):
    """The old way (one fit_uncertainty per member, ŷ recomputed by the model) against one group in the reverse
    order (ŷ of the scored sites from the stored predictions): the same records, so the same random draws per
    member whatever its place in the group."""
    a, members_a = _copy(tiny_member, tmp_path / "a")
    b, members_b = _copy(tiny_member, tmp_path / "b")
    for cfg in _configs(a, members_a, tiny_cache):
        fit_uncertainty(cfg, stored_yhat=False)
    got = fit_group(_configs(b, members_b, tiny_cache)[::-1])
    assert list(got) == [m["member_id"] for m in members_b][::-1]
    assert_records_close(a, b)
    assert fit_group(_configs(b, members_b, tiny_cache)) == {}  # all recorded: nothing is fitted again


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_group_resumes_from_its_members_checkpoint(tiny_member, tiny_cache, tmp_path):
    """A group stopped in its second member's fit: rerun with that member's checkpoint, the first is skipped
    and the second resumes after the checkpointed epoch; a checkpoint of another member is not applied."""
    exp, members = _copy(tiny_member, tmp_path / "x")
    cfgs = _configs(exp, members, tiny_cache, baselines=[])
    second = members[1]["member_id"]
    kept = tmp_path / "kept"

    class Stop(Exception):
        pass

    def report(metrics, ckpt):
        if ckpt is not None and metrics["member_id"] == second:
            assert checkpoint_member(ckpt) == second
            os.replace(ckpt, kept)
            raise Stop  # the process "dies" after the second member's first checkpoint
        assert metrics["member_id"] in {m["member_id"] for m in members}

    with pytest.raises(Stop):
        fit_group(cfgs, report=report)
    assert recorded_members(exp) == {members[0]["member_id"]}
    first_part = records.records_dir(exp) / "uncertainty" / "parts" / f"{members[0]['member_id']}.parquet"
    mtime = first_part.stat().st_mtime_ns
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MEMBER_FILE).write_text("someone-else")
    assert checkpoint_member(tmp_path / "other") == "someone-else"

    got = fit_group(cfgs, resume_from=kept)
    assert list(got) == [second] and first_part.stat().st_mtime_ns == mtime
    att = records.load_attempts(exp)
    starts = att[(att["stage"] == "uncertainty") & (att["run"] == second)]["start_epoch"].tolist()
    assert starts == [0, 1], att  # the second attempt started after epoch 1, from the checkpoint


_CHILD = """
import json, sys, time
from trainables.uncertainty import fit_group
cfgs = json.loads(sys.argv[1])
def report(metrics, ckpt):
    if metrics.get("scored"):
        print("scored", metrics["member_id"], flush=True)
        time.sleep(60)  # killed here, between the first member's records and the second member's fit
fit_group(cfgs, report=report)
"""


@pytest.mark.slow
def test_killed_group_process_resumes_at_first_unrecorded_member(tiny_member, tiny_cache, tmp_path):
    """A real process running a group is killed (SIGKILL) after its first member is recorded; a new run of the
    group fits only the second member, and the records equal an uninterrupted group's."""
    import json

    exp, members = _copy(tiny_member, tmp_path / "killed")
    cfgs = _configs(exp, members, tiny_cache, baselines=[], epochs=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfgs)], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        lines = []
        while not (lines and lines[-1].startswith("scored ")) and proc.poll() is None:
            lines.append(proc.stdout.readline())
        assert lines and lines[-1].startswith("scored "), lines
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert recorded_members(exp) == {members[0]["member_id"]}
    got = fit_group(cfgs)
    assert list(got) == [members[1]["member_id"]]
    ref, ref_members = _copy(tiny_member, tmp_path / "whole")
    fit_group(_configs(ref, ref_members, tiny_cache, baselines=[], epochs=1))
    assert_records_close(ref, exp)


def test_member_groups():
    from sweeps.uncertainty import member_groups

    ids = ["a-ep1", "a-ep2", "b-ep1", "b-ep2", "c"]
    runs = {"a-ep1": "a", "a-ep2": "a", "b-ep1": "b", "b-ep2": "b"}
    # by run (the default): a run's snapshot members, in the records' order; the groups with baselines first
    assert member_groups(ids, {"b-ep2"}, runs, None) == [("b", ["b-ep1", "b-ep2"]), ("a", ["a-ep1", "a-ep2"]),
                                                           ("c", ["c"])]
    # N at a time in the stage's order (members with baselines first); 1: one trial per member, as before groups
    assert member_groups(ids, {"c"}, runs, 2) == [("c", ["c", "a-ep1"]), ("a-ep2", ["a-ep2", "b-ep1"]),
                                                  ("b-ep2", ["b-ep2"])]
    assert member_groups(ids, set(), runs, 1) == [(m, [m]) for m in ids]


@pytest.mark.parametrize("value, want", [("run", None), (1, 1), (4, 4)])
def test_group_size_spec_key(value, want, tmp_path):
    from sweeps.spec import SpecError, parse_spec

    base = {"name": "g", "storage": str(tmp_path), "data": {"layout": "prostate_multisite", "root": str(tmp_path),
                                                            "source": "SiteA", "targets": ["SiteB"]},
            "pool": {"arch": "unet_r18", "lr": 1e-3, "epochs": 2}, "uncertainty": {"group_size": value}}
    assert parse_spec(base).uncertainty.group_size == want
    assert parse_spec(base).uncertainty.train_max_failures == 0
    for bad in ("runs", 0, 1.5):
        with pytest.raises(SpecError, match="uncertainty.group_size"):
            parse_spec({**base, "uncertainty": {"group_size": bad}})


def test_finished_train_runs_and_groups(tmp_path):
    """The Train runs whose checkpoints the driver prunes: a one-member run of a scored member, a group whose
    listed members are all scored; not a group with a member still owed."""
    from sweeps.reconcile import train_groups
    from sweeps.uncertainty import finished_train_runs, members_file

    members_file(tmp_path, "runA").write_text('["a1", "a2"]')
    members_file(tmp_path, "runB").write_text('["b1", "b2"]')
    members_file(tmp_path, "broken").write_text("not json")
    assert train_groups(tmp_path) == {"runA": ["a1", "a2"], "runB": ["b1", "b2"]}
    got = finished_train_runs(tmp_path, {"a1", "a2", "b1"})
    assert [p.name for p in got] == ["delta-a1", "delta-a2", "delta-b1", "delta-runA"]
