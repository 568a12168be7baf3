"""analysis.health: the pool-health checks of the demo on hand-made performance tables."""
from __future__ import annotations

import pandas as pd

from analysis.health import health_line, pool_health


def _perf(rows: list[tuple[str, str, float, dict[str, float]]]) -> pd.DataFrame:
    """rows: (member_id, arch, id_score, {target: ood_score})."""
    return pd.DataFrame([{"member_id": m, "arch": a, "target": t, "id_score": i, "ood_score": o}
                         for m, a, i, ood in rows for t, o in ood.items()])


GOOD = [("a1", "unet", 0.90, {"B": 0.80, "C": 0.60, "D": 0.40}),
        ("a2", "unet", 0.60, {"B": 0.50, "C": 0.40, "D": 0.30}),
        ("s1", "sam", 0.75, {"B": 0.70, "C": 0.50, "D": 0.45})]


def test_healthy_pool():
    h = pool_health(_perf(GOOD), ["B", "C", "D"])
    assert h["best_id"] == {"sam": 0.75, "unet": 0.90}
    assert h["collapsed"] == [] and h["n_members"] == 3
    assert h["mean_id"] == (0.90 + 0.60 + 0.75) / 3
    assert h["mean_ood"] == {"B": (0.8 + 0.5 + 0.7) / 3, "C": 0.5, "D": (0.4 + 0.3 + 0.45) / 3}
    assert h["learns"] and h["few_collapsed"] and h["ood_ordered"] and h["ok"]
    line = health_line(h, "iou_3d")
    assert "sam 0.75" in line and "0 of 3" in line and "B 0.67 > C 0.50 > D 0.38" in line and "NOT" not in line


def test_each_check_can_fail():
    # an architecture whose best member is below the bar
    weak = GOOD[:2] + [("s1", "sam", 0.69, {"B": 0.6, "C": 0.5, "D": 0.4})]
    assert not pool_health(_perf(weak), ["B", "C", "D"])["learns"]
    # 2 collapsed of 11 members > 10%; 1 of 10 is allowed
    many = GOOD + [(f"c{i}", "unet", 0.01, {"B": 0.0, "C": 0.0, "D": 0.0}) for i in range(2)] \
        + [(f"w{i}", "unet", 0.8, {"B": 0.7, "C": 0.5, "D": 0.4}) for i in range(6)]
    h = pool_health(_perf(many), ["B", "C", "D"])
    assert h["collapsed"] == ["c0", "c1"] and not h["few_collapsed"] and not h["ok"]
    assert pool_health(_perf(many[:-1][:3] + many[4:]), ["B", "C", "D"])["few_collapsed"]  # 1 of 10
    # order: the severity order is the caller's, not the alphabet's
    assert not pool_health(_perf(GOOD), ["D", "C", "B"])["ood_ordered"]
    # a target above the source fails the order even when the targets fall
    above = [("a1", "unet", 0.5, {"B": 0.9, "C": 0.4, "D": 0.3})]
    h = pool_health(_perf(above), ["B", "C", "D"])
    assert not h["ood_ordered"] and "NOT met" in health_line(h, "iou_3d")


def test_targets_outside_the_severity_chain_are_only_checked_against_the_source():
    # E is a one-kind site: it scores above C but is not in the chain B > C > D
    rows = [("a1", "unet", 0.9, {"B": 0.8, "C": 0.5, "D": 0.4, "E": 0.7}),
            ("a2", "unet", 0.8, {"B": 0.7, "C": 0.5, "D": 0.3, "E": 0.6})]
    h = pool_health(_perf(rows), ["B", "C", "D", "E"], chain=["B", "C", "D"])
    assert h["ood_ordered"] and h["chain"] == ["B", "C", "D"]
    line = health_line(h, "iou_3d")
    assert "B 0.75 > C 0.50 > D 0.35; not in the severity chain: E 0.65" in line and "NOT" not in line
    assert not pool_health(_perf(rows), ["B", "C", "D", "E"])["ood_ordered"]  # as one chain, E breaks it
    above = [("a1", "unet", 0.6, {"B": 0.5, "C": 0.4, "D": 0.3, "E": 0.65})]  # E above the source
    assert not pool_health(_perf(above), ["B", "C", "D", "E"], chain=["B", "C", "D"])["ood_ordered"]
