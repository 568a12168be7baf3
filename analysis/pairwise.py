"""The arithmetic of the pool's pairwise agreement (``analysis.agreement`` explains the metrics): packed
predictions, per-slice intersections by one matrix product, and sums over blocks of cases that add up to a
split's agreement (``partial_agreement`` / ``add_partials`` / ``finish_agreement``), so that a large pool is
computed a block at a time (``analysis.agreement.agreement_matrices``' ``memory_gib``)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

#: Keys of a predictions file (``trainables.records.save_predictions``).
PRED_KEYS = ("bits", "shape", "case_id", "slice_idx")


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
        missing = [k for k in PRED_KEYS if k not in z.files]
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


def shared_bits(bits: np.ndarray) -> np.ndarray:
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


def check_bits(bits: np.ndarray, n_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate the ``M x N x B`` packed stack; return it (uint8) and its ``M x N`` mask sizes."""
    bits = np.asarray(bits, dtype=np.uint8)
    if bits.ndim != 3 or bits.shape[2] * 8 < n_px:
        raise ValueError(f"bits must be members x slices x bytes with bytes * 8 >= n_px = {n_px}, "
                         f"got shape {bits.shape}")
    if n_px >= 2 ** 24:  # float32 counts are exact below 2**24 (the matrix products run in float32)
        raise ValueError(f"{n_px} pixels per slice is beyond exact float32 counts (2**24); downsample the masks")
    return bits, np.bitwise_count(bits).sum(axis=2, dtype=np.int64)


