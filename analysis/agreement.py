"""Agreement between pool members: mean Dice between their predicted masks on a split (DESIGN §7).

The pool stage stores every member's binary predictions per evaluated site as packed bits
(``trainables.records.save_predictions``): one file per member and site, the same slices in the same
order for every member of one experiment. For one site, this module stacks the packed bits of all
members and computes the Dice of every pair on every slice with one matrix product per slice:
for a members x pixels 0/1 matrix ``X`` of one slice, ``X @ X.T`` holds the pairwise intersections
(and its diagonal the mask sizes). Only the pixels where at least one member predicts foreground
take part in the product, which keeps it small (masks are mostly background).

Agreement of members i and j on a split (the convention of ``records.metric_by("dice_2d")``, with
"at least one of the two masks non-empty" in place of "non-empty ground truth", since agreement
uses no labels): the mean over the split's slices where at least one of the two masks is non-empty
of ``2 |Pi ∩ Pj| / (|Pi| + |Pj|)``. Like dice_2d on a split without foreground, it is undefined
(NaN) for a pair that predicts nothing on every slice: two members that both fail to segment
anything would otherwise "agree perfectly" and lift each other's agreement. The matrix is
symmetric; a member's agreement with itself is 1 (NaN only if it predicts nothing anywhere).
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


def _shared_bits(bits: np.ndarray) -> np.ndarray:
    """Packed ``N x B`` mask of the pixels that at least two of the ``M x N x B`` members mark."""
    once = np.zeros(bits.shape[1:], dtype=np.uint8)
    twice = np.zeros_like(once)
    for member in bits:  # bitwise on packed bytes: M passes over N x B bytes, nothing unpacked
        twice |= once & member
        once |= member
    return twice


def _one_blas_thread() -> contextlib.AbstractContextManager:
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


def pairwise_dice(bits: np.ndarray, n_px: int) -> np.ndarray:
    """Mean Dice between every pair of members' masks over the slices of one split.

    Args:
        bits: ``M x N x B`` uint8, member m's packed mask of slice n in ``bits[m, n]``
            (``B * 8 >= n_px``, bits in ``np.packbits`` order, padding bits zero).
        n_px: pixels per slice (``H * W``).

    Returns:
        ``M x M`` float64, symmetric: the mean over slices where at least one of the two masks is
        non-empty of the per-slice Dice; NaN where both masks are empty on every slice (so the
        diagonal is 1 but for a member that predicts nothing anywhere).
    """
    bits = np.asarray(bits, dtype=np.uint8)
    if bits.ndim != 3 or bits.shape[2] * 8 < n_px:
        raise ValueError(f"bits must be members x slices x bytes with bytes * 8 >= n_px = {n_px}, "
                         f"got shape {bits.shape}")
    m, n, _ = bits.shape
    if n_px >= 2 ** 24:  # float32 counts are exact below 2**24 (the matrix products run in float32)
        raise ValueError(f"{n_px} pixels per slice is beyond exact float32 counts (2**24); downsample the masks")
    sizes = np.bitwise_count(bits).sum(axis=2, dtype=np.int64)  # M x N mask sizes
    # A pixel marked by a single member adds to no pairwise intersection: only the pixels that two
    # or more members mark enter the product (isolated false positives would otherwise widen it).
    shared = _shared_bits(bits)
    by_slice = np.ascontiguousarray(bits.transpose(1, 0, 2))  # N x M x B: one slice's masks contiguous
    dice_sum = np.zeros((m, m))
    for k in np.flatnonzero(sizes.any(axis=0)):  # a slice where every mask is empty adds nothing
        nz = np.flatnonzero(sizes[:, k])          # members with a non-empty mask: a pair with one
        a = sizes[nz, k].astype(np.float64)       # empty mask has Dice 0 there (adds 0 to the sum)
        cols = np.flatnonzero(shared[k])          # bytes holding a shared pixel
        if cols.size:
            keep = np.unpackbits(shared[k, cols]).astype(bool)
            rows = by_slice[k] if len(nz) == m else by_slice[k, nz]
            x = np.unpackbits(rows[:, cols], axis=1)[:, keep].astype(np.float32)  # nz x shared pixels
            inter = (x @ x.T).astype(np.float64)                                  # |Pi ∩ Pj|, i != j
        else:
            inter = np.zeros((len(nz), len(nz)))
        np.fill_diagonal(inter, a)
        inter /= np.add.outer(a, a)               # Dice / 2, in place
        if len(nz) == m:
            dice_sum += inter
        else:
            dice_sum[np.ix_(nz, nz)] += inter
    dice_sum *= 2.0
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
    """

    member_ids: list[str]
    matrices: dict[str, np.ndarray] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    n_slices: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

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


def _stack_site(paths: dict[str, Path], site: str) -> tuple[list[str], np.ndarray | None, int, list[str]]:
    """Stack the packed bits of the members whose file matches the first one's slices."""
    notes: list[str] = []
    ref: PackedPredictions | None = None
    ref_path: Path | None = None
    kept: list[str] = []
    stack: np.ndarray | None = None
    for mid, path in paths.items():
        try:
            p = read_packed(path)
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
        return [], None, 0, notes
    return kept, stack[: len(kept)], ref.n_px, notes


def agreement_matrices(experiment_dir: str | os.PathLike, member_ids: list[str],
                       site_roles: dict[str, str]) -> Agreement:
    """Pairwise agreement of ``member_ids`` on every site of ``site_roles``, from the stored predictions.

    Args:
        experiment_dir: the experiment directory (``records/predictions/<member_id>/<site>.npz``).
        member_ids: the pool members (rows and columns of the matrices, in this order).
        site_roles: site -> role (``"id"`` / ``"ood"``), e.g. from the slice records.
    Returns:
        An ``Agreement``; a site where fewer than two members have predictions gets no matrix
        (and a note), a member without a file on a site gets NaN there (and a note).
    """
    pdir = records_dir(experiment_dir) / "predictions"
    res = Agreement(member_ids=list(member_ids))
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
        kept, stack, n_px, notes = _stack_site({k: p for k, p in paths.items() if k not in missing}, site)
        res.notes += notes
        if len(kept) < 2 or stack is None:
            res.notes.append(f"agreement on {site}: fewer than two members with usable predictions; skipped")
            continue
        with _one_blas_thread():
            sub = pairwise_dice(stack, n_px)
        full = np.full((len(res.member_ids),) * 2, np.nan)
        pos = np.array([index[k] for k in kept])
        full[np.ix_(pos, pos)] = sub
        res.matrices[site] = full
        res.roles[site] = role
        res.n_slices[site] = int(stack.shape[1])
    return res
