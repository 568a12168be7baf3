"""`oodsweep export` / `oodsweep rederive` (sweeps.publish): a published folder is self-contained, holds no
absolute path of the machine it came from, and re-derives its claims.csv byte for byte."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sweeps.publish import _prefixes, compare_outputs, read_manifest, relativize


def test_relativize_at_path_boundaries_only():
    prefixes = _prefixes([("/data/runs/study", "<experiment>"), ("/data/runs", "<storage>")])
    assert prefixes[0] == ("/data/runs/study", "<experiment>")  # longest first
    text = ("experiment /data/runs/study; cache /data/runs/.cache/x; other /data/runs2/y; "
            "sqlite:////data/runs/study/mlflow.db; '/data/runs/study'")
    assert relativize(text, prefixes) == ("experiment <experiment>; cache <storage>/.cache/x; other /data/runs2/y; "
                                          "sqlite:///<experiment>/mlflow.db; '<experiment>'")


def test_prefixes_never_strip_the_root():
    assert all(p != "/" and p for p, _ in _prefixes([("/", "<root>"), ("/a", "<a>")]))


def test_compare_outputs_names_each_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, value, secs in ((a, "1.0", 3.0), (b, "1.5", 9.0)):
        (d / "plots").mkdir(parents=True)
        (d / "claims.csv").write_text(f"claim,value\nC1,{value}\n")
        (d / "summary.json").write_text(json.dumps({"metric": "iou_3d", "seconds": {"total": secs}}))
        (d / "plots" / "fig.png").write_bytes(b"\x89PNG")
    (a / "only_here.csv").write_text("x\n")
    res = compare_outputs(a, b)
    assert res["different"] == ["claims.csv"]
    assert res["identical"] == ["plots/fig.png", "summary.json"]  # the timings are not compared
    assert res["only_published"] == ["only_here.csv"] and res["only_rederived"] == []


def test_rederive_refuses_a_folder_that_was_not_published(tmp_path, capsys):
    from sweeps.cli import main
    from sweeps.errors import ExperimentError

    with pytest.raises(ExperimentError, match="published.json"):
        read_manifest(tmp_path)
    assert main(["rederive", str(tmp_path)]) != 0
    assert "oodsweep export" in capsys.readouterr().err


def test_a_published_folder_is_not_resumed_or_analysed_in_place(tmp_path, capsys):
    from sweeps.cli import main

    (tmp_path / "spec.yaml").write_text("name: x\n")
    (tmp_path / "published.json").write_text("{}\n")
    for cmd in ("analyze", "resume", "status"):
        assert main([cmd, str(tmp_path)]) != 0
        assert "oodsweep rederive" in capsys.readouterr().err


@pytest.mark.integration
def test_export_then_rederive_without_the_original(finished, tmp_path, capsys):
    """The tiny finished sweep, copied (the fixture is shared), exported with a console log that names its
    folders, the copy deleted: no file of the published folder holds the copy's or the original's path, the
    analysis re-derived from it gives the same claims.csv byte for byte, and a changed claims.csv is caught."""
    from sweeps.cli import main
    from sweeps.publish import rederive

    src = tmp_path / "runs" / "tiny"
    shutil.copytree(finished["exp"], src, ignore=shutil.ignore_patterns(
        "checkpoints", "pool", "mlartifacts", "mlflow.db", ".driver.lock"))
    shutil.rmtree(src / "uncertainty")  # the Ray Tune state of the δ stage (records/uncertainty stays)
    clone = tmp_path / "clone"
    log = tmp_path / "driver.log"
    log.write_text(f"[oodsweep] experiment {src}\n[oodsweep] records: {src / 'records'}\n"
                   f"[oodsweep] started from {clone}/sweeps\n[oodsweep] spec {finished['spec']}\n")
    pub = tmp_path / "published"
    assert main(["export", str(src), str(pub), "--log", str(log), "--strip", str(clone),
                 "--strip", str(finished["tmp"]), "--no-check"]) == 0
    assert "published" in capsys.readouterr().out
    shutil.rmtree(src)

    manifest = json.loads((pub / "published.json").read_text())
    assert {"records/members.parquet", "records/slices.parquet", "records/uncertainty.parquet",
            "records/uncertainty_sites.parquet", "spec.yaml", "analysis/claims.csv", "analysis/tables.md",
            "driver.log"} <= set(manifest["files"])
    assert any(f.startswith("records/predictions/") for f in manifest["files"])
    assert not any("checkpoints" in f for f in manifest["files"])
    for path in (src, finished["exp"], tmp_path, finished["tmp"]):
        hits = [str(f) for f in pub.rglob("*") if f.is_file() and str(path).encode() in f.read_bytes()]
        assert hits == [], f"{path} in {hits}"
    assert "<experiment>/records" in (pub / "driver.log").read_text()
    assert "storage: ${OODSWEEP_STORAGE:-./oodsweep-runs}" in (pub / "spec.yaml").read_text()

    # δ's examples: the member Fig. 6 shows whole, the others only the slice it shows
    import numpy as np

    slices = sorted(np.load(f)["slice_idx"].size for f in (pub / "records/uncertainty/examples").glob("*.npz"))
    assert len(slices) >= 2 and slices[-2] <= 1 < slices[-1], slices

    res = rederive(pub)
    assert res["claims_identical"] and res["different"] == [], res
    assert "claims.csv" in res["identical"] and "tables.md" in res["identical"]

    claims = pub / "analysis" / "claims.csv"
    claims.write_text(claims.read_text().replace("inconclusive", "reproduced", 1))
    assert main(["rederive", str(pub), "--out", str(tmp_path / "again")]) == 1
    out = capsys.readouterr().out
    assert "claims.csv: NOT reproduced" in out, out
    assert (tmp_path / "again" / "analysis" / "claims.csv").is_file()  # --out keeps the re-derived files
