"""``pool.repeat``: more seeds for chosen configurations of a grid pool, without multiplying the grid.

::

    pool:
      arch: {grid: [unet_r18, unet_effb0]}
      lr: {grid: [2.0e-3, 1.0e-3]}
      seed: {grid: [0]}
      repeat:                                   # one entry or a list
        - {arch: unet_r18, lr: 2.0e-3, seeds: [1]}

Each entry names one configuration of the grid (``arch`` from ``pool.arch``, ``lr`` from ``pool.lr``) and the
extra ``seeds`` it is trained with: one more training run per seed (per ``pool.epochs`` value in grid mode),
whose members join the pool. The grid's own runs are unchanged (same configurations, same seeds); the extra
runs are new members (``<arch>-lr<lr>-s<seed>-ep<e>``). Ray Tune starts them as its ``points_to_evaluate``
(``sweeps.pool.search_of``), before the grid's runs. A seed already in ``pool.seed`` would train a member twice
and is refused, as is a repeat in a search (``search:`` samples its own configurations).
"""
from __future__ import annotations

import math
from typing import Any

from .spec_checks import Checker
from .spec_schema import Param

#: An extra training run: (arch, lr, seed).
Run = tuple[str, float, int]


def parse_repeat(c: Checker, raw: Any, arch: Param, lr: Param, seed: Param) -> tuple[Run, ...]:
    """The extra runs of ``pool.repeat`` in the spec's order (empty when it is absent)."""
    if raw is None:
        return ()
    entries = [raw] if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise c.fail("pool.repeat", f"expected {{arch: A, lr: L, seeds: [S, ..]}} or a list of them, got {raw!r}")
    for k, p in (("pool.arch", arch), ("pool.lr", lr), ("pool.seed", seed)):
        if not p.is_grid:
            raise c.fail("pool.repeat", f"repeats a configuration of a grid, but {k} is {{{p.kind}: ...}}; "
                                        f"use {{grid: [...]}} for {k} or remove pool.repeat")
    out: list[Run] = []
    for i, e in enumerate(entries):
        key = f"pool.repeat[{i}]" if isinstance(raw, list) else "pool.repeat"
        e = c.keys(e, key, {"arch": True, "lr": True, "seeds": True})
        a = c.choice(e["arch"], f"{key}.arch", arch.values)
        v = c.number(e["lr"], f"{key}.lr", positive=True)
        match = [x for x in lr.values if math.isclose(x, v, rel_tol=1e-9)]
        if not match:
            raise c.fail(f"{key}.lr", f"{e['lr']!r} is not in pool.lr's grid {list(lr.values)}; a repeat adds seeds "
                                      f"to a configuration of the grid")
        seeds = e["seeds"] if isinstance(e["seeds"], list) else [e["seeds"]]
        if not seeds:
            raise c.fail(f"{key}.seeds", "expected a non-empty list of seeds, e.g. [1]")
        for j, s in enumerate(seeds):
            s = c.number(s, f"{key}.seeds[{j}]", integer=True, nonneg=True)
            if s in seed.values:
                raise c.fail(f"{key}.seeds[{j}]", f"seed {s} is in pool.seed's grid {list(seed.values)}, so {a} lr "
                                                  f"{match[0]:g} already trains with it; give another seed")
            run = (a, match[0], s)
            if run in out:
                raise c.fail(f"{key}.seeds[{j}]", f"{a} lr {match[0]:g} seed {s} is repeated twice; give it once")
            out.append(run)
    return tuple(out)
