"""``pool.repeat``: extra seeds for chosen grid configurations. Validation, the runs and members it adds, and the
trials Ray Tune's generator makes of it (the generator only: no Ray cluster is started)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sweeps.reconcile import expected_members
from sweeps.spec import SpecError, load_spec, parse_spec

PRESETS = Path(__file__).resolve().parents[1] / "sweeps" / "presets"
REPEAT = {"arch": "unet_r18", "lr": "2.0e-3", "seeds": [1]}


def _raw(tmp_path, repeat=None, **pool) -> dict:
    (tmp_path / "data").mkdir(exist_ok=True)
    p = {"arch": {"grid": ["unet_r18", "unet_effb0"]}, "lr": {"grid": [2e-3, 1e-3]}, "epochs": {"snapshots": [1, 2]},
         "seed": {"grid": [0]}, **pool}
    if repeat is not None:
        p["repeat"] = repeat
    return {"name": "t", "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(tmp_path / "data"), "source": "SiteA",
                     "targets": ["SiteB"], "image_size": 64}, "pool": p}


def test_repeat_adds_one_run_not_a_grid(tmp_path):
    plain, spec = parse_spec(_raw(tmp_path)), parse_spec(_raw(tmp_path, REPEAT))
    assert plain.pool.repeat == () and plain.n_runs() == 4 and plain.n_members() == 8
    assert spec.pool.repeat == (("unet_r18", 2e-3, 1),) and spec.n_runs() == 5 and spec.n_members() == 10
    assert expected_members(spec) == expected_members(plain) + ["unet_r18-lr0.002-s1-ep1", "unet_r18-lr0.002-s1-ep2"]
    two = parse_spec(_raw(tmp_path, [REPEAT, {"arch": "unet_effb0", "lr": 1e-3, "seeds": [2, 3]}]))
    assert two.pool.repeat == (("unet_r18", 2e-3, 1), ("unet_effb0", 1e-3, 2), ("unet_effb0", 1e-3, 3))
    grid = parse_spec(_raw(tmp_path, REPEAT, epochs={"grid": [1, 2]}))  # grid mode: one run per epochs value
    assert grid.n_runs() == 10 and grid.n_members() == 10


@pytest.mark.parametrize("repeat,pool,expect", [
    ({**REPEAT, "arch": "unet_r50"}, {}, ["pool.repeat.arch", "'unet_r50'", "unet_r18, unet_effb0"]),
    ({**REPEAT, "lr": 5e-3}, {}, ["pool.repeat.lr", "0.005", "not in pool.lr's grid [0.002, 0.001]"]),
    ({**REPEAT, "seeds": [1, 0]}, {}, ["pool.repeat.seeds[1]", "seed 0 is in pool.seed's grid", "another seed"]),
    ({**REPEAT, "seeds": [-1]}, {}, ["pool.repeat.seeds[0]", "must be >= 0"]),
    ({**REPEAT, "seeds": []}, {}, ["pool.repeat.seeds", "non-empty list"]),
    ([REPEAT, REPEAT], {}, ["pool.repeat[1].seeds[0]", "unet_r18 lr 0.002 seed 1 is repeated twice"]),
    ({"arch": "unet_r18", "lr": 2e-3}, {}, ["pool.repeat", "seeds"]),
    ({**REPEAT, "seed": [1]}, {}, ["pool.repeat.seed", "unknown key", "'seeds'"]),
    ([], {}, ["pool.repeat", "expected {arch: A, lr: L, seeds: [S, ..]}"]),
    (REPEAT, {"lr": {"loguniform": [1e-4, 1e-2]}}, ["pool.repeat", "pool.lr is {loguniform: ...}", "grid"]),
])
def test_repeat_errors_name_the_key(tmp_path, repeat, pool, expect):
    with pytest.raises(SpecError) as e:
        parse_spec(_raw(tmp_path, repeat, **pool))
    for s in expect:
        assert s in str(e.value), (s, str(e.value))


def test_repeat_refused_in_a_search(tmp_path):
    raw = _raw(tmp_path, REPEAT)
    raw["search"] = {"num_samples": 3}
    with pytest.raises(SpecError, match=r"pool\.repeat.*a search samples its own configurations"):
        parse_spec(raw)


def _tune_trials(spec, tmp_path) -> list[dict]:
    """The trial configs Tune's generator makes of ``spec`` (``sweeps.pool.search_of``); nothing runs."""
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from sweeps.pool import param_space, search_of

    alg, n = search_of(spec)
    alg = alg or BasicVariantGenerator()
    alg.add_configurations([Experiment("t", run=lambda c: None, config=param_space(spec, tmp_path / "cache"),
                                       num_samples=n)])
    out = []
    while (trial := alg.next_trial()) is not None:
        out.append(trial.config)
    return out


def test_tune_runs_the_grid_as_before_plus_the_repeat(tmp_path):
    plain = _tune_trials(parse_spec(_raw(tmp_path)), tmp_path)
    more = _tune_trials(parse_spec(_raw(tmp_path, REPEAT)), tmp_path)
    assert more[1:] == plain  # the grid's runs: the same configs (seeds included), in the same order
    assert len(plain) == 4 and {(c["arch"], c["lr"], c["seed"]) for c in plain} == {
        (a, lr, 0) for a in ("unet_r18", "unet_effb0") for lr in (2e-3, 1e-3)}
    assert more[0] == {**plain[0], "seed": 1} and plain[0]["arch"] == "unet_r18" and plain[0]["lr"] == 2e-3
    grid = _tune_trials(parse_spec(_raw(tmp_path, REPEAT, epochs={"grid": [1, 2]})), tmp_path)
    assert [(c["seed"], c["epochs"]) for c in grid[:2]] == [(1, 1), (1, 2)] and len(grid) == 10


def test_demo_repeats_one_cnn_configuration():
    spec = load_spec(PRESETS / "demo.yaml")
    assert spec.pool.repeat == (("unet_effb0", 2e-3, 1),)
    assert spec.n_runs() == 7 and spec.n_members() == 14
