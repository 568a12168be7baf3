"""The experiment folder is the truth: what a user does to a small finished experiment (delete, move,
rename, corrupt, point at nothing) ends cleanly: no silent gap, an error naming the file and the fix,
nothing finished lost. One row of docs/experiment.md's list per test; the experiment is the session's
`finished` sweep, copied (no new Ray run) except for the moved-folder chain, which resumes for real.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli

from sweeps.cli import main
from trainables import records

pytestmark = pytest.mark.integration

UNC_PART = "records/uncertainty/parts/{}.parquet"


@pytest.fixture(scope="module")
def pristine(finished, tmp_path_factory) -> Path:
    """One copy of the finished experiment, never changed: each test copies it again (cheap, no Ray)."""
    return _copy(finished["exp"], tmp_path_factory.mktemp("pristine") / "tiny")


def _copy(src: Path, dest: Path) -> Path:
    """Copy an experiment; its checkpoints (150 MB) are hard links: replace one, never write into it."""
    def copy(a, b):
        return os.link(a, b) if Path(a).parent.name == "checkpoints" else shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=copy)
    return dest


def _garble(path: Path, data: bytes = b"garbage") -> None:
    path.unlink()  # a hard link shared with the other copies: replaced, not written into
    path.write_bytes(data)


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _members(exp: Path) -> list[str]:
    return sorted(pd.read_parquet(exp / "records" / "members.parquet")["member_id"])


def test_deleted_delta_record_is_named_not_skipped(pristine, tmp_path, capsys):
    """Row 1 (without Ray): a deleted δ part shows as missing in `status`, and `analyze` refuses to run on
    the rest unless --allow-incomplete, which names it in tables.md. (The resume that refits it: the
    moved-folder chain below.)"""
    exp = _copy(pristine, tmp_path / "tiny")
    gone = _members(exp)[0]
    (exp / UNC_PART.format(gone)).unlink()
    rc, out, _ = _cli(capsys, "status", str(exp))
    assert rc == 0 and "uncertainty incomplete members 3/4" in out, out
    assert f"missing {gone}" in out and f"oodsweep resume {exp}" in out and "pool      done" in out
    rc, _, err = _cli(capsys, "analyze", str(exp), "--no-mlflow")
    assert rc == 1 and "incomplete" in err and gone in err and "--allow-incomplete" in err, err
    assert f"oodsweep resume {exp}" in err
    rc, out, err = _cli(capsys, "analyze", str(exp), "--no-mlflow", "--allow-incomplete")
    assert rc == 0, err
    md = (exp / "analysis" / "tables.md").read_text()
    assert "Incomplete experiment: 1 record(s) missing" in md and f"uncertainty of {gone}" in md


def test_corrupt_frozen_spec(pristine, tmp_path, capsys):
    """Row 5: a corrupt spec.yaml is named, with what to do; no traceback, for status, resume and run."""
    exp = _copy(pristine, tmp_path / "tiny")
    (exp / "spec.yaml").write_text("name: tiny\ndata: {root: [unclosed\n")
    for cmd in ("status", "resume", "analyze"):
        rc, _, err = _cli(capsys, cmd, str(exp))
        assert rc == 2 and f"{exp / 'spec.yaml'} is damaged: not valid YAML" in err, (cmd, err)
        assert "cp <your spec.yaml>" in err and "Traceback" not in err
    (exp / "spec.yaml").write_text("just a string\n")
    rc, _, err = _cli(capsys, "status", str(exp))
    assert rc == 2 and "is damaged: expected the frozen sweep spec" in err


def test_damaged_records_files(pristine, tmp_path, capsys):
    """Row 8: a corrupt members.parquet is rebuilt from parts/ (and says so); a corrupt part or δ record is
    named with `oodsweep resume` as the fix; nothing else is touched."""
    exp = _copy(pristine, tmp_path / "tiny")
    (exp / "records" / "members.parquet").write_bytes(b"garbage, not parquet")
    rc, out, err = _cli(capsys, "analyze", str(exp), "--no-mlflow")
    assert rc == 0, err
    assert "records/members.parquet is damaged" in err and "rebuilt it from" in err and "records/parts" in err
    assert len(pd.read_parquet(exp / "records" / "members.parquet")) == 4
    first = _members(exp)[0]
    (exp / "records" / "parts" / f"{first}.slices.parquet").write_bytes(b"garbage")
    (exp / UNC_PART.format(_members(exp)[1])).write_bytes(b"garbage")
    rc, _, err = _cli(capsys, "analyze", str(exp), "--no-mlflow")
    assert rc == 1 and f"its slice counts {exp}/records/parts/{first}.slices.parquet are damaged" in err, err
    assert f"its δ record {exp}/{UNC_PART.format(_members(exp)[1])} is damaged" in err
    assert f"oodsweep resume {exp}" in err and "Traceback" not in err
    # with nothing to rebuild from, the merged table's error names it and says how to redo it
    bare = tmp_path / "bare"
    (bare / "records").mkdir(parents=True)
    (bare / "records" / "members.parquet").write_bytes(b"x")
    (bare / "records" / "slices.parquet").write_bytes(b"x")
    with pytest.raises(records.RecordsError, match=r"members.parquet is damaged .* holds no parts .*oodsweep resume"):
        records.load_records(bare)


def test_garbage_member_checkpoint_message(pristine, tmp_path, capsys):
    """Row 7 (the message): a garbage member checkpoint is named as damaged, never with torch's advice to
    load pickles unsafely, and the fix is `resume` (which retrains it: the moved-folder chain)."""
    import torch

    from sweeps import reconcile
    from trainables.uncertainty import load_frozen

    exp = _copy(pristine, tmp_path / "tiny")
    mid = _members(exp)[0]
    ckpt = exp / "records" / "checkpoints" / f"{mid}.pt"
    _garble(ckpt)
    with pytest.raises(ValueError) as e:
        load_frozen(str(ckpt), mid, str(exp), torch.device("cpu"))
    msg = str(e.value)
    assert str(ckpt) in msg and "damaged" in msg and f"oodsweep resume {exp}" in msg
    assert "weights_only" not in msg and "oodsweep run" not in msg
    # a pickle torch refuses to load safely: same message, torch's unsafe hint not passed on
    ckpt.unlink()
    torch.save({"f": Path("x")}, ckpt)
    with pytest.raises(ValueError) as e:
        load_frozen(str(ckpt), mid, str(exp), torch.device("cpu"))
    assert "weights_only" not in str(e.value) and e.value.__cause__ is None
    rc, out, _ = _cli(capsys, "status", str(exp))
    assert "pool      incomplete members 3/4" in out and f"missing {mid}: its checkpoint {ckpt} is damaged" in out
    assert reconcile.pool_gaps(reconcile_spec(exp)) == {mid: f"its checkpoint {ckpt} is damaged (UnpicklingError)"}


def reconcile_spec(exp: Path):
    from sweeps.experiment import load_experiment_spec

    return load_experiment_spec(exp)


def test_renamed_folder_status(pristine, tmp_path, capsys):
    """Row 3: `status` of a renamed folder reports that folder, done, not `<parent>/<spec name>` pending."""
    exp = _copy(pristine, tmp_path / "elsewhere" / "renamed")
    rc, out, err = _cli(capsys, "status", str(exp))
    assert rc == 0, err
    assert f"experiment tiny  ({exp})" in out and "pool      done" in out and "uncertainty done" in out
    assert "pending" not in out and str(tmp_path / "elsewhere" / "tiny") not in out


def test_unreachable_address_fails_fast_before_freezing(tmp_path, tiny_data):
    """Row 6: nothing listens at the address: refused within 30 s, naming it and how to check it; the
    experiment folder holds no frozen spec afterwards."""
    from conftest import tiny_spec

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "runs", tiny_data)))
    t = time.time()
    proc = run_cli("run", str(path), "--address", "127.0.0.1:1", timeout=60)
    assert time.time() - t < 30
    assert proc.returncode == 1 and "cannot reach the Ray cluster at '127.0.0.1:1'" in proc.stderr, proc.stderr
    assert "ray status --address 127.0.0.1:1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "tiny" / "spec.yaml").exists()
    from sweeps.cluster import check_address

    os.environ["RAY_ADDRESS"] = "127.0.0.1:1"
    try:
        with pytest.raises(RuntimeError, match=r"\$RAY_ADDRESS"):
            check_address(None)
    finally:
        del os.environ["RAY_ADDRESS"]


def test_refused_first_run_leaves_nothing_blocking(tmp_path, tiny_data, capsys):
    """Row 4: a target site folder missing: the run is refused before the spec is frozen, and the corrected
    spec is accepted with nothing to delete by hand."""
    from conftest import tiny_spec

    from sweeps.experiment import check_frozen
    from sweeps.spec import load_spec

    spec = tiny_spec(tmp_path / "runs", tiny_data)
    spec["data"]["targets"] = ["SiteB", "SiteZ"]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    rc, _, err = _cli(capsys, "run", str(path))
    assert rc == 2 and "SiteZ" in err, err
    assert not (tmp_path / "runs" / "tiny" / "spec.yaml").exists()
    spec["data"]["targets"] = ["SiteB", "SiteC"]
    path.write_text(yaml.safe_dump(spec))
    frozen, changes = check_frozen(load_spec(path))
    assert frozen["data"]["targets"] == ["SiteB", "SiteC"] and changes == []


def test_small_ones(pristine, tmp_path, capsys, monkeypatch):
    """Rows 9-11: snapshots out of order refused with the key; `demo --storage` puts the synthetic data
    under the storage; `analyze --out` somewhere unwritable and `run <a folder>` say what is wrong;
    the MLflow experiment says it is a model-training experiment."""
    from sweeps import driver
    from sweeps.spec import SpecError, parse_spec
    from sweeps.tracking import KIND, KIND_TAG, Tracker

    base = {"name": "s", "storage": str(tmp_path), "data": {"layout": "prostate_multisite", "root": str(tmp_path),
                                                            "source": "A", "targets": ["B"]},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [2, 1]}}}
    with pytest.raises(SpecError, match=r"pool\.epochs\.snapshots: snapshot epochs must be strictly increasing, "
                                        r"got \[2, 1\]; .* \[1, 2\]"):
        parse_spec(base)
    base["pool"]["epochs"] = {"snapshots": [1, 1]}
    with pytest.raises(SpecError, match="strictly increasing"):
        parse_spec(base)

    seen = {}
    monkeypatch.setattr(driver, "run_sweep", lambda spec, **kw: seen.setdefault("spec", spec))
    for var in ("OODSWEEP_STORAGE", "OODSWEEP_DATA"):
        monkeypatch.setenv(var, "unset-by-test")  # restored after the test; demo --storage overrides both
    assert main(["demo", "--smoke", "--storage", str(tmp_path / "store")]) == 0
    assert seen["spec"].data.root.is_relative_to(tmp_path / "store")
    assert seen["spec"].experiment_dir.is_relative_to(tmp_path / "store")

    exp = _copy(pristine, tmp_path / "tiny")
    rc, _, err = _cli(capsys, "analyze", str(exp), "--no-mlflow", "--out", "/proc/nope")
    assert rc == 2 and "--out /proc/nope: cannot write the analysis there" in err and "pass a folder" in err
    rc, _, err = _cli(capsys, "run", str(exp))
    assert rc == 2 and f"{exp} is a folder, not a spec file" in err and f"oodsweep resume {exp}" in err
    rc, _, err = _cli(capsys, "run", str(tmp_path))
    assert rc == 2 and "is a folder, not a spec file; give a spec YAML file" in err

    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "kind")
    from mlflow import MlflowClient

    assert MlflowClient(t.tracking_uri).get_experiment(t.experiment_id).tags[KIND_TAG] == KIND == \
        "custom_model_development"


def test_resolve_checkpoint(tmp_path):
    """Checkpoints are stored relative to the experiment; older absolute ones re-resolve after a move."""
    exp = tmp_path / "new"
    (exp / "records" / "checkpoints").mkdir(parents=True)
    (exp / "records" / "checkpoints" / "m.pt").write_bytes(b"x")
    assert records.resolve_checkpoint(exp, "records/checkpoints/m.pt") == exp / "records/checkpoints/m.pt"
    assert records.resolve_checkpoint(exp, "/old/place/records/checkpoints/m.pt") == exp / "records/checkpoints/m.pt"
    assert records.resolve_checkpoint(exp, "/weights/elsewhere.pt") == Path("/weights/elsewhere.pt")


def test_moved_folder_whole_chain(finished, pristine, tmp_path, capsys):
    """Row 2 (and the resume half of rows 1 and 7): the finished experiment moved and renamed, with a δ
    record deleted and a member checkpoint garbled. `status` reports the new folder and both gaps;
    `resume` retrains that member's run and refits the δ nets it owes (counted in attempts.jsonl),
    writing nothing at the old location; `analyze` then runs; MLflow runs stay unique and FINISHED,
    their artifacts under the new folder."""
    from mlflow import MlflowClient

    orig = finished["exp"]
    exp = _copy(pristine, tmp_path / "moved" / "renamed")
    members = _members(exp)
    bad = [m for m in members if m.startswith("unet_r18") and m.endswith("-ep1")][0]
    gone = [m for m in members if m.startswith("unet_effb0")][0]
    _garble(exp / "records" / "checkpoints" / f"{bad}.pt")
    (exp / UNC_PART.format(gone)).unlink()
    attempts0 = records.load_attempts(exp)
    kept = {m: (exp / "records" / "parts" / f"{m}.member.json").stat().st_mtime_ns for m in members}
    hidden = orig.with_name("tiny.hidden")
    orig.rename(hidden)  # the folder has really moved: nothing may still read or write the old one
    try:
        rc, out, _ = _cli(capsys, "status", str(exp))
        assert f"({exp})" in out and "pool      incomplete members 3/4" in out and f"missing {bad}" in out
        assert f"missing {gone}" in out and f"oodsweep resume {exp}" in out
        proc = run_cli("resume", str(exp), "--num-cpus", "2")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert not orig.exists(), "the resume wrote at the experiment's old location"
        assert f"this experiment ran from {orig} before" in proc.stdout
        assert f"pool member {bad}: its checkpoint" in proc.stdout and "damaged" in proc.stdout
        rc, out, err = _cli(capsys, "analyze", str(exp))
        assert rc == 0, err
        assert not orig.exists()
    finally:
        hidden.rename(orig)
    # the run of the garbled member was trained again (both its members), δ refitted where owed
    att = records.load_attempts(exp).iloc[len(attempts0):]
    run = bad.rsplit("-ep", 1)[0]
    pool_att = att[att["stage"] == "pool"]
    assert len(pool_att) == 1 and pool_att["run"].iloc[0].startswith(run + "-E"), att
    assert sorted(att[att["stage"] == "uncertainty"]["run"]) == sorted(m for m in members
                                                                       if m.startswith(run) or m == gone), att
    for m in members:
        if not m.startswith(run):
            assert (exp / "records" / "parts" / f"{m}.member.json").stat().st_mtime_ns == kept[m], m
    unc = pd.read_parquet(exp / "records" / "uncertainty.parquet")
    assert sorted(unc["member_id"].unique()) == members
    assert (exp / "records" / ".damaged").is_dir()  # the garbled checkpoint is kept aside, not deleted
    assert "Incomplete" not in (exp / "analysis" / "tables.md").read_text()
    st = run_cli("status", str(exp))
    assert "pool      done" in st.stdout and "uncertainty done" in st.stdout and "missing" not in st.stdout
    # MLflow: one run per stage and per member, all FINISHED, artifacts under the new folder
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    e = client.get_experiment_by_name("tiny")
    runs = client.search_runs([e.experiment_id])
    names = [(r.data.tags.get("mlflow.parentRunId") is None, r.data.tags.get("oodsweep.stage"), r.info.run_name)
             for r in runs]
    assert len(names) == len(set(names)) == 4 + 4 + 3, names
    assert all(r.info.status == "FINISHED" for r in runs)
    new = (exp / "mlartifacts").as_uri()
    assert e.artifact_location == new and all(r.info.artifact_uri.startswith(new) for r in runs)
    an = [r for r in runs if r.data.tags.get("oodsweep.stage") == "analysis"][0]
    assert (exp / "mlartifacts" / an.info.run_id / "artifacts" / "tables.md").exists()
    assert json.loads((exp / "analysis" / "summary.json").read_text())["missing"] == []
