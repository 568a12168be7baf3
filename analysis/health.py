"""Does the pool learn? The three checks a study needs before its correlations mean anything.

A pool whose members predict nothing, or whose "harder" targets score above the source, lets every
indicator correlate through collapsed-versus-working members, and the study then tests nothing.
:func:`pool_health` reads the analysis's performance table (one row per member and
target: ``id_score``, ``ood_score``) and reports:

* **learns**: the best member of every architecture reaches ``id_bar`` on the source test split;
* **few collapsed**: at most ``max_collapsed_share`` of the members score below ``collapse_floor`` on
  the source (they predict almost nothing);
* **OOD ordered**: the pool's mean OOD score falls along the severity chain (the targets of growing
  shift severity, in that order: by default all of them in the spec's order), and every target's mean
  is below the source's mean (the targets outside the chain, e.g. the study's one-kind sites, are
  only checked against the source).

It also states how far a configuration moves across seeds (``analysis.seeds``): the range and SD of the ID
score and of the mean OOD score of every configuration trained with two or more seeds, or that the pool
has one seed per configuration (its seed noise unknown), so that a reader can tell noise from an effect.

The numbers are the pool's as trained: every member, oracle-prompted ones included (they are members
of the pool; the label-free guarantee concerns indicators, not this check).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from analysis.seeds import health_clause, health_spread

#: The demo's bars: best member per architecture, share of collapsed members, collapse floor.
ID_BAR = 0.70
MAX_COLLAPSED_SHARE = 0.10
COLLAPSE_FLOOR = 0.05


def pool_health(performance: pd.DataFrame, targets: Sequence[str], id_bar: float = ID_BAR,
                collapse_floor: float = COLLAPSE_FLOOR, max_collapsed_share: float = MAX_COLLAPSED_SHARE,
                chain: Sequence[str] | None = None) -> dict:
    """The pool's health checks (module doc) from ``performance`` (columns ``member_id``, ``arch``,
    ``target``, ``id_score``, ``ood_score``); ``chain``: the targets of growing shift severity, in that
    order (None: ``targets``, in their order); the other ``targets`` are not ordered among themselves.

    Returns a JSON-able dict: ``best_id`` per architecture, ``collapsed`` (member ids), ``mean_id``,
    ``mean_ood`` per target, the three verdicts ``learns``, ``few_collapsed``, ``ood_ordered``, ``ok``
    (all three), the bars used and ``seed_spread`` (``analysis.seeds.health_spread``; not a verdict).
    """
    members = performance.drop_duplicates("member_id")
    best = members.groupby("arch")["id_score"].max().sort_index()
    collapsed = sorted(members.loc[members["id_score"] < collapse_floor, "member_id"])
    mean_id = float(members["id_score"].mean())
    by_target = performance.groupby("target")["ood_score"].mean()
    targets = [t for t in targets if t in by_target.index]
    mean_ood = {t: float(by_target[t]) for t in targets}
    chain = targets if chain is None else [t for t in chain if t in mean_ood]
    falls = [mean_ood[t] for t in chain]
    ordered = (bool(targets) and all(a > b for a, b in zip(falls, falls[1:]))
               and all(m < mean_id for m in mean_ood.values()))
    out = {
        "n_members": int(len(members)),
        "best_id": {a: float(v) for a, v in best.items()},
        "collapsed": collapsed,
        "mean_id": mean_id,
        "mean_ood": mean_ood,
        "chain": list(chain),
        "learns": bool(len(best)) and bool((best >= id_bar).all()),
        "few_collapsed": len(collapsed) <= max_collapsed_share * len(members),
        "ood_ordered": ordered,
        "bars": {"id_bar": id_bar, "collapse_floor": collapse_floor, "max_collapsed_share": max_collapsed_share},
        "seed_spread": health_spread(performance),
    }
    out["ok"] = out["learns"] and out["few_collapsed"] and out["ood_ordered"]
    return out


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _bar(v: float | None) -> str:
    """A bar's value; none (None or infinite: a metric not in [0, 1], e.g. −HD95) reads "none"."""
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "none"


def health_line(h: dict, metric: str) -> str:
    """One line for the run's final summary, e.g. ``pool health (iou_3d): best ID per architecture ...``, ending
    with the seed spread (``analysis.seeds.health_clause``; left out for a result without one)."""
    bars = h["bars"]
    best = ", ".join(f"{a} {v:.2f}" for a, v in h["best_id"].items())
    order = h.get("chain", list(h["mean_ood"]))
    chain = " > ".join(f"{t} {h['mean_ood'][t]:.2f}" for t in order)
    others = [t for t in h["mean_ood"] if t not in order]
    if others:
        chain += "; not in the severity chain: " + ", ".join(f"{t} {h['mean_ood'][t]:.2f}" for t in others)
    return (f"pool health ({metric}): best ID per architecture {best} (bar >= {_bar(bars['id_bar'])}: "
            f"{_mark(h['learns'])}); collapsed (ID < {_bar(bars['collapse_floor'])}) {len(h['collapsed'])} of "
            f"{h['n_members']} (bar <= {bars['max_collapsed_share']:.0%}: {_mark(h['few_collapsed'])}); mean OOD "
            f"{chain}, source {h['mean_id']:.2f} (falling with severity, all below the source: "
            f"{_mark(h['ood_ordered'])})" + (f"; {seeds}" if (seeds := health_clause(h.get("seed_spread"))) else ""))
