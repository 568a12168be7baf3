"""Per-slice confusion counts: the only numbers a trial records (DESIGN §3).

Aggregations (2D Dice, 3D IoU, global Dice) live in ``trainables.records.metric_by`` so that the
trial's own per-epoch report and the analysis compute them from the same counts.
"""
from __future__ import annotations

import torch


def confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Count tp, fp, fn, tn per slice.

    Args:
        pred: ``B x H x W`` (or ``B x 1 x H x W``) binary prediction (bool or {0, 1}).
        target: same shape, binary ground truth.

    Returns:
        ``B x 4`` int64 tensor with columns tp, fp, fn, tn (on the inputs' device).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p = pred.reshape(pred.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = p.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).long()
