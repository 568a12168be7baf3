"""Per-slice confusion counts: the only numbers a trial records (docs/architecture.md "Records").

Aggregations (2D Dice, 3D IoU, global Dice) live in ``trainables.records.metric_by`` so that the
trial's own per-epoch report and the analysis compute them from the same counts.
"""
from __future__ import annotations

import torch


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Count tp, fp, fn, tn per slice (and, with ``per_channel``, per label channel).

    Args:
        pred: ``B x H x W`` (or ``B x L x H x W``) binary prediction (bool or {0, 1}).
        target: same shape, binary ground truth.
        per_channel: count each of the L channels of ``B x L x H x W`` inputs apart.

    Returns:
        ``B x 4`` int64 tensor with columns tp, fp, fn, tn (on the inputs' device), the channels
        pooled; ``B x L x 4`` with ``per_channel``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if per_channel and pred.ndim != 4:
        raise ValueError(f"per_channel counts need B x L x H x W inputs, got shape {tuple(pred.shape)}")
    lead = tuple(pred.shape[:2]) if per_channel else (pred.shape[0],)
    p = pred.reshape(*lead, -1).bool()
    t = target.reshape(*lead, -1).bool()
    tp = (p & t).sum(-1)
    fp = (p & ~t).sum(-1)
    fn = (~p & t).sum(-1)
    tn = p.shape[-1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=-1).long()
