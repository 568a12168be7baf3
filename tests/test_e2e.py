"""End to end on a local Ray (2 CPUs) at tiny size: CLI -> Tune pool -> records -> MLflow -> analysis.

Also: rerunning skips the finished stage without duplicating MLflow runs; `analyze` and `status` work
without Ray; bad data fails with the file named and leaves the finished experiment as it was.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration
from conftest import run_cli  # noqa: E402  (the shared `finished` sweep lives in conftest)


def test_records(finished):
    exp = finished["exp"]
    members = pd.read_parquet(exp / "records" / "members.parquet")
    slices = pd.read_parquet(exp / "records" / "slices.parquet")
    assert len(members) == 4 and set(members["arch"]) == {"unet_r18", "unet_effb0"}
    assert set(members["epochs"]) == {1, 2}
    assert not members["oracle_prompt"].any() and members["run_id"].nunique() == 2  # two runs, 2 snapshots each
    assert set(slices["role"]) == {"id", "ood", "val"}  # the validation split is scored too
    # stored relative to the experiment, so that the folder can move (tests/test_experiment_folder.py)
    assert all(not Path(c).is_absolute() and (exp / c).is_file() for c in members["checkpoint"])
    assert set(slices["member_id"]) == set(members["member_id"])
    assert set(slices["site"]) == {"SiteA", "SiteB", "SiteC"}
    for mid in members["member_id"]:
        assert sorted(p.name for p in (exp / "records" / "predictions" / mid).iterdir()) == \
            ["SiteA.npz", "SiteB.npz", "SiteC.npz"]
    assert yaml.safe_load((exp / "spec.yaml").read_text())["name"] == "tiny"
    unc = pd.read_parquet(exp / "records" / "uncertainty.parquet")
    assert set(unc["member_id"]) == set(members["member_id"])
    assert set(unc["method"]) == {"ggd", "bayescap", "tta_noise", "tta_color", "mc_dropout"}
    assert not (exp / "records" / "table4.csv").exists()  # Table 4 is the analysis's (analysis/table4.csv)
    t4 = pd.read_csv(exp / "analysis" / "table4.csv", index_col="method")
    assert {"SiteA → SiteB", "SiteA → SiteC"} <= set(t4.columns) and len(t4) == 5
    # the records that answer the question: per slice the intersection, per site the maps' AUROC, δ's fit
    assert (unc["uncertain_error_px"] <= unc["error_px"]).all() and unc["map_ptp"].notna().all()
    sites = pd.read_parquet(exp / "records" / "uncertainty_sites.parquet")
    assert set(zip(sites["member_id"], sites["method"])) == set(zip(unc["member_id"], unc["method"]))
    assert len(list((exp / "records" / "uncertainty" / "fits").glob("*.json"))) == len(members)
    assert "pool members" in finished["out"] and str(exp / "analysis") in finished["out"]


def test_mlflow_runs(finished):
    from mlflow import MlflowClient

    exp = finished["exp"]
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    e = client.get_experiment_by_name("tiny")
    runs = client.search_runs([e.experiment_id])
    by_stage = {r.data.tags.get("oodsweep.stage"): r for r in runs if r.data.tags.get("oodsweep.stage")}
    assert set(by_stage) == {"pool", "uncertainty", "analysis"}
    pool = by_stage["pool"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pool.info.run_id]
    members = pd.read_parquet(exp / "records" / "members.parquet")
    assert sorted(r.info.run_name for r in children) == sorted(members["member_id"])
    for r in children:
        assert r.info.status == "FINISHED"
        assert {"arch", "lr", "seed", "epochs"} <= set(r.data.params)
        hist = client.get_metric_history(r.info.run_id, "ood_SiteB_iou_3d")
        assert sorted(m.step for m in hist) == list(range(1, int(r.data.params["epochs"]) + 1))
        assert client.get_metric_history(r.info.run_id, "id_iou_3d")
    unc = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == by_stage["uncertainty"].info.run_id]
    assert sorted(r.data.tags["oodsweep.member_id"] for r in unc) == sorted(members["member_id"])
    for r in unc:
        assert r.info.status == "FINISHED"
        assert client.get_metric_history(r.info.run_id, "loss_ggd")
        assert {"ua_ggd_SiteB", "ua_ggd_SiteC", "ua_tta_noise_SiteB", "auroc_ggd_SiteB"} <= set(r.data.metrics)
        assert client.get_metric_history(r.info.run_id, "heldout_dice_mu_yhat")  # δ's convergence, per epoch
    arts = {a.path for a in client.list_artifacts(by_stage["analysis"].info.run_id)}
    assert {"tables.md", "correlations.csv", "plots", "claims.md", "claims.csv", "table4.csv"} <= arts
    assert "analysis" in {a.path for a in client.list_artifacts(pool.info.run_id)}


def test_analysis_files(finished):
    an = finished["exp"] / "analysis"
    for name in ("tables.md", "correlations.csv", "performance.csv", "table1.csv", "summary.json"):
        assert (an / name).stat().st_size > 0, name
    for t in ("SiteB", "SiteC"):
        assert (an / "plots" / f"fig4_{t}.png").stat().st_size > 1000
    corr = pd.read_csv(an / "correlations.csv")
    members = corr[(corr["unit"] == "member") & (corr["members"] == "label-free")]
    assert set(members["target"]) == {"SiteB", "SiteC"} and (members["n"] == 4).all()
    assert set(corr["resample"]) == {"run"}  # the bootstrap resamples the two training runs
    assert {"id_performance", "id_agreement", "uncertain_area", "mean_uncertainty", "fixed_threshold_area",
            "guarded_area"} <= set(corr["indicator"])
    assert {"table4_readings.csv", "error_ranking.csv", "uncertainty_fits.csv"} <= {p.name for p in an.iterdir()}
    assert (an / "plots" / "fig3_uncertainty_vs_ood.png").stat().st_size > 1000
    assert list((an / "plots").glob("fig6_*.png"))
    assert "Table 4" in (an / "tables.md").read_text()
    perf = pd.read_csv(an / "performance.csv")
    assert perf[["id_score", "ood_score"]].drop_duplicates().shape[0] > 1  # a spread, not one point
    md = (an / "tables.md").read_text()
    assert "SiteA → SiteB" in md
    assert "on the validation split (source training cases held out" in md
    assert (an / "aline.csv").exists() and (an / "lines.csv").exists()
    claims = pd.read_csv(an / "claims.csv")   # the claims report: every claim has a row and a verdict
    assert {"C1", "C2", "C3", "C4", "C5"} <= set(claims["claim"]) and claims["verdict"].notna().all()
    assert "## Claims" in md and "Decision rule" in (an / "claims.md").read_text()


def test_rerun_skips_and_does_not_duplicate(finished):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{finished['exp'] / 'mlflow.db'}")
    e = client.get_experiment_by_name("tiny")
    # a driver killed between a stage's done marker and the end of its MLflow run leaves the run
    # RUNNING; the rerun skips the stage and must still end it
    stage_runs = [r.info.run_id for r in client.search_runs([e.experiment_id])
                  if r.data.tags.get("oodsweep.stage") in ("pool", "uncertainty")
                  and "mlflow.parentRunId" not in r.data.tags]
    assert len(stage_runs) == 2
    for rid in stage_runs:
        client.update_run(rid, status="RUNNING")
    proc = run_cli("run", str(finished["spec"]), "--num-cpus", "2", cwd=finished["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pool stage already done" in proc.stdout
    client = MlflowClient(f"sqlite:///{finished['exp'] / 'mlflow.db'}")
    e = client.get_experiment_by_name("tiny")
    assert "uncertainty stage already done" in proc.stdout
    assert len(client.search_runs([e.experiment_id])) == 4 + 4 + 3  # members (pool, uncertainty), stages
    assert all(client.get_run(rid).info.status == "FINISHED" for rid in stage_runs)


def test_status_and_analyze_without_ray(finished, tmp_path):
    fake = tmp_path / "noray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    env = {"PYTHONPATH": f"{fake}{os.pathsep}{Path(__file__).resolve().parents[1]}"}
    st = run_cli("status", str(finished["exp"]), env=env)
    assert st.returncode == 0, st.stderr
    assert "pool      done" in st.stdout and "members 4/4" in st.stdout and "runs 2/2 finished" in st.stdout
    assert "unfinished" not in st.stdout and "uncertainty done" in st.stdout
    out = tmp_path / "an"
    proc = run_cli("analyze", str(finished["exp"]), "--metric", "dice_2d", "--out", str(out), "--no-mlflow",
                   env=env)
    assert proc.returncode == 0, proc.stderr
    assert "pearson r" in proc.stdout
    assert (out / "tables.md").exists() and "dice_2d" in (out / "tables.md").read_text()


def test_bad_data_keeps_finished_work(finished, tmp_path, tiny_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    f = data / "SiteB" / "Case01.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    spec = yaml.safe_load(finished["spec"].read_text())
    spec["name"] = "tiny-bad"
    spec["data"]["root"] = str(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    before = sorted(p.relative_to(finished["exp"]) for p in finished["exp"].rglob("*") if p.is_file())
    proc = run_cli("run", str(path), "--num-cpus", "2")
    assert proc.returncode == 2
    assert "Case01.nii.gz" in proc.stderr and "SiteB" in proc.stderr
    after = sorted(p.relative_to(finished["exp"]) for p in finished["exp"].rglob("*") if p.is_file())
    assert before == after
    bad = tmp_path / "bad.txt"
    bad.write_text("name: [unclosed")
    proc = run_cli("run", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


def test_optuna_search(tmp_path, tiny_data):
    """A loguniform lr searched by Ray's OptunaSearch: num_samples runs, each a pool member."""
    spec = {"name": "search", "storage": str(tmp_path / "runs"),
            "data": {"layout": "prostate_multisite", "root": str(tiny_data), "source": "SiteA",
                     "targets": ["SiteB"], "image_size": 32, "test_fraction": 0.25},
            "pool": {"arch": {"choice": ["unet_r18"]}, "lr": {"loguniform": [1e-4, 1e-2]},
                     "epochs": {"grid": [1]}, "seed": 0, "batch_size": 4},
            "search": {"algo": "optuna", "num_samples": 2, "seed": 3}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli("run", str(path), "--num-cpus", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "OptunaSearch" in proc.stdout + proc.stderr
    members = pd.read_parquet(tmp_path / "runs" / "search" / "records" / "members.parquet")
    assert len(members) == 2 and members["lr"].nunique() == 2
    assert ((members["lr"] >= 1e-4) & (members["lr"] <= 1e-2)).all()
