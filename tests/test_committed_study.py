"""The committed study re-derives: `oodsweep rederive bench/results/study` reproduces its claims.csv byte for byte.

`bench/results/study/` is the study's run as `oodsweep export` wrote it (its README says how it was run); this
reruns the whole analysis from that folder alone, as a reader would, and compares. Marked slow: the analysis of
96 members with its bootstraps takes tens of seconds, without Ray.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STUDY = Path(__file__).resolve().parent.parent / "bench" / "results" / "study"
NEEDED = ("published.json", "spec.yaml", "records/members.parquet", "records/slices.parquet",
          "records/uncertainty.parquet", "records/uncertainty_sites.parquet", "records/predictions",
          "records/uncertainty/fits", "analysis/claims.csv", "analysis/summary.json")


def test_committed_study_rederives():
    from sweeps.publish import format_rederived, rederive

    missing = [n for n in NEEDED if not (STUDY / n).exists()]
    assert not missing, (f"{STUDY} cannot be re-derived, it lacks {', '.join(missing)}: commit the study as "
                         f"`oodsweep export oodsweep-runs/study {STUDY}` writes it")
    result = rederive(STUDY)
    assert result["claims_identical"], format_rederived(result, STUDY)
