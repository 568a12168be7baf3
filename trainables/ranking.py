"""How well an uncertainty map ranks the error pixels (AUROC, AP) in bounded memory: binned scores on the trial's
device (docs/uncertainty.md "Scoring a large split").

The exact path (``uncertainty_scoring.error_ranking``: sklearn over every pixel in float64) sorts every pixel of
a site at once: a 10,000-slice 256² split is 655 M pixels, about 5 GB per float64 copy, several such copies
during the sort. The binned path here counts the error and the correct pixels per score bin, a batch of slices
at a time, on the trial's device: its memory is the batch plus ``bins`` counters, whatever the split's size.

Why a histogram of our own and not torchmetrics' ``BinaryAUROC(thresholds=N)``: torchmetrics compares every
pixel with every threshold (O(pixels x thresholds) per update: 655 M x 65,536 comparisons for one site) and
needs scores in [0, 1] (it squashes others with a sigmoid, which crowds a variance map's values into a few
thresholds). ``torch.bucketize`` against edges at the score distribution's quantiles costs O(pixels x log bins)
and spreads the pixels evenly over the bins whatever the scores' scale.

The error, stated and returned: binning changes only the order within a bin (its pixels tie). For AUROC
the pairs (error pixel, correct pixel) that share a bin count 1/2 instead of their true 0 or 1, so
``|binned - exact| <= 1/2 * sum_b pos_b * neg_b / (P * N)`` over the bins that hold more than one value
(``Ranking.auroc_bound``), computed from the counts themselves; with quantile edges each bin holds about 1/bins of the pixels, so the bound is about
1/(2 bins) of the correct pixels' share in the busiest bin (about 1e-5 with the default 65,536 bins). AP has no such closed bound; tests/test_ranking.py measures it against sklearn (≤ 0.005).
Exact ties (a constant background) are ties in both: a value that fills several quantiles gets a bin of
its own, which adds nothing to the bound.

``binned_error_rankings`` adds a second pair of histograms for a subset of the pixels (the error band:
docs/uncertainty.md "Error ranking in a band"), on the same edges and in the same pass; its bound comes from
its own counts, so it is stated the same way (it grows where the subset's scores crowd into few bins).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

#: Bins of the binned ranking (edges at the quantiles of a sample of the site's scores).
BINS = 1 << 16
#: Scores sampled (a fixed seed of its own: the trial's generator is left untouched) to place the bin edges.
SAMPLE = 1 << 22
#: ``scoring: auto`` ranks exactly up to this many pixels per site (sklearn's float64 sort: about 1 GB there),
#: binned above (a 512-slice 256² split is 33.6 M pixels).
EXACT_MAX_PIXELS = 1 << 25
#: Pixels per device batch of the binned ranking (16 MiB of float32 scores, 32 MiB of int64 bin indices).
BATCH_PIXELS = 1 << 22
SCORING_MODES = ("auto", "exact", "binned")


@dataclass(frozen=True)
class Ranking:
    """AUROC and AP of a score for a binary label, with the binning's AUROC error bound (0 when exact)."""

    auroc: float
    ap: float
    auroc_bound: float = 0.0
    #: the pixels ranked: error (positives) and correct ones (binned path; -1 where not counted)
    positives: int = -1
    negatives: int = -1


def bin_edges(maps: np.ndarray, bins: int = BINS, sample: int = SAMPLE) -> np.ndarray:
    """Ascending, distinct float32 edges at the quantiles of a sample of ``maps``' values."""
    flat = np.asarray(maps).reshape(-1)
    if flat.size > sample:
        # with replacement: O(sample) memory (without, numpy may permute the whole index range)
        flat = flat[np.sort(np.random.default_rng(0).integers(0, flat.size, size=sample))]
    vals = np.asarray(flat, dtype=np.float64)
    if not np.isfinite(vals).all():
        raise ValueError(f"uncertainty map has {int((~np.isfinite(vals)).sum())} non-finite values among the "
                         f"sampled pixels")
    q, count = np.unique(np.quantile(vals, np.linspace(0.0, 1.0, bins + 1)[1:-1]).astype(np.float32),
                         return_counts=True)
    # a value that fills several quantiles (a constant background) gets a bin of its own, (nextafter(v), v]:
    # its pixels tie in the exact ranking too, so that bin adds nothing to the error bound (``single_value``)
    below = np.nextafter(q[count > 1], np.float32(-np.inf))
    return np.unique(np.concatenate([q, below]))


def single_value_bins(edges: np.ndarray) -> np.ndarray:
    """Bool per bin of ``edges`` (``len(edges) + 1`` bins): the bin holds a single float32 value."""
    e = np.asarray(edges, dtype=np.float32)
    out = np.zeros(len(e) + 1, dtype=bool)
    out[1:-1] = e[:-1] == np.nextafter(e[1:], np.float32(-np.inf))
    return out