def prepare_stack(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(shared, by_slice)`` for ``slice_intersections``, computed once per stack."""
    # A pixel marked by a single member adds to no pairwise intersection: only the pixels that two
    # or more members mark enter the product (isolated false positives would otherwise widen it).
    return shared_bits(bits), np.ascontiguousarray(bits.transpose(1, 0, 2))  # N x M x B: a slice contiguous


def slice_intersections(prep: tuple[np.ndarray, np.ndarray], sizes: np.ndarray, slices: np.ndarray | None = None):
    """Yield ``(k, nz, inter)`` per slice ``k`` (of ``slices``, default all) where some mask is non-empty.

    ``prep``: ``prepare_stack(bits)``. ``nz``: the members with a non-empty mask on slice k (a pair with one
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


def add_block(acc: np.ndarray, nz: np.ndarray, block: np.ndarray) -> None:
    if len(nz) == len(acc):
        acc += block
    else:
        acc[np.ix_(nz, nz)] += block


def symmetrised(total: np.ndarray, count: np.ndarray) -> np.ndarray:
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


def case_codes(case_ids: np.ndarray | list[str] | None, n: int) -> np.ndarray:
    """``n`` int codes of the slices' cases (their rank among the sorted case ids; all 0 without case ids)."""
    cases = np.zeros(n, dtype=np.int64) if case_ids is None else np.unique(np.asarray(case_ids, dtype=str),
                                                                             return_inverse=True)[1].ravel()
    if len(cases) != n:
        raise ValueError(f"case_ids has {len(cases)} entries for {n} slices")
    return cases


def partial_agreement(bits: np.ndarray, n_px: int, cases: np.ndarray | None, metric: str) -> dict[str, np.ndarray]:
    """The sums ``finish_agreement`` turns into the agreement, over the slices of ``bits`` (``M x N x B``).

    Every sum is additive over whole cases: the agreement of a split is ``finish_agreement`` of the
    ``add_partials`` of its blocks of cases (``cases``: the slices' case codes, ``case_codes``, None: one case;
    a block must hold every slice of its cases for ``iou_3d``).
    """
    bits, sizes = check_bits(bits, n_px)
    m, n, _ = bits.shape
    if metric in ("dice_2d", "mask_dice"):
        total = np.zeros((m, m))
        for _, nz, inter in slice_intersections(prepare_stack(bits), sizes):
            a = np.diag(inter).copy()
            add_block(total, nz, 2.0 * inter / np.add.outer(a, a))
        if metric == "dice_2d":
            return {"total": total, "count": (sizes > 0).sum(axis=1)}
        # Slices a pair counts: all but those where both masks are empty (E.T @ E counts those; E is
        # slices x members, 1 where the member's mask is empty; exact in float64).
        empty = (sizes == 0).astype(np.float64).T
        return {"total": total, "n_slices": n - empty.T @ empty}
    cases = np.zeros(n, dtype=np.int64) if cases is None else np.asarray(cases)
    order = np.argsort(cases, kind="stable")
    bounds = np.flatnonzero(np.diff(cases[order])) + 1
    total = np.zeros((m, m))
    count = np.zeros(m, dtype=np.int64)
    sum_sizes = np.zeros(m)
    prep = prepare_stack(bits)
    for group in np.split(order, bounds):
        inter_c = np.zeros((m, m))
        for _, nz, inter in slice_intersections(prep, sizes, group):
            add_block(inter_c, nz, inter)
        s = np.diag(inter_c).copy()                # the members' mask sizes in this case
        if metric == "dice_global":
            total += inter_c
            sum_sizes += s
            continue
        union = np.add.outer(s, s) - inter_c
        with np.errstate(invalid="ignore", divide="ignore"):
            total += np.divide(inter_c, union, out=np.zeros_like(union), where=union > 0)
        count += s > 0
    return {"total": total, "sum_sizes": sum_sizes} if metric == "dice_global" else {"total": total, "count": count}


def add_partials(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sums of two blocks (``partial_agreement``); ``a`` None: ``b`` itself."""
    return b if a is None else {k: a[k] + b[k] for k in a}


def finish_agreement(acc: dict[str, np.ndarray], metric: str) -> np.ndarray:
    """The ``M x M`` agreement from the split's sums (``partial_agreement``, ``add_partials``)."""
    if metric == "dice_global":
        den = np.add.outer(acc["sum_sizes"], acc["sum_sizes"])
        return np.divide(2.0 * acc["total"], den, out=np.full_like(den, np.nan), where=den > 0)
    if metric == "mask_dice":
        n_slices = acc["n_slices"]
        return np.divide(acc["total"], n_slices, out=np.full_like(acc["total"], np.nan), where=n_slices > 0)
    return symmetrised(acc["total"], acc["count"])


def check_agreement_metric(metric: str) -> None:
    if metric not in AGREEMENT_METRICS:
        raise ValueError(f"unknown agreement metric {metric!r}; valid metrics: {', '.join(AGREEMENT_METRICS)}")


def pairwise_agreement(bits: np.ndarray, n_px: int, case_ids: np.ndarray | list[str] | None = None,
                       metric: str = "iou_3d") -> np.ndarray:
    """Agreement of every pair of members on one split, on the scale of the performance ``metric``.

    Args:
        bits: ``M x N x B`` uint8, member m's packed mask of slice n in ``bits[m, n]``
            (``B * 8 >= n_px``, bits in ``np.packbits`` order, padding bits zero).
        n_px: pixels per slice (``H * W``).
        case_ids: ``N`` case ids (``iou_3d`` merges a case's slices; default: one case).
        metric: one of ``AGREEMENT_METRICS`` (see ``analysis.agreement``'s docstring).

    Returns:
        ``M x M`` float64, symmetric; the diagonal is 1 but for a member that predicts nothing.

    Raises:
        ValueError: an unknown metric (the message lists the valid ones) or a malformed stack.
    """
    check_agreement_metric(metric)
    cases = (case_codes(case_ids, np.shape(bits)[1]) if metric in ("iou_3d", "dice_global") and np.ndim(bits) == 3
             else None)
    return finish_agreement(partial_agreement(bits, n_px, cases, metric), metric)


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
    return finish_agreement(partial_agreement(bits, n_px, None, "mask_dice"), "mask_dice")
