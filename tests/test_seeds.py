"""analysis.seeds: how far a configuration moves across seeds, in the pool-health line and Table 1 (hand-built
performance tables)."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis.health import health_line, pool_health
from analysis.performance import PERFORMANCE_COLUMNS
from analysis.seeds import ONE_SEED, health_clause, seed_spread
from analysis.tables import table1, table1_markdown


def _perf(rows: list[tuple]) -> pd.DataFrame:
    """(member_id, arch, lr, epochs, seed, {target: ood}, id) -> a performance table of source A."""
    df = pd.DataFrame([(m, a, lr, ep, s, t, i, o) for m, a, lr, ep, s, ood, i in rows for t, o in ood.items()],
                      columns=["member_id", "arch", "lr", "epochs", "seed", "target", "id_score", "ood_score"])
    return df.assign(source="A", metric="iou_3d")[PERFORMANCE_COLUMNS]


# unet lr 1e-3 over seeds 0 and 1: ID 0.80 / 0.70 (SD 0.0707), B 0.50 / 0.60, C 0.80 / 0.76, mean OOD 0.65 / 0.68;
# medsam: one seed
POOL = [("u-0", "unet", 1e-3, 5, 0, {"B": 0.50, "C": 0.80}, 0.80),
        ("u-1", "unet", 1e-3, 5, 1, {"B": 0.60, "C": 0.76}, 0.70),
        ("ms-0", "medsam", 1e-4, 10, 0, {"B": 0.45, "C": 0.40}, 0.90)]


def test_seed_spread_per_configuration_and_scope():
    sp = seed_spread(_perf(POOL)).set_index("scope")
    assert list(sp.index) == ["id", "ood_mean", "B", "C"] and set(sp["arch"]) == {"unet"}  # medsam: one seed
    assert (sp["n_seeds"] == 2).all()
    assert sp.loc["id", ["lo", "hi"]].tolist() == [0.70, 0.80] and sp.loc["id", "sd"] == pytest.approx(0.0707107)
    assert sp.loc["ood_mean", ["lo", "hi"]].tolist() == pytest.approx([0.65, 0.68])
    assert sp.loc["B", "sd"] == pytest.approx(0.0707107)
    assert seed_spread(_perf(POOL[2:])).empty
    assert seed_spread(_perf(POOL).drop(columns="seed")).empty  # records without the columns: nothing to say


def test_health_line_states_the_seed_spread():
    h = pool_health(_perf(POOL), ["B", "C"])
    assert h["seed_spread"] == [{"source": "A", "arch": "unet", "lr": 1e-3, "epochs": 5, "n_seeds": 2,
                                 "id": [0.70, 0.80, pytest.approx(0.0707107)],
                                 "ood_mean": [0.65, pytest.approx(0.68), pytest.approx(0.0212132)]}]
    line = health_line(h, "iou_3d")
    assert line.endswith("; seed spread: unet lr 0.001 ep 5 ID 0.70–0.80 (SD 0.07), mean OOD 0.65–0.68 (SD 0.02) "
                         "over 2 seeds")
    one = health_line(pool_health(_perf(POOL[2:]), ["B", "C"]), "iou_3d")
    assert one.endswith("; " + ONE_SEED) and ONE_SEED == "one seed per configuration: seed noise unknown"
    old = {k: v for k, v in h.items() if k != "seed_spread"}  # a result written before the clause existed
    assert "seed" not in health_line(old, "iou_3d")


def test_health_clause_summarises_many_configurations():
    spread = [{"arch": "unet", "lr": lr, "epochs": 5, "n_seeds": 2, "id": [0.5, 0.5 + w, 0.01],
               "ood_mean": [0.4, 0.45, 0.02]} for lr, w in ((1e-3, 0.1), (2e-3, 0.3), (3e-3, 0.05), (4e-3, 0.2))]
    clause = health_clause(spread)
    assert clause.count(" over 2 seeds") == 3
    assert clause.endswith("and 1 more configurations (widest ID range 0.30: unet lr 0.002 ep 5)")


def test_table1_has_a_seed_spread_column():
    wide = table1(_perf(POOL)).set_index("setting")
    assert wide.loc["A", "seed spread"] == "unet lr 0.001 ep 5: 70.00–80.00 (SD 7.07, 2 seeds)"
    assert wide.loc["A → B", "seed spread"] == "unet lr 0.001 ep 5: 50.00–60.00 (SD 7.07, 2 seeds)"
    assert wide.loc["A → C", "seed spread"] == "unet lr 0.001 ep 5: 76.00–80.00 (SD 2.83, 2 seeds)"
    assert set(table1(_perf(POOL[2:]))["seed spread"]) == {"one seed per configuration"}
    assert "seed spread: the row's iou_3d across the seeds" in table1_markdown(_perf(POOL))
    assert "seed spread" not in table1(_perf(POOL), orient="archs").columns  # Tables 2-3: the cells only
    many = [(f"u{k}-{s}", "unet", lr, 5, s, {"B": 0.5}, 0.6 + 0.1 * s * k)
            for k, lr in enumerate((1e-3, 2e-3, 3e-3, 4e-3), 1) for s in (0, 1)]
    assert table1(_perf(many)).set_index("setting").loc["A", "seed spread"] == \
        "4 configurations with ≥ 2 seeds: median range 25.00, largest 40.00 (unet lr 0.004 ep 5)"
