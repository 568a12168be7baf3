"""Surface metrics per case (docs/experiment.md "Surface records"): HD95 and normalised surface Dice (NSD).

A member's predicted slices of a case are stacked back into the case's volume on the slice cache's
``S x S x D`` grid and scored against the cached ground truth with MONAI's
``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice`` at the grid's physical
spacing (the cache index's ``spacing_h, spacing_w, spacing_d``: mm, or native pixels for photographs
whose files carry no spacing). A case of one slice (a photograph) is scored in 2D: in 3D its single
slice would be all surface.

Empty masks (MONAI returns NaN for HD95 there, and NSD 0 or NaN):

* both empty (a lesion absent and not predicted): ``hd95_mm`` and ``nsd`` NaN, ``empty = "both"``;
  the analysis leaves such cases out of the mean, as ``dice_2d`` leaves out slices without foreground;
* one empty (``empty = "pred"``: nothing predicted, ``"truth"``: a false alarm): ``nsd`` 0 (MONAI's)
  and ``hd95_mm`` the diagonal of the case's volume in mm, the largest distance in it (the worst
  value, as Metrics Reloaded recommends instead of an infinite or missing one);
* else ``empty = "none"``.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import records
from .data.cache import SPACING_COLUMNS, SliceCache

#: The values of the ``empty`` column (see the module docstring).
EMPTY_VALUES = ("none", "pred", "truth", "both")


def case_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                tolerance_mm: float) -> tuple[float, float, str]:
    """``(hd95_mm, nsd, empty)`` of one binary volume (``H x W x D`` or ``H x W``) at ``spacing`` (one per axis).

    ``nsd`` counts boundary elements within ``tolerance_mm`` (MONAI ``class_thresholds=[tolerance_mm]``).
    Empty masks: see the module docstring.
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or len(spacing) != pred.ndim:
        raise ValueError(f"prediction {pred.shape}, truth {truth.shape} and spacing {tuple(spacing)} disagree")
    if pred.ndim == 3 and pred.shape[2] == 1:  # a photograph: its one slice would be all surface in 3D
        pred, truth, spacing = pred[..., 0], truth[..., 0], tuple(spacing)[:2]
    has_p, has_t = bool(pred.any()), bool(truth.any())
    if not has_p and not has_t:
        return math.nan, math.nan, "both"
    if not (has_p and has_t):
        diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
        return diagonal, 0.0, "pred" if not has_p else "truth"
    p = torch.from_numpy(pred)[None, None].float()  # MONAI: batch x channel x spatial, one-hot
    t = torch.from_numpy(truth)[None, None].float()
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument its own helpers still pass
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=sp)
        nsd = compute_surface_dice(p, t, [float(tolerance_mm)], include_background=True, spacing=sp)
    return float(hd.item()), float(nsd.item()), "none"


def case_spacing(cache: SliceCache, rows: np.ndarray) -> tuple[float, float, float]:
    """The cache grid's spacing of a case's ``rows`` (the index's ``SPACING_COLUMNS``); 1.0 each with a
    warning for a cache built before the columns existed (rebuild it: delete its folder)."""
    index = cache.index
    if not all(c in index.columns for c in SPACING_COLUMNS):
        warnings.warn(f"slice cache {cache.path} has no spacing columns (built by an older version): surface "
                      f"metrics use a spacing of 1 cache pixel; delete the folder to rebuild it with them",
                      UserWarning, stacklevel=3)
        return 1.0, 1.0, 1.0
    first = index.iloc[int(rows[0])]
    return tuple(float(first[c]) for c in SPACING_COLUMNS)  # type: ignore[return-value]


def surface_records(cache: SliceCache, site: str, role: str, rows: np.ndarray, pred: np.ndarray,
                    tolerance_mm: float) -> pd.DataFrame:
    """One row per case (and label) of ``rows`` (cache rows of ``site``; ``pred`` the member's masks of
    them, ``N x S x S`` or ``N x L x S x S``): ``records.SURFACE_COLUMNS`` without ``member_id``."""
    pred = np.asarray(pred, dtype=bool)
    rows = np.asarray(rows)
    if len(pred) != len(rows):
        raise ValueError(f"{len(pred)} predicted slices for {len(rows)} rows of site {site!r}")
    labels = cache.labels
    idx = cache.index.iloc[rows]
    cases = idx["case_id"].astype(str).to_numpy()
    order = np.lexsort((idx["slice_idx"].to_numpy(), cases))
    out = []
    for case in dict.fromkeys(cases[order]):
        sel = order[cases[order] == case]  # this case's positions in rows, in slice order
        spacing = case_spacing(cache, rows[sel])
        truth = np.asarray(cache.masks[rows[sel]], dtype=bool)
        p = pred[sel]
        if truth.ndim == 3:  # one label: D x S x S -> one channel
            truth, p = truth[:, None], p[:, None]
        for li, label in enumerate(labels):
            vol_p = np.moveaxis(p[:, li], 0, -1)  # S x S x D, the Case axes
            vol_t = np.moveaxis(truth[:, li], 0, -1)
            hd, nsd, empty = case_scores(vol_p, vol_t, spacing, tolerance_mm)
            out.append({"site": site, "role": role, "case_id": case, "label": label, "hd95_mm": hd, "nsd": nsd,
                        "empty": empty, "tolerance_mm": float(tolerance_mm), "spacing_h": spacing[0],
                        "spacing_w": spacing[1], "spacing_d": spacing[2]})
    return pd.DataFrame(out)


def member_surface(cache: SliceCache, sets, preds: dict, tolerance_mm: float | None) -> pd.DataFrame | None:
    """Every scored (non-validation) set's surface records of one member (``preds``: site -> masks of its
    rows); None when ``tolerance_mm`` is None (surface metrics turned off)."""
    if tolerance_mm is None:
        return None
    parts = [surface_records(cache, site, role, rows, np.asarray(preds[site]), tolerance_mm)
             for site, role, rows in sets if role != "val" and site in preds]
    return pd.concat(parts, ignore_index=True) if parts else None


def write_member_surface(exp, member_id: str, cache: SliceCache, sets, preds: dict,
                         tolerance_mm: float | None) -> None:
    """Compute and write a member's surface part (``records.write_surface_part``); nothing when turned off."""
    df = member_surface(cache, sets, preds, tolerance_mm)
    if df is not None:
        records.write_surface_part(exp, member_id, df.assign(member_id=member_id))
