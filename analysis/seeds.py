"""How much a configuration moves across seeds: the yardstick that tells seed noise from an effect.

A configuration is everything that identifies a training run apart from its seed: ``source, arch, lr,
epochs`` (a snapshot epoch is its own configuration). For every configuration trained with two or more
seeds, :func:`seed_spread` gives the range (min–max) and the sample SD (ddof = 1) across its seeds of the
ID score, of each target's OOD score and of the member's mean OOD score over the targets. The pool-health
line (``analysis.health``) and Table 1 (``analysis.tables``) state it; a pool with one seed per
configuration says that its seed noise is unknown.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: What identifies a configuration apart from its seed (columns of the performance table).
CONFIG_KEYS = ["source", "arch", "lr", "epochs"]
#: ``scope`` of the ID score's and of the mean OOD score's rows (the others are target names).
ID, OOD_MEAN = "id", "ood_mean"
#: Said where no configuration has two seeds.
ONE_SEED = "one seed per configuration: seed noise unknown"
#: Configurations named one by one in a line or cell; more are summarised.
SHOWN = 3


def seed_spread(perf: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration with >= 2 seeds, scope): ``source, arch, lr, epochs, scope, n_seeds, lo, hi,
    sd``; ``scope`` is ``"id"`` (the ID score), ``"ood_mean"`` (each member's mean OOD score over its targets)
    or a target site (its OOD score). Empty (same columns) when no configuration has two seeds, and when
    ``perf`` lacks the configuration columns."""
    cols = [*CONFIG_KEYS, "scope", "n_seeds", "lo", "hi", "sd"]
    if perf.empty or not set(CONFIG_KEYS + ["seed", "member_id"]) <= set(perf.columns):
        return pd.DataFrame(columns=cols)
    members = perf.drop_duplicates("member_id").set_index("member_id")
    long = [members[[*CONFIG_KEYS, "seed"]].assign(scope=ID, score=members["id_score"])]
    ood_mean = perf.groupby("member_id")["ood_score"].mean()
    long.append(members[[*CONFIG_KEYS, "seed"]].assign(scope=OOD_MEAN, score=ood_mean.reindex(members.index)))
    long.append(perf[[*CONFIG_KEYS, "seed", "target"]].rename(columns={"target": "scope"})
                .assign(score=perf["ood_score"]))
    df = pd.concat(long, ignore_index=True)
    df = df[np.isfinite(df["score"].astype(float))]
    order = list(dict.fromkeys([ID, OOD_MEAN, *perf["target"].astype(str)]))
    rows = []
    for key, g in df.groupby([*CONFIG_KEYS, "scope"], sort=True):
        if g["seed"].nunique() < 2:
            continue
        v = g["score"].astype(float).to_numpy()
        rows.append((*key, int(g["seed"].nunique()), float(v.min()), float(v.max()), float(v.std(ddof=1))))
    out = pd.DataFrame(rows, columns=cols)
    out["_o"] = out["scope"].map({s: i for i, s in enumerate(order)})
    return out.sort_values(["_o", "source", "arch", "lr", "epochs"], kind="stable").drop(columns="_o") \
        .reset_index(drop=True)


def _config(r) -> str:
    return f"{r['arch']} lr {float(r['lr']):g} ep {int(r['epochs'])}"


def health_spread(perf: pd.DataFrame) -> list[dict] | None:
    """The pool-health record of the seed spread: per configuration with >= 2 seeds, ``arch, lr, epochs,
    source, n_seeds`` and ``id`` / ``ood_mean`` as ``[lo, hi, sd]``; None when ``perf`` lacks the
    configuration columns (the clause is then left out)."""
    if not set(CONFIG_KEYS + ["seed"]) <= set(perf.columns):
        return None
    sp = seed_spread(perf)
    out = []
    for key, g in sp[sp["scope"].isin([ID, OOD_MEAN])].groupby(CONFIG_KEYS, sort=False):
        rec = dict(zip(CONFIG_KEYS, key))
        rec = {"source": str(rec["source"]), "arch": str(rec["arch"]), "lr": float(rec["lr"]),
               "epochs": int(rec["epochs"]), "n_seeds": int(g["n_seeds"].max())}
        for scope in (ID, OOD_MEAN):
            r = g[g["scope"] == scope]
            rec[scope] = [float(r["lo"].iloc[0]), float(r["hi"].iloc[0]), float(r["sd"].iloc[0])] if len(r) else None
        out.append(rec)
    return out


def _range(v: list[float] | None) -> str:
    return "–" if v is None else f"{v[0]:.2f}–{v[1]:.2f} (SD {v[2]:.2f})"


def health_clause(spread: list[dict] | None) -> str:
    """The pool-health line's clause, e.g. ``seed spread: unet_r18 lr 0.002 ep 8 ID 0.71–0.78 (SD 0.05), mean
    OOD 0.40–0.46 (SD 0.04) over 2 seeds``; ``""`` for None (records without the configuration columns)."""
    if spread is None:
        return ""
    if not spread:
        return ONE_SEED
    parts = [f"{_config(r)} ID {_range(r[ID])}, mean OOD {_range(r[OOD_MEAN])} over {r['n_seeds']} seeds"
             for r in spread[:SHOWN]]
    if len(spread) > SHOWN:
        widest = max(spread, key=lambda r: -math.inf if r[ID] is None else r[ID][1] - r[ID][0])
        parts.append(f"and {len(spread) - SHOWN} more configurations (widest ID range "
                     f"{widest[ID][1] - widest[ID][0]:.2f}: {_config(widest)})")
    return "seed spread: " + "; ".join(parts)


def table_spread(perf: pd.DataFrame, source: str, scope: str, scale: float = 100.0) -> str:
    """Table 1's "seed spread" cell of one row: ``scope`` (``"id"`` on a Same-Dom. row, the target on a
    Cross-Dom. one) of ``source``'s configurations with >= 2 seeds, in the cells' unit (``scale``), e.g.
    ``unet_r18 lr 0.002 ep 8: 71.20–78.40 (SD 5.09, 2 seeds)``; up to :data:`SHOWN` configurations by name,
    more as the median and the largest range; ``one seed per configuration`` when none has two."""
    sp = seed_spread(perf)
    sp = sp[(sp["source"].astype(str) == str(source)) & (sp["scope"] == scope)]
    if sp.empty:
        return "one seed per configuration"
    cells = [f"{_config(r)}: {scale * r['lo']:.2f}–{scale * r['hi']:.2f} (SD {scale * r['sd']:.2f}, "
             f"{r['n_seeds']} seeds)" for _, r in sp.iterrows()]
    if len(cells) <= SHOWN:
        return "; ".join(cells)
    ranges = scale * (sp["hi"] - sp["lo"])
    widest = sp.loc[ranges.idxmax()]
    return (f"{len(sp)} configurations with ≥ 2 seeds: median range {float(ranges.median()):.2f}, "
            f"largest {float(ranges.max()):.2f} ({_config(widest)})")