class BinnedRanking:
    """Error and correct pixels counted per score bin (``bin_edges``), batch by batch, on ``device``."""

    def __init__(self, edges: np.ndarray, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.edges = torch.as_tensor(np.asarray(edges, dtype=np.float32), device=self.device)
        n = len(self.edges) + 1
        self.pos = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.neg = torch.zeros(n, dtype=torch.int64, device=self.device)

    def update(self, scores, labels) -> None:
        """Add a batch: ``scores`` (any shape, float) and ``labels`` (same shape, bool: error pixels)."""
        s = torch.as_tensor(np.asarray(scores) if not torch.is_tensor(scores) else scores)
        y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        s = s.to(self.device, dtype=torch.float32).reshape(-1)
        y = y.to(self.device, dtype=torch.bool).reshape(-1)
        if not torch.isfinite(s).all():
            raise ValueError(f"uncertainty map has {int((~torch.isfinite(s)).sum())} non-finite values")
        b = torch.bucketize(s, self.edges)  # equal scores share a bin: ties stay ties
        n = len(self.pos)
        self.pos += torch.bincount(b[y], minlength=n)
        self.neg += torch.bincount(b[~y], minlength=n)

    def compute(self) -> Ranking:
        """AUROC (ties count 1/2, as sklearn's), AP (sklearn's step sum over the bins' thresholds) and the bound."""
        pos = self.pos.cpu().numpy().astype(np.float64)
        neg = self.neg.cpu().numpy().astype(np.float64)
        p, n = pos.sum(), neg.sum()
        counts = {"positives": int(p), "negatives": int(n)}
        if p == 0 or n == 0:
            return Ranking(math.nan, math.nan, math.nan, **counts)
        neg_below = np.cumsum(neg) - neg
        auroc = float((pos * (neg_below + 0.5 * neg)).sum() / (p * n))
        mixed = ~single_value_bins(self.edges.cpu().numpy())  # a single-value bin's pairs tie in the exact one too
        bound = float(0.5 * (pos * neg)[mixed].sum() / (p * n))
        tp = np.cumsum(pos[::-1])          # predicted "error" at or above each bin, highest bin first
        fp = np.cumsum(neg[::-1])
        keep = pos[::-1] > 0               # a bin without error pixels adds no recall
        ap = float((pos[::-1][keep] / p * tp[keep] / (tp[keep] + fp[keep])).sum())
        return Ranking(auroc, ap, bound, **counts)


def binned_error_ranking(maps: np.ndarray, error: np.ndarray, device: torch.device | str = "cpu",
                         bins: int = BINS, batch_pixels: int = BATCH_PIXELS) -> Ranking:
    """(AUROC, AP, bound) of ``maps`` (``N x H x W``) for the ``error`` pixels, binned (module docstring).

    Slices go to ``device`` a batch at a time (about ``batch_pixels`` pixels); nothing of the split's size
    is copied. NaN when every pixel, or none, is an error.
    """
    return binned_error_rankings(maps, error, None, device, bins, batch_pixels)[0]


def binned_error_rankings(maps: np.ndarray, error: np.ndarray, within: Callable[[int, int], np.ndarray] | None,
                          device: torch.device | str = "cpu", bins: int = BINS, batch_pixels: int = BATCH_PIXELS
                          ) -> tuple[Ranking, Ranking | None]:
    """``binned_error_ranking`` over every pixel and, with ``within``, over a subset of them, in one pass.

    ``within(start, stop)``: the bool ``(stop - start) x H x W`` mask of the pixels of slices ``start:stop``
    the second ranking counts (the error band, ``uncertainty.scoring.error_band``); it is asked a batch at a
    time, so the subset's memory is a batch's too. Its pixels go into histograms of their own on the same bin
    edges (the whole map's quantiles), and its bound is computed from its own counts. The whole-map ranking
    is the same computation as without ``within``.
    """
    maps, error = np.asarray(maps), np.asarray(error)
    if maps.shape != error.shape:
        raise ValueError(f"uncertainty maps {maps.shape} and error masks {error.shape} differ in shape")
    if not maps.size:
        empty = Ranking(math.nan, math.nan, math.nan, 0, 0)
        return empty, (empty if within is not None else None)
    edges = bin_edges(maps, bins)
    acc = BinnedRanking(edges, device)
    sub = BinnedRanking(edges, device) if within is not None else None
    per = max(1, batch_pixels // max(1, int(np.prod(maps.shape[1:])))) if maps.ndim > 1 else batch_pixels
    for i in range(0, len(maps), per):
        m, e = maps[i:i + per], error[i:i + per]
        acc.update(m, e)
        if sub is not None:
            keep = np.asarray(within(i, i + len(m)), dtype=bool)
            if keep.shape != m.shape:
                raise ValueError(f"the band of slices {i}:{i + len(m)} is {keep.shape}, the maps {m.shape}")
            sub.update(m[keep], e[keep])
    return acc.compute(), (sub.compute() if sub is not None else None)


def scoring_mode(mode: str, n_pixels: int) -> str:
    """``"exact"`` or ``"binned"`` for a site of ``n_pixels``: ``auto`` is exact up to ``EXACT_MAX_PIXELS``."""
    if mode not in SCORING_MODES:
        raise ValueError(f"uncertainty scoring {mode!r} is not one of {', '.join(SCORING_MODES)}")
    if mode == "auto":
        return "exact" if n_pixels <= EXACT_MAX_PIXELS else "binned"
    return mode
