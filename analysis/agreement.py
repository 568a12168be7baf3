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
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.records import records_dir

#: Keys of a predictions file (``trainables.records.save_predictions``).
_PRED_KEYS = ("bits", "shape", "case_id", "slice_idx")


@dataclass
class PackedPredictions:
    """One member's predictions on one site, still packed (``save_predictions``' layout).

    Attributes:
        bits: ``N x ceil(H*W/8)`` uint8, one row of packed bits per slice.
        shape: ``(N, H, W)``.
        case_id: ``N`` case ids.
        slice_idx: ``N`` slice indices.
    """

    bits: np.ndarray
    shape: tuple[int, ...]
    case_id: np.ndarray
    slice_idx: np.ndarray

    @property
    def n_px(self) -> int:
        return int(np.prod(self.shape[1:]))


def read_packed(path: str | os.PathLike) -> PackedPredictions:
    """Read a predictions file without unpacking its bits.

    ``trainables.records.load_predictions`` unpacks every slice to a bool array (8x the bytes);
    the agreement of a large pool keeps every member's bits packed and unpacks only the bytes
    that two members share, so it reads the file's arrays directly (the layout
    ``save_predictions`` writes).

    Raises:
        ValueError: the file lacks one of the keys ``save_predictions`` writes, or its arrays
            disagree in length.
    """
    with np.load(path) as z:
        missing = [k for k in _PRED_KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not a predictions file of trainables.records.save_predictions (missing keys "
                             f"{missing}, found {sorted(z.files)}); rewrite it with save_predictions or delete it")
        p = PackedPredictions(bits=z["bits"], shape=tuple(int(s) for s in z["shape"]),
                              case_id=z["case_id"].astype(str), slice_idx=z["slice_idx"].astype(np.int64))
    n = p.shape[0] if p.shape else -1
    if not (len(p.bits) == len(p.case_id) == len(p.slice_idx) == n) or p.bits.shape[1] * 8 < p.n_px:
        raise ValueError(f"{path}: inconsistent predictions file (shape {p.shape}, bits {p.bits.shape}, "
                         f"{len(p.case_id)} case ids, {len(p.slice_idx)} slice indices); rewrite it with "
                         f"trainables.records.save_predictions")
    return p


def label_channel(p: PackedPredictions, channel: int, path: str | os.PathLike) -> PackedPredictions:
    """Label ``channel`` of multi-label predictions (``N x L x H x W``) as ``N x H x W``, still packed.

    The slice's bits hold the L channels one after another; when H*W is a multiple of 8 the channel is a byte
    range of each row, otherwise it is unpacked and packed again. A ValueError names the file when it holds one
    label only or fewer channels.
    """
    if len(p.shape) != 4 or not 0 <= channel < p.shape[1]:
        raise ValueError(f"{path}: predictions of shape {p.shape} have no label channel {channel} (multi-label "
                         f"predictions are N x L x H x W)")
    hw = int(np.prod(p.shape[2:]))
    if hw % 8 == 0:
        bits = p.bits[:, channel * hw // 8:(channel + 1) * hw // 8]
    else:
        flat = np.unpackbits(p.bits, axis=1, count=p.shape[1] * hw)
        bits = np.packbits(flat[:, channel * hw:(channel + 1) * hw], axis=1)
    return PackedPredictions(bits=np.ascontiguousarray(bits), shape=(p.shape[0], *p.shape[2:]), case_id=p.case_id,
                             slice_idx=p.slice_idx)


def _shared_bits(bits: np.ndarray) -> np.ndarray:
    """Packed ``N x B`` mask of the pixels that at least two of the ``M x N x B`` members mark."""
    once = np.zeros(bits.shape[1:], dtype=np.uint8)
    twice = np.zeros_like(once)
    for member in bits:  # bitwise on packed bytes: M passes over N x B bytes, nothing unpacked
        twice |= once & member
        once |= member
    return twice


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread while the many small products run (``threadpoolctl`` if installed).

    The products are small (members x a few hundred pixels): threads gain nothing there, and on a
    busy machine (Ray workers beside the driver) spinning BLAS threads made one split 2.5x slower
    in our measurement (14.5 s against 5.8 s with two competing processes on 2 cores).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it the products run with BLAS's own thread count
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


#: Agreement metrics: ``trainables.records.METRICS`` (the performance scale) and the earlier ``mask_dice``.
AGREEMENT_METRICS = ("iou_3d", "dice_2d", "dice_global", "mask_dice")


def _check_bits(bits: np.ndarray, n_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate the ``M x N x B`` packed stack; return it (uint8) and its ``M x N`` mask sizes."""
    bits = np.asarray(bits, dtype=np.uint8)
    if bits.ndim != 3 or bits.shape[2] * 8 < n_px:
        raise ValueError(f"bits must be members x slices x bytes with bytes * 8 >= n_px = {n_px}, "
                         f"got shape {bits.shape}")
    if n_px >= 2 ** 24:  # float32 counts are exact below 2**24 (the matrix products run in float32)
        raise ValueError(f"{n_px} pixels per slice is beyond exact float32 counts (2**24); downsample the masks")
    return bits, np.bitwise_count(bits).sum(axis=2, dtype=np.int64)


def _prepare(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(shared, by_slice)`` for ``_slice_intersections``, computed once per stack."""
    # A pixel marked by a single member adds to no pairwise intersection: only the pixels that two
    # or more members mark enter the product (isolated false positives would otherwise widen it).
    return _shared_bits(bits), np.ascontiguousarray(bits.transpose(1, 0, 2))  # N x M x B: a slice contiguous


def _slice_intersections(prep: tuple[np.ndarray, np.ndarray], sizes: np.ndarray, slices: np.ndarray | None = None):
    """Yield ``(k, nz, inter)`` per slice ``k`` (of ``slices``, default all) where some mask is non-empty.

    ``prep``: ``_prepare(bits)``. ``nz``: the members with a non-empty mask on slice k (a pair with one
    empty mask has tp = 0 there); ``inter``: ``len(nz) x len(nz)`` float64, ``|Pi ∩ Pj|`` off the
    diagonal, ``|Pi|`` on it.
    """
    shared, by_slice = prep
    m = by_slice.shape[1]
    ks = np.flatnonzero(sizes.any(axis=0)) if slices is None else [k for k in slices if sizes[:, k].any()]
    for k in ks:
        nz = np.flatnonzero(sizes[:, k])
        cols = np.flatnonzero(shared[k])          # bytes holding a shared pixel
        if cols.size:
            keep = np.unpackbits(shared[k, cols]).astype(bool)
            rows = by_slice[k] if len(nz) == m else by_slice[k, nz]
            x = np.unpackbits(rows[:, cols], axis=1)[:, keep].astype(np.float32)  # nz x shared pixels
            inter = (x @ x.T).astype(np.float64)                                  # |Pi ∩ Pj|, i != j
        else:
            inter = np.zeros((len(nz), len(nz)))
        np.fill_diagonal(inter, sizes[nz, k].astype(np.float64))
        yield k, nz, inter


def _add(acc: np.ndarray, nz: np.ndarray, block: np.ndarray) -> None:
    if len(nz) == len(acc):
        acc += block
    else:
        acc[np.ix_(nz, nz)] += block


def _symmetrised(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mean of ``total[i, j] / count[j]`` (i scored against j) and ``total[i, j] / count[i]`` (j against i).

    ``total`` is symmetric: the sum of the per-unit score over the units where either mask is
    non-empty (a unit where only one is non-empty scores 0, so the sum over the units where the
    "truth" is non-empty is the same). ``count[j]``: units where j is non-empty.
    """
    c = count.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(c[None, :] > 0, total / np.where(c > 0, c, 1.0)[None, :], np.nan)  # i against j
        both = np.stack([d, d.T])
        ok = np.isfinite(both)
        n = ok.sum(axis=0)
        return np.divide(np.where(ok, both, 0.0).sum(axis=0), n, out=np.full(total.shape, np.nan), where=n > 0)


def pairwise_agreement(bits: np.ndarray, n_px: int, case_ids: np.ndarray | list[str] | None = None,
                       metric: str = "iou_3d") -> np.ndarray:
    """Agreement of every pair of members on one split, on the scale of the performance ``metric``.

    Args:
        bits: ``M x N x B`` uint8, member m's packed mask of slice n in ``bits[m, n]``
            (``B * 8 >= n_px``, bits in ``np.packbits`` order, padding bits zero).
        n_px: pixels per slice (``H * W``).
        case_ids: ``N`` case ids (``iou_3d`` merges a case's slices; default: one case).
        metric: one of ``AGREEMENT_METRICS`` (see the module docstring).

    Returns:
        ``M x M`` float64, symmetric; the diagonal is 1 but for a member that predicts nothing.

    Raises:
        ValueError: an unknown metric (the message lists the valid ones) or a malformed stack.
    """
    if metric not in AGREEMENT_METRICS:
        raise ValueError(f"unknown agreement metric {metric!r}; valid metrics: {', '.join(AGREEMENT_METRICS)}")
    if metric == "mask_dice":
        return pairwise_dice(bits, n_px)
    bits, sizes = _check_bits(bits, n_px)
    m, n, _ = bits.shape
    if metric == "dice_2d":
        total = np.zeros((m, m))
        for _, nz, inter in _slice_intersections(_prepare(bits), sizes):
            a = np.diag(inter).copy()
            _add(total, nz, 2.0 * inter / np.add.outer(a, a))
        return _symmetrised(total, (sizes > 0).sum(axis=1))
    cases = np.zeros(n, dtype=np.int64) if case_ids is None else np.unique(np.asarray(case_ids, dtype=str),
                                                                             return_inverse=True)[1].ravel()
    if len(cases) != n:
        raise ValueError(f"case_ids has {len(cases)} entries for {n} slices")
    order = np.argsort(cases, kind="stable")
    bounds = np.flatnonzero(np.diff(cases[order])) + 1
    total = np.zeros((m, m))
    count = np.zeros(m, dtype=np.int64)
    sum_sizes = np.zeros(m)
    prep = _prepare(bits)
    for group in np.split(order, bounds):
        inter_c = np.zeros((m, m))
        for _, nz, inter in _slice_intersections(prep, sizes, group):
            _add(inter_c, nz, inter)
        s = np.diag(inter_c).copy()                # the members' mask sizes in this case
        if metric == "dice_global":
            total += inter_c
            sum_sizes += s
            continue
        union = np.add.outer(s, s) - inter_c
        with np.errstate(invalid="ignore", divide="ignore"):
            total += np.divide(inter_c, union, out=np.zeros_like(union), where=union > 0)
        count += s > 0
    if metric == "dice_global":
        den = np.add.outer(sum_sizes, sum_sizes)
        return np.divide(2.0 * total, den, out=np.full_like(den, np.nan), where=den > 0)
    return _symmetrised(total, count)


def pairwise_dice(bits: np.ndarray, n_px: int) -> np.ndarray:
    """Mean Dice between every pair of members' masks over the slices of one split (``mask_dice``).

    Args:
        bits: ``M x N x B`` uint8, member m's packed mask of slice n in ``bits[m, n]``
            (``B * 8 >= n_px``, bits in ``np.packbits`` order, padding bits zero).
        n_px: pixels per slice (``H * W``).

    Returns:
        ``M x M`` float64, symmetric: the mean over slices where at least one of the two masks is
        non-empty of the per-slice Dice; NaN where both masks are empty on every slice (so the
        diagonal is 1 but for a member that predicts nothing anywhere).
    """
    bits, sizes = _check_bits(bits, n_px)
    m, n, _ = bits.shape
    dice_sum = np.zeros((m, m))
    for _, nz, inter in _slice_intersections(_prepare(bits), sizes):
        a = np.diag(inter).copy()
        _add(dice_sum, nz, 2.0 * inter / np.add.outer(a, a))
    # Slices a pair counts: all but those where both masks are empty (E.T @ E counts those; E is
    # slices x members, 1 where the member's mask is empty; exact in float64).
    empty = (sizes == 0).astype(np.float64).T
    n_slices = n - empty.T @ empty
    return np.divide(dice_sum, n_slices, out=np.full_like(dice_sum, np.nan), where=n_slices > 0)


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


def _stack_site(paths: dict[str, Path], site: str, channel: int | None = None
                ) -> tuple[list[str], np.ndarray | None, int, list[str], np.ndarray | None]:
    """Stack the packed bits of the members whose file matches the first one's slices (and its case ids);
    ``channel``: that label channel of multi-label predictions only (``label_channel``)."""
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
            stack = np.empty((len(paths),) + p.bits.shape, dtype=np.uint8)
        elif (p.shape != ref.shape or p.bits.shape != ref.bits.shape or not np.array_equal(p.case_id, ref.case_id)
              or not np.array_equal(p.slice_idx, ref.slice_idx)):
            notes.append(f"agreement on {site}: skipped member {mid}: {path} holds other slices than {ref_path} "
                         f"(shape {p.shape} vs {ref.shape}, or different case_id/slice_idx order); every member "
                         f"must store the same slices in the same order (rerun its pool trial)")
            continue
        stack[len(kept)] = p.bits
        kept.append(mid)
    if ref is None or stack is None:
        return [], None, 0, notes, None
    return kept, stack[: len(kept)], ref.n_px, notes, ref.case_id


def agreement_matrices(experiment_dir: str | os.PathLike, member_ids: list[str],
                       site_roles: dict[str, str], metric: str = "iou_3d", channel: int | None = None) -> Agreement:
    """Pairwise agreement of ``member_ids`` on every site of ``site_roles``, from the stored predictions.

    Args:
        experiment_dir: the experiment directory (``records/predictions/<member_id>/<site>.npz``).
        member_ids: the pool members (rows and columns of the matrices, in this order).
        site_roles: site -> role (``"id"`` / ``"ood"``), e.g. from the slice records.
        metric: the agreement metric (``AGREEMENT_METRICS``): the performance metric, so that
            agreement and performance are on one scale.
        channel: for multi-label predictions, the agreement of this label channel only (``label_channel``);
            None: every channel's pixels together (one pooled mask, as before).
    Returns:
        An ``Agreement``; a site where fewer than two members have predictions gets no matrix
        (and a note), a member without a file on a site gets NaN there (and a note).
    """
    pdir = records_dir(experiment_dir) / "predictions"
    if metric not in AGREEMENT_METRICS:
        raise ValueError(f"unknown agreement metric {metric!r}; valid metrics: {', '.join(AGREEMENT_METRICS)}")
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
                                                            channel)
        res.notes += notes
        if len(kept) < 2 or stack is None:
            res.notes.append(f"agreement on {site}: fewer than two members with usable predictions; skipped")
            continue
        with one_blas_thread():
            sub = pairwise_agreement(stack, n_px, case_ids, metric)
        full = np.full((len(res.member_ids),) * 2, np.nan)
        pos = np.array([index[k] for k in kept])
        full[np.ix_(pos, pos)] = sub
        res.matrices[site] = full
        res.roles[site] = role
        res.n_slices[site] = int(stack.shape[1])
    return res
