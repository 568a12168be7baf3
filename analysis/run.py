"""The analysis stage: experiment records -> tables, correlations, plots (DESIGN §2, §7).

Reads ``<experiment>/records`` only (no Ray, no MLflow: the driver logs the files this
writes), so it can be rerun on any finished experiment.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from analysis.correlate import correlations
from analysis.plots import plot_all_on_the_line
from analysis.table import check_metric, performance_table
from analysis.tables import correlation_markdown, table1, table1_markdown
from trainables.records import load_records, member_part_ids, records_dir


def _json_clean(v: object) -> object:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict."""
    if isinstance(v, dict):
        return {str(k): _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _check_records(experiment_dir: Path) -> None:
    rdir = records_dir(experiment_dir)
    merged = (rdir / "members.parquet").exists() and (rdir / "slices.parquet").exists()
    if not merged and not member_part_ids(experiment_dir):
        raise FileNotFoundError(
            f"no pool records in {rdir} (expected members.parquet + slices.parquet or parts/*.member.json); "
            f"run the pool stage first, e.g. `oodsweep run <spec.yaml>`, or point at the experiment directory "
            f"that holds records/")


def run_analysis(experiment_dir: str | os.PathLike, metric: str = "iou_3d",
                 out_dir: str | os.PathLike | None = None) -> dict:
    """Run the "accuracy on the line" analysis of one experiment and write its files.

    Writes under ``out_dir`` (default ``<experiment_dir>/analysis``): ``performance.csv``,
    ``correlations.csv``, ``table1.csv``, ``tables.md``, ``plots/accuracy_on_the_line_<target>.png``
    and ``summary.json``.

    Args:
        experiment_dir: the experiment directory (holding ``records/``).
        metric: one of ``trainables.records.METRICS``.
        out_dir: where to write; default ``<experiment_dir>/analysis``.

    Returns:
        ``{"out_dir": str, "files": [str, ...], "correlations": [dict, ...]}`` (one dict per
        target, NaN as None).

    Raises:
        ValueError: unknown metric (the message lists the valid ones), or records without
            any OOD evaluation.
        FileNotFoundError: no records under ``experiment_dir``.
    """
    check_metric(metric)
    experiment_dir = Path(experiment_dir)
    _check_records(experiment_dir)
    members, slices = load_records(experiment_dir)
    perf = performance_table(members, slices, metric)
    if perf.empty:
        raise ValueError(f"records in {records_dir(experiment_dir)} hold no OOD (target-site) evaluations: "
                         f"{len(members)} members, roles {sorted(slices['role'].astype(str).unique())}")
    out = Path(out_dir) if out_dir is not None else experiment_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    perf.to_csv(out / "performance.csv", index=False)
    files.append(out / "performance.csv")

    corr = correlations(perf)
    corr.to_csv(out / "correlations.csv", index=False)
    files.append(out / "correlations.csv")

    table1(perf).to_csv(out / "table1.csv", index=False)
    files.append(out / "table1.csv")

    n_members = int(members["member_id"].nunique())
    header = (f"# Analysis: {experiment_dir.name}\n\nMetric: `{metric}`; {n_members} pool members; "
              f"source {', '.join(sorted(perf['source'].astype(str).unique()))}; targets "
              f"{', '.join(dict.fromkeys(perf['target'].astype(str)))}.\n")
    (out / "tables.md").write_text(header + "\n## Table 1\n\n" + table1_markdown(perf)
                                   + "\n\n## Accuracy on the line\n\n" + correlation_markdown(corr) + "\n",
                                   encoding="utf-8")
    files.append(out / "tables.md")

    files += plot_all_on_the_line(perf, out / "plots", metric)

    corr_records = _json_clean(corr.to_dict(orient="records"))
    summary = {"metric": metric, "n_members": n_members,
               "sources": sorted(perf["source"].astype(str).unique()),
               "targets": list(dict.fromkeys(perf["target"].astype(str))),
               "correlations": corr_records}
    (out / "summary.json").write_text(json.dumps(_json_clean(summary), indent=1, allow_nan=False) + "\n",
                                      encoding="utf-8")
    files.append(out / "summary.json")
    return {"out_dir": str(out), "files": [str(f) for f in files], "correlations": corr_records}
