"""The typed configs at the trainable boundary (trainables.config, trainables.uncertainty.config): conversion of Ray's
flat dict, errors that name the type, the key, the value and the fix, one place per default, and the Tune
param_spaces the driver builds, whose keys must be the configs' fields."""
from __future__ import annotations

import dataclasses

import pytest

from trainables.config import AccelConfig, MemberConfig, SamOptions
from trainables.uncertainty.config import DeltaConfig


def member(**kw) -> dict:
    return {"arch": "unet_r18", "lr": 1e-3, "seed": 0, "cache": "/c", "source": "A", "targets": ["B", "C"],
            "experiment_dir": "/e", "snapshots": [1, 2], **kw}


def delta(**kw) -> dict:
    return {"member_id": "m", "checkpoint": "m.pt", "cache": "/c", "source": "A", "targets": ["B"],
            "experiment_dir": "/e", **kw}


def test_member_config_casts_once_and_is_frozen():
    cfg = MemberConfig.from_dict(member(lr="1e-3", seed=2.0, snapshots=[4, 2, 4], targets=["B"], amp=False,
                                        num_threads=1.0, gpu_share=0.5))
    assert (cfg.lr, cfg.seed, cfg.snapshots, cfg.targets, cfg.num_threads) == (1e-3, 2, (2, 4), ("B",), 1)
    assert type(cfg.seed) is int and type(cfg.lr) is float and cfg.last_epoch == 4
    assert cfg.accel == AccelConfig(amp="off", gpu_share=0.5) and cfg.sam == SamOptions()
    assert MemberConfig.from_dict(member(snapshots=None, epochs=3)).snapshots == (3,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    assert dataclasses.replace(cfg, lr=2e-3).snapshots == (2, 4)  # replace re-checks, idempotently
    # to_dict is from_dict's inverse (a dense architecture's dict keeps only the pool-wide SAM keys)
    for c in (cfg, MemberConfig.from_dict(member(arch="medsam_tiny", box_mode="components"))):
        assert MemberConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("change,error,parts", [
    ({"lr": KeyError}, KeyError, ["MemberConfig", "lacks ['lr']", "required keys", "'experiment_dir'"]),
    ({"learning_rate": 1}, KeyError, ["MemberConfig", "unknown keys ['learning_rate']", "valid keys", "'lr'"]),
    ({"batchsize": 4}, KeyError, ["'batchsize' (did you mean 'batch_size'?)"]),
    ({"box_mode": "mask"}, KeyError, ["unknown keys ['box_mode']", "box-prompted", "medsam_tiny", "'unet_r18'"]),
    ({"seed": 2.5}, ValueError, ["MemberConfig: seed must be an integer, got 2.5"]),
    ({"targets": "B"}, ValueError, ["MemberConfig: targets must be a list, got 'B'"]),
    ({"target_split": "val"}, ValueError, ["MemberConfig: target_split must be 'test' or 'all', got 'val'"]),
    ({"augment": "rotate"}, ValueError, ["MemberConfig: augment must be 'none' or 'flip', got 'rotate'"]),
    ({"snapshots": [0, 2]}, ValueError, ["MemberConfig: epochs/snapshots must be positive integers", "(0, 2)"]),
    ({"amp": "fp8"}, ValueError, ["AccelConfig: amp must be 'auto', 'bf16', 'fp16' or 'off', got 'fp8'"]),
    ({"data_placement": "gpu"}, ValueError, ["AccelConfig: data_placement must be", "'stream'", "got 'gpu'"]),
    ({"loader_workers": -1}, ValueError, ["AccelConfig: loader_workers must be 'auto' or an integer >= 0, got -1"]),
    ({"arch": "resnet"}, KeyError, ["'resnet'", "registered models"]),
])
def test_member_config_errors_name_type_key_value_and_fix(change, error, parts):
    raw = member(**{k: v for k, v in change.items() if v is not KeyError})
    for k in (k for k, v in change.items() if v is KeyError):
        del raw[k]
    with pytest.raises(error) as e:
        MemberConfig.from_dict(raw)
    for part in parts:
        assert part in str(e.value), (part, str(e.value))


def test_sam_options_are_keys_of_prompted_members_only():
    cfg = MemberConfig.from_dict(member(arch="medsam_tiny", box_mode="components", box_shift=10,
                                        embedding_dir="/emb", sam_init_seed=3))
    assert (cfg.sam.box_mode, cfg.sam.box_shift, cfg.sam.embedding_dir, cfg.sam.sam_init_seed) == \
        ("components", 10.0, "/emb", 3)
    with pytest.raises(ValueError, match="SamOptions: box_mode must be 'mask' or 'components', got 'points'"):
        MemberConfig.from_dict(member(arch="medsam_tiny", box_mode="points"))
    # the pool-wide ones: every architecture takes them (the sweep sets them for the whole pool)
    dense = MemberConfig.from_dict(member(sam_checkpoint="/w.pth", sam_sha256="ab", embeddings_ready=True))
    assert dense.sam.sam_checkpoint == "/w.pth" and dense.sam.embeddings_ready is True


def test_delta_config_conversion_and_errors():
    cfg = DeltaConfig.from_dict(delta(lam=[1, 100], baselines=["tta_noise"], epochs=2.0, amp="bf16"))
    assert cfg.lam == (1.0, 100.0) and cfg.lams == {"ggd": 1.0, "ggd_lam100": 100.0}
    assert cfg.baselines == ("tta_noise",) and cfg.epochs == 2 and cfg.accel.amp == "bf16"
    assert DeltaConfig.from_dict(delta()).lams == {"ggd": 1.0}
    for change, part in [({"lam": 0}, r"DeltaConfig: lam \(λ of Eq. 5\) must be > 0 \(or a non-empty list of such\), "
                                      r"got 0; .*paper's default is 1.0"),
                         ({"fit_split": "test"}, r"DeltaConfig: fit_split must be one of \['train', 'val'\], got 'test'"),
                         ({"baselines": ["deep_ensemble"]}, r"unknown uncertainty baselines \['deep_ensemble'\].*"
                                                            r"valid: \['bayescap'"),
                         ({"holdout": 1.0}, r"DeltaConfig: holdout must be in \[0, 1\), got 1.0"),
                         ({"epochs": 0}, r"DeltaConfig: epochs must be >= 1, got 0")]:
        with pytest.raises(ValueError, match=part):
            DeltaConfig.from_dict(delta(**change))
    with pytest.raises(KeyError, match=r"DeltaConfig: the config has unknown keys \['augment'\]"):
        DeltaConfig.from_dict(delta(augment="flip"))  # δ trains without augmentation
    with pytest.raises(KeyError, match=r"DeltaConfig: the config lacks \['checkpoint'\]"):
        DeltaConfig.from_dict({k: v for k, v in delta().items() if k != "checkpoint"})


def test_one_place_per_default():
    from sweeps.spec_schema import DataSpec, PoolSpec, UncertaintySpec, default
    from trainables.sam.options import EmbeddingJob

    # the spec's defaults are the trainables' fields, not copies that may drift
    for spec_type, name, cfg_type in [(PoolSpec, "batch_size", MemberConfig), (PoolSpec, "weight_decay", MemberConfig),
                                      (PoolSpec, "sam_checkpoint", SamOptions), (PoolSpec, "sam_sha256", SamOptions),
                                      (DataSpec, "val_fraction", MemberConfig), (DataSpec, "target_split", MemberConfig),
                                      (UncertaintySpec, "epochs", DeltaConfig), (UncertaintySpec, "lr", DeltaConfig),
                                      (UncertaintySpec, "passes", DeltaConfig), (UncertaintySpec, "lam", DeltaConfig),
                                      (UncertaintySpec, "baselines", DeltaConfig),
                                      (UncertaintySpec, "batch_size", DeltaConfig)]:
        assert default(spec_type, name) == cfg_type.default(name), (spec_type, name)
    assert MemberConfig.default("sam_checkpoint") is SamOptions.default("sam_checkpoint") is None
    assert MemberConfig.default("amp") == AccelConfig.default("amp") == "auto"
    with pytest.raises(KeyError, match="unknown keys \\['bacth_size'\\]"):
        MemberConfig.default("bacth_size")
    # the embedding pre-stage reads a trial's dict or its MemberConfig alike
    raw = member(arch="medsam_tiny", sam_init_seed=4, embedding_dir="/emb", num_threads=2)
    assert EmbeddingJob.of(raw) == EmbeddingJob.of(MemberConfig.from_dict(raw))
    assert EmbeddingJob.of({"arch": "medsam_lite"}).sam == SamOptions()


def _spec(tmp_path, **extra):
    from sweeps.spec import parse_spec

    (tmp_path / "data").mkdir(exist_ok=True)
    return parse_spec({"name": "t", "storage": str(tmp_path / "runs"),
                       "data": {"layout": "prostate_multisite", "root": str(tmp_path / "data"), "source": "SiteA",
                                "targets": ["SiteB", "SiteC"], "image_size": 64},
                       "pool": {"arch": {"grid": ["unet_r18", "medsam_tiny"]}, "lr": {"grid": [1e-3]},
                                "epochs": {"snapshots": [1, 2]}, "seed": {"grid": [0, 1]},
                                "training": {"amp": "bf16", "augment": "flip"}}, **extra})


def _first(value):
    """A Tune space's value with its first grid point taken."""
    return value["grid_search"][0] if isinstance(value, dict) and "grid_search" in value else value


def test_pool_param_space_keys_are_member_config_fields(tmp_path):
    from sweeps.pool import param_space

    space = param_space(_spec(tmp_path), tmp_path / "cache")
    assert set(space) <= set(MemberConfig.keys()) and set(MemberConfig.required()) <= set(space)
    # a trial's config drawn from it converts as the trial converts it
    cfg = MemberConfig.from_dict({**{k: _first(v) for k, v in space.items()}, "gpu_share": 0.25})
    assert (cfg.arch, cfg.snapshots, cfg.accel.amp, cfg.augment, cfg.sam.embeddings_ready) == \
        ("unet_r18", (1, 2), "bf16", "flip", True)
    # a key that is not a field is refused at the driver, named
    with pytest.raises(KeyError, match=r"unknown keys \['batchsize'\].*did you mean 'batch_size'"):
        MemberConfig.check_keys({**space, "batchsize": 8})


def test_uncertainty_param_space_keys_are_delta_config_fields(tmp_path, monkeypatch):
    from sweeps import cluster
    from sweeps.uncertainty import MEMBER_POINT_KEYS, param_space

    monkeypatch.setattr(cluster, "capacity", lambda: {"CPU": 2.0, "GPU": 0.0})
    spec = _spec(tmp_path, uncertainty={"epochs": 3, "lam": {"grid": [1.0, 10.0]}, "training": {"amp": "off"}})
    space = param_space(spec, tmp_path / "cache", ["a", "b"], {"a": "a.pt", "b": "b.pt"}, {"b"})
    fixed = {k: v for k, v in space.items() if k not in ("group", "_train")}
    groups = space["group"]["grid_search"]  # a member per group here (no records: no training runs to group by)
    assert [g["name"] for g in groups] == ["b", "a"]  # the member with baselines first
    points = [p for g in groups for p in g["members"]]
    assert set(points[0]) == set(MEMBER_POINT_KEYS)
    assert set(fixed) | set(MEMBER_POINT_KEYS) <= set(DeltaConfig.keys())
    assert set(DeltaConfig.required()) <= set(fixed) | set(MEMBER_POINT_KEYS)
    cfg = DeltaConfig.from_dict({**fixed, **points[0]})  # what trial_fn hands fit_uncertainty
    assert (cfg.member_id, cfg.epochs, cfg.lams, cfg.accel.amp) == ("b", 3, {"ggd": 1.0, "ggd_lam10": 10.0}, "off")
    assert cfg.baselines == spec.uncertainty.baselines and DeltaConfig.from_dict({**fixed, **points[1]}).baselines == ()
