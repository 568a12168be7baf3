"""Mutually exclusive classes (``label_kind: exclusive``) trained as nnU-Net trains them (docs/models.md
"Several labels").

A slice cache says in its manifest how its L label channels relate (``label_kind``):

* no key: today's behaviour: one label is a binary sigmoid task, several labels are *overlapping* (the fundus
  lesions: one sigmoid per channel, ``trainables.dense.segmentation_loss``);
* ``"overlapping"``: the same, stated;
* ``"exclusive"``: every pixel is background or exactly one class (prostate zones, organs). With L >= 2 the
  member's net outputs L + 1 logits (background first), is trained with MONAI's ``DiceCELoss(softmax=True,
  to_onehot_y=True, include_background=False)`` (softmax cross-entropy over all L + 1 channels, Dice over the
  L classes, as nnU-Net's default loss) and predicts the argmax.

``ExclusiveClasses`` wraps such a net so that every stage after training sees what it sees for overlapping
labels: L channels whose "logit > 0" is the argmax prediction (``binary_logits``), so the predicted masks are
L binary channels that never overlap, and a sigmoid of them is a per-class confidence for TTA and MC dropout.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

#: The values of a slice cache manifest's ``label_kind`` key.
LABEL_KINDS = ("overlapping", "exclusive")


def label_kind(manifest: dict, where: str = "manifest.json") -> str:
    """``"binary"`` (one label), ``"overlapping"`` or ``"exclusive"`` (several) from a cache's manifest.

    A manifest without ``label_kind`` is read as before the key existed (several labels: overlapping); one label
    is always binary, whatever the key says. A value not in ``LABEL_KINDS`` is a ValueError naming ``where``.
    """
    kind = manifest.get("label_kind")
    if kind is not None and kind not in LABEL_KINDS:
        raise ValueError(f"{where}: label_kind {kind!r} is not one of {list(LABEL_KINDS)}; rebuild the slice cache "
                         f"(delete its folder) or fix the layout that wrote it")
    n_labels = len(manifest.get("labels") or ["foreground"])
    if n_labels == 1:
        return "binary"
    return kind or "overlapping"


def binary_logits(logits: torch.Tensor) -> torch.Tensor:
    """``B x (L+1) x H x W`` class logits (background first) -> ``B x L x H x W`` margins.

    Channel c is z_c - max_{k != c} z_k over all L + 1 logits: positive exactly where class c is the strict
    argmax (a tie, of measure zero, predicts none), so ``> 0`` gives the argmax prediction as L binary
    channels that never overlap; σ of it is p_c / (p_c + p_k) for the strongest competitor k.
    """
    top2 = logits.topk(2, dim=1).values
    others = torch.where(logits == top2[:, :1], top2[:, 1:2], top2[:, :1])  # max over the other channels
    return (logits - others)[:, 1:]


class ExclusiveClasses(nn.Module):
    """A net with L + 1 class logits, seen by the pool as L binary channels (``binary_logits``).

    ``class_net`` is the wrapped net (its L + 1 logits train the softmax loss); ``forward`` returns the margins.
    Its state dict is the wrapped net's under ``class_net.``; a member's checkpoint says ``label_kind:
    exclusive`` and ``classes: L + 1`` so that ``trainables.dense.load_dense_member`` rebuilds the wrapper.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.class_net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binary_logits(self.class_net(x))


def class_index(masks: torch.Tensor) -> torch.Tensor:
    """``B x L x H x W`` exclusive binary masks -> ``B x 1 x H x W`` class indices (0 background, c for label c)."""
    weights = torch.arange(1, masks.shape[1] + 1, device=masks.device, dtype=masks.dtype)
    return (masks * weights[None, :, None, None]).amax(1, keepdim=True)


def exclusive_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """nnU-Net's loss on ``B x (L+1) x H x W`` logits and ``B x L x H x W`` binary targets.

    MONAI's ``DiceCELoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)``: the
    cross-entropy over all L + 1 channels, the Dice over the L classes (nnU-Net leaves the background out of its
    Dice), computed over the whole batch as the sigmoid loss is (``trainables.dense.segmentation_loss``).
    """
    from monai.losses import DiceCELoss

    loss = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(logits, class_index(target))
    return fn


def check_exclusive(masks: np.ndarray, where: str) -> None:
    """ValueError naming ``where`` when the ``N x L x H x W`` masks overlap (a pixel in two classes)."""
    overlap = np.asarray(masks).sum(1, dtype=np.int64) > 1
    if overlap.any():
        n = int(overlap.reshape(len(overlap), -1).any(1).sum())
        raise ValueError(f"{where}: label_kind is 'exclusive' but {n} slice(s) have pixels in two or more label "
                         f"channels; set label_kind: overlapping for such data (one sigmoid per label), or fix the "
                         f"layout's masks")
