"""Spec validation: every error names the key, the bad value and the valid choices or fix."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sweeps.spec import SpecError, load_spec, parse_spec

PRESETS = Path(__file__).resolve().parents[1] / "sweeps" / "presets"


def base(tmp_path) -> dict:
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"name": "t", "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(tmp_path / "data"), "source": "SiteA",
                     "targets": ["SiteB", "SiteC"], "image_size": 64},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [1, 2]},
                     "seed": {"grid": [0, 1]}}}


def edit(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    *head, last = path.split(".")
    node = d
    for k in head:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


def test_valid_spec(tmp_path):
    spec = parse_spec(base(tmp_path))
    assert spec.n_runs() == 2 and spec.n_members() == 4
    assert spec.analysis.degenerate_floor == 0.01 and spec.analysis.probit_clip == "auto"
    assert spec.experiment_dir == tmp_path / "runs" / "t"
    assert spec.tracking().startswith("sqlite:////") and spec.tracking().endswith("/runs/t/mlflow.db")


def test_demo_preset_is_valid():
    spec = load_spec(PRESETS / "demo.yaml")
    assert spec.n_members() >= 12
    assert len(spec.pool.arch.values) >= 3 and len(spec.pool.lr.values) >= 2
    assert len(spec.pool.epochs.values) >= 2 and len(spec.data.targets) >= 3
    assert 64 <= spec.data.image_size <= 128


@pytest.mark.parametrize("path,value,expect", [
    ("pool.arch", {"grid": ["unet_r18", "unet_r1000"]}, ["pool.arch.grid[1]", "unet_r1000", "unet_r18, unet_r50"]),
    ("pool.lr", {"grid": [-1e-3]}, ["pool.lr.grid[0]", "must be > 0", "-0.001"]),
    ("pool.epochs", {"snapshots": [0, 2]}, ["pool.epochs.snapshots[0]", "must be > 0", "0"]),
    ("pool.epochs", {"grid": [0]}, ["pool.epochs.grid[0]", "must be > 0"]),
    ("data.targets", ["SiteB", "SiteA"], ["data.targets", "source site 'SiteA'"]),
    ("data.root", "/nonexistent/oodsweep-data", ["data.root", "/nonexistent/oodsweep-data", "does not exist"]),
    ("pool.learning_rate", 1e-3, ["pool.learning_rate", "unknown key", "valid keys here", "lr"]),
    ("data.layout", "prostate", ["data.layout", "'prostate'", "prostate_multisite"]),
    ("data.image_size", 50, ["data.image_size", "multiple of 32", "50"]),
    ("analysis", {"metric": "assd"}, ["analysis.metric", "assd", "iou_3d", "hd95"]),
    ("analysis", {"degenerate_floor": 0.9}, ["analysis.degenerate_floor", "must be <= 0.5", "0.9"]),
    ("analysis", {"probit_clip": 0.5}, ["analysis.probit_clip", "0.5", "'auto'", "between 0 and 0.5"]),
    ("analysis", {"probit_clip": "half"}, ["analysis.probit_clip", "'half'", "'auto'"]),
    ("pool.lr", {"loguniform": [1e-5, 1e-3]}, ["pool.lr", "needs a search", "optuna"]),
    ("name", "a b/c", ["name", "folder-safe"]),
    ("pool.arch", KeyError, ["pool.arch", "required"]),
    ("pool.sam_checkpoint", "/nonexistent/sam.pth", ["pool.sam_checkpoint", "/nonexistent/sam.pth",
                                                     "does not exist", "medsam_vit_b.pth"]),
])
def test_invalid_specs(tmp_path, path, value, expect):
    with pytest.raises(SpecError) as e:
        parse_spec(edit(base(tmp_path), path, value), where="my.yaml")
    msg = str(e.value)
    assert msg.startswith("my.yaml: ")
    for part in expect:
        assert part in msg, (part, msg)


def test_image_size_multiple_and_indicators_come_from_the_registries(tmp_path):
    """data.image_size is checked against the pool's ModelSpec.size_multiple (and δ's body); the analysis'
    indicator registry gives analysis.indicators its choices."""
    d = edit(edit(base(tmp_path), "data.image_size", 48), "pool.arch", {"grid": ["transunet_tiny"]})
    assert parse_spec(d).data.image_size == 48  # TransUNet down-samples 16x
    with pytest.raises(SpecError, match=r"data.image_size: must be a multiple of 32 .*δ net.*got 48; use e.g. 64"):
        parse_spec({**d, "uncertainty": {}})  # δ's ResNet-18 UNet down-samples 32x
    spec = parse_spec({**base(tmp_path), "uncertainty": {}, "analysis": {"indicators": ["uncertain_area"]}})
    assert spec.analysis.indicators == ("uncertain_area",)
    with pytest.raises(SpecError, match="analysis.indicators: lists 'guarded_area' but the spec has no `uncertainty:`"):
        parse_spec({**base(tmp_path), "analysis": {"indicators": ["id_agreement", "guarded_area"]}})
    with pytest.raises(SpecError, match=r"analysis.indicators\[0\]: unknown value 'accuracy'.*ood_agreement"):
        parse_spec({**base(tmp_path), "analysis": {"indicators": ["accuracy"]}})


def test_unknown_top_level_key_suggests(tmp_path):
    d = base(tmp_path)
    d["analisys"] = {}
    with pytest.raises(SpecError, match="did you mean 'analysis'"):
        parse_spec(d)


def test_search_spec(tmp_path):
    d = edit(base(tmp_path), "pool.lr", {"loguniform": [1e-5, 1e-3]})
    d["search"] = {"algo": "optuna", "num_samples": 3}
    spec = parse_spec(d)
    assert spec.search.num_samples == 3 and spec.n_runs() == 3
    assert spec.search.metric == "val_iou_3d" and spec.data.val_fraction == 0.1  # chosen on validation
    with pytest.raises(SpecError, match="search.metric.*val_iou_3d.*data.val_fraction is 0"):
        parse_spec({**d, "data": {**d["data"], "val_fraction": 0}})
    with pytest.raises(SpecError, match="search.algo.*'hyperopt'.*optuna"):
        parse_spec({**d, "search": {"algo": "hyperopt"}})


def test_env_vars(tmp_path, monkeypatch):
    d = edit(base(tmp_path), "data.root", "${OODSWEEP_TEST_DATA}")
    with pytest.raises(SpecError, match="OODSWEEP_TEST_DATA is not set"):
        parse_spec(d)
    monkeypatch.setenv("OODSWEEP_TEST_DATA", str(tmp_path / "data"))
    assert parse_spec(d).data.root == tmp_path / "data"
    d = edit(base(tmp_path), "data.root", "${OODSWEEP_UNSET_VAR:-" + str(tmp_path / "data") + "}")
    assert parse_spec(d).data.root == tmp_path / "data"


def test_env_is_passed_not_written(tmp_path, monkeypatch):
    """${VAR} comes from an env mapping when one is given; `oodsweep demo --storage` passes one instead of
    overwriting the process environment."""
    import os

    from sweeps import driver
    from sweeps.cli import main

    monkeypatch.setenv("OODSWEEP_STORAGE", str(tmp_path / "elsewhere"))
    spec = load_spec(PRESETS / "demo.yaml", env={"OODSWEEP_STORAGE": str(tmp_path / "s"),
                                                 "OODSWEEP_DATA": str(tmp_path / "d")})
    assert spec.storage == tmp_path / "s" and spec.data.root.is_relative_to(tmp_path / "d")
    seen = {}
    monkeypatch.setattr(driver, "run_sweep", lambda spec, **kw: seen.setdefault("spec", spec))
    assert main(["demo", "--storage", str(tmp_path / "store")]) == 0
    assert seen["spec"].experiment_dir.is_relative_to(tmp_path / "store")
    assert seen["spec"].data.root.is_relative_to(tmp_path / "store" / "data")
    assert os.environ["OODSWEEP_STORAGE"] == str(tmp_path / "elsewhere")


def test_not_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ndata: [unclosed\n  pool: {")
    with pytest.raises(SpecError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_spec(p)
    p.write_text("just a string")
    with pytest.raises(SpecError, match="expected a YAML mapping"):
        load_spec(p)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_yaml_roundtrip(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(base(tmp_path)))
    assert load_spec(p).source_file == p.resolve()


def test_sam_checkpoint_goes_to_the_trials(tmp_path):
    from sweeps.pool import param_space

    ckpt = tmp_path / "medsam_vit_b.pth"
    ckpt.write_bytes(b"x")
    with pytest.raises(SpecError, match="pool.sam_checkpoint: is set but pool.arch has none of the SAM models"):
        parse_spec(edit(base(tmp_path), "pool.sam_checkpoint", str(ckpt)))
    raw = edit(edit(base(tmp_path), "pool.sam_checkpoint", str(ckpt)), "pool.arch", {"grid": ["unet_r18", "medsam"]})
    spec = parse_spec(raw)
    assert spec.pool.sam_checkpoint == ckpt
    assert param_space(spec, tmp_path / "cache")["sam_checkpoint"] == str(ckpt)
    assert "sam_checkpoint" not in param_space(parse_spec(base(tmp_path)), tmp_path / "cache")


@pytest.mark.parametrize("path,value,expect", [
    ("pool.training", {"amp": "fp8"}, ["pool.training.amp", "'fp8'", "bf16"]),
    ("pool.training", {"data_placement": "gpu"}, ["pool.training.data_placement", "'gpu'", "device, stream"]),
    ("pool.training", {"loader_workers": -1}, ["pool.training.loader_workers", "-1"]),
    ("pool.training", {"augment": "rotate"}, ["pool.training.augment", "'rotate'", "flip"]),
    ("pool.training", {"amps": "bf16"}, ["pool.training.amps", "unknown key", "amp"]),
    ("uncertainty", {"training": {"augment": "flip"}}, ["uncertainty.training.augment", "unknown key"]),
])
def test_invalid_training_blocks(tmp_path, path, value, expect):
    with pytest.raises(SpecError) as e:
        parse_spec(edit(base(tmp_path), path, value), where="my.yaml")
    for part in expect:
        assert part in str(e.value), (part, str(e.value))


def test_training_block_goes_to_the_trials(tmp_path):
    from sweeps.pool import param_space

    raw = edit(base(tmp_path), "pool.training", {"amp": "bf16", "augment": "flip", "data_placement": "stream",
                                                  "loader_workers": 2})
    space = param_space(parse_spec(raw), tmp_path / "cache")
    assert {k: space[k] for k in ("amp", "augment", "data_placement", "loader_workers")} == \
        {"amp": "bf16", "augment": "flip", "data_placement": "stream", "loader_workers": 2}
    assert "amp" not in param_space(parse_spec(base(tmp_path)), tmp_path / "cache")  # the trainables' default


def test_resume_may_move_data_but_not_change_precision(tmp_path):
    from sweeps.experiment import prepare_experiment

    prepare_experiment(parse_spec(base(tmp_path)))
    # where the training data lives changes no number: allowed on a resume
    prepare_experiment(parse_spec(edit(base(tmp_path), "pool.training", {"data_placement": "stream"})))
    # the precision changes the results: refused, naming the key
    with pytest.raises(Exception, match="pool.training.amp"):
        prepare_experiment(parse_spec(edit(base(tmp_path), "pool.training", {"data_placement": "stream",
                                                                              "amp": "bf16"})))


@pytest.mark.parametrize("value,expect", [
    ({"lam": 0}, ["uncertainty.lam", "must be > 0", "0"]),
    ({"lam": {"grid": [1.0, -5]}}, ["uncertainty.lam.grid[1]", "must be > 0", "-5"]),
    ({"baselines": ["bayescap", "deep_ensemble"]}, ["uncertainty.baselines[1]", "deep_ensemble", "tta_noise"]),
    ({"fit_split": "test"}, ["uncertainty.fit_split", "'test'", "train"]),
])
def test_invalid_uncertainty_sections(tmp_path, value, expect):
    with pytest.raises(SpecError) as e:
        parse_spec({**base(tmp_path), "uncertainty": value}, where="my.yaml")
    for part in expect:
        assert part in str(e.value), (part, str(e.value))


def test_fit_split_val_needs_a_validation_split(tmp_path):
    d = base(tmp_path)
    assert parse_spec({**d, "uncertainty": {"fit_split": "val"}}).uncertainty.fit_split == "val"  # val_fraction 0.1
    with pytest.raises(SpecError) as e:
        parse_spec({**d, "data": {**d["data"], "val_fraction": 0}, "uncertainty": {"fit_split": "val"}}, where="my.yaml")
    for part in ("uncertainty.fit_split", "no validation split", "data.val_fraction"):
        assert part in str(e.value), (part, str(e.value))


def test_lam_grid_and_bayescap_size(tmp_path):
    spec = parse_spec({**base(tmp_path), "uncertainty": {"lam": {"grid": [1.0, 100.0]}, "bayescap": {"width": 8}}})
    assert spec.uncertainty.lam == (1.0, 100.0) and spec.uncertainty.fit_split == "train"
    assert spec.uncertainty.bayescap == {"bayescap_width": 8, "bayescap_blocks": 16}
    assert parse_spec({**base(tmp_path), "uncertainty": {"lam": 100}}).uncertainty.lam == 100


def test_baseline_members_are_chosen_on_the_validation_split(tmp_path):
    import pandas as pd

    from sweeps.uncertainty import baseline_members

    spec = parse_spec({**base(tmp_path), "uncertainty": {"baseline_members": 1}})
    members = pd.DataFrame({"member_id": ["a", "b"]})
    row = {"site": "SiteA", "case_id": "c", "slice_idx": 0, "fn": 0, "tn": 0, "area_px": 10}
    # a is best on the test split (role id), b on the validation split
    slices = pd.DataFrame([{**row, "member_id": "a", "role": "id", "tp": 9, "fp": 1},
                           {**row, "member_id": "b", "role": "id", "tp": 1, "fp": 9},
                           {**row, "member_id": "a", "role": "val", "tp": 1, "fp": 9},
                           {**row, "member_id": "b", "role": "val", "tp": 9, "fp": 1}])
    assert baseline_members(spec, members, slices) == {"b"}
    assert baseline_members(spec, members, slices[slices["role"] == "id"]) == {"a"}  # no validation split

    # {per_arch: N}: the N best of each architecture
    per_arch = parse_spec({**base(tmp_path), "uncertainty": {"baseline_members": {"per_arch": 1}}})
    assert per_arch.uncertainty.baseline_per_arch and per_arch.uncertainty.baseline_members == 1
    members = pd.DataFrame({"member_id": ["a", "b", "c"], "arch": ["unet_r18", "unet_r18", "medsam_lite"]})
    slices = pd.concat([slices, pd.DataFrame([{**row, "member_id": "c", "role": "val", "tp": 0, "fp": 9}])])
    assert baseline_members(per_arch, members, slices) == {"b", "c"}
    assert baseline_members(spec, members, slices) == {"b"}
    # {per_run: N}: the N best snapshots of each training run (b and c are two snapshots of run r1)
    per_run = parse_spec({**base(tmp_path), "uncertainty": {"baseline_members": {"per_run": 1}}})
    assert per_run.uncertainty.baseline_per_run and not per_run.uncertainty.baseline_per_arch
    members = members.assign(run_id=["r0", "r1", "r1"])
    assert baseline_members(per_run, members, slices) == {"a", "b"}
    with pytest.raises(SpecError, match=r"uncertainty\.baseline_members: give one of"):
        parse_spec({**base(tmp_path), "uncertainty": {"baseline_members": {"per_run": 1, "per_arch": 1}}})
    with pytest.raises(SpecError, match=r"uncertainty\.baseline_members\.per_arch.*-1"):
        parse_spec({**base(tmp_path), "uncertainty": {"baseline_members": {"per_arch": -1}}})
    with pytest.raises(SpecError, match=r"uncertainty\.baseline_members.*per_arc"):
        parse_spec({**base(tmp_path), "uncertainty": {"baseline_members": {"per_arc": 2}}})


def test_prompted_members_without_baselines_can_skip_delta(tmp_path):
    import pandas as pd

    from sweeps.uncertainty import delta_members

    members = pd.DataFrame({"member_id": ["cnn", "sam1", "sam2", "cnn2"],
                            "oracle_prompt": [False, True, True, False]})
    everyone = parse_spec({**base(tmp_path), "uncertainty": {}})
    assert everyone.uncertainty.prompted_members == "all"
    assert delta_members(everyone, members, {"sam1"}) == ["cnn", "sam1", "sam2", "cnn2"]
    some = parse_spec({**base(tmp_path), "uncertainty": {"prompted_members": "with_baselines"}})
    assert delta_members(some, members, {"sam1"}) == ["cnn", "sam1", "cnn2"]  # CNNs always, sam2 has no baselines
    with pytest.raises(SpecError, match=r"uncertainty\.prompted_members.*'baselines'.*with_baselines"):
        parse_spec({**base(tmp_path), "uncertainty": {"prompted_members": "baselines"}})
