"""The uncertainty stage's qualitative examples, for the paper's Fig. 6.

``records/uncertainty/examples/<member_id>.npz`` (``trainables.records``) holds a few slices of one
member: ``image`` (K x H x W float), ``truth``, ``pred``, ``error`` (K x H x W bool), ``mu``,
``uncertainty`` (K x H x W float), ``site`` (one name, or K names), ``case_id`` (K) and
``slice_idx`` (K). This module reads them and picks what Fig. 6 shows: a member and one of its
slices, and the uncertainty maps of the other members on that same slice, most uncertain first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.uncertainty_cases import is_case_sums
from trainables.records import read_uncertainty_slice, records_dir

#: Keys of an examples file.
EXAMPLE_KEYS = ("image", "truth", "pred", "error", "mu", "uncertainty", "site", "case_id", "slice_idx")
#: Members shown in Fig. 6's bottom row at most.
MAX_OTHERS = 6


@dataclass
class Example:
    """One slice of one member, as the uncertainty stage stored it (arrays ``H x W``)."""

    member_id: str
    site: str
    case_id: str
    slice_idx: int
    image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    error: np.ndarray
    mu: np.ndarray
    uncertainty: np.ndarray

    @property
    def key(self) -> tuple[str, str, int]:
        return self.site, self.case_id, self.slice_idx


def examples_dir(experiment_dir: str | os.PathLike) -> Path:
    return records_dir(experiment_dir) / "uncertainty" / "examples"


def example_members(experiment_dir: str | os.PathLike) -> list[str]:
    """Members with an examples file, sorted (hidden ``.*`` files are writes in progress)."""
    return sorted(p.stem for p in examples_dir(experiment_dir).glob("*.npz") if not p.name.startswith("."))


def _keys(z: np.lib.npyio.NpzFile, path: Path) -> list[tuple[str, str, int]]:
    missing = [k for k in EXAMPLE_KEYS if k not in z.files]
    if missing:
        raise ValueError(f"{path}: examples file without keys {missing} (found {sorted(z.files)}); the "
                         f"uncertainty stage writes {list(EXAMPLE_KEYS)} (trainables.records); rerun it or delete "
                         f"the file")
    case = np.atleast_1d(z["case_id"]).astype(str)
    sl = np.atleast_1d(z["slice_idx"]).astype(np.int64)
    site = np.broadcast_to(np.asarray(z["site"]).astype(str), case.shape)
    if len(sl) != len(case):
        raise ValueError(f"{path}: {len(case)} case ids but {len(sl)} slice indices")
    return [(str(s), str(c), int(i)) for s, c, i in zip(site, case, sl)]


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Every example slice of one examples file (the member id is the file's stem).

    Raises:
        ValueError: a key is missing, or the arrays disagree in their number of slices.
    """
    path = Path(path)
    with np.load(path) as z:
        keys = _keys(z, path)
        arrays = {k: np.asarray(z[k]) for k in ("image", "truth", "pred", "error", "mu", "uncertainty")}
    bad = {k: a.shape for k, a in arrays.items() if a.ndim != 3 or len(a) != len(keys)}
    if bad:
        raise ValueError(f"{path}: expected K x H x W arrays with K = {len(keys)} slices, got shapes {bad}")
    return [Example(path.stem, s, c, i, **{k: a[j] for k, a in arrays.items()})
            for j, (s, c, i) in enumerate(keys)]


def _slice_area(unc: pd.DataFrame | None, key: tuple[str, str, int], method: str = "ggd",
                experiment_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """member -> uncertain-area fraction on one slice ``(site, case_id, slice_idx)``. ``unc``: the slice records,
    or their case sums (``analysis.uncertainty_cases``: the analysis' table), in which case the slice's rows are
    read from ``experiment_dir``'s records."""
    if unc is None or unc.empty:
        return {}
    site, case, sl = key
    if is_case_sums(unc):
        if experiment_dir is None:
            return {}
        u = read_uncertainty_slice(experiment_dir, site, case, sl, method)
    else:
        u = unc[(unc["method"] == method) & (unc["site"] == site) & (unc["case_id"] == case)
                & (unc["slice_idx"] == sl)]
    frac = (u["uncertain_px"] / u["area_px"]).to_numpy(dtype=float)
    return dict(zip(u["member_id"].astype(str), frac))


def fig6_inputs(experiment_dir: str | os.PathLike, table: pd.DataFrame | None = None,
                unc: pd.DataFrame | None = None, member: str | None = None,
                index: int | None = None) -> tuple[Example, list[tuple[str, np.ndarray, float]]]:
    """Pick Fig. 6's member and slice, and the other members' uncertainty on that slice.

    Args:
        experiment_dir: the experiment directory.
        table: an ``indicator_table``: the default member is the one with the best mean OOD
            score among those with examples (else the first with examples).
        unc: the uncertainty records, for the uncertain area of each member on the slice.
        member: the member to show (default: see ``table``).
        index: which of its example slices (default: the one with the largest error among the
            slices whose truth is non-empty).

    Returns:
        ``(example, others)``: ``others`` lists ``(label, uncertainty map, uncertain area)`` of
        up to ``MAX_OTHERS`` members with the same slice, the chosen one included, most
        uncertain first (members without uncertainty records for the slice are left out).

    Raises:
        FileNotFoundError: no examples at all, or none for ``member``.
        IndexError: ``index`` outside the member's examples.
    """
    edir = examples_dir(experiment_dir)
    members = example_members(experiment_dir)
    if not members:
        raise FileNotFoundError(f"no examples under {edir} (the uncertainty stage writes <member_id>.npz there)")
    if member is None:
        member = members[0]
        if table is not None and not table.empty:
            mean = table[table["member_id"].astype(str).isin(members)].groupby("member_id")["ood_score"].mean()
            if mean.notna().any():
                member = str(mean.idxmax())
    elif member not in members:
        raise FileNotFoundError(f"no examples file {edir / (member + '.npz')}; members with examples: "
                                f"{', '.join(members[:10])}{' ...' if len(members) > 10 else ''}")
    examples = load_examples(edir / f"{member}.npz")
    if index is None:
        score = [(bool(np.any(e.truth)), int(np.count_nonzero(e.error))) for e in examples]
        index = max(range(len(examples)), key=lambda i: score[i])
    elif not -len(examples) <= index < len(examples):
        raise IndexError(f"example index {index} outside {edir / (member + '.npz')}'s {len(examples)} slices")
    chosen = examples[index]
    area = _slice_area(unc, chosen.key, experiment_dir=experiment_dir)
    shown: tuple[str, np.ndarray, float] | None = None
    rest: list[tuple[str, np.ndarray, float]] = []
    for m in members:
        a = area.get(m)
        if a is None:
            continue
        if m == member:
            shown = (f"{m} (shown)", chosen.uncertainty, a)
            continue
        with np.load(edir / f"{m}.npz") as z:
            try:
                keys = _keys(z, edir / f"{m}.npz")
            except ValueError:
                continue  # a broken file of another member only drops it from the bottom row
            if chosen.key in keys:
                rest.append((m, np.asarray(z["uncertainty"])[keys.index(chosen.key)], a))
    rest.sort(key=lambda o: -o[2])
    k = MAX_OTHERS - (shown is not None)
    if len(rest) > k:  # the most and the least uncertain of the others
        rest = rest[: k - k // 2] + (rest[len(rest) - k // 2:] if k // 2 else [])
    others = sorted(rest + ([shown] if shown is not None else []), key=lambda o: -o[2])
    return chosen, others
