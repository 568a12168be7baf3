"""The train/test split of a slice cache's cases (``trainables.data.cache`` stores it in ``index.parquet``).

Per site: the dataset's own split where the layout gives one (IDRiD's training/testing sets), else a
fixed-seed random split by case (80/20 by default; ``split="random"`` forces it everywhere).

Synthetic sites (``trainables.data.synthetic``) are the exception: case *i* is the same anatomy at every
site, so a split per site would put anatomies the source trained on into a target's test cases (the
drop to the target would then mix the shift with memorised anatomy). There every site takes the
source's case split (:func:`paired_source`): a target's test cases are exactly the source's test
anatomies under the target's shift, and its training cases (unused unless ``data.target_split`` is
``all``) are the source's training anatomies. Real multi-site data shares no patients: nothing pairs.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def split_cases(case_ids: Sequence[str], site: str, seed: int = 0, test_fraction: float = 0.2) -> dict[str, str]:
    """Assign each case to "train" or "test": a fixed-seed permutation per site, 80/20 by default.

    At least one case goes to each split when the site has two or more cases.
    """
    ids = sorted(case_ids)
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    order = rng.permutation(len(ids))
    n_test = int(round(test_fraction * len(ids)))
    if len(ids) >= 2:
        n_test = min(max(n_test, 1), len(ids) - 1)
    test = {ids[i] for i in order[:n_test]}
    return {c: ("test" if c in test else "train") for c in ids}


def paired_source(sources: Mapping[str, tuple[str, Path]], sites: Sequence[str]) -> str | None:
    """The source (``sites[0]``) when every site is a synthetic site of one data root (the same anatomies
    under different shifts, ``synthetic.shares_anatomies``), else None (each site splits on its own)."""
    from .synthetic import shares_anatomies

    if len(sites) < 2 or len({(lay, root) for lay, root in sources.values()}) != 1:
        return None
    lay, root = sources[sites[0]]
    return sites[0] if lay == "prostate_multisite" and shares_anatomies(root, sites) else None


def assign_splits(site_cases: Mapping[str, Sequence[str]], own: Mapping[tuple[str, str], str | None], split: str,
                  split_seed: int, test_fraction: float,
                  paired: str | None = None) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """``{(site, case): "train" | "test"}`` and each site's split source (for the manifest).

    Args:
        site_cases: each site's case ids (the cached ones).
        own: the dataset's own split of each (site, case), None where the release has none.
        split: ``"dataset"`` (the release's split where it has one) or ``"random"``.
        split_seed, test_fraction: the random split by case.
        paired: the source whose case split every other site takes (:func:`paired_source`); a case the
            source lacks (skipped as bad there) goes to "train", so the targets' test cases stay the
            source's test anatomies.
    """
    split_of: dict[tuple[str, str], str] = {}
    source_of: dict[str, str] = {}
    for site, ids in site_cases.items():
        if paired is not None and site != paired:
            continue
        mine = [own.get((site, c)) for c in ids]
        if split == "dataset" and all(o in ("train", "test") for o in mine) and {"train", "test"} <= set(mine):
            split_of.update({(site, c): o for c, o in zip(ids, mine)})  # type: ignore[misc]
            source_of[site] = "dataset"
        else:
            split_of.update({(site, c): s for c, s in split_cases(ids, site, split_seed, test_fraction).items()})
            source_of[site] = f"random {1 - test_fraction:.0%}/{test_fraction:.0%} by case, seed {split_seed}"
    if paired is not None:
        for site, ids in site_cases.items():
            if site != paired:
                split_of.update({(site, c): split_of.get((paired, c), "train") for c in ids})
                source_of[site] = f"{paired}'s case split (the same synthetic anatomies)"
    return split_of, source_of
