"""The driver's stage helper without Ray: a Tuner run that leaves members without their records is run
again once, for those members only, after Tune's state is set aside."""
from __future__ import annotations

from types import SimpleNamespace

from sweeps.driver import fit_until_recorded


def _ok(*ids):
    return [SimpleNamespace(error=None, path=i) for i in ids]


def test_members_still_unrecorded_after_a_restore_run_again(tmp_path):
    stage = tmp_path / "pool"
    (stage / "trial_a").mkdir(parents=True)
    (stage / "experiment_state.json").write_text("{}")
    calls, recorded, invalidated = [], set(), []

    def fit(ids):
        calls.append(ids)
        recorded.update(ids or ["a"])  # the restored Tuner only ran "a"; "b" counted as finished
        return _ok(*(ids or ["a"]))

    def gaps():
        return {m: "its record is missing" for m in ("a", "b") if m not in recorded}

    results, failed = fit_until_recorded(stage, fit, gaps, invalidated.append, "a record")
    assert calls == [None, ["b"]] and invalidated == [{"b": "its record is missing"}]
    assert [r.path for r in results] == ["b"] and failed == []
    assert not (stage / "experiment_state.json").exists() and (stage / ".superseded").is_dir()  # set aside


def test_failed_trials_are_not_run_again(tmp_path):
    calls = []

    def fit(ids):
        calls.append(ids)
        return [SimpleNamespace(error=RuntimeError("boom"), path="x")]

    results, failed = fit_until_recorded(tmp_path / "pool", fit, lambda: {"x": "missing"}, lambda g: None, "a record")
    assert calls == [None] and len(failed) == 1  # the failure is reported, `oodsweep resume` retries it
