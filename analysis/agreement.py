"""Agreement between pool members: one member scored against another's masks
(docs/architecture.md "Records", "Analysis").

The pool stage stores every member's binary predictions per evaluated site as packed bits
(``trainables.records.save_predictions``): one file per member and site, the same slices in the same
order for every member of one experiment. For one site, this module stacks the packed bits of all
members and computes, with one matrix product per slice, the per-slice confusion counts of every
member's mask against every other member's: for a members x pixels 0/1 matrix ``X`` of one slice,
``X @ X.T`` holds the pairwise intersections ``tp`` (and its diagonal the mask sizes), so member i
against member j has ``tp = |Pi ∩ Pj|``, ``fp = |Pi| - tp``, ``fn = |Pj| - tp``. Only the pixels
where at least two members predict foreground take part in the product (masks are mostly background).

Agreement is on the performance scale (Baek et al.'s "agreement on the line" compares the two lines
on one scale): member i's masks are scored against member j's as if j's were the truth, aggregated
exactly as ``trainables.records.metric_by`` aggregates the performance metric:

* ``iou_3d``: per case, |Pi ∩ Pj| / |Pi ∪ Pj| over all its slices; the mean over the cases where the
  "truth" j is non-empty;
* ``dice_2d``: per slice 2 |Pi ∩ Pj| / (|Pi| + |Pj|); the mean over the slices where j is non-empty;
* ``dice_global``: 2 Σ|Pi ∩ Pj| / (Σ|Pi| + Σ|Pj|) over the split (symmetric as it stands).

``iou_3d`` and ``dice_2d`` depend on which member plays the truth (the set of cases or slices
averaged over), so they are symmetrised: agreement(i, j) is the mean of i scored against j and j
against i (the one that is defined if only one is: a member that predicts nothing anywhere scores
0 against the others). NaN for a pair that predicts nothing on the split: two members that both fail
to segment anything would otherwise "agree perfectly". ``mask_dice`` keeps the earlier convention
(mean per-slice Dice over the slices where either mask is non-empty), by name, for comparison.

The arithmetic is in ``analysis.pairwise``. A large pool is computed in blocks of cases
(``agreement_matrices``' ``memory_gib``): every sum behind the agreement adds up over whole cases, so each
block reads only its slices of every member's file, and the blocks' sums give the split's matrix (the same
to rounding, 1e-12). The blocks run in-process one after the other, or through a ``map_blocks`` the caller
gives (the sweep's analysis stage maps them onto Ray tasks; this package never imports Ray).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.pairwise import (AGREEMENT_METRICS, PackedPredictions, add_partials, case_codes,  # noqa: F401
                               check_agreement_metric, finish_agreement, label_channel, one_blas_thread,
                               pairwise_agreement, pairwise_dice, partial_agreement, read_packed)
from trainables.records import records_dir

#: Share of ``memory_gib`` one block's packed stack may take (its transposed copy and the unpacked
#: products take about as much again; the rest is for the matrices and the analysis' tables).
BLOCK_SHARE = 0.25
#: Bytes per packed byte a block holds while it runs: the stack, its slice-major copy, the shared mask.
BLOCK_COPIES = 3

#: ``map_blocks(fn, tasks)``: yields ``fn(task)`` for every task, in the tasks' order (the builtin ``map``).
BlockMap = Callable[[Callable, Iterable], Iterator]


@dataclass
class Agreement:
    """Pairwise agreement of the pool on every evaluated site.

    Attributes:
        member_ids: the members, in the order of the matrices' rows and columns.
        matrices: site -> ``M x M`` agreement (NaN rows/columns for members without a usable
            predictions file on that site).
        roles: site -> ``"id"`` or ``"ood"``.
        n_slices: site -> number of slices compared.
        notes: what was skipped and why (for tables.md).
        metric: the agreement metric (``AGREEMENT_METRICS``; the performance metric's scale).
    """

    member_ids: list[str]
    matrices: dict[str, np.ndarray] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    n_slices: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metric: str = "iou_3d"

    def subset(self, member_ids: list[str] | tuple[str, ...]) -> Agreement:
        """The agreement of ``member_ids`` only (e.g. the label-free members): sub-matrices, same sites."""
        index = {m: i for i, m in enumerate(self.member_ids)}
        keep = [m for m in member_ids if m in index]
        pos = np.array([index[m] for m in keep], dtype=np.int64)
        return Agreement(member_ids=keep, matrices={s: a[np.ix_(pos, pos)] for s, a in self.matrices.items()},
                         roles=dict(self.roles), n_slices=dict(self.n_slices), notes=list(self.notes),
                         metric=self.metric)

    @property
    def id_site(self) -> str | None:
        """The source test split's site (role ``"id"``), or None."""
        return next((s for s, r in self.roles.items() if r == "id"), None)

    def member_mean(self, site: str) -> pd.Series:
        """Each member's mean agreement with the other members on ``site`` (NaN if it has none)."""
        a = self.matrices[site].copy()
        np.fill_diagonal(a, np.nan)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(a)
            cnt = ok.sum(axis=1)
            mean = np.divide(np.where(ok, a, 0.0).sum(axis=1), cnt, out=np.full(len(a), np.nan), where=cnt > 0)
        return pd.Series(mean, index=pd.Index(self.member_ids, name="member_id"), name=f"agreement_{site}")

    def pairs(self) -> pd.DataFrame:
        """One row per unordered pair of members: ``member_a, member_b`` and one column per site."""
        m = len(self.member_ids)
        ia, ib = np.triu_indices(m, k=1)
        ids = np.asarray(self.member_ids, dtype=object)
        out = pd.DataFrame({"member_a": ids[ia], "member_b": ids[ib]})
        for site, mat in self.matrices.items():
            out[site] = mat[ia, ib]
        return out


@dataclass(frozen=True)
class BlockTask:
    """One block of cases of one site: what ``agreement_block`` needs (picklable: a Ray task may run it)."""

    paths: tuple[str, ...]      # every kept member's predictions file on the site, in the matrix's order
    rows: np.ndarray            # the block's slices (rows of every file)
    cases: np.ndarray           # their case codes (``case_codes``)
    n_px: int
    metric: str
    channel: int | None = None  # multi-label predictions: this label channel only (``label_channel``)


def agreement_block(task: BlockTask) -> dict[str, np.ndarray]:
    """The sums of one block (``partial_agreement``), reading only its rows of every member's file."""
    stack = None
    for k, path in enumerate(task.paths):
        with np.load(path) as z:
            bits = z["bits"][task.rows]
            if task.channel is not None:
                shape = tuple(int(v) for v in z["shape"])
                bits = label_channel(PackedPredictions(bits, (len(bits), *shape[1:]), np.empty(0), np.empty(0)),
                                     task.channel, path).bits
        if stack is None:
            stack = np.empty((len(task.paths),) + bits.shape, dtype=np.uint8)
        stack[k] = bits
    with one_blas_thread():
        return partial_agreement(stack, task.n_px, task.cases, task.metric)


def plan_blocks(case_ids: np.ndarray, n_members: int, row_bytes: int, memory_gib: float | None) -> list[np.ndarray]:
    """The site's slices in blocks of whole cases whose stack fits ``BLOCK_SHARE * memory_gib``.

    One block (every slice, in file order) when ``memory_gib`` is None or the whole stack fits; a case
    larger than a block is a block of its own.
    """
    n = len(case_ids)
    cap = None if memory_gib is None else int(BLOCK_SHARE * memory_gib * (1 << 30)
                                              // max(1, BLOCK_COPIES * n_members * row_bytes))
    if cap is None or cap >= n:
        return [np.arange(n)]
    codes = case_codes(case_ids, n)
    order = np.argsort(codes, kind="stable")
    cases = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    blocks, cur, size = [], [], 0
    for rows in cases:
        if cur and size + len(rows) > max(1, cap):
            blocks.append(np.concatenate(cur))
            cur, size = [], 0
        cur.append(rows)
        size += len(rows)
    blocks.append(np.concatenate(cur))
    return blocks


def _stack_site(paths: dict[str, Path], site: str, memory_gib: float | None = None, channel: int | None = None
                ) -> tuple[list[str], np.ndarray | None, int, list[str], np.ndarray | None]:
    """Stack the packed bits of the members whose file matches the first one's slices (and its case ids);
    ``channel``: that label channel of multi-label predictions only (``label_channel``).

    With ``memory_gib``, when the whole stack would not fit one block (``plan_blocks``), the files are only
    checked and no stack is returned (None): the blocks read them again, a block's rows at a time."""
    notes: list[str] = []
    ref: PackedPredictions | None = None
    ref_path: Path | None = None
    kept: list[str] = []
    stack: np.ndarray | None = None
    for mid, path in paths.items():
        try:
            p = read_packed(path)
            p = p if channel is None else label_channel(p, channel, path)
        except (OSError, ValueError) as e:  # one unreadable file must not sink the whole analysis
            notes.append(f"agreement on {site}: skipped member {mid}: {e}")
            continue
        if ref is None:
            ref, ref_path = p, path
            whole = len(plan_blocks(p.case_id, len(paths), p.bits.shape[1], memory_gib)) == 1
            stack = np.empty((len(paths),) + p.bits.shape, dtype=np.uint8) if whole else None
        elif (p.shape != ref.shape or p.bits.shape != ref.bits.shape or not np.array_equal(p.case_id, ref.case_id)
              or not np.array_equal(p.slice_idx, ref.slice_idx)):
            notes.append(f"agreement on {site}: skipped member {mid}: {path} holds other slices than {ref_path} "
                         f"(shape {p.shape} vs {ref.shape}, or different case_id/slice_idx order); every member "
                         f"must store the same slices in the same order (rerun its pool trial)")
            continue
        if stack is not None:
            stack[len(kept)] = p.bits
        kept.append(mid)
    if ref is None:
        return [], None, 0, notes, None
    return kept, None if stack is None else stack[: len(kept)], ref.n_px, notes, ref.case_id


def _blocked(paths: dict[str, Path], kept: list[str], n_px: int, case_ids: np.ndarray, metric: str,
             memory_gib: float, map_blocks: BlockMap, channel: int | None = None) -> np.ndarray:
    """The site's matrix of the ``kept`` members from blocks of cases (``plan_blocks``, ``agreement_block``)."""
    with np.load(paths[kept[0]]) as z:
        row_bytes = int(z["bits"].shape[1])
    codes = case_codes(case_ids, len(case_ids))
    files = tuple(str(paths[k]) for k in kept)
    tasks = (BlockTask(files, rows, codes[rows], n_px, metric, channel)
             for rows in plan_blocks(case_ids, len(kept), row_bytes, memory_gib))
    acc = None
    for part in map_blocks(agreement_block, tasks):  # in the blocks' order: the same sums every run
        acc = add_partials(acc, part)
    return finish_agreement(acc, metric)


def agreement_matrices(experiment_dir: str | os.PathLike, member_ids: list[str],
                       site_roles: dict[str, str], metric: str = "iou_3d", memory_gib: float | None = None,
                       map_blocks: BlockMap | None = None, channel: int | None = None) -> Agreement:
    """Pairwise agreement of ``member_ids`` on every site of ``site_roles``, from the stored predictions.

    Args:
        experiment_dir: the experiment directory (``records/predictions/<member_id>/<site>.npz``).
        member_ids: the pool members (rows and columns of the matrices, in this order).
        site_roles: site -> role (``"id"`` / ``"ood"``), e.g. from the slice records.
        metric: the agreement metric (``AGREEMENT_METRICS``): the performance metric, so that
            agreement and performance are on one scale.
        memory_gib: bound the members' packed masks held at once: a site whose stack exceeds
            ``BLOCK_SHARE`` of it is computed in blocks of cases (``plan_blocks``); None: one block.
        map_blocks: runs the blocks (``BlockMap``; default: in this process, one after the other).
        channel: for multi-label predictions, the agreement of this label channel only (``label_channel``);
            None: every channel's pixels together (one pooled mask, as before).
    Returns:
        An ``Agreement``; a site where fewer than two members have predictions gets no matrix
        (and a note), a member without a file on a site gets NaN there (and a note).
    """
    pdir = records_dir(experiment_dir) / "predictions"
    check_agreement_metric(metric)
    res = Agreement(member_ids=list(member_ids), metric=metric)
    index = {mid: i for i, mid in enumerate(res.member_ids)}
    if not pdir.is_dir():
        res.notes.append(f"no predicted masks under {pdir}: agreement skipped (the pool stage stores them with "
                         f"trainables.records.save_predictions; rerun the pool stage to get them)")
        return res
    for site, role in site_roles.items():
        paths = {mid: pdir / mid / f"{site}.npz" for mid in res.member_ids}
        missing = [mid for mid, p in paths.items() if not p.exists()]
        if missing:
            res.notes.append(f"agreement on {site}: no predictions file for {len(missing)} member(s) "
                             f"(e.g. {pdir / missing[0] / (site + '.npz')}); they are left out there")
        kept, stack, n_px, notes, case_ids = _stack_site({k: p for k, p in paths.items() if k not in missing}, site,
                                                         memory_gib, channel)
        res.notes += notes
        if len(kept) < 2 or case_ids is None:
            res.notes.append(f"agreement on {site}: fewer than two members with usable predictions; skipped")
            continue
        if stack is not None:  # one block: today's single pass
            with one_blas_thread():
                sub = pairwise_agreement(stack, n_px, case_ids, metric)
        else:
            sub = _blocked(paths, kept, n_px, case_ids, metric, memory_gib, map_blocks or map, channel)
        full = np.full((len(res.member_ids),) * 2, np.nan)
        pos = np.array([index[k] for k in kept])
        full[np.ix_(pos, pos)] = sub
        res.matrices[site] = full
        res.roles[site] = role
        res.n_slices[site] = len(case_ids)
    return res
